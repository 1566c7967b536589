"""The lean ONNX Runtime paths (issue 10): the lean T = 1 graph of ``export/ort_rewrite.py`` and the lean
graph for every T of ``export/ort_prefill.py`` (each with and without contrib ops), and the host path of
``Session.step`` (no re-validation of the session's own states), checked against the float64 reference
at odd shapes, rows at different positions, T not a multiple of C, batched decode and long streams.
No timing here: bench/bench_ort.py measures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import TOL_LONG, TOL_SHORT, assert_rel_close, tiny_config, tiny_model

from trellis_export.export.ort_prefill import lean_prefill_model
from trellis_export.export.ort_rewrite import RewriteError, lean_decode_model
from trellis_export.runtime import Session, StateError, open_session

#: Odd configs (H = 3, d = 5, m = 7): every phi / f / rho, C in {1, 3, 4}, both q/k norms, conv_size 2, 3
#: and 4, an untied LM head.
CONFIGS = {
    "ln-ln-id-C3": dict(phi="ln_silu", f="ln_silu", rho="identity", chunk_size=3),
    "id-l2-ln-C1": dict(phi="identity", f="l2_silu", rho="ln_silu", chunk_size=1, qk_norm="none",
                        conv_size=2),
    "l2-id-l2-C4": dict(phi="l2_silu", f="identity", rho="l2_silu", chunk_size=4, conv_size=3,
                        tie_embeddings=False),
}
VOCAB = 37


class _Models:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._onnx: dict[str, Path] = {}

    def models(self, name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        cfg = tiny_config(vocab_size=VOCAB, **CONFIGS[name])
        return tiny_model(cfg, seed=5, dtype=torch.float32), tiny_model(cfg, seed=5)

    def onnx(self, name: str) -> Path:
        if name not in self._onnx:
            from trellis_export.export import export_onnx

            self._onnx[name] = export_onnx(self.models(name)[0], self.tmp / f"{name}.onnx")
        return self._onnx[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> _Models:
    return _Models(tmp_path_factory.mktemp("lean"))


def _ids(B: int, T: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(B, T), dtype=np.int64)


def _ref_stream(m64: torch.nn.Module, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with torch.no_grad():
        logits, state = m64(torch.from_numpy(ids), mode="step")
    return logits.numpy(), {k: v.numpy() for k, v in state.items()}


def _rows_at(s: Session, prefill: Session, ids: np.ndarray, prefix: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One state of ``s`` whose row b consumed ``ids[b, :prefix[b]]`` (each row prefilled alone on
    ``prefill``): rows at different positions."""
    states = []
    for b, n in enumerate(prefix):
        st = prefill.init_state(1)
        if n:
            _, st = prefill.step(ids[b:b + 1, :n], st)
        states.append(st)
    return s.concat_states(states)


