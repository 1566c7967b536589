"""Streaming Trellis memory: one program per (row, head) walks its T tokens in order.

The four ``[m, d]`` memories stay in registers for the whole call; each token applies the
snapshot rule ``if (position[b] + t) % C == 0: S <- K``, the two inner gradients at the snapshots,
the gated write and the read (TRELLIS_SPEC.md section 3). T = 1 is the decode step.

Argument order (TensorRT AOT plugins): input pointers, integer scalars, output pointers, then
constexprs; see ``utils.RUNTIME_ARGS``.

Specialisations (constexprs): ``DECODE`` makes T a compile-time 1 (the run-time ``T`` parameter stays
in the signature, unread); ``IN_PLACE`` is for outputs that alias the input memories: the snapshots
are stored only when a chunk starts in the call. Every variant skips the load of the stored
snapshots when the call's first token starts a chunk (they would be overwritten unread).
In the decode specialisation the ln_silu statistics take one cross-warp reduction each
(``ONE_ROUND``, Welford): the barrier instructions of the decode PTX went from 34 to 19 at the same
registers (``ptx_stats.ptx_memory_ops``). The multi-token build keeps the two-pass sums: there the
one-round form cost registers (96 -> 109-115 at d = 32) and spills (8 -> 48-52 bytes at d = 128).
"""

from __future__ import annotations

from typing import cast

import torch
import triton
import triton.language as tl

from .utils import MemoryOutputs, inner_grad, launch_config, nl_code, nl_fwd


@triton.jit
def fused_recurrent_trellis_fwd_kernel(
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
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    st = pid.to(tl.int64) * (M * D) + offs_m[:, None] * D + offs_d[None, :]
    pos = tl.load(position + i_b).to(tl.int64)
    if DECODE:
        n_tok = 1                                            # T == 1: the decode specialisation
    else:
        n_tok = T
    # the first chunk start of this call is token t0; the stored snapshot is read only when the
    # first token does not start a chunk (otherwise the snapshot is overwritten before any use)
    t0 = (C - pos % C) % C
    keep = t0 != 0
    Km = tl.load(key_memory + st, mask=mask_md, other=0.0).to(tl.float32)
    Vm = tl.load(value_memory + st, mask=mask_md, other=0.0).to(tl.float32)
    SK = tl.load(key_snapshot + st, mask=mask_md & keep, other=0.0).to(tl.float32)
    SV = tl.load(value_snapshot + st, mask=mask_md & keep, other=0.0).to(tl.float32)
    for t in range(0, n_tok):
        reset = ((pos + t) % C) == 0
        SK = tl.where(reset, Km, SK)
        SV = tl.where(reset, Vm, SV)
        tok = (i_b.to(tl.int64) * n_tok + t) * H + i_h       # flat (b, t, h) index
        kt = tl.load(k + tok * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        vt = tl.load(v + tok * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        qt = tl.load(q + tok * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        at = tl.load(a + tok * M + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        bt = tl.load(beta + tok).to(tl.float32)
        gt = tl.load(gamma + tok).to(tl.float32)
        zk = tl.sum(SK * kt[None, :], axis=1)                  # [BM]
        zv = tl.sum(SV * vt[None, :], axis=1)
        uk = inner_grad(zk, at, mask_m, M, EPS, PHI, 0, DECODE)
        uv = inner_grad(zv, at, mask_m, M, EPS, PHI, 0, DECODE)
        Km = bt * Km - gt * (uk[:, None] * kt[None, :])
        Vm = bt * Vm - gt * (uv[:, None] * vt[None, :])
        r = nl_fwd(tl.sum(Km * qt[None, :], axis=1), mask_m, M, EPS, F, 0, DECODE)  # [BM]
        ov = nl_fwd(tl.sum(Vm * r[:, None], axis=0), mask_d, D, EPS, RHO, 0, DECODE)  # [BD]
        tl.store(out_o + tok * D + offs_d, ov.to(out_o.dtype.element_ty), mask=mask_d)
    tl.store(out_key_memory + st, Km, mask=mask_md)
    tl.store(out_value_memory + st, Vm, mask=mask_md)
    if IN_PLACE:
        # out_* alias the inputs: a snapshot is written only when a chunk started in this call
        wrote = t0 < n_tok
        tl.store(out_key_snapshot + st, SK, mask=mask_md & wrote)
        tl.store(out_value_snapshot + st, SV, mask=mask_md & wrote)
    else:
        tl.store(out_key_snapshot + st, SK, mask=mask_md)
        tl.store(out_value_snapshot + st, SV, mask=mask_md)


def fused_recurrent_trellis_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, beta: torch.Tensor,
    gamma: torch.Tensor, key_memory: torch.Tensor, value_memory: torch.Tensor,
    key_snapshot: torch.Tensor, value_snapshot: torch.Tensor, position: torch.Tensor, *,
    chunk_size: int, phi: str = "ln_silu", f: str = "ln_silu", rho: str = "identity",
    eps: float = 1e-5, out: tuple[torch.Tensor, ...] | None = None, in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the streaming kernel. Inputs as in ``trellis_memory``; returns (o, K, V, S_K, S_V),
    o in q's dtype, memories float32. Tensors are made contiguous; the state is float32.
    ``out``: optional preallocated contiguous outputs (o, K, V, S_K, S_V), written in place (the GPU
    suite poisons them with NaN first).
    ``in_place``: update the four state tensors themselves (they must be contiguous float32; the
    returned K, V, S_K, S_V are those tensors); snapshots are written only when a chunk starts in
    this call, and the stored snapshot is not read when the first token starts a chunk.
    T == 1 launches the decode specialisation (``DECODE``: T a compile-time 1)."""
    from .common import outputs, prepare
    args, (B, T, H, m, d) = prepare(q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot,
                                    value_snapshot, position)
    cfg = launch_config("fused_recurrent", m, d, chunk_size)
    outs = outputs(args, (key_memory, value_memory, key_snapshot, value_snapshot), out, in_place,
                   (B, T, H, m, d))
    fused_recurrent_trellis_fwd_kernel[cfg.grid(B, H)](
        *args, T, *outs,
        H=H, M=m, D=d, C=chunk_size, BM=cfg.BM, BD=cfg.BD, BC=cfg.BC,
        PHI=nl_code(phi, "phi"), F=nl_code(f, "f"), RHO=nl_code(rho, "rho"), EPS=float(eps),
        DOT_PRECISION="ieee", DECODE=T == 1, IN_PLACE=bool(in_place), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return cast(MemoryOutputs, outs)

