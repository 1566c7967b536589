"""The TensorRT session's host-side logic on the CPU: profile choice, ping-pong buffer sets, device
state handles (used in place, copied to the host only when read or before their buffers are reused).

The device is a host-memory stand-in (:class:`HostDevice`: malloc / copies over bytearrays) and the
engine's ``execute`` runs the same exported model with ONNX Runtime on the bytes it finds at the
bound addresses, so every number compared here is a real model output; what is *not* exercised is
TensorRT itself and CUDA: ``bench/gpu_suite.py`` runs the real session when a GPU is lent.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOL_SHORT, assert_rel_close, export_cached, random_ids, tiny_config, tiny_model

from trellis_export.runtime import InputError, StateError, open_session
from trellis_export.runtime.trt_backend import DeviceState, Profile, TrtSession, choose_profile
from trellis_export.state import state_spec


class HostDevice:
    """Device memory as bytearrays keyed by fake addresses."""

    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}
        self.next = 4096
        self.copies = {"h2d": 0, "d2h": 0}
        self.stream = 0

    def malloc(self, nbytes: int) -> int:
        ptr = self.next
        self.mem[ptr] = bytearray(max(nbytes, 1))
        self.next += max(nbytes, 1) + 256
        return ptr

    def free(self, ptr: int) -> None:
        del self.mem[ptr]

    def h2d(self, dst: int, src: np.ndarray) -> None:
        b = np.ascontiguousarray(src).tobytes()
        self.mem[dst][:len(b)] = b
        self.copies["h2d"] += 1

    def d2h(self, dst: np.ndarray, src: int) -> None:
        dst[...] = np.frombuffer(bytes(self.mem[src][:dst.nbytes]), dtype=dst.dtype).reshape(dst.shape)
        self.copies["d2h"] += 1

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        self.mem[dst][:nbytes] = self.mem[src][:nbytes]

    def synchronize(self) -> None:
        return None

    def read(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(bytes(self.mem[ptr][:n]), dtype=dtype).reshape(shape).copy()

    def write(self, ptr: int, value: np.ndarray) -> None:
        b = np.ascontiguousarray(value).tobytes()
        self.mem[ptr][:len(b)] = b


class OrtEngine:
    """``execute`` of the engine, computed by ONNX Runtime from the device stand-in's bytes."""

    runtime_name, runtime_version = "host-stand-in", "0"

    def __init__(self, onnx_path: Path, dev: HostDevice, session_spec: list) -> None:
        self.ort = open_session("ort", model_path=onnx_path, threads=1)
        self.dev = dev
        self.spec = session_spec
        self.profiles_used: list[str] = []

    def execute(self, profile: Profile, ids_shape: tuple[int, int], ids_buf: int, past: dict, present: dict,
                logits_buf: int, B: int) -> None:
        self.profiles_used.append(profile.name)
        ids = self.dev.read(ids_buf, ids_shape, np.int64)
        state = {t.name: self.dev.read(past[t.name], t.concrete_shape(B), self.ort.state_dtype(t))
                 for t in self.spec}
        logits, new = self.ort.step(ids, state)
        for name, value in new.items():
            self.dev.write(present[name], value)
        self.dev.write(logits_buf, logits)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    from trellis_export.checkpoint import model_fingerprint

    root = tmp_path_factory.mktemp("trt_session")
    cfg = tiny_config(chunk_size=3)
    model = tiny_model(cfg, seed=3, dtype=torch.float32)
    onnx_path = export_cached(model)
    engine = root / "m.engine"
    engine.write_bytes(b"stand-in: never deserialised")
    profiles = [{"name": "decode", "index": 0, "batch": {"min": 1, "opt": 1, "max": 4},
                 "tokens": {"min": 1, "opt": 1, "max": 1}},
                {"name": "prefill", "index": 1, "batch": {"min": 1, "opt": 1, "max": 4},
                 "tokens": {"min": 2, "opt": 16, "max": 16}}]
    side = {"format": "trellis-engine", "fingerprint": model_fingerprint(model), "config": cfg.to_dict(),
            "state_spec": {"activation_dtype": "float32", "tensors": [t.to_dict() for t in state_spec(cfg)]},
            "activation_dtype": "float32", "plugin": False, "runtime": "tensorrt-rtx", "profiles": profiles}
    (root / "m.engine.json").write_text(json.dumps(side))
    return onnx_path, engine, model


def make_session(model_files: tuple[Path, Path, torch.nn.Module]) -> tuple[TrtSession, HostDevice, OrtEngine]:
    onnx_path, engine, model = model_files
    dev = HostDevice()
    eng = OrtEngine(onnx_path, dev, state_spec(model.config))
    return TrtSession(engine, device_api=dev, engine_api=eng), dev, eng


def test_choose_profile() -> None:
    ps = [Profile(0, "decode", (1, 8), (1, 1)), Profile(1, "prefill", (1, 8), (2, 256))]
    assert choose_profile(ps, 3, 1).name == "decode"
    assert choose_profile(ps, 8, 256).name == "prefill"
    only = [Profile(0, "prefill", (1, 4), (1, 64))]
    assert choose_profile(only, 1, 1).name == "prefill"
    for B, T in ((9, 1), (1, 257), (5, 10)):
        with pytest.raises(InputError, match="fits no profile"):
            choose_profile(ps if B != 5 else only, B, T)


