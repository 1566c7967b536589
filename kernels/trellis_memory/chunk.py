"""Chunked parallel Trellis memory (prefill / training forward), TRELLIS_SPEC.md section 3.

One program per (row, head) walks the row's chunks in order. Inside a chunk every inner gradient
depends only on the chunk-start state, so all u of the chunk come from two ``tl.dot``s, and the
outputs and the end-of-chunk memories follow from the linear recurrence
``M_t = b_t S - sum_{j<=t} gamma_j (b_t / b_j) u_j w_j^T`` with log-space cumulative decays.

Rows at different chunk phases: chunk c of row b covers the row's tokens
``t = c*C + i - phase_b`` (i < C, phase_b = position[b] % C); slots with t outside [0, T) are no-op
tokens (beta = 1, gamma = 0), i.e. the row is left-padded to its chunk phase as in the reference.
The first chunk's stale state is the stored snapshot when the row is mid-chunk.

Float32 compute; ``DOT_PRECISION`` is "ieee" (default: FMA, meets the 1e-5 tolerance), "tf32"
(tensor cores, misses it) or "tf32x3" (three tf32 passes on tensor cores). ``DECODE`` / ``IN_PLACE``
as in the streaming kernel.
"""

from __future__ import annotations

from typing import cast

import torch
import triton
import triton.language as tl

from .utils import DOT_PRECISIONS, MemoryOutputs, inner_grad, launch_config, nl_code, nl_fwd


