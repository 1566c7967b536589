"""Triton kernels vs the float64 reference op, run on the CPU by triton's interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a function (at import of the kernel
modules), so it is set here before anything imports ``trellis_export.kernels``. Shapes are tiny
(the interpreter costs ~1 ms per token-step per program).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

import triton.language as _tl  # noqa: E402
from trellis_export.kernels.trellis_memory import (  # noqa: E402
    chunk_trellis_fwd,
    fused_recurrent_trellis_fwd,
    trellis_memory_triton,
)
from trellis_export.kernels.trellis_memory.chunk import chunk_trellis_fwd_kernel  # noqa: E402
from trellis_export.kernels.trellis_memory.chunk_split import (  # noqa: E402
    chunk_readout_kernel,
    chunk_split_trellis_fwd,
    chunk_state_dsplit_kernel,
    chunk_state_kernel,
    max_chunks,
)
from trellis_export.kernels.trellis_memory.fused_recurrent import (  # noqa: E402
    fused_recurrent_trellis_fwd_kernel,
)
from trellis_export.kernels.trellis_memory.utils import CONSTEXPR_ARGS, RUNTIME_ARGS  # noqa: E402

from trellis_export.config import TrellisConfig  # noqa: E402
from trellis_export.metrics import rel_rms  # noqa: E402
from trellis_export.model import TrellisLM  # noqa: E402
from trellis_export.model.backends import memory_backend, use_backend  # noqa: E402
from trellis_export.model.memory import MemoryState, trellis_memory  # noqa: E402

if type(fused_recurrent_trellis_fwd_kernel).__name__ != "InterpretedFunction" \
        or type(_tl.standard.sum).__name__ != "InterpretedFunction":
    # (triton imported before TRITON_INTERPRET=1: its interpreter then fails on tl.reduce with a
    # combine function, which the decode kernel's one-round statistics use)
    pytest.skip("triton or the kernels were imported before TRITON_INTERPRET=1 was set (run this module "
                "alone)", allow_module_level=True)

TOL = 1e-5
M, D, H = 7, 5, 3
KERNELS = {"fused_recurrent": fused_recurrent_trellis_fwd, "chunk": chunk_trellis_fwd,
           "chunk_split": chunk_split_trellis_fwd}


def make_inputs(B: int, T: int, positions: list[int], seed: int = 0, dtype: torch.dtype = torch.float32,
                gate_dtype: torch.dtype | None = None, m: int = M, d: int = D
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = F.normalize(r(B, T, H, d), dim=-1)
    k = F.normalize(r(B, T, H, d), dim=-1)
    v, a = r(B, T, H, d), r(B, T, H, m)
    beta = 0.5 + 0.5 * torch.rand(B, T, H, generator=g)
    gamma = torch.rand(B, T, H, generator=g)
    acts = [x.to(dtype) for x in (q, k, v, a)] + [x.to(gate_dtype or dtype) for x in (beta, gamma)]
    state = [r(B, H, m, d) / d ** 0.5 for _ in range(4)]
    return acts, state, torch.tensor(positions, dtype=torch.int64)


def reference(acts: list[torch.Tensor], state: list[torch.Tensor], pos: torch.Tensor, **kw: object
              ) -> list[torch.Tensor]:
    o, st = trellis_memory(*[x.double() for x in acts], MemoryState(*[s.double() for s in state]), pos,
                           mode="step", **kw)
    return [o, *st]


def check(out: tuple[torch.Tensor, ...], ref: list[torch.Tensor], tol_o: float = TOL, tol_s: float = TOL
          ) -> None:
    names = ("o", "key_memory", "value_memory", "key_snapshot", "value_snapshot")
    for name, x, r, tol in zip(names, out, ref, (tol_o, tol_s, tol_s, tol_s, tol_s)):
        assert x.shape == r.shape, name
        assert torch.isfinite(x).all(), f"{name} has non-finite entries"
        err = rel_rms(x, r)
        assert err <= tol, f"{name}: rel RMS {err:.3e} > {tol:.0e}"


def test_kernel_signatures_follow_the_plugin_order() -> None:
    expected = list(RUNTIME_ARGS + CONSTEXPR_ARGS)
    assert fused_recurrent_trellis_fwd_kernel.arg_names == expected
    assert chunk_trellis_fwd_kernel.arg_names == expected
    split = list(RUNTIME_ARGS + ("ws_memory", "ws_u") + CONSTEXPR_ARGS)
    assert chunk_state_kernel.arg_names == split and chunk_readout_kernel.arg_names == split
    # the d-axis split: its steps after T, its two workspaces last (what aot.kernel_args records)
    from trellis_export.kernels.aot import kernel_args
    n_in = len(RUNTIME_ARGS) - 6
    dsplit = RUNTIME_ARGS[:n_in + 1] + ("S0", "S1") + RUNTIME_ARGS[n_in + 1:] \
        + ("ws_memory", "ws_u", "ws_z", "ws_sync")
    assert chunk_state_dsplit_kernel.arg_names == list(dsplit + CONSTEXPR_ARGS)
    assert kernel_args("chunk_state_dsplit") == dsplit and kernel_args("chunk_state") == tuple(split[:-14])


# (kernel, C, T, positions, phi, f, rho): odd shapes, T not a multiple of C, T = 1 decode, rows at
# different chunk phases, every nonlinearity in every role at least once.
CASES = [
    ("fused_recurrent", 1, 5, [0, 3], "ln_silu", "ln_silu", "identity"),
    ("fused_recurrent", 3, 7, [5, 0], "l2_silu", "identity", "ln_silu"),
    ("fused_recurrent", 4, 1, [6, 4, 0], "identity", "l2_silu", "l2_silu"),
    ("fused_recurrent", 4, 9, [2, 13], "ln_silu", "ln_silu", "identity"),
    ("chunk", 1, 5, [0, 3], "ln_silu", "l2_silu", "identity"),
    ("chunk", 3, 7, [5, 0], "identity", "ln_silu", "ln_silu"),
    ("chunk", 3, 1, [4, 3, 0], "l2_silu", "ln_silu", "identity"),
    ("chunk", 4, 11, [2, 13], "ln_silu", "identity", "l2_silu"),
    ("chunk", 16, 21, [9, 0], "ln_silu", "ln_silu", "identity"),
    # the two-launch prefill (state pass per (row, head, pass), read-out per (chunk, row, head))
    ("chunk_split", 1, 5, [0, 3], "l2_silu", "ln_silu", "identity"),
    ("chunk_split", 3, 7, [5, 0, 1], "ln_silu", "l2_silu", "ln_silu"),
    ("chunk_split", 3, 1, [4, 3, 0], "identity", "ln_silu", "identity"),
    ("chunk_split", 4, 11, [2, 13], "ln_silu", "identity", "l2_silu"),
    ("chunk_split", 16, 21, [9, 0], "ln_silu", "ln_silu", "identity"),
]


@pytest.mark.parametrize("kernel,C,T,positions,phi,f,rho", CASES)
def test_kernel_matches_reference(kernel: str, C: int, T: int, positions: list[int], phi: str, f: str,
                                  rho: str) -> None:
    acts, state, pos = make_inputs(len(positions), T, positions, seed=C * 100 + T)
    kw = dict(chunk_size=C, phi=phi, f=f, rho=rho, eps=1e-5)
    out = KERNELS[kernel](*acts, *state, pos, **kw)
    assert out[0].dtype == torch.float32 and all(s.dtype == torch.float32 for s in out[1:])
    check(out, reference(acts, state, pos, **kw))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_long_stream_split_into_calls(kernel: str) -> None:
    """A 40-token stream in calls of 1, 6 and 33 tokens equals the reference over the whole stream."""
    acts, state, pos = make_inputs(2, 40, [3, 0], seed=7)
    kw = dict(chunk_size=4, phi="ln_silu", f="ln_silu", rho="identity")
    ref = reference(acts, state, pos, **kw)
    st, p, outs = state, pos.clone(), []
    for t0, t1 in ((0, 1), (1, 7), (7, 40)):
        o, *st = KERNELS[kernel](*[x[:, t0:t1] for x in acts], *st, p, **kw)
        outs.append(o)
        p = p + (t1 - t0)
    check((torch.cat(outs, dim=1), *st), ref)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_float16_inputs(kernel: str) -> None:
    """float16 activations (and float16 gates): compute is float32 on the float16-rounded inputs;
    the output is float16 (rounding ~3e-4 relative), the float32 state meets the 1e-5 tolerance."""
    acts, state, pos = make_inputs(2, 6, [1, 0], seed=3, dtype=torch.float16)
    kw = dict(chunk_size=3, phi="ln_silu", f="ln_silu", rho="identity")
    out = KERNELS[kernel](*acts, *state, pos, **kw)
    assert out[0].dtype == torch.float16
    check(out, reference(acts, state, pos, **kw), tol_o=2e-3)


def test_bfloat16_activations_float32_gates() -> None:
    acts, state, pos = make_inputs(2, 5, [2, 0], seed=4, dtype=torch.bfloat16, gate_dtype=torch.float32)
    kw = dict(chunk_size=3, phi="l2_silu", f="ln_silu", rho="identity")
    out = chunk_trellis_fwd(*acts, *state, pos, **kw)
    assert out[0].dtype == torch.bfloat16
    check(out, reference(acts, state, pos, **kw), tol_o=1.5e-2)


def test_custom_op_modes_agree_with_reference() -> None:
    acts, state, pos = make_inputs(2, 5, [1, 0], seed=5)
    kw = dict(chunk_size=3, phi="ln_silu", f="ln_silu", rho="identity", eps=1e-5)
    ref = reference(acts, state, pos, **kw)
    for mode in ("step", "chunked"):
        o, st = trellis_memory_triton(*acts, MemoryState(*state), pos, mode=mode, **kw)
        check((o, *st), ref)


def test_custom_op_chunked_mode_runs_the_split_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mode="chunked"`` calls the split prefill (counted by a pass-through wrapper; under the
    interpreter its rounding equals the one-launch kernel's, so the bits cannot tell them apart), and
    matches the reference within 1e-5 at odd shapes, rows at three chunk phases."""
    from trellis_export.kernels.trellis_memory import ops

    calls: list[int] = []

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return chunk_split_trellis_fwd(*args, **kwargs)

    monkeypatch.setattr(ops, "chunk_split_trellis_fwd", counted)
    acts, state, pos = make_inputs(3, 11, [0, 5, 2], seed=8)
    kw = dict(chunk_size=4, phi="l2_silu", f="ln_silu", rho="identity", eps=1e-5)
    o, st = trellis_memory_triton(*acts, MemoryState(*state), pos, mode="chunked", **kw)
    assert calls == [1]
    check((o, *st), reference(acts, state, pos, **kw))


