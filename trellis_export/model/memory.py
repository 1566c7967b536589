"""The Trellis memory op: the reference every fast path is checked against (TRELLIS_SPEC.md 2-4).

Two modes compute the same function:

* ``mode="step"``: the recurrence token by token, with the chunk-start snapshot rule.
* ``mode="chunked"``: the stale-gradient parallel form. Inside a chunk every inner gradient u
  depends only on the chunk-start snapshot, so all of them come at once and the memory evolves by a
  linear recurrence with log-space cumulative decays. Rows whose positions differ are aligned by
  left-padding each row with no-op tokens (beta = 1, gamma = 0) up to its chunk phase.

Both are differentiable by autograd. Computation is float32, or float64 when the inputs or the state
are float64 (used by the tests as the high-precision oracle).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..config import NONLINEARITIES

__all__ = ["MemoryState", "trellis_memory", "nonlinearity", "nonlinearity_vjp", "MODES"]

MODES: tuple[str, ...] = ("step", "chunked")


class MemoryState(NamedTuple):
    """Recurrent memory of one layer: four ``[B, H, m, d]`` tensors (float32)."""

    key: Tensor
    value: Tensor
    key_snapshot: Tensor
    value_snapshot: Tensor

    @classmethod
    def zeros(cls, batch: int, heads: int, slots: int, head_dim: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> MemoryState:
        z = torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device)
        return cls(z, z.clone(), z.clone(), z.clone())


# --------------------------------------------------------------------------- nonlinearities
def _check_name(name: str, what: str) -> None:
    if name not in NONLINEARITIES:
        raise ValueError(f"{what} must be one of {', '.join(NONLINEARITIES)}; got {name!r}")


def nonlinearity(name: str, z: Tensor, eps: float = 1e-5) -> Tensor:
    """y = g(z) over the last axis (TRELLIS_SPEC.md section 2)."""
    if name == "identity":
        return z
    s = z * torch.sigmoid(z)
    if name == "ln_silu":
        mu = s.mean(-1, keepdim=True)
        c = s - mu
        sd = torch.sqrt((c * c).mean(-1, keepdim=True) + eps)
        return c / sd
    if name == "l2_silu":
        return s / torch.sqrt((s * s).sum(-1, keepdim=True) + eps)
    _check_name(name, "nonlinearity")
    raise AssertionError("unreachable")


def nonlinearity_vjp(name: str, z: Tensor, e: Tensor, eps: float = 1e-5) -> Tensor:
    """u = J_g(z)^T e over the last axis, in closed form (TRELLIS_SPEC.md section 2)."""
    if name == "identity":
        return e
    sig = torch.sigmoid(z)
    s = z * sig
    ds = sig * (1.0 + z * (1.0 - sig))
    if name == "ln_silu":
        mu = s.mean(-1, keepdim=True)
        c = s - mu
        sd = torch.sqrt((c * c).mean(-1, keepdim=True) + eps)
        y = c / sd
        return ds * (e - e.mean(-1, keepdim=True) - y * (e * y).mean(-1, keepdim=True)) / sd
    if name == "l2_silu":
        nrm = torch.sqrt((s * s).sum(-1, keepdim=True) + eps)
        y = s / nrm
        return ds * (e - y * (y * e).sum(-1, keepdim=True)) / nrm
    _check_name(name, "nonlinearity")
    raise AssertionError("unreachable")


def _inner_grad(phi: str, z: Tensor, a: Tensor, eps: float) -> Tensor:
    """Gradient of 1/2 ||phi(z) - a||^2 with respect to z."""
    return nonlinearity_vjp(phi, z, nonlinearity(phi, z, eps) - a, eps)


# --------------------------------------------------------------------------- validation
def _validate(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
              state: MemoryState, position: Tensor, chunk_size: int, mode: str) -> None:
    named = (("q", q), ("k", k), ("v", v), ("a", a), ("beta", beta), ("gamma", gamma),
             *((f"state.{n}", t) for n, t in zip(MemoryState._fields, state)))
    for name, t in named:
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, d], got shape {tuple(q.shape)}")
    B, T, H, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (B, T, H, d):
            raise ValueError(f"{name} must have shape {(B, T, H, d)} like q, got {tuple(t.shape)}")
    if a.dim() != 4 or tuple(a.shape[:3]) != (B, T, H):
        raise ValueError(f"a must be [B, T, H, m] = [{B}, {T}, {H}, m], got {tuple(a.shape)}")
    m = a.shape[3]
    for name, t in (("beta", beta), ("gamma", gamma)):
        if tuple(t.shape) != (B, T, H):
            raise ValueError(f"{name} must have shape {(B, T, H)}, got {tuple(t.shape)}")
    for name, t in zip(MemoryState._fields, state):
        if tuple(t.shape) != (B, H, m, d):
            raise ValueError(f"state.{name} must have shape {(B, H, m, d)}, got {tuple(t.shape)}")
    if tuple(position.shape) != (B,) or position.dtype != torch.int64:
        raise ValueError(f"position must be an int64 tensor of shape ({B},), got "
                         f"{position.dtype} {tuple(position.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")


# --------------------------------------------------------------------------- step mode
def _step(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
          state: MemoryState, position: Tensor, C: int, phi: str, f: str, rho: str,
          eps: float) -> tuple[Tensor, MemoryState]:
    B, T = q.shape[:2]
    K, V, SK, SV = state
    outs = []
    for t in range(T):
        reset = ((position + t) % C == 0).view(B, 1, 1, 1)
        SK = torch.where(reset, K, SK)
        SV = torch.where(reset, V, SV)
        kt, vt, at = k[:, t], v[:, t], a[:, t]                    # [B, H, d], [B, H, m]
        uk = _inner_grad(phi, torch.einsum("bhmd,bhd->bhm", SK, kt), at, eps)
        uv = _inner_grad(phi, torch.einsum("bhmd,bhd->bhm", SV, vt), at, eps)
        bt = beta[:, t, :, None, None]
        gt = gamma[:, t, :, None, None]
        K = bt * K - gt * uk[..., :, None] * kt[..., None, :]
        V = bt * V - gt * uv[..., :, None] * vt[..., None, :]
        r = nonlinearity(f, torch.einsum("bhmd,bhd->bhm", K, q[:, t]), eps)
        outs.append(nonlinearity(rho, torch.einsum("bhmd,bhm->bhd", V, r), eps))
    return torch.stack(outs, dim=1), MemoryState(K, V, SK, SV)


# --------------------------------------------------------------------------- chunked mode
def _chunked(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
             state: MemoryState, position: Tensor, C: int, phi: str, f: str, rho: str,
             eps: float) -> tuple[Tensor, MemoryState]:
    B, T, H, d = q.shape
    dev = q.device
    phase = position % C                                           # [B] tokens into the current chunk
    L = -(-int((phase + T).max()) // C) * C                        # padded length, multiple of C
    N = L // C
    idx = torch.arange(L, device=dev)[None, :] - phase[:, None]    # [B, L] token index in this call
    valid = (idx >= 0) & (idx < T)
    gidx = idx.clamp(0, T - 1)

    def pad(x: Tensor, fill: float | None = None) -> Tensor:
        g = gidx.view(B, L, *([1] * (x.dim() - 2))).expand(B, L, *x.shape[2:])
        out = torch.gather(x, 1, g)
        vmask = valid.view(B, L, *([1] * (x.dim() - 2)))
        return torch.where(vmask, out, torch.full_like(out, fill) if fill else torch.zeros_like(out))

    qp, kp, vp, ap = (pad(x).view(B, N, C, *x.shape[2:]) for x in (q, k, v, a))
    logb = torch.log(pad(beta, 1.0).clamp_min(torch.finfo(beta.dtype).tiny)).view(B, N, C, H)
    gp = pad(gamma).view(B, N, C, H)

    K, V = state.key, state.value
    mid_chunk = (phase > 0).view(B, 1, 1, 1)
    SK0 = torch.where(mid_chunk, state.key_snapshot, K)
    SV0 = torch.where(mid_chunk, state.value_snapshot, V)
    causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    outs, snaps_k, snaps_v = [], [], []
    for c in range(N):
        SK = SK0 if c == 0 else K
        SV = SV0 if c == 0 else V
        snaps_k.append(SK)
        snaps_v.append(SV)
        qc, kc, vc, ac = qp[:, c], kp[:, c], vp[:, c], ap[:, c]   # [B, C, H, *]
        gc = gp[:, c]                                              # [B, C, H]
        uk = _inner_grad(phi, torch.einsum("bhmd,bchd->bchm", SK, kc), ac, eps)
        uv = _inner_grad(phi, torch.einsum("bhmd,bchd->bchm", SV, vc), ac, eps)
        cb = torch.cumsum(logb[:, c], dim=1)                      # [B, C, H] log of b_t
        diff = cb[:, :, None, :] - cb[:, None, :, :]               # [B, t, j, H]
        diff = diff.masked_fill(~causal[None, :, :, None], float("-inf"))
        D = torch.exp(diff) * gc[:, None, :, :]                    # gamma_j b_t / b_j, j <= t
        bt = torch.exp(cb)[..., None]                              # [B, C, H, 1]
        # K_t q_t = b_t K0 q_t - sum_j D[t, j] (k_j . q_t) uk_j
        kq = torch.einsum("bthd,bjhd->btjh", qc, kc)
        Kq = bt * torch.einsum("bhmd,bthd->bthm", K, qc) - torch.einsum("btjh,bjhm->bthm", D * kq, uk)
        r = nonlinearity(f, Kq, eps)
        # V_t^T r_t = b_t V0^T r_t - sum_j D[t, j] (uv_j . r_t) v_j
        ur = torch.einsum("bthm,bjhm->btjh", r, uv)
        Vr = bt * torch.einsum("bhmd,bthm->bthd", V, r) - torch.einsum("btjh,bjhd->bthd", D * ur, vc)
        outs.append(nonlinearity(rho, Vr, eps))
        total = cb[:, -1]                                          # [B, H]
        w = torch.exp(total[:, None, :] - cb) * gc                 # gamma_j b_C / b_j
        decay = torch.exp(total)[..., None, None]
        K = decay * K - torch.einsum("bjh,bjhm,bjhd->bhmd", w, uk, kc)
        V = decay * V - torch.einsum("bjh,bjhm,bjhd->bhmd", w, uv, vc)

    o_pad = torch.cat(outs, dim=1)                                  # [B, L, H, d]
    take = (torch.arange(T, device=dev)[None, :] + phase[:, None]).view(B, T, 1, 1).expand(B, T, H, d)
    o = torch.gather(o_pad, 1, take)
    last_chunk = ((phase + T - 1) // C).view(1, B, 1, 1, 1).expand(1, *K.shape)
    SK = torch.gather(torch.stack(snaps_k), 0, last_chunk)[0]
    SV = torch.gather(torch.stack(snaps_v), 0, last_chunk)[0]
    return o, MemoryState(K, V, SK, SV)


# --------------------------------------------------------------------------- public op
def trellis_memory(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
                   state: MemoryState, position: Tensor, *, chunk_size: int, phi: str = "ln_silu",
                   f: str = "ln_silu", rho: str = "identity", eps: float = 1e-5,
                   mode: str = "step") -> tuple[Tensor, MemoryState]:
    """Run the Trellis memory over T tokens of B rows (TRELLIS_SPEC.md section 4).

    Shapes: q, k, v ``[B, T, H, d]``; a ``[B, T, H, m]``; beta, gamma ``[B, T, H]``; state four
    ``[B, H, m, d]``; position ``[B]`` int64, tokens each row consumed before this call. Returns
    ``o [B, T, H, d]`` (in q's dtype) and the new state (float32, or float64 for float64 inputs).
    The op neither advances ``position`` nor resets state: the caller does both.
    """
    for name, what in ((phi, "phi"), (f, "f"), (rho, "rho")):
        _check_name(name, what)
    if not isinstance(state, MemoryState):
        state = MemoryState(*state)
    _validate(q, k, v, a, beta, gamma, state, position, chunk_size, mode)
    wide = any(t.dtype == torch.float64 for t in (q, k, v, a, beta, gamma, *state))
    ct = torch.float64 if wide else torch.float32
    qc, kc, vc, ac, bc, gc = (t.to(ct) for t in (q, k, v, a, beta, gamma))
    st = MemoryState(*(t.to(ct) for t in state))
    impl = _step if mode == "step" else _chunked
    o, new_state = impl(qc, kc, vc, ac, bc, gc, st, position, chunk_size, phi, f, rho, float(eps))
    return o.to(q.dtype), new_state