@triton.jit
def chunk_trellis_fwd_kernel(
    q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot, value_snapshot, position,
    T,
    out_o, out_key_memory, out_value_memory, out_key_snapshot, out_value_snapshot,
    H: tl.constexpr, M: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    PHI: tl.constexpr, F: tl.constexpr, RHO: tl.constexpr, EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DECODE: tl.constexpr = False, IN_PLACE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    i_b = pid // H
    i_h = pid % H
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_c = tl.arange(0, BC)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    causal = (offs_c[:, None] >= offs_c[None, :]) & (offs_c[None, :] < C)
    st = pid.to(tl.int64) * (M * D) + offs_m[:, None] * D + offs_d[None, :]
    if DECODE:
        T = 1
    Km = tl.load(key_memory + st, mask=mask_md, other=0.0).to(tl.float32)
    Vm = tl.load(value_memory + st, mask=mask_md, other=0.0).to(tl.float32)
    pos = tl.load(position + i_b).to(tl.int64)
    phase = pos % C
    # stale state of the first chunk: the stored snapshot if the row is mid-chunk (not read otherwise)
    mid = phase > 0
    SK = tl.where(mid, tl.load(key_snapshot + st, mask=mask_md & mid, other=0.0).to(tl.float32), Km)
    SV = tl.where(mid, tl.load(value_snapshot + st, mask=mask_md & mid, other=0.0).to(tl.float32), Vm)
    n_chunks = ((phase + T + C - 1) // C).to(tl.int32)
    for ci in range(0, n_chunks):
        SK = tl.where(ci > 0, Km, SK)
        SV = tl.where(ci > 0, Vm, SV)
        tt = ci * C + offs_c - phase                           # [BC] token index in this call
        valid = (offs_c < C) & (tt >= 0) & (tt < T)
        tok = (i_b.to(tl.int64) * T + tt) * H + i_h
        vd = valid[:, None] & mask_d[None, :]
        vm = valid[:, None] & mask_m[None, :]
        Qc = tl.load(q + tok[:, None] * D + offs_d[None, :], mask=vd, other=0.0).to(tl.float32)
        Kc = tl.load(k + tok[:, None] * D + offs_d[None, :], mask=vd, other=0.0).to(tl.float32)
        Vc = tl.load(v + tok[:, None] * D + offs_d[None, :], mask=vd, other=0.0).to(tl.float32)
        Ac = tl.load(a + tok[:, None] * M + offs_m[None, :], mask=vm, other=0.0).to(tl.float32)
        bc = tl.load(beta + tok, mask=valid, other=1.0).to(tl.float32)
        gc = tl.load(gamma + tok, mask=valid, other=0.0).to(tl.float32)
        lb = tl.log(tl.maximum(bc, 1.1754943508222875e-38))
        cb = tl.cumsum(lb, axis=0)                             # [BC] log b_t
        total = tl.sum(lb, axis=0)                             # log b_C (padding adds 0)
        # inner gradients of the whole chunk at the chunk-start state
        UK = inner_grad(tl.dot(Kc, tl.trans(SK), input_precision=DOT_PRECISION), Ac, mask_m[None, :],
                        M, EPS, PHI, 1)                        # [BC, BM]
        UV = inner_grad(tl.dot(Vc, tl.trans(SV), input_precision=DOT_PRECISION), Ac, mask_m[None, :],
                        M, EPS, PHI, 1)
        UK = tl.where(valid[:, None], UK, 0.0)
        UV = tl.where(valid[:, None], UV, 0.0)
        # Dm[t, j] = gamma_j b_t / b_j for j <= t
        Dm = tl.where(causal, tl.exp(cb[:, None] - cb[None, :]), 0.0) * gc[None, :]
        bt = tl.exp(cb)[:, None]
        # K_t q_t = b_t K0 q_t - sum_j Dm[t, j] (k_j . q_t) uk_j
        QK = tl.dot(Qc, tl.trans(Kc), input_precision=DOT_PRECISION)                       # [BC, BC]
        Kq = bt * tl.dot(Qc, tl.trans(Km), input_precision=DOT_PRECISION) \
            - tl.dot(Dm * QK, UK, input_precision=DOT_PRECISION)                           # [BC, BM]
        R = nl_fwd(Kq, mask_m[None, :], M, EPS, F, 1)
        # V_t^T r_t = b_t V0^T r_t - sum_j Dm[t, j] (uv_j . r_t) v_j
        UR = tl.dot(R, tl.trans(UV), input_precision=DOT_PRECISION)                        # [BC, BC]
        Vr = bt * tl.dot(R, Vm, input_precision=DOT_PRECISION) \
            - tl.dot(Dm * UR, Vc, input_precision=DOT_PRECISION)                           # [BC, BD]
        O = nl_fwd(Vr, mask_d[None, :], D, EPS, RHO, 1)
        tl.store(out_o + tok[:, None] * D + offs_d[None, :], O.to(out_o.dtype.element_ty), mask=vd)
        # end-of-chunk memories: M_C = b_C S0 - sum_j gamma_j (b_C / b_j) u_j w_j^T
        w = tl.exp(total - cb) * gc                            # [BC]
        decay = tl.exp(total)
        Km = decay * Km - tl.dot(tl.trans(UK * w[:, None]), Kc, input_precision=DOT_PRECISION)
        Vm = decay * Vm - tl.dot(tl.trans(UV * w[:, None]), Vc, input_precision=DOT_PRECISION)
    tl.store(out_key_memory + st, Km, mask=mask_md)
    tl.store(out_value_memory + st, Vm, mask=mask_md)
    if IN_PLACE:
        # out_* alias the inputs: the snapshots change only when a chunk starts in this call
        wrote = (phase == 0) | (n_chunks > 1)
        tl.store(out_key_snapshot + st, SK, mask=mask_md & wrote)
        tl.store(out_value_snapshot + st, SV, mask=mask_md & wrote)
    else:
        tl.store(out_key_snapshot + st, SK, mask=mask_md)
        tl.store(out_value_snapshot + st, SV, mask=mask_md)


def chunk_trellis_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, beta: torch.Tensor,
    gamma: torch.Tensor, key_memory: torch.Tensor, value_memory: torch.Tensor,
    key_snapshot: torch.Tensor, value_snapshot: torch.Tensor, position: torch.Tensor, *,
    chunk_size: int, phi: str = "ln_silu", f: str = "ln_silu", rho: str = "identity",
    eps: float = 1e-5, dot_precision: str = "ieee", out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the chunked kernel. Same contract as ``fused_recurrent_trellis_fwd``."""
    from .common import outputs, prepare
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {', '.join(DOT_PRECISIONS)}, got {dot_precision!r}")
    args, (B, T, H, m, d) = prepare(q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot,
                                    value_snapshot, position)
    cfg = launch_config("chunk", m, d, chunk_size)
    outs = outputs(args, (key_memory, value_memory, key_snapshot, value_snapshot), out, False,
                   (B, T, H, m, d))
    chunk_trellis_fwd_kernel[cfg.grid(B, H)](
        *args, T, *outs,
        H=H, M=m, D=d, C=chunk_size, BM=cfg.BM, BD=cfg.BD, BC=cfg.BC,
        PHI=nl_code(phi, "phi"), F=nl_code(f, "f"), RHO=nl_code(rho, "rho"), EPS=float(eps),
        DOT_PRECISION=dot_precision, DECODE=T == 1, IN_PLACE=False, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return cast(MemoryOutputs, outs)