def test_bad_inputs_raise_clear_errors() -> None:
    acts, state, pos = make_inputs(1, 2, [0], seed=6)
    with pytest.raises(TypeError, match="q must be float32, float16 or bfloat16"):
        fused_recurrent_trellis_fwd(acts[0].double(), *acts[1:], *state, pos, chunk_size=2)
    with pytest.raises(ValueError, match="phi must be one of"):
        chunk_trellis_fwd(*acts, *state, pos, chunk_size=2, phi="tanh")
    with pytest.raises(ValueError, match="position must be an int64"):
        chunk_trellis_fwd(*acts, *state, pos.int(), chunk_size=2)
    with pytest.raises(ValueError, match="memory backend must be one of"):
        memory_backend("cuda")


def tiny_model() -> TrellisLM:
    cfg = TrellisConfig(vocab_size=32, d_model=12, n_layers=1, n_heads=H, head_dim=D, n_slots=M,
                        chunk_size=3, ffn_dim=24)
    torch.manual_seed(0)
    return TrellisLM(cfg).eval()


def interpreted_triton_backend(model: TrellisLM) -> TrellisLM:
    """``use_backend(model, "triton")`` refuses a machine without a CUDA GPU (the production rule);
    under TRITON_INTERPRET the kernels run on the CPU, so these tests set the backend function directly."""
    model.memory_fn = memory_backend("triton")
    return model


