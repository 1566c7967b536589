"""StreamPool (trellis_export.runtime.pool): many streams over one session, batched step_many equal to
solo runs, capacity, idle expiry, save / restore, bad requests, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOL_SHORT, assert_rel_close, export_cached, tiny_model

from trellis_export.runtime import StateError, open_session
from trellis_export.runtime.base import InputError
from trellis_export.runtime.pool import (
    PoolError,
    PoolFull,
    StreamExists,
    StreamExpired,
    StreamPool,
    UnknownStream,
)

try:   # the TensorRT session's host-memory stand-in (its fixture is reused here)
    from test_trt_session import make_session as _trt_make_session
    from test_trt_session import model_files  # noqa: F401 - a fixture
except ImportError:  # pragma: no cover - the module is another suite's
    _trt_make_session = None

    @pytest.fixture(scope="module")
    def model_files():  # type: ignore[no-redef]
        pytest.skip("tests/test_trt_session.py (the TensorRT stand-in) is absent")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def model32() -> torch.nn.Module:
    return tiny_model(dtype=torch.float32)


@pytest.fixture(scope="module")
def onnx_path(model32: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:

    return export_cached(model32)


def _session(backend: str, model32: torch.nn.Module, onnx_path: Path):
    if backend == "ort":
        return open_session("ort", model_path=onnx_path, threads=1)
    return open_session("torch", model=model32)


def _streams(n: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"s{i}": rng.integers(0, vocab, size=int(rng.integers(1, 30)), dtype=np.int64) for i in range(n)}


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_16_interleaved_streams_equal_solo_runs(backend: str, model32, onnx_path) -> None:
    s = _session(backend, model32, onnx_path)
    streams = _streams(16, s.config.vocab_size, seed=1)
    solo = {sid: s.step(ids[None, :], s.init_state(1))[0][0] for sid, ids in streams.items()}
    pool = StreamPool(s, capacity=16)
    rng = np.random.default_rng(2)
    done = {sid: 0 for sid in streams}
    out: dict[str, list[np.ndarray]] = {sid: [] for sid in streams}
    pending = list(streams)
    opened: set[str] = set()
    calls = 0
    while pending:
        # a random subset of the unfinished streams, each with a random piece (1 token most often)
        pick = [sid for sid in pending if rng.random() < 0.6] or pending[:1]
        req = {}
        for sid in pick:
            if sid not in opened:
                pool.open(sid)
                opened.add(sid)
            left = len(streams[sid]) - done[sid]
            n = min(left, 1 if rng.random() < 0.6 else int(rng.integers(2, 8)))
            req[sid] = streams[sid][done[sid]:done[sid] + n]
        res = pool.step_many(req)
        calls += 1
        for sid, logits in res.items():
            assert logits.shape == (len(req[sid]), s.config.vocab_size)
            out[sid].append(logits)
            done[sid] += len(req[sid])
        pending = [sid for sid in pending if done[sid] < len(streams[sid])]
    assert pool.rows > pool.calls, "step_many never batched rows together"
    for sid, ids in streams.items():
        got = np.concatenate(out[sid], axis=0)
        assert got.shape == solo[sid].shape
        assert_rel_close(got, solo[sid], TOL_SHORT, f"{backend} stream {sid}")
        assert pool.position(sid) == len(ids)


def test_rows_at_different_positions_in_one_call(model32, onnx_path) -> None:
    s = _session("ort", model32, onnx_path)
    pool = StreamPool(s)
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 19, size=9), rng.integers(0, 19, size=2)
    pool.open("a")
    pool.open("b")
    pool.step("a", a[:8])
    pool.step("b", b[:1])
    calls = pool.calls
    res = pool.step_many({"a": a[8:], "b": b[1:]})       # positions 8 and 1, T = 1: one call
    assert pool.calls == calls + 1
    ref_a = s.step(a[None], s.init_state(1))[0][0, -1]
    ref_b = s.step(b[None], s.init_state(1))[0][0, -1]
    assert_rel_close(res["a"][0], ref_a, TOL_SHORT, "a")
    assert_rel_close(res["b"][0], ref_b, TOL_SHORT, "b")


def test_open_close_capacity_and_reset(model32, onnx_path) -> None:
    s = _session("ort", model32, onnx_path)
    pool = StreamPool(s, capacity=2)
    pool.open(1)
    pool.open(2)
    with pytest.raises(PoolFull, match="full"):
        pool.open(3)
    with pytest.raises(StreamExists, match="already open"):
        pool.open(1)
    pool.step(1, [1, 2, 3])
    pool.open(1, reset=True)
    assert pool.position(1) == 0
    pool.close(2)
    assert 2 not in pool and len(pool) == 1
    with pytest.raises(UnknownStream, match="not open"):
        pool.step(2, [1])
    pool.open(3)
    assert pool.stream_ids() == [1, 3]
    with pytest.raises(PoolError):
        StreamPool(s, capacity=0)


def test_idle_expiry(model32, onnx_path) -> None:
    s = _session("ort", model32, onnx_path)
    clock = FakeClock()
    pool = StreamPool(s, capacity=2, idle_timeout=10.0, clock=clock)
    pool.open("old")
    pool.open("live")
    clock.t = 6.0
    pool.step("live", [4])
    clock.t = 12.0                       # "old" idle 12 s > 10 s, "live" idle 6 s
    pool.open("new")                     # capacity 2: only possible because "old" expired
    assert set(pool.stream_ids()) == {"live", "new"}
    with pytest.raises(StreamExpired, match="expired after 12.0 s idle"):
        pool.step("old", [1])
    clock.t = 30.0
    assert sorted(pool.expire_idle()) == ["live", "new"]
    pool.open("old")                     # an expired id may start again
    assert pool.position("old") == 0


def test_bad_request_refused_without_disturbing_others(model32, onnx_path) -> None:
    s = _session("ort", model32, onnx_path)
    pool = StreamPool(s)
    ref = StreamPool(s)
    for p in (pool, ref):
        p.open("good")
        p.open("bad")
        p.step("good", [1, 2])
        p.step("bad", [1, 2])
    with pytest.raises(InputError, match="stream 'bad'.*vocab"):
        pool.step_many({"good": [3], "bad": [99]})
    assert pool.position("good") == 2          # nothing ran
    res = pool.step_many({"good": [3], "bad": [[1, 2], [3, 4]], "nope": [1]}, return_errors=True)
    assert isinstance(res["bad"], InputError) and "shape" in str(res["bad"])
    assert isinstance(res["nope"], UnknownStream)
    want = ref.step("good", [3])
    np.testing.assert_array_equal(res["good"], want)
    assert pool.position("bad") == 2
    with pytest.raises(InputError, match="integer"):
        pool.step("good", np.array([1.5]))
    with pytest.raises(PoolError, match="twice"):
        pool.step_many([("good", [1]), ("good", [2])])


def test_save_restore(model32, onnx_path, tmp_path: Path) -> None:
    s = _session("ort", model32, onnx_path)
    pool = StreamPool(s)
    ids = np.random.default_rng(4).integers(0, 19, size=12)
    pool.open("x")
    pool.step("x", ids[:7])
    pool.save("x", tmp_path / "x.safetensors")
    want = pool.step("x", ids[7:])
    pool.restore("y", tmp_path / "x.safetensors")
    assert pool.position("y") == 7
    np.testing.assert_array_equal(pool.step("y", ids[7:]), want)
    with pytest.raises(StreamExists):
        pool.restore("y", tmp_path / "x.safetensors")
    # a state of another model is refused
    other = open_session("torch", model=tiny_model(seed=5, dtype=torch.float32))
    with pytest.raises(StateError, match="another model"):
        StreamPool(other).restore("z", tmp_path / "x.safetensors")
    # a two-row state is refused
    s.save_state(s.init_state(2), tmp_path / "two.safetensors")
    with pytest.raises(StateError, match="batch-1"):
        pool.restore("w", tmp_path / "two.safetensors")


def test_threads_many_streams(model32, onnx_path) -> None:
    """8 threads, each driving 2 streams (step and step_many), while another thread opens and closes
    streams: every stream's logits equal its solo run."""
    s = _session("ort", model32, onnx_path)
    pool = StreamPool(s, capacity=32)
    streams = _streams(16, 19, seed=6)
    solo = {sid: s.step(ids[None, :], s.init_state(1))[0][0] for sid, ids in streams.items()}
    out: dict[str, list[np.ndarray]] = {sid: [] for sid in streams}
    errors: list[BaseException] = []
    for sid in streams:
        pool.open(sid)

    def drive(sids: list[str]) -> None:
        try:
            pos = {sid: 0 for sid in sids}
            while any(pos[sid] < len(streams[sid]) for sid in sids):
                req = {sid: streams[sid][pos[sid]:pos[sid] + 1 + pos[sid] % 3] for sid in sids
                       if pos[sid] < len(streams[sid])}
                for sid, logits in pool.step_many(req).items():
                    out[sid].append(logits)
                    pos[sid] += len(req[sid])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def churn() -> None:
        try:
            for i in range(50):
                pool.open(f"tmp{i}")
                pool.step(f"tmp{i}", [1, 2])
                pool.close(f"tmp{i}")
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    sids = list(streams)
    threads = [threading.Thread(target=drive, args=(sids[i::8],)) for i in range(8)]
    threads.append(threading.Thread(target=churn))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    for sid in streams:
        assert_rel_close(np.concatenate(out[sid]), solo[sid], TOL_SHORT, sid)
    assert len(pool) == 16