def test_stream_through_device_handles_equals_ort(model_files: tuple[Path, Path, torch.nn.Module]) -> None:
    """A 3-row stream in calls of 1, 7, 1, 16, 2 tokens: the handles are used in place (no state
    upload after the first call, no download until read) and the logits equal ORT's own run."""
    sess, dev, eng = make_session(model_files)
    ort = eng.ort
    ids = random_ids(3, 27, sess.config.vocab_size, seed=4).numpy()
    state_t, state_o, t0 = None, None, 0
    for n in (1, 7, 1, 16, 2):
        h2d_before = dev.copies["h2d"]
        lt, state_t = sess.step(ids[:, t0:t0 + n], state_t)
        lo, state_o = ort.step(ids[:, t0:t0 + n], state_o)
        np.testing.assert_array_equal(lt, lo)
        assert isinstance(state_t, DeviceState) and state_t.on_device
        if t0:
            assert dev.copies["h2d"] - h2d_before == 1, "only input_ids go up once a stream runs"
        t0 += n
    assert eng.profiles_used == ["decode", "prefill", "decode", "prefill", "prefill"]
    d2h = dev.copies["d2h"]
    for k in state_o:
        np.testing.assert_array_equal(state_t[k], state_o[k])
    assert dev.copies["d2h"] - d2h == len(state_o), "a handle is downloaded once, when first read"


def test_branching_from_an_old_handle_stays_correct(model_files: tuple[Path, Path, torch.nn.Module]) -> None:
    """Step twice from the same handle after its buffers were reused: the session copied it to the
    host before reuse, so the branch equals ORT (and the float64 reference) from that state."""
    sess, dev, eng = make_session(model_files)
    ids = random_ids(2, 6, sess.config.vocab_size, seed=5).numpy()
    _, s1 = sess.step(ids[:, :3])
    _, s2 = sess.step(ids[:, 3:4], s1)
    _, s3 = sess.step(ids[:, 4:5], s2)          # reuses s1's buffer set: s1 must be saved first
    assert not s1.on_device and s3.on_device
    la, _ = sess.step(ids[:, 5:6], s1)
    lb, _ = eng.ort.step(ids[:, 5:6], s1.to_numpy())
    np.testing.assert_array_equal(la, lb)
    ref = open_session("torch", model=model_files[2], dtype="float64")
    lr, _ = ref.step(ids[:, 5:6], {t.name: s1[t.name].astype(ref.state_dtype(t)) for t in ref.state_spec})
    assert_rel_close(la, lr, TOL_SHORT, "branch logits vs float64 reference")


def test_dropped_handles_cost_no_copy(model_files: tuple[Path, Path, torch.nn.Module]) -> None:
    sess, dev, _ = make_session(model_files)
    ids = random_ids(1, 10, sess.config.vocab_size, seed=6).numpy()
    state = None
    for t in range(10):
        _, state = sess.step(ids[:, t:t + 1], state)
        gc.collect()
    assert dev.copies["d2h"] == 10, "only the logits came down (one copy per call)"


def test_numpy_state_is_validated_and_foreign_handles_refused(
        model_files: tuple[Path, Path, torch.nn.Module]) -> None:
    sess, _, _ = make_session(model_files)
    other, _, _ = make_session(model_files)
    ids = random_ids(2, 2, sess.config.vocab_size, seed=7).numpy()
    bad = sess.init_state(2)
    del bad["0.conv"]
    with pytest.raises(StateError, match="0.conv"):
        sess.step(ids, bad)
    _, h = other.step(ids)
    la, _ = sess.step(ids, h)                   # another session's handle: read via host, not in place
    lb, _ = other.step(ids, h.to_numpy())
    np.testing.assert_array_equal(la, lb)
    with pytest.raises(StateError, match="batch"):
        sess.step(ids[:1], sess.step(ids)[1])
    with pytest.raises(InputError, match="fits no profile"):
        sess.step(random_ids(5, 1, sess.config.vocab_size).numpy())


def test_sessions_refuse_a_state_saved_by_another_model(model_files: tuple[Path, Path, torch.nn.Module],
                                                        tmp_path: Path) -> None:
    sess, _, _ = make_session(model_files)
    other = open_session("torch", model=tiny_model(tiny_config(chunk_size=3), seed=99, dtype=torch.float32))
    other.save_state(other.init_state(1), tmp_path / "s.safetensors")
    with pytest.raises(StateError, match="another model"):
        sess.load_state(tmp_path / "s.safetensors")


def test_timed_call_steps_from_one_device_state(model_files: tuple[Path, Path, torch.nn.Module]) -> None:
    """bench's prepared call: every call runs from the same device-resident state (uploaded once) and
    gives the logits step() gives from that state; only input_ids go up per call."""
    sess, dev, eng = make_session(model_files)
    ids = random_ids(2, 1, sess.config.vocab_size, seed=9).numpy()
    state = sess.init_state(2)
    state["position"][:] = [3, 11]
    call = sess.timed_call(ids, state)
    before = dev.copies["h2d"]
    outs = [call()[0] for _ in range(3)]
    assert dev.copies["h2d"] - before == 3
    want, _ = eng.ort.step(ids, state)
    for got in outs:
        np.testing.assert_array_equal(got, want)