def test_model_with_triton_backend_streams_like_reference() -> None:
    model = tiny_model()
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_state = model(ids, mode="step")
        interpreted_triton_backend(model)
        for mode in ("step", "chunked"):
            logits, state = model(ids, mode=mode)
            assert rel_rms(logits, ref) <= TOL
            assert rel_rms(state["0.key_memory"], ref_state["0.key_memory"]) <= TOL
        # decode: 4 tokens then one more token equals the whole call
        _, st = model.step(ids[:, :4], model.init_state(2))
        last, _ = model.step(ids[:, 4:], st)
        assert rel_rms(last, ref[:, 4:]) <= TOL


def test_torch_export_traces_through_the_custom_op() -> None:
    """torch.export runs the fake implementation only; the op is a node of the exported graph."""
    model = interpreted_triton_backend(tiny_model())
    ids = torch.randint(0, 32, (2, 4))
    ep = torch.export.export(model, (ids,), kwargs={"mode": "chunked"}, strict=False)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("trellis_export.memory_triton" in t for t in targets) == model.config.n_layers
    with torch.no_grad():
        out, _ = ep.module()(ids, mode="chunked")
        ref, _ = use_backend(model, "reference")(ids, mode="chunked")
    assert rel_rms(out, ref) <= TOL


# --------------------------------------------------------------------------- issue 14: lean decode
@pytest.mark.parametrize("C,T,positions", [(3, 1, [0, 4, 3, 8]), (4, 1, [7, 0]), (1, 1, [2, 0]),
                                           (3, 5, [1, 0, 6]), (4, 7, [2, 13])])