def test_float64_torch_session(model32) -> None:
    """Works on the float64 reference session too (states of its own dtypes)."""
    s = open_session("torch", model=tiny_model(), dtype="float64")
    pool = StreamPool(s)
    streams = _streams(4, 19, seed=7)
    for sid in streams:
        pool.open(sid)
    res = pool.step_many({sid: ids[:1] for sid, ids in streams.items()})
    for sid, ids in streams.items():
        ref = s.step(ids[None, :1], s.init_state(1))[0][0]
        assert_rel_close(res[sid], ref, 1e-12, sid)


def test_max_batch_splits_calls_and_a_failing_call_leaves_its_streams(model32, onnx_path) -> None:
    s = _session("ort", model32, onnx_path)
    pool = StreamPool(s, max_batch=3)
    streams = _streams(7, 19, seed=8)
    for sid in streams:
        pool.open(sid)
    calls = pool.calls
    res = pool.step_many({sid: ids[:1] for sid, ids in streams.items()})
    assert pool.calls == calls + 3                          # 7 rows of T = 1 in calls of 3, 3, 1
    for sid, ids in streams.items():
        assert_rel_close(res[sid], s.step(ids[None, :1], s.init_state(1))[0][0], TOL_SHORT, sid)

    class Refusing:
        """A session that refuses calls of T > 2 (like a TensorRT engine outside its profiles)."""

        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

        def step(self, ids, state):
            if np.asarray(ids).shape[1] > 2:
                raise InputError(f"T = {np.asarray(ids).shape[1]} fits no profile")
            return self.inner.step(ids, state)

    refusing = StreamPool(Refusing(s))  # type: ignore[arg-type]
    refusing.open("short")
    refusing.open("long")
    res = refusing.step_many({"short": [1, 2], "long": [1, 2, 3]}, return_errors=True)
    assert res["short"].shape == (2, 19)
    assert isinstance(res["long"], InputError) and refusing.position("long") == 0
    with pytest.raises(InputError, match="fits no profile"):
        refusing.step("long", [1, 2, 3])


