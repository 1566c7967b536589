"""Streaming runtimes (trellis_export.runtime): torch and ONNX Runtime sessions against the float64
reference, state validation, state files, and the torch-free ORT path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOL_SHORT, assert_rel_close, tiny_config, tiny_model

from trellis_export.errors import TrellisExportError
from trellis_export.runtime import Session, SessionError, StateError, open_session
from trellis_export.runtime.base import InputError

#: Odd configs: every phi / f / rho value appears, C in {1, 3}, both q/k norms.
CONFIGS = {
    "ln-ln-id-C3": dict(phi="ln_silu", f="ln_silu", rho="identity", chunk_size=3),
    "id-l2-ln-C1": dict(phi="identity", f="l2_silu", rho="ln_silu", chunk_size=1, qk_norm="none"),
    "l2-id-l2-C3": dict(phi="l2_silu", f="identity", rho="l2_silu", chunk_size=3),
}
FIRST = next(iter(CONFIGS))
#: Piece sizes of a 23-token stream: T = 1 and T > 1 calls, crossing chunk boundaries.
PIECES = (1, 3, 1, 7, 2, 9)


def _export(model: torch.nn.Module, path: Path) -> Path:
    from trellis_export.export import export_onnx

    export_onnx(model, path)
    return path


def _ids(B: int, T: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T), dtype=np.int64)


def _stream(session: Session, ids: np.ndarray, pieces: tuple[int, ...] = PIECES,
            state: dict | None = None) -> tuple[np.ndarray, dict]:
    state = session.init_state(ids.shape[0]) if state is None else state
    out, pos, i = [], 0, 0
    while pos < ids.shape[1]:
        n = min(pieces[i % len(pieces)], ids.shape[1] - pos)
        logits, state = session.step(ids[:, pos:pos + n], state)
        assert logits.shape == (ids.shape[0], n, session.config.vocab_size)
        out.append(logits)
        pos, i = pos + n, i + 1
    return np.concatenate(out, axis=1), state


def _reference(model64: torch.nn.Module, ids: np.ndarray) -> tuple[np.ndarray, dict]:
    """One whole-stream call of the float64 model, token-by-token memory (mode "step")."""
    with torch.no_grad():
        logits, state = model64(torch.from_numpy(ids), mode="step")
    return logits.numpy(), {k: v.numpy() for k, v in state.items()}


class _Models:
    """Random models per config, exported once per test module (exports take seconds)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._onnx: dict[str, Path] = {}

    def models(self, name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        cfg = tiny_config(vocab_size=37, **CONFIGS[name])
        return tiny_model(cfg, seed=3, dtype=torch.float32), tiny_model(cfg, seed=3)

    def onnx(self, name: str) -> Path:
        if name not in self._onnx:
            self._onnx[name] = _export(self.models(name)[0], self.tmp / f"{name}.onnx")
        return self._onnx[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> _Models:
    return _Models(tmp_path_factory.mktemp("models"))


@pytest.fixture(params=list(CONFIGS))
def case(request: pytest.FixtureRequest, models: _Models):
    """(name, float32 model, float64 copy, models cache)."""
    m32, m64 = models.models(request.param)
    return request.param, m32, m64, models


@pytest.fixture
def onnx_path(case) -> Path:
    return case[3].onnx(case[0])


@pytest.fixture
def first_onnx(models: _Models) -> Path:
    return models.onnx(FIRST)


def _sessions(case, onnx_path_or_none) -> list[Session]:
    _, m32, _, _ = case
    out: list[Session] = [open_session("torch", model=m32)]
    if onnx_path_or_none is not None:
        out.append(open_session("ort", model_path=onnx_path_or_none))
    return out


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_stream_matches_float64_reference(case, backend: str, request: pytest.FixtureRequest) -> None:
    name, m32, m64, _ = case
    if backend == "torch":
        s = open_session("torch", model=m32)
    else:
        s = open_session("ort", model_path=request.getfixturevalue("onnx_path"))
        assert s.providers and s.providers[-1] == "CPUExecutionProvider"
    assert s.config == m32.config
    ids = _ids(2, 23, 37, seed=1)
    ref_logits, ref_state = _reference(m64, ids)
    logits, state = _stream(s, ids)
    assert_rel_close(logits, ref_logits, TOL_SHORT, f"{name}/{backend} logits")
    assert set(state) == {t.name for t in s.state_spec}
    for t in s.state_spec:
        assert state[t.name].dtype == s.state_dtype(t)
        assert_rel_close(state[t.name], ref_state[t.name], TOL_SHORT, f"{name}/{backend} {t.name}")
    np.testing.assert_array_equal(state["position"], [23, 23])


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_rows_at_different_positions(case, backend: str, request: pytest.FixtureRequest) -> None:
    """Row 0 has consumed 5 tokens, row 1 starts fresh; one batch serves both."""
    name, m32, m64, _ = case
    s = (open_session("torch", model=m32) if backend == "torch"
         else open_session("ort", model_path=request.getfixturevalue("onnx_path")))
    a, b = _ids(1, 14, 37, seed=2), _ids(1, 9, 37, seed=3)
    _, st_a = _stream(s, a[:, :5], pieces=(2, 3))
    batch_state = s.concat_states([st_a, s.init_state(1)])
    np.testing.assert_array_equal(batch_state["position"], [5, 0])
    logits, state = _stream(s, np.concatenate([a[:, 5:], b], axis=0), pieces=(1, 4, 4),
                            state=batch_state)
    ref_a, ref_sa = _reference(m64, a)
    ref_b, ref_sb = _reference(m64, b)
    assert_rel_close(logits[:1], ref_a[:, 5:], TOL_SHORT, f"{name}/{backend} row 0 logits")
    assert_rel_close(logits[1:], ref_b, TOL_SHORT, f"{name}/{backend} row 1 logits")
    for t in s.state_spec:
        assert_rel_close(state[t.name][:1], ref_sa[t.name], TOL_SHORT, f"row 0 {t.name}")
        assert_rel_close(state[t.name][1:], ref_sb[t.name], TOL_SHORT, f"row 1 {t.name}")
    # selecting and resetting rows
    only_b = s.select_rows(state, [1])
    np.testing.assert_array_equal(only_b["position"], [9])
    reset = s.reset_rows(state, [0])
    np.testing.assert_array_equal(reset["position"], [0, 9])
    l_reset, _ = s.step(b[:, :3].repeat(2, 0), reset)
    ref_b3, _ = _reference(m64, b[:, :3])
    assert_rel_close(l_reset[:1], ref_b3, TOL_SHORT, "reset row restarts the stream")


def test_torch_and_ort_agree_per_call(case, onnx_path: Path) -> None:
    name, m32, _, _ = case
    ts, os_ = open_session("torch", model=m32), open_session("ort", model_path=onnx_path)
    assert ts.fingerprint == os_.fingerprint
    ids = _ids(3, 12, 37, seed=4)
    st_t, st_o = ts.init_state(3), os_.init_state(3)
    for i, (lo, hi) in enumerate(((0, 1), (1, 6), (6, 7), (7, 12))):
        lt, st_t = ts.step(ids[:, lo:hi], st_t)
        lo_, st_o = os_.step(ids[:, lo:hi], st_o)
        assert_rel_close(lo_, lt, TOL_SHORT, f"{name} ort vs torch logits [{lo}:{hi}]")
        for k in st_t:                    # ORT's own output state, compared before anything is swapped
            if k == "position":
                np.testing.assert_array_equal(st_o[k], st_t[k])
            else:
                assert_rel_close(st_o[k], st_t[k], TOL_SHORT, f"{name} ort vs torch {k} [{lo}:{hi}]")
        if i == 1:                        # states are interchangeable: continue ORT from torch's state
            st_o = {k: v.copy() for k, v in st_t.items()}


# --------------------------------------------------------------------------- state files
def test_save_load_round_trip(case, onnx_path: Path, tmp_path: Path) -> None:
    name, m32, _, _ = case
    for s in _sessions(case, onnx_path):
        ids = _ids(2, 10, 37, seed=5)
        _, state = _stream(s, ids[:, :6])
        path = tmp_path / f"{s.backend}.safetensors"
        s.save_state(state, path)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        loaded = s.load_state(path)
        assert set(loaded) == set(state)
        for k in state:
            assert loaded[k].dtype == state[k].dtype
            np.testing.assert_array_equal(loaded[k], state[k])
        a, _ = s.step(ids[:, 6:], state)
        b, _ = s.step(ids[:, 6:], loaded)
        np.testing.assert_array_equal(a, b)
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata()
        assert meta["fingerprint"] == s.fingerprint
        assert [t["name"] for t in json.loads(meta["state_spec"])["tensors"]] == \
            [t.name for t in s.state_spec]


def _bad_states(s: Session) -> dict[str, tuple[dict, str]]:
    """name -> (bad state, text the error must contain)."""
    good = s.init_state(2)
    first_mem = next(t.name for t in s.state_spec if t.field == "key_memory")
    conv = next(t.name for t in s.state_spec if t.field == "conv")
    missing = dict(good)
    del missing[first_mem]
    extra = dict(good, **{"9.key_memory": good[first_mem]})
    shape = dict(good, **{first_mem: good[first_mem][:, :, :-1]})
    dtype = dict(good, **{conv: good[conv].astype(np.float64)})
    batch = dict(good, **{"position": good["position"][:1]})
    return {"missing": (missing, first_mem), "extra": (extra, "9.key_memory"),
            "shape": (shape, first_mem), "dtype": (dtype, conv), "batch": (batch, "position")}


def test_bad_states_refused_in_memory(case, onnx_path: Path) -> None:
    ids = _ids(2, 3, 37)
    for s in _sessions(case, onnx_path):
        for kind, (bad, name) in _bad_states(s).items():
            with pytest.raises(StateError, match=name.replace(".", r"\.")) as exc:
                s.step(ids, bad)
            assert isinstance(exc.value, TrellisExportError), kind
        # wrong batch against input_ids
        with pytest.raises(StateError, match="position"):
            s.step(_ids(3, 2, 37), s.init_state(2))
        with pytest.raises(InputError, match="vocab"):
            s.step(np.full((2, 2), 37), s.init_state(2))
        with pytest.raises(InputError, match=r"\[B, T\]"):
            s.step(np.zeros((2,), dtype=np.int64), s.init_state(2))


def test_bad_state_files_refused(case, onnx_path: Path, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    name, m32, _, _ = case
    other = tiny_model(m32.config, seed=99, dtype=torch.float32)
    so = open_session("torch", model=other)
    for s in _sessions(case, onnx_path):
        # a state saved by another model (same config, other weights)
        p_other = tmp_path / f"other-{s.backend}.safetensors"
        so.save_state(so.init_state(1), p_other)
        with pytest.raises(StateError, match="another model"):
            s.load_state(p_other)
        # tensor-level problems in a file with the right metadata
        good_path = tmp_path / f"good-{s.backend}.safetensors"
        s.save_state(s.init_state(2), good_path)
        from safetensors import safe_open
        with safe_open(str(good_path), framework="numpy") as fh:
            meta = fh.metadata()
        for kind, (bad, tname) in _bad_states(s).items():
            p = tmp_path / f"{kind}-{s.backend}.safetensors"
            save_file({k: np.ascontiguousarray(v) for k, v in bad.items()}, str(p), metadata=meta)
            with pytest.raises(StateError, match=tname.replace(".", r"\.")) as exc:
                s.load_state(p)
            assert str(p) in str(exc.value), kind
        # corrupted and truncated files, a missing file, a file without trellis metadata
        data = good_path.read_bytes()
        (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
        (tmp_path / "garbage.safetensors").write_bytes(b"\x07" * 64)
        save_file({"position": np.zeros(2, np.int64)}, str(tmp_path / "plain.safetensors"))
        for fname, text in (("trunc", "not a readable"), ("garbage", "not a readable"),
                            ("missing", "no such state file"), ("plain", "not a trellis state")):
            with pytest.raises(StateError, match=text):
                s.load_state(tmp_path / f"{fname}.safetensors")


# --------------------------------------------------------------------------- sessions
def test_open_session_errors(tmp_path: Path) -> None:
    with pytest.raises(SessionError, match="backend"):
        open_session("tensorrt")
    with pytest.raises(SessionError, match="no such ONNX model"):
        open_session("ort", model_path=tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(SessionError, match="bad.onnx"):
        open_session("ort", model_path=bad)
    with pytest.raises(SessionError, match="model_path"):
        open_session("ort")


def test_ort_model_without_metadata_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(SessionError, match="no Trellis config"):
        open_session("ort", model_path=path)


def test_ort_reports_providers_actually_used(first_onnx: Path) -> None:
    import onnxruntime as ort

    want = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(SessionError, match="CUDAExecutionProvider not available"):
            open_session("ort", model_path=first_onnx, providers=want)   # no silent fallback
    s = open_session("ort", model_path=first_onnx, providers=want, allow_fallback=True)
    assert s.providers == s.session.get_providers()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert s.providers == ["CPUExecutionProvider"]
        assert "CUDAExecutionProvider" in s.providers_missing


def test_ort_session_never_imports_torch(first_onnx: Path, tmp_path: Path) -> None:
    code = f"""
import sys
import numpy as np
from trellis_export.runtime import open_session
s = open_session("ort", model_path={str(first_onnx)!r})
st = s.init_state(2)
logits, st = s.step(np.array([[1, 2, 3], [4, 5, 6]]), st)
logits, st = s.step(np.array([[7], [8]]), st)
s.save_state(st, {str(tmp_path / 'st.safetensors')!r})
st = s.load_state({str(tmp_path / 'st.safetensors')!r})
assert st["position"].tolist() == [4, 4], st["position"]
bad = {{k: v for k, v in st.items() if k != "position"}}
try:
    s.step(np.array([[1], [2]]), bad)
except Exception as exc:
    assert type(exc).__name__ == "StateError" and "position" in str(exc), exc
else:
    raise AssertionError("a state without 'position' was accepted")
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"