def test_in_place_update_matches_reference(C: int, T: int, positions: list[int]) -> None:
    """``in_place=True``: the state tensors are updated themselves; snapshots are written only by rows
    where a chunk starts in the call (T = 1 is the DECODE specialisation)."""
    acts, state, pos = make_inputs(len(positions), T, positions, seed=11 * C + T)
    kw = dict(chunk_size=C, phi="ln_silu", f="l2_silu", rho="identity", eps=1e-5)
    ref = reference(acts, state, pos, **kw)
    st = [s.clone() for s in state]
    out = fused_recurrent_trellis_fwd(*acts, *st, pos, in_place=True, **kw)
    assert all(o is s for o, s in zip(out[1:], st))             # the caller's tensors, updated
    check(out, ref)


def test_split_prefill_in_place() -> None:
    """The split prefill's state pass in place: state updated, untouched snapshots of rows where no
    chunk starts (row 0: position 1, C = 4, T = 2), matching the reference."""
    acts, state, pos = make_inputs(3, 2, [1, 3, 8], seed=51)
    kw = dict(chunk_size=4, phi="l2_silu", f="ln_silu", rho="identity", eps=1e-5)
    ref = reference(acts, state, pos, **kw)
    st = [s.clone() for s in state]
    out = chunk_split_trellis_fwd(*acts, *st, pos, in_place=True, **kw)
    assert all(o is s for o, s in zip(out[1:], st))
    check(out, ref)
    assert torch.equal(out[3][0], state[2][0]) and torch.equal(out[4][0], state[3][0])


def test_in_place_leaves_snapshots_of_mid_chunk_rows_untouched() -> None:
    """A row with no chunk start in the call keeps its snapshot storage bit for bit (not rewritten);
    a row whose chunk starts overwrites it."""
    C, T = 4, 2
    positions = [1, 3, 5]                  # first chunk start at t = 3, 1, 3: only row 1 has one in T = 2
    acts, state, pos = make_inputs(3, T, positions, seed=21)
    kw = dict(chunk_size=C, phi="ln_silu", f="ln_silu", rho="identity", eps=1e-5)
    ref = reference(acts, state, pos, **kw)
    st = [s.clone() for s in state]
    out = fused_recurrent_trellis_fwd(*acts, *st, pos, in_place=True, **kw)
    check(out, ref)
    for i in (2, 3):
        assert torch.equal(out[i + 1][[0, 2]], state[i][[0, 2]])   # untouched rows
        assert not torch.equal(out[i + 1][1], state[i][1])         # a chunk started in row 1


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_snapshot_not_read_when_the_call_starts_a_chunk(kernel: str) -> None:
    """Rows at position % C == 0 overwrite the snapshot before using it: the kernels do not load it,
    so NaN there must not reach any output (rows mid-chunk read theirs and stay correct)."""
    C = 3
    positions = [0, 4, 6]
    acts, state, pos = make_inputs(3, 1, positions, seed=31)
    kw = dict(chunk_size=C, phi="ln_silu", f="ln_silu", rho="identity", eps=1e-5)
    ref = reference(acts, state, pos, **kw)
    poisoned = [s.clone() for s in state]
    for i in (2, 3):
        poisoned[i][[0, 2]] = float("nan")
    out = KERNELS[kernel](*acts, *poisoned, pos, **kw)
    check(out, ref)


