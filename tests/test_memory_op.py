"""The reference TrellisMemory op (TRELLIS_SPEC.md sections 2-4) against itself and against
independent loops written plainly here.

Grid: m = 7, d = 5, H = 3, C in {1, 3, 4, 16}, T not a multiple of C, rows at different positions,
every nonlinearity in every role (phi, f, rho).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    CHUNK_SIZES,
    NONLINEARITY_NAMES,
    TOL_F64,
    TOL_LONG,
    TOL_SHORT,
    OpInputs,
    assert_rel_close,
    assert_state_close,
    make_op_inputs,
    op_shape_grid,
    run_op,
    run_op_split,
)
from torch import Tensor

from trellis_export.model.memory import MemoryState, nonlinearity, nonlinearity_vjp, trellis_memory

#: Every nonlinearity in every role at least once, plus the spec's defaults.
COMBOS: list[tuple[str, str, str]] = [
    ("ln_silu", "ln_silu", "identity"),     # spec defaults
    ("identity", "l2_silu", "ln_silu"),
    ("l2_silu", "identity", "l2_silu"),
]
ALL_COMBOS = list(itertools.product(NONLINEARITY_NAMES, repeat=3))
#: positions of the three rows: chunk start, mid chunk, and far into a stream (phase differs per C).
POSITIONS = [0, 5, 1003]
EPS = 1e-5


def combo_kwargs(combo: tuple[str, str, str]) -> dict[str, str]:
    return dict(zip(("phi", "f", "rho"), combo))


# --------------------------------------------------------------------------- independent oracles
def plain_g(name: str, z: Tensor, eps: float = EPS) -> Tensor:
    """The slot nonlinearities of spec section 2, spelled out independently of the module."""
    if name == "identity":
        return z
    s = z / (1.0 + torch.exp(-z))
    n = z.shape[-1]
    if name == "ln_silu":
        mean = s.sum(-1, keepdim=True) / n
        var = ((s - mean) ** 2).sum(-1, keepdim=True) / n
        return (s - mean) / torch.sqrt(var + eps)
    if name == "l2_silu":
        return s / torch.sqrt((s ** 2).sum(-1, keepdim=True) + eps)
    raise AssertionError(name)


def plain_inner_grad(phi: str, z: Tensor, a: Tensor, eps: float = EPS) -> Tensor:
    """d/dz of 1/2 ||phi(z) - a||^2, by autograd (no closed form)."""
    with torch.enable_grad():
        z = z.detach().clone().requires_grad_(True)
        loss = 0.5 * ((plain_g(phi, z, eps) - a) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, z)
    return grad


def plain_recurrence(x: OpInputs, C: int, phi: str, f: str, rho: str,
                     eps: float = EPS) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence of spec section 3, one row and one head at a time, in float64.

    With C = 1 no snapshot is kept at all: the inner gradient is taken at the running memory.
    Returns (o, K, V).
    """
    B, T, H, m, d = x.shape
    o = torch.zeros(B, T, H, d, dtype=torch.float64)
    K_out = torch.zeros(B, H, m, d, dtype=torch.float64)
    V_out = torch.zeros_like(K_out)
    for b in range(B):
        for h in range(H):
            K = x.state.key[b, h].double().clone()
            V = x.state.value[b, h].double().clone()
            SK = x.state.key_snapshot[b, h].double().clone()
            SV = x.state.value_snapshot[b, h].double().clone()
            for t in range(T):
                q, k, v = (y[b, t, h].double() for y in (x.q, x.k, x.v))
                a = x.a[b, t, h].double()
                beta, gamma = float(x.beta[b, t, h]), float(x.gamma[b, t, h])
                if C == 1:
                    stale_k, stale_v = K, V
                else:
                    if (int(x.position[b]) + t) % C == 0:
                        SK, SV = K.clone(), V.clone()
                    stale_k, stale_v = SK, SV
                uk = plain_inner_grad(phi, stale_k @ k, a, eps)
                uv = plain_inner_grad(phi, stale_v @ v, a, eps)
                K = beta * K - gamma * torch.outer(uk, k)
                V = beta * V - gamma * torch.outer(uv, v)
                r = plain_g(f, K @ q, eps)
                o[b, t, h] = plain_g(rho, V.T @ r, eps)
            K_out[b, h], V_out[b, h] = K, V
    return o, K_out, V_out