def test_tensorrt_session_stand_in(model_files) -> None:
    """The pool over the TensorRT session (host-memory device stand-in of tests/test_trt_session.py;
    engine batch <= 4, tokens <= 16): calls split to the engine's batch, results equal solo ORT runs."""
    session, _, _ = _trt_make_session(model_files)
    ort = open_session("ort", model_path=model_files[0], threads=1)
    pool = StreamPool(session)
    assert pool.max_batch == 4
    streams = _streams(6, session.config.vocab_size, seed=9)
    streams = {sid: ids[:16] for sid, ids in streams.items()}
    for sid in streams:
        pool.open(sid)
    out: dict[str, list[np.ndarray]] = {sid: [] for sid in streams}
    pos = {sid: 0 for sid in streams}
    while any(pos[sid] < len(ids) for sid, ids in streams.items()):
        req = {sid: ids[pos[sid]:pos[sid] + 1 + (pos[sid] % 2)] for sid, ids in streams.items()
               if pos[sid] < len(ids)}
        for sid, logits in pool.step_many(req).items():
            out[sid].append(logits)
            pos[sid] += len(req[sid])
    assert pool.rows > pool.calls
    for sid, ids in streams.items():
        solo = ort.step(ids[None], ort.init_state(1))[0][0]
        assert_rel_close(np.concatenate(out[sid]), solo, TOL_SHORT, f"trt stand-in {sid}")