def test_in_place_needs_float32_contiguous_state() -> None:
    acts, state, pos = make_inputs(1, 1, [0], seed=6)
    bad = [state[0].transpose(-1, -2).contiguous().transpose(-1, -2), *state[1:]]
    with pytest.raises(ValueError, match="in_place needs contiguous float32"):
        fused_recurrent_trellis_fwd(*acts, *bad, pos, chunk_size=2, in_place=True)
    with pytest.raises(ValueError, match="in_place needs contiguous float32"):
        fused_recurrent_trellis_fwd(*acts, *[s.double() for s in state], pos, chunk_size=2, in_place=True)


def test_split_prefill_grid_covers_every_row_phase() -> None:
    """The read-out grid's first axis is the most chunks any row can span: T + phase tokens over C."""
    for C in (1, 3, 4, 16):
        for T in (1, 2, 7, 33):
            need = max((phase + T + C - 1) // C for phase in range(C))
            assert max_chunks(T, C) == need, (C, T)


# (m, C, T, positions, f, rho): the m-axis split of the state pass at phi = identity, 16-slot blocks:
# m = 19 and 33 leave a part-filled last block (2 and 3 programs per (row, head, pass)), T not a
# multiple of C, rows at different chunk phases, T = 1.
M_SPLIT_CASES = [
    (19, 3, 8, [0, 1, 2], "ln_silu", "identity"),
    (33, 3, 7, [5, 0], "l2_silu", "ln_silu"),
    (19, 3, 1, [2, 0], "ln_silu", "identity"),
    (40, 4, 11, [3, 4], "identity", "l2_silu"),
]


@pytest.mark.parametrize("m,C,T,positions,f,rho", M_SPLIT_CASES)
def test_split_prefill_m_axis_split_matches_reference(m: int, C: int, T: int, positions: list[int], f: str,
                                                      rho: str) -> None:
    """Each block of 16 slots as a program of its own (phi = identity: slots do not interact in the
    state pass) == the float64 reference, and == the unsplit pass; in place too."""
    assert -(-m // 16) > 1                                            # more than one 16-slot program
    acts, state, pos = make_inputs(len(positions), T, positions, seed=m + T, m=m)
    kw = dict(chunk_size=C, phi="identity", f=f, rho=rho, eps=1e-5)
    ref = reference(acts, state, pos, **kw)
    split = chunk_split_trellis_fwd(*acts, *state, pos, m_block=16, **kw)
    check(split, ref)
    whole = chunk_split_trellis_fwd(*acts, *state, pos, m_block=0, **kw)
    assert max(rel_rms(x, y) for x, y in zip(split, whole)) <= TOL
    mine = [s.clone() for s in state]
    check(chunk_split_trellis_fwd(*acts, *mine, pos, m_block=16, in_place=True, **kw), ref)
    check((split[0], *mine), ref)


def test_m_axis_split_needs_phi_identity_and_a_block_below_m() -> None:
    """The split is refused where slots interact (ln_silu / l2_silu statistics over all m) or the
    block is not below m; the automatic choice (m_block=None) takes it only where it is allowed."""
    from trellis_export.kernels.trellis_memory.chunk_split import split_m_block, splits_m
    acts, state, pos = make_inputs(2, 5, [1, 0], seed=3, m=19)
    for phi in ("ln_silu", "l2_silu"):
        with pytest.raises(ValueError, match="needs phi = identity"):
            chunk_split_trellis_fwd(*acts, *state, pos, chunk_size=3, phi=phi, m_block=16)
    with pytest.raises(ValueError, match="m_block must be a power of two >= 16 below 32"):
        chunk_split_trellis_fwd(*acts, *state, pos, chunk_size=3, phi="identity", m_block=32)
    with pytest.raises(ValueError, match="m_block must be a power of two"):
        chunk_split_trellis_fwd(*acts, *state, pos, chunk_size=3, phi="identity", m_block=24)
    assert splits_m("identity", 19) and not splits_m("identity", 16) and not splits_m("ln_silu", 64)
    assert split_m_block("identity", 64, 1, 8, 132) == 16 and split_m_block("identity", 64, 9, 8, 132) == 0
    assert split_m_block("identity", 64, 9, 8, None) == 16 and split_m_block("ln_silu", 64, 1, 8, 132) == 0
    kw = dict(chunk_size=3, phi="identity", f="ln_silu", rho="identity", eps=1e-5)
    check(chunk_split_trellis_fwd(*acts, *state, pos, **kw), reference(acts, state, pos, **kw))


# (m, d, C, T, positions, phi, f, rho, d_block): the d-axis split of the state pass (any phi): d = 40
# and 33 leave a part-filled last column block (3 programs per (row, head, pass)), T not a multiple
# of C, rows at different chunk phases, T = 1 (DECODE), every phi.
D_SPLIT_CASES = [
    (7, 40, 3, 7, [0, 1, 2], "ln_silu", "ln_silu", "identity", 16),
    (7, 33, 3, 8, [5, 0], "l2_silu", "ln_silu", "l2_silu", 16),
    (19, 40, 4, 11, [3, 4], "identity", "l2_silu", "identity", 32),
    (7, 20, 3, 1, [2, 0], "ln_silu", "identity", "ln_silu", 16),
]


@pytest.mark.parametrize("m,d,C,T,positions,phi,f,rho,d_block", D_SPLIT_CASES)
def test_split_prefill_d_axis_split_matches_reference(m: int, d: int, C: int, T: int, positions: list[int],
                                                      phi: str, f: str, rho: str, d_block: int) -> None:
    """Blocks of d_block memory columns as programs of their own, meeting once per chunk through
    their partial Z (one launch per step here: the interpreter runs programs one at a time) == the
    float64 reference and == the unsplit pass; in place too."""
    assert -(-d // d_block) > 1                                       # more than one program per group
    B = len(positions)
    acts, state, pos = make_inputs(B, T, positions, seed=d + T, m=m, d=d)
    kw = dict(chunk_size=C, phi=phi, f=f, rho=rho, eps=1e-5)
    ref = reference(acts, state, pos, **kw)
    split = chunk_split_trellis_fwd(*acts, *state, pos, d_block=d_block, d_sync="launch", **kw)
    check(split, ref)
    whole = chunk_split_trellis_fwd(*acts, *state, pos, m_block=0, **kw)
    assert max(rel_rms(x, y) for x, y in zip(split, whole)) <= TOL
    mine = [s.clone() for s in state]
    check(chunk_split_trellis_fwd(*acts, *mine, pos, d_block=d_block, d_sync="launch", in_place=True, **kw),
          ref)
    check((split[0], *mine), ref)


def test_d_axis_split_spin_launch_walks_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """``d_sync='spin'``: one launch walks every step, its programs taking start-order tickets and
    meeting at a counter barrier per chunk. With one program per group (d_block = d's padded size)
    that runs here; the tickets and counters end where they should and the result is the reference."""
    acts, state, pos = make_inputs(3, 11, [0, 1, 2], seed=5, d=20)
    kw = dict(chunk_size=3, phi="ln_silu", f="ln_silu", rho="identity", eps=1e-5)
    check(chunk_split_trellis_fwd(*acts, *state, pos, d_block=32, d_sync="spin", **kw),
          reference(acts, state, pos, **kw))
    # the counters: one ticket per program; each group's counter = its barriers (its chunks)
    from trellis_export.kernels.trellis_memory import chunk_split as cs
    seen: list[torch.Tensor] = []
    real = cs.workspaces

    def keep(*args: object) -> dict[str, torch.Tensor]:
        ws = real(*args)  # type: ignore[arg-type]
        seen.append(ws["ws_sync"])
        return ws

    monkeypatch.setattr(cs, "workspaces", keep)
    chunk_split_trellis_fwd(*acts, *state, pos, d_block=32, d_sync="spin", **kw)
    (sync,) = seen
    n_chunks = [(p % 3 + 11 + 2) // 3 for p in (0, 1, 2)]             # 4, 4 and 5 chunks
    assert sync[0].item() == 3 * H * 2
    assert sync[1:].tolist() == [n for n in n_chunks for _ in range(H * 2)]


class ConcurrentPrograms:
    """A stand-in for an interpreted kernel whose launch runs all its programs at once, one Python
    thread each, started after random short delays: what the spin barrier needs and triton's
    interpreter (one program after another) does not do. Only for kernels that take their program
    identity from a ticket (``chunk_state_dsplit_kernel`` walking more than one step): every thread
    sees ``program_id`` 0. The launch goes through the interpreter's own ``GridExecutor`` with a
    one-program grid, whose one program starts the threads and joins them (a deadlock fails the
    test after ``timeout`` seconds instead of hanging it)."""

    def __init__(self, kernel: object, seed: int, timeout: float = 120.0) -> None:
        self.kernel, self.rng, self.timeout = kernel, __import__("random").Random(seed), timeout
        self.programs = 0

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        import inspect
        import threading
        import time

        import triton.runtime.interpreter as interp
        n = 1
        for g in grid:
            n *= int(g)
        fn = self.kernel.rewrite()                                      # type: ignore[attr-defined]
        delays = [self.rng.random() * 0.003 for _ in range(n)]

        def programs(**args: object) -> None:
            errors: list[BaseException] = []

            def one(delay: float) -> None:
                try:
                    time.sleep(delay)
                    fn(**args)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the launching thread
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(dl,), daemon=True) for dl in delays]
            for t in threads:
                t.start()
            for t in threads:
                t.join(self.timeout)
            assert not any(t.is_alive() for t in threads), \
                f"deadlock: programs still waiting after {self.timeout} s"
            self.programs += n
            if errors:
                raise errors[0]

        # the executor reads the launched function's signature and annotations (its constexprs): the
        # kernel's; the triton.language it patches it finds in this module's globals (``_tl``)
        programs.__signature__ = inspect.signature(fn)                  # type: ignore[attr-defined]
        programs.__annotations__ = fn.__annotations__
        return lambda *a, **kw: interp.GridExecutor(programs, self.kernel.arg_names, (1, 1, 1))(*a, **kw)


@pytest.mark.parametrize("d,C,T,positions,phi,in_place", [(40, 3, 8, [0, 1, 2], "ln_silu", False),
                                                          (33, 4, 11, [5, 2], "l2_silu", True)])
def test_d_axis_split_spin_barrier_with_programs_running_at_once(
        monkeypatch: pytest.MonkeyPatch, d: int, C: int, T: int, positions: list[int], phi: str,
        in_place: bool) -> None:
    """``d_sync='spin'`` with three programs per group, all the launch's programs running at once
    (``ConcurrentPrograms``): they take tickets in whatever order they start, meet at each chunk's
    barrier, and give the float64 reference, and bit for bit what one launch per chunk gives. This
    runs the barrier's protocol (tickets, counters, the two-deep partial-Z buffer, rows with
    different chunk counts); the GPU's memory model it does not (bench/gpu_suite.py, section
    d_split)."""
    from trellis_export.kernels.trellis_memory import chunk_split as cs
    acts, state, pos = make_inputs(len(positions), T, positions, seed=d + T, d=d)
    kw = dict(chunk_size=C, phi=phi, f="ln_silu", rho="l2_silu", eps=1e-5)
    ref = reference(acts, state, pos, **kw)
    st_launch = [s.clone() for s in state]
    launch = chunk_split_trellis_fwd(*acts, *st_launch, pos, d_block=16, d_sync="launch", in_place=in_place,
                                     **kw)
    runner = ConcurrentPrograms(cs.chunk_state_dsplit_kernel, seed=d)
    monkeypatch.setattr(cs, "chunk_state_dsplit_kernel", runner)
    st_spin = [s.clone() for s in state]
    spin = chunk_split_trellis_fwd(*acts, *st_spin, pos, d_block=16, d_sync="spin", in_place=in_place, **kw)
    if in_place:
        launch, spin = (launch[0], *st_launch), (spin[0], *st_spin)
    assert runner.programs == len(positions) * H * 2 * 3                 # one launch, 3 column blocks
    check(spin, ref)
    assert all(torch.equal(x, y) for x, y in zip(spin, launch))


def test_d_axis_split_refusals() -> None:
    """Bad blocks, both splits at once, an unknown sync and a spin launch the interpreter cannot run
    each get an error naming the argument."""
    acts, state, pos = make_inputs(2, 5, [1, 0], seed=3, m=19, d=40)
    kw = dict(chunk_size=3, phi="ln_silu", f="ln_silu", rho="identity", eps=1e-5)
    with pytest.raises(ValueError, match="d_block must be a power of two from 16 to 64"):
        chunk_split_trellis_fwd(*acts, *state, pos, d_block=24, **kw)
    with pytest.raises(ValueError, match="d_block must be a power of two from 16 to 64"):
        chunk_split_trellis_fwd(*acts, *state, pos, d_block=128, **kw)
    with pytest.raises(ValueError, match="choose one split"):
        chunk_split_trellis_fwd(*acts, *state, pos, d_block=16, m_block=16, **{**kw, "phi": "identity"})
    with pytest.raises(ValueError, match="d_sync must be one of spin, launch"):
        chunk_split_trellis_fwd(*acts, *state, pos, d_block=16, d_sync="grid", **kw)
    with pytest.raises(ValueError, match="interpreter"):
        chunk_split_trellis_fwd(*acts, *state, pos, d_block=16, d_sync="spin", **kw)


def test_split_prefill_tf32x3_flag_under_the_interpreter() -> None:
    """The flag reaches the kernels and the result meets the spec's 1e-5. The interpreter computes
    every tl.dot in float32 whatever the precision, so this checks the plumbing only; the tensor-core
    accuracy of tf32x3 needs a GPU (bench/gpu_suite.py)."""
    acts, state, pos = make_inputs(2, 7, [2, 0], seed=41)
    kw = dict(chunk_size=3, phi="ln_silu", f="ln_silu", rho="identity", eps=1e-5)
    check(chunk_split_trellis_fwd(*acts, *state, pos, dot_precision="tf32x3", **kw),
          reference(acts, state, pos, **kw))
    with pytest.raises(ValueError, match="dot_precision must be one of"):
        chunk_split_trellis_fwd(*acts, *state, pos, dot_precision="bf16", **kw)


# --------------------------------------------------------------------------- in-kernel nonlinearities
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from trellis_export.kernels.trellis_memory.utils import inner_grad, nl_fwd  # noqa: E402

from trellis_export.model.memory import nonlinearity, nonlinearity_vjp  # noqa: E402


@triton.jit
def _nl_probe(z_ptr, a_ptr, y_ptr, u_ptr, N: tl.constexpr, BN: tl.constexpr, KIND: tl.constexpr,
              ONE_ROUND: tl.constexpr):
    offs = tl.arange(0, BN)
    mask = offs < N
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, nl_fwd(z, mask, N, 1e-5, KIND, 0, ONE_ROUND), mask=mask)
    tl.store(u_ptr + offs, inner_grad(z, a, mask, N, 1e-5, KIND, 0, ONE_ROUND), mask=mask)


def _probe_errors(z: torch.Tensor, a: torch.Tensor, one_round: bool) -> dict[str, tuple[float, float]]:
    N = z.numel()
    out = {}
    for kind, name in ((1, "ln_silu"), (2, "l2_silu")):
        y, u = torch.empty(N), torch.empty(N)
        _nl_probe[(1,)](z, a, y, u, N=N, BN=triton.next_power_of_2(N), KIND=kind, ONE_ROUND=one_round)
        y_ref = nonlinearity(name, z.double())
        u_ref = nonlinearity_vjp(name, z.double(), y_ref - a.double())
        out[name] = (rel_rms(y, y_ref), rel_rms(u, u_ref))
    return out


@pytest.mark.parametrize("one_round", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_in_kernel_nonlinearities_match_float64(one_round: bool, scale: float) -> None:
    """ln_silu / l2_silu and their vector-Jacobian products inside a kernel, two-pass and one-round
    (Welford, the decode kernel's) statistics, against the float64 definitions."""
    g = torch.Generator().manual_seed(3)
    z, a = scale * torch.randn(7, generator=g), torch.randn(7, generator=g)
    for name, (ey, eu) in _probe_errors(z, a, one_round).items():
        assert ey <= 1e-5 and eu <= 1e-5, (name, ey, eu)


def test_one_round_statistics_do_not_cancel() -> None:
    """z ~ 6 +- 1e-2 (s's spread 1e-3 of its mean): float32 itself loses ~1e-5..1e-4 here with either
    form (measured over 40 seeds: two-pass max 6.6e-5, Welford max 1.7e-4; in regimes of realistic
    spread both stay below 1.1e-6), while E[s^2] - E[s]^2 loses 6e-3 of the variance. The Welford
    form must not cancel: within 5x of the two-pass error and below 1e-3."""
    g = torch.Generator().manual_seed(5)
    z, a = 6.0 + 1e-2 * torch.randn(64, generator=g), torch.randn(64, generator=g)
    two, one = _probe_errors(z, a, False), _probe_errors(z, a, True)
    for name in two:
        assert max(one[name]) <= 5 * max(two[name]) + 1e-6, (name, one[name], two[name])
        assert max(one[name]) <= 1e-3, (name, one[name])