def gated_delta_rule(x: OpInputs, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """phi = f = rho = identity written as a gated delta rule (spec section 3 with u = S k - a).

    C = 1: K <- K (beta I - gamma k k^T) + gamma a k^T (the classic form); C > 1 keeps the
    stale chunk-start S in the error term: K <- beta K - gamma (S k - a) k^T. o = V^T K q.
    """
    B, T, H, m, d = x.shape
    eye = torch.eye(d, dtype=torch.float64)
    o = torch.zeros(B, T, H, d, dtype=torch.float64)
    K_out = torch.zeros(B, H, m, d, dtype=torch.float64)
    V_out = torch.zeros_like(K_out)
    for b in range(B):
        for h in range(H):
            K, V = x.state.key[b, h].clone(), x.state.value[b, h].clone()
            SK, SV = x.state.key_snapshot[b, h].clone(), x.state.value_snapshot[b, h].clone()
            for t in range(T):
                q, k, v, a = x.q[b, t, h], x.k[b, t, h], x.v[b, t, h], x.a[b, t, h]
                beta, gamma = x.beta[b, t, h], x.gamma[b, t, h]
                if C == 1:
                    K = K @ (beta * eye - gamma * torch.outer(k, k)) + gamma * torch.outer(a, k)
                    V = V @ (beta * eye - gamma * torch.outer(v, v)) + gamma * torch.outer(a, v)
                else:
                    if (int(x.position[b]) + t) % C == 0:
                        SK, SV = K, V
                    K = beta * K - gamma * torch.outer(SK @ k - a, k)
                    V = beta * V - gamma * torch.outer(SV @ v - a, v)
                o[b, t, h] = V.T @ (K @ q)
            K_out[b, h], V_out[b, h] = K, V
    return o, K_out, V_out


# --------------------------------------------------------------------------- nonlinearities
@pytest.mark.parametrize("name", NONLINEARITY_NAMES)
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
def test_nonlinearity_matches_plain_definition(name: str, scale: float) -> None:
    z = torch.randn(4, 3, 7, dtype=torch.float64) * scale
    assert_rel_close(nonlinearity(name, z, EPS), plain_g(name, z, EPS), TOL_F64, name)


@pytest.mark.parametrize("name", NONLINEARITY_NAMES)
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_closed_form_vjp_equals_autograd(name: str, scale: float, eps: float) -> None:
    torch.manual_seed(1)
    z = torch.randn(4, 3, 7, dtype=torch.float64) * scale
    e = torch.randn(4, 3, 7, dtype=torch.float64)
    _, ref = torch.autograd.functional.vjp(lambda x: nonlinearity(name, x, eps), z, e)
    _, ref_plain = torch.autograd.functional.vjp(lambda x: plain_g(name, x, eps), z, e)
    got = nonlinearity_vjp(name, z, e, eps)
    assert_rel_close(got, ref, TOL_F64, f"{name} vjp vs autograd")
    assert_rel_close(got, ref_plain, TOL_F64, f"{name} vjp vs autograd of the plain definition")


def test_unknown_nonlinearity_raises() -> None:
    z = torch.zeros(2, 7)
    with pytest.raises(ValueError, match="relu"):
        nonlinearity("relu", z)
    with pytest.raises(ValueError, match="relu"):
        nonlinearity_vjp("relu", z, z)


# --------------------------------------------------------------------------- step == chunked
@pytest.mark.parametrize("combo", COMBOS, ids="-".join)
@pytest.mark.parametrize("C,T", list(op_shape_grid()))
def test_step_equals_chunked(C: int, T: int, combo: tuple[str, str, str]) -> None:
    x = make_op_inputs(B=3, T=T, positions=POSITIONS, seed=C * 100 + T)
    kw = dict(chunk_size=C, **combo_kwargs(combo))
    o_s, st_s = run_op(x, mode="step", **kw)
    o_c, st_c = run_op(x, mode="chunked", **kw)
    assert o_s.dtype == o_c.dtype == torch.float64
    assert_rel_close(o_c, o_s, TOL_F64, "o")
    assert_state_close(st_c, st_s, TOL_F64)   # all four state tensors, snapshots included


@pytest.mark.parametrize("C", CHUNK_SIZES)
def test_step_equals_chunked_every_phase(C: int) -> None:
    """One row at every chunk phase 0 .. C-1 in one batch."""
    T = C + 2
    x = make_op_inputs(B=C, T=T, H=1, positions=list(range(7 * C, 8 * C)), seed=C)
    o_s, st_s = run_op(x, mode="step", chunk_size=C)
    o_c, st_c = run_op(x, mode="chunked", chunk_size=C)
    assert_rel_close(o_c, o_s, TOL_F64, "o")
    assert_state_close(st_c, st_s, TOL_F64)


# --------------------------------------------------------------------------- splits
SPLITS = {
    "single_tokens": lambda T, C: list(range(1, T)),
    "prefix_then_tokens": lambda T, C: [T - 4, T - 3, T - 2, T - 1],
    "ragged": lambda T, C: [2, 3, 9, 10, 16],
    "off_chunk_ends": lambda T, C: list(range(C + 1, T, C + 1)),
}


@pytest.mark.parametrize("modes", [("step",), ("chunked",), ("chunked", "step")], ids="+".join)
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("C", CHUNK_SIZES)
def test_any_split_equals_one_call(C: int, split: str, modes: tuple[str, ...]) -> None:
    T = 19
    x = make_op_inputs(B=3, T=T, positions=POSITIONS, seed=7 + C)
    kw = dict(chunk_size=C, phi="ln_silu", f="l2_silu", rho="ln_silu")
    o_ref, st_ref = run_op(x, mode="step", **kw)
    o, st = run_op_split(x, SPLITS[split](T, C), modes=list(modes), **kw)
    assert_rel_close(o, o_ref, TOL_F64, "o")
    # snapshots are state only for C > 1; with C = 1 they depend on how the op was called last
    fields = MemoryState._fields if C > 1 else ("key", "value")
    assert_state_close(st, st_ref, TOL_F64, fields=fields)


# --------------------------------------------------------------------------- independent loops
@pytest.mark.parametrize("mode", ["step", "chunked"])
@pytest.mark.parametrize("combo", ALL_COMBOS, ids="-".join)
def test_c1_equals_plain_exact_recurrence(combo: tuple[str, str, str], mode: str) -> None:
    x = make_op_inputs(B=2, T=6, positions=[0, 3], seed=3)
    o_ref, K_ref, V_ref = plain_recurrence(x, 1, *combo)
    o, st = run_op(x, chunk_size=1, mode=mode, **combo_kwargs(combo))
    assert_rel_close(o, o_ref, TOL_F64, "o")
    assert_rel_close(st.key, K_ref, TOL_F64, "key")
    assert_rel_close(st.value, V_ref, TOL_F64, "value")


@pytest.mark.parametrize("mode", ["step", "chunked"])
def test_c1_snapshots_are_memories_before_last_write(mode: str) -> None:
    """docs/DEVIATIONS.md: with C = 1 the returned snapshots are the memories before the last token."""
    x = make_op_inputs(B=2, T=5, positions=[0, 3], seed=4)
    _, before = run_op(x.slice(0, 4), chunk_size=1, mode=mode)
    _, after = run_op(x.slice(4, 5).with_state(before), chunk_size=1, mode=mode)
    _, full = run_op(x, chunk_size=1, mode=mode)
    assert_rel_close(full.key_snapshot, before.key, TOL_F64, "key_snapshot")
    assert_rel_close(full.value_snapshot, before.value, TOL_F64, "value_snapshot")
    assert_rel_close(after.key, full.key, TOL_F64, "key")


@pytest.mark.parametrize("mode", ["step", "chunked"])
@pytest.mark.parametrize("C", [3, 4, 16])
@pytest.mark.parametrize("combo", COMBOS, ids="-".join)
def test_snapshot_recurrence_equals_plain_loop(combo: tuple[str, str, str], C: int, mode: str) -> None:
    T = C + 3
    x = make_op_inputs(B=3, T=T, H=2, positions=POSITIONS, seed=C)
    o_ref, K_ref, V_ref = plain_recurrence(x, C, *combo)
    o, st = run_op(x, chunk_size=C, mode=mode, **combo_kwargs(combo))
    assert_rel_close(o, o_ref, TOL_F64, "o")
    assert_rel_close(st.key, K_ref, TOL_F64, "key")
    assert_rel_close(st.value, V_ref, TOL_F64, "value")


@pytest.mark.parametrize("mode", ["step", "chunked"])
@pytest.mark.parametrize("C", CHUNK_SIZES)
def test_identity_phi_is_gated_delta_rule(C: int, mode: str) -> None:
    x = make_op_inputs(B=3, T=C + 5, positions=POSITIONS, seed=11 + C)
    o_ref, K_ref, V_ref = gated_delta_rule(x, C)
    o, st = run_op(x, chunk_size=C, mode=mode, phi="identity", f="identity", rho="identity")
    assert_rel_close(o, o_ref, TOL_F64, "o")
    assert_rel_close(st.key, K_ref, TOL_F64, "key")
    assert_rel_close(st.value, V_ref, TOL_F64, "value")


# --------------------------------------------------------------------------- gradients
GRAD_COMBOS = [("ln_silu", "ln_silu", "identity"), ("l2_silu", "l2_silu", "ln_silu"),
               ("identity", "ln_silu", "l2_silu")]


@pytest.mark.parametrize("mode", ["step", "chunked"])
@pytest.mark.parametrize("combo", GRAD_COMBOS, ids="-".join)
def test_gradcheck(combo: tuple[str, str, str], mode: str) -> None:
    x = make_op_inputs(B=2, T=3, H=1, m=3, d=2, positions=[0, 1], seed=5)
    names = ("q", "k", "v", "a", "beta", "gamma")

    def fn(q, k, v, a, beta, gamma, K, V, SK, SV):  # noqa: ANN001, ANN202
        o, st = trellis_memory(q, k, v, a, beta, gamma, MemoryState(K, V, SK, SV), x.position,
                               chunk_size=2, mode=mode, **combo_kwargs(combo))
        return (o, *st)

    inputs = tuple(getattr(x, n).clone().requires_grad_(True) for n in names)
    inputs += tuple(s.clone().requires_grad_(True) for s in x.state)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("C", [1, 4])
def test_autograd_step_equals_chunked(C: int) -> None:
    """Training differentiates the chunked form: its gradients equal those of the recurrence."""
    x = make_op_inputs(B=3, T=2 * C + 3, positions=POSITIONS, seed=9)
    w = torch.randn(x.q.shape, dtype=torch.float64)
    grads = {}
    for mode in ("step", "chunked"):
        leaves = [t.clone().requires_grad_(True) for t in (*x.activations(), *x.state)]
        o, st = trellis_memory(*leaves[:6], MemoryState(*leaves[6:]), x.position, chunk_size=C,
                               mode=mode)
        ((o * w).sum() + st.key.square().sum() + st.value.sum()).backward()
        grads[mode] = [t.grad for t in leaves]
    for i, (gs, gc) in enumerate(zip(grads["step"], grads["chunked"])):
        assert_rel_close(gc, gs, 1e-9, f"grad of input {i}")


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("mode", ["step", "chunked"])
@pytest.mark.parametrize("combo", COMBOS, ids="-".join)
@pytest.mark.parametrize("C", CHUNK_SIZES)
def test_float32_matches_float64(C: int, combo: tuple[str, str, str], mode: str) -> None:
    T = 64 if C != 1 else 61
    x64 = make_op_inputs(B=3, T=T, positions=POSITIONS, seed=21)
    kw = dict(chunk_size=C, mode=mode, **combo_kwargs(combo))
    o_ref, st_ref = run_op(x64, **kw)
    o, st = run_op(x64.to(torch.float32), **kw)
    assert o.dtype == torch.float32 and all(s.dtype == torch.float32 for s in st)
    assert_rel_close(o, o_ref, TOL_SHORT, "o")
    assert_state_close(st, st_ref, TOL_SHORT)


@pytest.mark.parametrize("C,mode,T,gamma_scale", [(16, "chunked", 512, 0.25), (4, "chunked", 500, 1.0),
                                                  (1, "step", 200, 1.0)])
def test_float32_long_stream(C: int, mode: str, T: int, gamma_scale: float) -> None:
    """Spec tolerance for long streams (1e-4). gamma_scale: see make_op_inputs."""
    x64 = make_op_inputs(B=2, T=T, H=2, positions=[0, 1003], seed=31, gamma_scale=gamma_scale)
    kw = dict(chunk_size=C, mode=mode)
    o_ref, st_ref = run_op(x64, **kw)
    o, st = run_op(x64.to(torch.float32), **kw)
    assert_rel_close(o, o_ref, TOL_LONG, "o")
    assert_state_close(st, st_ref, TOL_LONG)


@pytest.mark.parametrize("mode", ["step", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_give_half_output_and_float32_state(dtype: torch.dtype, mode: str) -> None:
    x = make_op_inputs(B=3, T=9, positions=POSITIONS, dtype=dtype, seed=2)
    assert x.state.key.dtype == torch.float32
    o, st = run_op(x, chunk_size=4, mode=mode)
    assert o.dtype == dtype
    assert all(s.dtype == torch.float32 for s in st)
    # the op computes in float32: same as upcasting the (rounded) inputs first, then rounding o
    o32, st32 = run_op(x.to(torch.float32), chunk_size=4, mode=mode)
    assert_rel_close(o.float(), o32.to(dtype).float(), 1e-6, "o")
    assert_state_close(st, st32, 1e-6)
    assert torch.isfinite(o.float()).all()


# --------------------------------------------------------------------------- causality, semantics
FIELDS = ("q", "k", "v", "a", "beta", "gamma")


@pytest.mark.parametrize("mode", ["step", "chunked"])
@pytest.mark.parametrize("field", FIELDS)
def test_causality(field: str, mode: str) -> None:
    C, T, t_changed = 4, 11, 6
    x = make_op_inputs(B=3, T=T, positions=POSITIONS, seed=13)
    o_ref, _ = run_op(x, chunk_size=C, mode=mode)
    y = x.clone()
    tensor = getattr(y, field)
    with torch.no_grad():
        if field in ("beta", "gamma"):
            tensor[:, t_changed] = tensor[:, t_changed] * 0.5 + 0.1
        else:
            tensor[:, t_changed] = torch.randn_like(tensor[:, t_changed])
    o, _ = run_op(y, chunk_size=C, mode=mode)
    assert torch.equal(o[:, :t_changed], o_ref[:, :t_changed]), "an earlier output changed"
    assert not torch.allclose(o[:, t_changed], o_ref[:, t_changed]), "the changed token had no effect"
    if field != "q":   # q is only read; every other input is written into the memory
        assert not torch.allclose(o[:, -1], o_ref[:, -1]), "the change did not reach later tokens"


@pytest.mark.parametrize("mode", ["step", "chunked"])
def test_op_neither_advances_position_nor_resets(mode: str) -> None:
    x = make_op_inputs(B=2, T=5, positions=[0, 4], seed=17)
    before = x.clone()
    o, _ = run_op(x, chunk_size=4, mode=mode)
    for name in (*FIELDS, "position"):
        assert torch.equal(getattr(x, name), getattr(before, name)), f"{name} was modified in place"
    for s, s0 in zip(x.state, before.state):
        assert torch.equal(s, s0), "the state was modified in place"
    # position 0 does not reset: another state gives another output, in every row
    other = x.with_state(MemoryState(*(2.0 * s for s in x.state)))
    o2, _ = run_op(other, chunk_size=4, mode=mode)
    for b in range(2):
        assert not torch.allclose(o2[b], o[b])


def test_chunk_start_uses_running_memory_mid_chunk_uses_snapshot() -> None:
    """A row at a chunk start ignores the stored snapshot; a mid-chunk row uses it."""
    x = make_op_inputs(B=2, T=3, positions=[8, 9], seed=19)
    o, _ = run_op(x, chunk_size=4, mode="chunked")
    other = x.with_state(x.state._replace(key_snapshot=x.state.key_snapshot + 1.0,
                                          value_snapshot=x.state.value_snapshot - 1.0))
    for mode in ("step", "chunked"):
        o2, _ = run_op(other, chunk_size=4, mode=mode)
        assert_rel_close(o2[0], o[0], TOL_F64, f"row at chunk start ({mode})")
        assert not torch.allclose(o2[1], o[1]), f"mid-chunk row ignored its snapshot ({mode})"


# --------------------------------------------------------------------------- bad inputs
def _bad_cases() -> list[tuple[str, object, str]]:
    B, T, H_, m, d = 2, 5, 3, 7, 5

    def shape(name: str, *shp: int):  # noqa: ANN202
        return lambda kw: kw.__setitem__(name, torch.zeros(*shp, dtype=torch.float64))

    def state_field(i: int, *shp: int):  # noqa: ANN202
        def f(kw):  # noqa: ANN001, ANN202
            st = list(kw["state"])
            st[i] = torch.zeros(*shp, dtype=torch.float64)
            kw["state"] = MemoryState(*st)
        return f

    def setter(name: str, value: object):  # noqa: ANN202
        return lambda kw: kw.__setitem__(name, value)

    return [
        ("q_3d", shape("q", B, T, H_ * d), "q"),
        ("k_shape", shape("k", B, T, H_, d + 1), "k"),
        ("v_shape", shape("v", B, T + 1, H_, d), "v"),
        ("a_batch", shape("a", B + 1, T, H_, m), "a"),
        ("a_3d", shape("a", B, T, H_), "a"),
        ("beta_shape", shape("beta", B, T, H_, 1), "beta"),
        ("gamma_shape", shape("gamma", B, T), "gamma"),
        ("key_shape", state_field(0, B, H_, m, d + 1), "state.key"),
        ("value_slots", state_field(1, B, H_, m + 1, d), "state.value"),
        ("key_snapshot_heads", state_field(2, B, H_ + 1, m, d), "state.key_snapshot"),
        ("value_snapshot_batch", state_field(3, B + 1, H_, m, d), "state.value_snapshot"),
        ("position_shape", setter("position", torch.zeros(B + 1, dtype=torch.int64)), "position"),
        ("position_int32", setter("position", torch.zeros(B, dtype=torch.int32)), "position"),
        ("position_float", setter("position", torch.zeros(B, dtype=torch.float64)), "position"),
        ("q_int", setter("q", torch.zeros(B, T, H_, d, dtype=torch.int64)), "q"),
        ("a_bool", setter("a", torch.zeros(B, T, H_, m, dtype=torch.bool)), "a"),
        ("gamma_int", setter("gamma", torch.zeros(B, T, H_, dtype=torch.int32)), "gamma"),
        ("chunk_size_0", setter("chunk_size", 0), "chunk_size"),
        ("chunk_size_bool", setter("chunk_size", True), "chunk_size"),
        ("chunk_size_float", setter("chunk_size", 4.0), "chunk_size"),
        ("mode", setter("mode", "parallel"), "mode"),
        ("phi", setter("phi", "relu"), "phi"),
        ("f", setter("f", "tanh"), "f"),
        ("rho", setter("rho", "softmax"), "rho"),
    ]


def _state_int(kw: dict) -> None:
    st = list(kw["state"])
    st[1] = st[1].to(torch.int64)
    kw["state"] = MemoryState(*st)


BAD = [*_bad_cases(), ("state_int", _state_int, "state.value")]


@pytest.mark.parametrize("mutate,what", [(m, w) for _, m, w in BAD], ids=[c for c, _, _ in BAD])
def test_bad_inputs_raise_value_error_naming_the_tensor(mutate, what: str) -> None:  # noqa: ANN001
    x = make_op_inputs(B=2, T=5, seed=23)
    kw = dict(q=x.q, k=x.k, v=x.v, a=x.a, beta=x.beta, gamma=x.gamma, state=x.state,
              position=x.position, chunk_size=4, mode="step")
    mutate(kw)
    with pytest.raises(ValueError) as info:
        trellis_memory(**kw)
    msg = str(info.value)
    assert msg.split()[0] == what, f"the message should start with the tensor's name {what!r}: {msg}"
    assert "\n" not in msg