@pytest.mark.parametrize("ort_graph", ["lean", "lean-std"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_decode_rows_at_different_positions(models: _Models, name: str, ort_graph: str) -> None:
    """B = 5 rows that consumed 0, 1, 2, 5, 8 tokens (prefilled on the exported graph, one row at a
    time), then 9 decode steps on the lean graph, against the float64 reference of each row."""
    _, m64 = models.models(name)
    s = open_session("ort", model_path=models.onnx(name), ort_graph=ort_graph)
    assert s.describe()["decode_graph"] == ort_graph and s.decode_session is not None
    prefix, steps = (0, 1, 2, 5, 8), 9
    ids = _ids(len(prefix), max(prefix) + steps, seed=2)
    state = _rows_at(s, s, ids, prefix)
    got = []
    for t in range(steps):
        step_ids = np.array([[ids[b, n + t]] for b, n in enumerate(prefix)], dtype=np.int64)
        logits, state = s.step(step_ids, state)
        got.append(logits[:, 0])
    for b, n in enumerate(prefix):
        ref_logits, ref_state = _ref_stream(m64, ids[b:b + 1, :n + steps])
        assert_rel_close(np.stack([g[b] for g in got]), ref_logits[0, n:], TOL_SHORT,
                         f"{name} row {b} logits")
        for t in s.state_spec:
            if t.name == "position":
                assert state["position"][b] == n + steps
            else:
                assert_rel_close(state[t.name][b], ref_state[t.name][0], TOL_SHORT,
                                 f"{name} row {b} {t.name}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_matches_exported_graph(models: _Models, name: str) -> None:
    """Lean decode against the exported graph, both float32, B = 4, from a mid-stream state; every
    output tensor (logits and each state tensor)."""
    path = models.onnx(name)
    lean = open_session("ort", model_path=path)
    exported = open_session("ort", model_path=path, ort_graph="exported")
    assert exported.decode_session is None and exported.describe()["decode_graph"] == "exported"
    ids = _ids(4, 11, seed=7)
    _, state = exported.step(ids, None)
    state["position"] = np.array([11, 12, 13, 0], dtype=np.int64)    # a fresh row (reset to M0, zero conv)
    for t in range(6):
        step = _ids(4, 1, seed=20 + t)
        la, sa = lean.step(step, state)
        lb, sb = exported.step(step, state)
        assert_rel_close(la, lb, 2e-6, f"{name} step {t} logits")
        for k in sb:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape
            assert_rel_close(sa[k], sb[k], 2e-6, f"{name} step {t} {k}")
        state = sb


def _stream(s: Session, ids: np.ndarray, pieces: tuple[int, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    out, pos, i, state = [], 0, 0, s.init_state(ids.shape[0])
    while pos < ids.shape[1]:
        n = min(pieces[i % len(pieces)], ids.shape[1] - pos)
        logits, state = s.step(ids[:, pos:pos + n], state)
        out.append(logits)
        pos, i = pos + n, i + 1
    return np.concatenate(out, axis=1), state


#: Mostly T = 1 (the lean graph), some prefill pieces (the exported graph), crossing chunk boundaries.
LONG_PIECES = (1, 1, 1, 7, 1, 1, 16, 1, 1, 1, 1, 5)


@pytest.mark.parametrize("name,B,T,pieces,seed", [
    ("ln-ln-id-C3", 3, 320, LONG_PIECES, 11),          # mostly decode, some prefill pieces
    ("l2-id-l2-C4", 2, 700, (97, 256, 1, 346), 12)])   # large prefill pieces, T not a multiple of C
def test_lean_long_stream_odd_model(models: _Models, name: str, B: int, T: int, pieces: tuple[int, ...],
                                    seed: int) -> None:
    """A long stream in pieces (phases changing between calls) against one float64 call over the whole
    stream. These random models are ill-conditioned (the float32 PyTorch model itself drifts to ~4e-4
    on the deeper layer's key memory), so each state tensor must be within max(1e-4, 2 x the float32
    PyTorch model's own error), as in tests/test_export.py::test_long_stream_in_pieces; the logits
    within 1e-4."""
    from conftest import rel_rms

    m32, m64 = models.models(name)
    s = open_session("ort", model_path=models.onnx(name))
    ids = _ids(B, T, seed=seed)
    ref_logits, ref_state = _ref_stream(m64, ids)
    with torch.no_grad():
        _, f32_state = m32(torch.from_numpy(ids), mode="step")
    logits, state = _stream(s, ids, pieces)
    assert_rel_close(logits, ref_logits, TOL_LONG, f"{name} long stream logits")
    for t in s.state_spec:
        tol = max(TOL_LONG, 2 * rel_rms(f32_state[t.name].numpy(), ref_state[t.name]))
        assert_rel_close(state[t.name], ref_state[t.name], tol, f"{name} long stream {t.name}")


def test_lean_long_stream_bundled_model(tmp_path: Path) -> None:
    """The bundled checkpoint, 400 tokens, B = 2 (rows 0 and 1 at the same positions) then B = 4 batched
    decode of two more streams admitted mid-way: every tensor within 1e-4 of the float64 reference."""
    from trellis_export.checkpoint import load_checkpoint
    from trellis_export.export import export_onnx

    m32 = load_checkpoint()
    m64 = load_checkpoint().double()
    s = open_session("ort", model_path=export_onnx(m32, tmp_path / "bundled.onnx"))
    assert s.describe()["decode_graph"] == "lean"
    V = s.config.vocab_size
    ids = np.random.default_rng(3).integers(0, V, size=(2, 400), dtype=np.int64)
    ref_logits, ref_state = _ref_stream(m64, ids)
    logits, state = _stream(s, ids, LONG_PIECES)
    assert_rel_close(logits, ref_logits, TOL_LONG, "bundled long stream logits")
    for t in s.state_spec:
        assert_rel_close(state[t.name], ref_state[t.name], TOL_LONG, f"bundled long stream {t.name}")
    # batched decode: two fresh streams join the two running ones (B = 4, positions 400 and 0)
    new = np.random.default_rng(4).integers(0, V, size=(2, 40), dtype=np.int64)
    state = s.concat_states([state, s.init_state(2)])
    got = []
    for t in range(40):
        step = np.concatenate([ids[:, -1:] * 0 + new[::-1, t:t + 1], new[:, t:t + 1]], axis=0)
        out, state = s.step(step, state)
        got.append(out[:, 0])
    both = np.concatenate([ids, new[::-1]], axis=1)
    ref_all, _ = _ref_stream(m64, both)
    ref_new, _ = _ref_stream(m64, new)
    got_arr = np.stack(got, axis=1)
    assert_rel_close(got_arr[:2], ref_all[:, 400:], TOL_LONG, "running rows")
    assert_rel_close(got_arr[2:], ref_new, TOL_SHORT, "fresh rows")


def test_lean_graph_is_straight_line_and_file_untouched(models: _Models) -> None:
    path = models.onnx("ln-ln-id-C3")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    s = open_session("ort", model_path=path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    proto = onnx.load(str(path))
    cfg = s.config
    for contrib in (True, False):
        lean = lean_decode_model(proto, cfg, contrib=contrib)
        ops = {n.op_type for n in lean.graph.node}
        assert not ops & {"If", "Loop", "Scan", "Conv", "Shape"}
        assert ("SkipSimplifiedLayerNormalization" in ops) == contrib
        assert [i.name for i in lean.graph.input] == [i.name for i in proto.graph.input]
        assert [o.name for o in lean.graph.output] == [o.name for o in proto.graph.output]
    # the exported graph keeps its portable body, no contrib op
    assert all(n.domain != "com.microsoft" for n in proto.graph.node)


def test_lean_refuses_float16_and_session_says_why(models: _Models, tmp_path: Path) -> None:
    from trellis_export.export import export_onnx

    m32, _ = models.models("ln-ln-id-C3")
    path = export_onnx(m32, tmp_path / "f16.onnx", dtype="float16")
    s = open_session("ort", model_path=path)
    d = s.describe()
    assert d["ort_graph"] == "lean" and d["decode_graph"] == "exported"
    assert "float32 only" in d["decode_graph_reason"]
    assert d["prefill_graph"] == "exported" and "float32 only" in d["prefill_graph_reason"]
    logits, _ = s.step(np.zeros((2, 1), np.int64), None)       # decode still runs (exported graph)
    assert logits.shape == (2, 1, VOCAB)
    assert s.step(np.zeros((2, 5), np.int64), None)[0].shape == (2, 5, VOCAB)    # prefill too
    with pytest.raises(RewriteError, match="float32 only"):
        lean_decode_model(onnx.load(str(path)), s.config, activation_dtype="float16")
    with pytest.raises(RewriteError, match="float32 only"):
        lean_prefill_model(onnx.load(str(path)), s.config, activation_dtype="float16")


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_own_state_is_not_revalidated(models: _Models, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "ln-ln-id-C3"
    m32, _ = models.models(name)
    s: Session = (open_session("ort", model_path=models.onnx(name)) if backend == "ort"
                  else open_session("torch", model=m32))
    calls: list[str] = []
    orig = type(s).validate_state

    def counting(self: Session, *args: object, **kwargs: object) -> int:
        calls.append("v")
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(type(s), "validate_state", counting)
    ids = _ids(2, 1, seed=0)
    _, st = s.step(ids, s.init_state(2))
    assert len(calls) == 1                                   # a state from init_state: validated
    _, st2 = s.step(ids, st)
    _, st3 = s.step(ids, dict(st2))                          # a copy of the dict: same arrays, trusted
    assert len(calls) == 1
    _, st3b = s.step(ids, st2)                               # an older state of this session: trusted
    assert len(calls) == 1
    bad = dict(st3)
    bad[next(t.name for t in s.state_spec if t.name.endswith("key_memory"))] = \
        np.full_like(st3["0.key_memory"], np.nan)           # a replaced array: validated, refused
    with pytest.raises(StateError, match="non-finite"):
        s.step(ids, bad)
    assert len(calls) == 2
    with pytest.raises(StateError, match="batch 3"):         # another batch: validated
        s.step(_ids(3, 1, seed=0), st3)
    s.trust_own_state = False                                # the opt-out: every call validated
    n = len(calls)
    s.step(ids, st3b)
    assert len(calls) == n + 1


@pytest.mark.parametrize("variant", [dict(contrib=True, linear_attention=False, stack=True),
                                     dict(contrib=True, linear_attention=False, stack=False),
                                     dict(contrib=False, stack=False),
                                     dict(contrib=True, linear_attention=True, conv="transposed"),
                                     dict(contrib=True, linear_attention=True, conv="window")])
@pytest.mark.parametrize("name", ["ln-ln-id-C3", "id-l2-ln-C1"])
def test_lean_builder_variants(models: _Models, name: str, variant: dict) -> None:
    """The builder's other variants (kept for the measurements) against the exported graph, B = 5,
    rows at positions 0 ... 4 (a fresh row, chunk starts and mid-chunk rows), float32 both."""
    import onnxruntime as ort

    path = models.onnx(name)
    exported = open_session("ort", model_path=path, ort_graph="exported")
    proto = onnx.load(str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    lean = ort.InferenceSession(lean_decode_model(proto, exported.config, **variant).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    _, state = exported.step(_ids(5, 6, seed=3), None)
    state["position"] = np.arange(5, dtype=np.int64)
    for t in range(4):
        ids = _ids(5, 1, seed=40 + t)
        want_logits, want = exported.step(ids, state)
        feeds = {"input_ids": ids, **{"past." + k: v for k, v in state.items()}}
        got = lean.run(exported._output_names, feeds)
        assert_rel_close(got[0], want_logits, 2e-6, f"{name} {variant} logits")
        for k, v in zip(exported._state_names, got[1:]):
            assert_rel_close(v, want[k], 2e-6, f"{name} {variant} {k}")
        state = want


# ---------------------------------------------------------------------------------------- lean prefill
@pytest.mark.parametrize("ort_graph", ["lean", "lean-std"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_prefill_rows_at_different_positions(models: _Models, name: str, ort_graph: str) -> None:
    """B = 6 rows that consumed 0, 1, 2, 5, 8, 13 tokens (every phase of C = 3 and 4, a fresh row),
    then calls of T = 2 (shorter than a chunk), 10 and 7 on the lean prefill graph, against the float64
    reference of each row: every logit and, after each call, every state tensor."""
    _, m64 = models.models(name)
    s = open_session("ort", model_path=models.onnx(name), ort_graph=ort_graph)
    d = s.describe()
    assert d["prefill_graph"] == ort_graph and d["prefill_graph_reason"] is None
    exported = open_session("ort", model_path=models.onnx(name), ort_graph="exported")
    prefix, calls = (0, 1, 2, 5, 8, 13), (2, 10, 7)
    ids = _ids(len(prefix), max(prefix) + sum(calls), seed=4)
    state = _rows_at(s, exported, ids, prefix)
    done = 0
    for T in calls:
        chunk = np.stack([ids[b, n + done:n + done + T] for b, n in enumerate(prefix)])
        logits, state = s.step(chunk, state)
        for b, n in enumerate(prefix):
            ref_logits, ref_state = _ref_stream(m64, ids[b:b + 1, :n + done + T])
            assert_rel_close(logits[b], ref_logits[0, n + done:], TOL_SHORT, f"{name} T={T} row {b} logits")
            assert state["position"][b] == n + done + T
            for t in s.state_spec:
                if t.name != "position":
                    assert_rel_close(state[t.name][b], ref_state[t.name][0], TOL_SHORT,
                                     f"{name} T={T} row {b} {t.name}")
        done += T


@pytest.mark.parametrize("contrib", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_prefill_matches_exported_graph(models: _Models, name: str, contrib: bool) -> None:
    """The lean prefill graph against the exported graph (both float32) for T = 1, 3, 16 and 33 from a
    mid-stream state with a fresh row, B = 4: every output tensor within the spec's 1e-5 (two float32
    orders of summation: this random model's deeper key memory differs by up to ~5e-6 at T = 33)."""
    import onnxruntime as ort

    path = models.onnx(name)
    exported = open_session("ort", model_path=path, ort_graph="exported")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    lean = ort.InferenceSession(lean_prefill_model(onnx.load(str(path)), exported.config,
                                                   contrib=contrib).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    _, state = exported.step(_ids(4, 11, seed=7), None)
    state["position"] = np.array([11, 12, 13, 0], dtype=np.int64)
    for T in (1, 3, 16, 33):
        ids = _ids(4, T, seed=60 + T)
        want_logits, want = exported.step(ids, state)
        feeds = {"input_ids": ids, **{"past." + k: v for k, v in state.items()}}
        got = lean.run(exported._output_names, feeds)
        assert_rel_close(got[0], want_logits, TOL_SHORT, f"{name} T={T} logits")
        for k, v in zip(exported._state_names, got[1:]):
            assert v.dtype == want[k].dtype and v.shape == want[k].shape
            assert_rel_close(v, want[k], TOL_SHORT, f"{name} T={T} {k}")
        state = want


def test_lean_prefill_graph_structure(models: _Models) -> None:
    """One Scan per layer (the state pass) and no other control flow; the file's inputs and outputs in
    the file's order; contrib ops only when asked; the file untouched."""
    path = models.onnx("ln-ln-id-C3")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    s = open_session("ort", model_path=path)
    assert s.describe()["prefill_graph"] == "lean"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    proto = onnx.load(str(path))
    for contrib in (True, False):
        lean = lean_prefill_model(proto, s.config, contrib=contrib)
        ops = [n.op_type for n in lean.graph.node]
        assert ops.count("Scan") == s.config.n_layers and not {"If", "Loop"} & set(ops)
        body_ops = {bn.op_type for n in lean.graph.node if n.op_type == "Scan"
                    for bn in n.attribute[0].g.node}
        assert not {"If", "Loop", "Scan", "Gather"} & body_ops          # the Scan slices its inputs itself
        assert any(n.domain == "com.microsoft" for n in lean.graph.node) == contrib
        assert [i.name for i in lean.graph.input] == [i.name for i in proto.graph.input]
        assert [o.name for o in lean.graph.output] == [o.name for o in proto.graph.output]


def test_long_prefill_runs_in_pieces_within_the_budget(models: _Models,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A call longer than the lean prefill graph's budget runs in pieces of a multiple of C (rows at
    different positions, B = 3): same logits and state as one whole call and as the float64
    reference; the piece length follows the budget; the exported graph is never split."""
    name = "ln-ln-id-C3"
    _, m64 = models.models(name)
    path = models.onnx(name)
    whole = open_session("ort", model_path=path)
    cfg = whole.config
    per_chunk = 4 * 3 * 2 * cfg.n_heads * (cfg.n_slots * cfg.head_dim + cfg.chunk_size * cfg.n_slots)
    small = open_session("ort", model_path=path, prefill_budget_bytes=2 * per_chunk + 1)
    assert small.prefill_piece_tokens(3) == 2 * cfg.chunk_size
    assert small.describe()["prefill_budget_bytes"] == 2 * per_chunk + 1
    assert open_session("ort", model_path=path, ort_graph="exported").prefill_piece_tokens(3) > 10 ** 9
    prefix = (0, 2, 5)
    ids = _ids(3, 5 + 37, seed=21)
    state = _rows_at(whole, whole, ids, prefix)
    call = np.stack([ids[b, n:n + 37] for b, n in enumerate(prefix)])
    from trellis_export.runtime.ort_backend import OrtSession

    calls: list[int] = []
    call_one = OrtSession._call

    def counting(sess: object, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        calls.append(feeds["input_ids"].shape[1])
        return call_one(sess, outputs, feeds)

    monkeypatch.setattr(OrtSession, "_call", staticmethod(counting))   # the pieces, as run
    got_logits, got = small.step(call, state)
    piece = 2 * cfg.chunk_size
    assert calls == [piece] * (37 // piece) + ([37 % piece] if 37 % piece else [])
    monkeypatch.undo()
    want_logits, want = whole.step(call, state)
    assert_rel_close(got_logits, want_logits, 2e-6, "pieces vs one call: logits")
    for k in want:
        assert_rel_close(got[k], want[k], 2e-6, f"pieces vs one call: {k}")
    for b, n in enumerate(prefix):
        ref_logits, ref_state = _ref_stream(m64, ids[b:b + 1, :n + 37])
        assert_rel_close(got_logits[b], ref_logits[0, n:], TOL_SHORT, f"row {b} logits")
        for t in small.state_spec:
            if t.name != "position":
                assert_rel_close(got[t.name][b], ref_state[t.name][0], TOL_SHORT, f"row {b} {t.name}")
