"""Prefill in two launches: a sequential state pass and a parallel read-out (issue 14, deliverable 3).

The Trellis inner gradient ``u = J_phi^T (phi(S w) - a)`` depends nonlinearly on the chunk-start
state S, so the chunks of one row must be walked in order; but the K and V passes are independent
until the read ``o = rho(V^T f(K q))`` couples them, and once the chunk-start memories and the inner
gradients U of every chunk are stored, the read-out of all chunks is independent.

1. ``chunk_state_kernel``, grid ``(B * H * 2 * MS,)``: one program per (row, head, pass, slot block),
   pass 0 the key memory (w = k), pass 1 the value memory (w = v). For each chunk in order it stores
   the running memory at the chunk start (``ws_memory``) and the chunk's inner gradients (``ws_u``),
   then steps the memory to the chunk end ``M <- b_C M - sum_j gamma_j (b_C / b_j) u_j w_j^T``. At
   the end it writes the output memory and snapshot. Twice the programs of the fused chunk kernel,
   each with about half the work and half the live tiles (no read-out in the loop).

   The m-axis split (``MS = cdiv(M, BM) > 1``, a block ``BM`` smaller than m): at phi = identity the
   inner gradient of slot j is ``u[j] = S[j, :] . w - a[j]`` and the write of slot j reads only u[j],
   so each block of BM slots is a recurrence of its own and its program needs nothing from the
   others: MS times the programs with no exchange between them. The ln_silu / l2_silu inner gradients
   need statistics over all m slots per token (an all-reduce per chunk between the programs, which
   Triton cannot synchronise), so they keep ``BM >= M`` (a ``tl.static_assert``).
2. ``chunk_readout_kernel``, grid ``(NC, B * H)`` with ``NC = (T + 2C - 2) // C`` (the most chunks a
   row can span): one program per (chunk, row, head) computes the chunk's outputs from the stored
   chunk-start memories K0, V0 and gradients UK, UV:
   ``K_t q_t = b_t K0 q_t - sum_{j<=t} Dm[t, j] (k_j . q_t) uk_j``, ``r_t = f(K_t q_t)``,
   ``V_t^T r_t = b_t V0^T r_t - sum_{j<=t} Dm[t, j] (uv_j . r_t) v_j``, ``o_t = rho(V_t^T r_t)``.

Rows at different chunk phases are left-padded to their phase exactly as in ``chunk.py`` (chunk c of
row b covers its tokens ``t = c*C + i - phase_b``; out-of-range slots are no-op tokens); programs
for chunks a row does not have return at once.

Workspaces (float32, contiguous; the caller allocates them, TensorRT as the plugin's workspace):
``ws_memory [B*H, 2, NC, M, D]`` and ``ws_u [B*H, 2, NC, C, M]`` (``WORKSPACE_BYTES``). Argument
order: the op's inputs, ``T``, the op's outputs, then ``ws_memory, ws_u``, then the constexprs of
the other kernels (``DECODE`` / ``IN_PLACE`` are accepted for a uniform signature; ``IN_PLACE`` skips
the snapshot store of rows where no chunk starts).
"""

from __future__ import annotations

from typing import cast

import torch
import triton
import triton.language as tl

from .utils import DOT_PRECISIONS, M_SPLIT_BLOCK, MemoryOutputs, inner_grad, launch_config, nl_code, nl_fwd

#: The extra pointer arguments of the split kernels, after the op's outputs.
WORKSPACE_ARGS: tuple[str, ...] = ("ws_memory", "ws_u")
#: Bytes of each workspace as an expression of B, H, T and the constexprs M, D, C.
WORKSPACE_BYTES: dict[str, str] = {"ws_memory": "B * H * 2 * ((T + 2 * C - 2) // C) * M * D * 4",
                                   "ws_u": "B * H * 2 * ((T + 2 * C - 2) // C) * C * M * 4"}
#: Launch grids as expressions (``cuda_launch.grid_for`` evaluates them).
GRID_DIMS: dict[str, list[str]] = {"chunk_state": ["B * H * 2 * ((M + BM - 1) // BM)", "1", "1"],
                                   "chunk_readout": ["(T + 2 * C - 2) // C", "B * H", "1"]}


def splits_m(phi: str, m: int) -> bool:
    """Whether the state pass of a model can take the m-axis split: phi = identity and more slots
    than one block."""
    return phi == "identity" and triton.next_power_of_2(int(m)) > M_SPLIT_BLOCK


def split_m_block(phi: str, m: int, B: int, H: int, sms: int | None) -> int:
    """The slot block the state pass runs with (0: no split): where the model allows the split
    (:func:`splits_m`) and ``cuda_launch.split_fills`` wants it for B rows of H heads on ``sms``
    streaming multiprocessors (None: unknown), the rule the TensorRT plugin's record choice follows."""
    from trellis_export.kernels.cuda_launch import split_fills
    return M_SPLIT_BLOCK if splits_m(phi, m) and split_fills(B, H, sms) else 0


def max_chunks(T: int, C: int) -> int:
    """The most chunks one row of a T-token call can span (phase up to C - 1)."""
    return (T + 2 * C - 2) // C


@triton.jit
def _state_pass(w, a, beta, gamma, mem_in, snap_in, position, T, out_mem, out_snap, ws_memory, ws_u,
                pid_bh, p, m0,
                H: tl.constexpr, M: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, PHI: tl.constexpr,
                EPS: tl.constexpr, DOT_PRECISION: tl.constexpr, IN_PLACE: tl.constexpr):
    i_b = pid_bh // H
    i_h = pid_bh % H
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_c = tl.arange(0, BC)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    st = pid_bh.to(tl.int64) * (M * D) + offs_m[:, None] * D + offs_d[None, :]
    Mm = tl.load(mem_in + st, mask=mask_md, other=0.0).to(tl.float32)
    pos = tl.load(position + i_b).to(tl.int64)
    phase = pos % C
    mid = phase > 0
    S = tl.where(mid, tl.load(snap_in + st, mask=mask_md & mid, other=0.0).to(tl.float32), Mm)
    n_chunks = ((phase + T + C - 1) // C).to(tl.int32)
    NC = (T + 2 * C - 2) // C
    ws_base = (pid_bh.to(tl.int64) * 2 + p) * NC
    for ci in range(0, n_chunks):
        S = tl.where(ci > 0, Mm, S)
        tt = ci * C + offs_c - phase
        valid = (offs_c < C) & (tt >= 0) & (tt < T)
        tok = (i_b.to(tl.int64) * T + tt) * H + i_h
        Wc = tl.load(w + tok[:, None] * D + offs_d[None, :], mask=valid[:, None] & mask_d[None, :],
                     other=0.0).to(tl.float32)
        Ac = tl.load(a + tok[:, None] * M + offs_m[None, :], mask=valid[:, None] & mask_m[None, :],
                     other=0.0).to(tl.float32)
        bc = tl.load(beta + tok, mask=valid, other=1.0).to(tl.float32)
        gc = tl.load(gamma + tok, mask=valid, other=0.0).to(tl.float32)
        lb = tl.log(tl.maximum(bc, 1.1754943508222875e-38))
        cb = tl.cumsum(lb, axis=0)
        total = tl.sum(lb, axis=0)
        U = inner_grad(tl.dot(Wc, tl.trans(S), input_precision=DOT_PRECISION), Ac, mask_m[None, :],
                       M, EPS, PHI, 1)
        U = tl.where(valid[:, None], U, 0.0)
        slot = ws_base + ci
        tl.store(ws_memory + slot * (M * D) + offs_m[:, None] * D + offs_d[None, :], Mm, mask=mask_md)
        tl.store(ws_u + slot * (C * M) + offs_c[:, None] * M + offs_m[None, :], U,
                 mask=(offs_c < C)[:, None] & mask_m[None, :])
        wgt = tl.exp(total - cb) * gc
        Mm = tl.exp(total) * Mm - tl.dot(tl.trans(U * wgt[:, None]), Wc, input_precision=DOT_PRECISION)
    tl.store(out_mem + st, Mm, mask=mask_md)
    if IN_PLACE:
        wrote = (phase == 0) | (n_chunks > 1)
        tl.store(out_snap + st, S, mask=mask_md & wrote)
    else:
        tl.store(out_snap + st, S, mask=mask_md)


@triton.jit
def chunk_state_kernel(
    q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot, value_snapshot, position,
    T,
    out_o, out_key_memory, out_value_memory, out_key_snapshot, out_value_snapshot,
    ws_memory, ws_u,
    H: tl.constexpr, M: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    PHI: tl.constexpr, F: tl.constexpr, RHO: tl.constexpr, EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DECODE: tl.constexpr = False, IN_PLACE: tl.constexpr = False,
):
    # the m-axis split (module docstring): only at phi = identity, where slots do not interact
    tl.static_assert(PHI == 0 or BM >= M, "the m-axis split (BM < M) needs phi = identity")
    MS: tl.constexpr = (M + BM - 1) // BM
    pid = tl.program_id(0)
    m0 = (pid % MS) * BM
    pid_bh = pid // (2 * MS)
    p = (pid // MS) % 2
    if DECODE:
        T = 1
    if p == 0:
        _state_pass(k, a, beta, gamma, key_memory, key_snapshot, position, T, out_key_memory,
                    out_key_snapshot, ws_memory, ws_u, pid_bh, 0, m0, H, M, D, C, BM, BD, BC, PHI, EPS,
                    DOT_PRECISION, IN_PLACE)
    else:
        _state_pass(v, a, beta, gamma, value_memory, value_snapshot, position, T, out_value_memory,
                    out_value_snapshot, ws_memory, ws_u, pid_bh, 1, m0, H, M, D, C, BM, BD, BC, PHI, EPS,
                    DOT_PRECISION, IN_PLACE)


@triton.jit
def chunk_readout_kernel(
    q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot, value_snapshot, position,
    T,
    out_o, out_key_memory, out_value_memory, out_key_snapshot, out_value_snapshot,
    ws_memory, ws_u,
    H: tl.constexpr, M: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    PHI: tl.constexpr, F: tl.constexpr, RHO: tl.constexpr, EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DECODE: tl.constexpr = False, IN_PLACE: tl.constexpr = False,
):
    ci = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if DECODE:
        T = 1
    i_b = pid_bh // H
    i_h = pid_bh % H
    pos = tl.load(position + i_b).to(tl.int64)
    phase = pos % C
    n_chunks = ((phase + T + C - 1) // C).to(tl.int32)
    if ci < n_chunks:
        offs_m = tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        offs_c = tl.arange(0, BC)
        mask_m = offs_m < M
        mask_d = offs_d < D
        mask_md = mask_m[:, None] & mask_d[None, :]
        mask_cm = (offs_c < C)[:, None] & mask_m[None, :]
        causal = (offs_c[:, None] >= offs_c[None, :]) & (offs_c[None, :] < C)
        NC = (T + 2 * C - 2) // C
        slot_k = (pid_bh.to(tl.int64) * 2) * NC + ci
        slot_v = slot_k + NC
        tile = offs_m[:, None] * D + offs_d[None, :]
        utile = offs_c[:, None] * M + offs_m[None, :]
        K0 = tl.load(ws_memory + slot_k * (M * D) + tile, mask=mask_md, other=0.0)
        UK = tl.load(ws_u + slot_k * (C * M) + utile, mask=mask_cm, other=0.0)
        tt = ci * C + offs_c - phase
        valid = (offs_c < C) & (tt >= 0) & (tt < T)
        tok = (i_b.to(tl.int64) * T + tt) * H + i_h
        vd = valid[:, None] & mask_d[None, :]
        Qc = tl.load(q + tok[:, None] * D + offs_d[None, :], mask=vd, other=0.0).to(tl.float32)
        Kc = tl.load(k + tok[:, None] * D + offs_d[None, :], mask=vd, other=0.0).to(tl.float32)
        bc = tl.load(beta + tok, mask=valid, other=1.0).to(tl.float32)
        gc = tl.load(gamma + tok, mask=valid, other=0.0).to(tl.float32)
        cb = tl.cumsum(tl.log(tl.maximum(bc, 1.1754943508222875e-38)), axis=0)
        Dm = tl.where(causal, tl.exp(cb[:, None] - cb[None, :]), 0.0) * gc[None, :]
        bt = tl.exp(cb)[:, None]
        QK = tl.dot(Qc, tl.trans(Kc), input_precision=DOT_PRECISION)
        Kq = bt * tl.dot(Qc, tl.trans(K0), input_precision=DOT_PRECISION) \
            - tl.dot(Dm * QK, UK, input_precision=DOT_PRECISION)
        R = nl_fwd(Kq, mask_m[None, :], M, EPS, F, 1)
        V0 = tl.load(ws_memory + slot_v * (M * D) + tile, mask=mask_md, other=0.0)
        UV = tl.load(ws_u + slot_v * (C * M) + utile, mask=mask_cm, other=0.0)
        Vc = tl.load(v + tok[:, None] * D + offs_d[None, :], mask=vd, other=0.0).to(tl.float32)
        UR = tl.dot(R, tl.trans(UV), input_precision=DOT_PRECISION)
        Vr = bt * tl.dot(R, V0, input_precision=DOT_PRECISION) \
            - tl.dot(Dm * UR, Vc, input_precision=DOT_PRECISION)
        O = nl_fwd(Vr, mask_d[None, :], D, EPS, RHO, 1)
        tl.store(out_o + tok[:, None] * D + offs_d[None, :], O.to(out_o.dtype.element_ty), mask=vd)


def workspaces(B: int, T: int, H: int, m: int, d: int, C: int, device: torch.device | str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two float32 workspaces of one call."""
    NC = max_chunks(T, C)
    return (torch.empty(B * H * 2 * NC * m * d, dtype=torch.float32, device=device),
            torch.empty(B * H * 2 * NC * C * m, dtype=torch.float32, device=device))


def chunk_split_trellis_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, beta: torch.Tensor,
    gamma: torch.Tensor, key_memory: torch.Tensor, value_memory: torch.Tensor,
    key_snapshot: torch.Tensor, value_snapshot: torch.Tensor, position: torch.Tensor, *,
    chunk_size: int, phi: str = "ln_silu", f: str = "ln_silu", rho: str = "identity",
    eps: float = 1e-5, dot_precision: str = "ieee", out: tuple[torch.Tensor, ...] | None = None,
    in_place: bool = False, m_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-launch prefill. Same contract and results as ``chunk_trellis_fwd``; ``in_place`` as in
    ``fused_recurrent_trellis_fwd`` (the state tensors are updated; snapshots written only by rows
    where a chunk starts). ``m_block``: the slot block of the state pass's m-axis split (0: none;
    None: :func:`split_m_block`, the rule the TensorRT plugin's record choice follows)."""
    from .common import outputs, prepare
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {', '.join(DOT_PRECISIONS)}, got {dot_precision!r}")
    args, (B, T, H, m, d) = prepare(q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot,
                                    value_snapshot, position)
    C = int(chunk_size)
    if m_block is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count \
            if q.device.type == "cuda" else None
        m_block = split_m_block(phi, m, B, H, sms)
    elif m_block and phi != "identity":
        raise ValueError(f"the m-axis split (m_block = {m_block}) needs phi = identity, got phi = {phi!r}")
    outs = outputs(args, (key_memory, value_memory, key_snapshot, value_snapshot), out, in_place,
                   (B, T, H, m, d))
    ws = workspaces(B, T, H, m, d, C, q.device)
    kw = dict(H=H, M=m, D=d, C=C, PHI=nl_code(phi, "phi"), F=nl_code(f, "f"), RHO=nl_code(rho, "rho"),
              EPS=float(eps), DOT_PRECISION=dot_precision, DECODE=T == 1, IN_PLACE=bool(in_place))
    from trellis_export.kernels.cuda_launch import grid_for
    for name, kernel in (("chunk_state", chunk_state_kernel), ("chunk_readout", chunk_readout_kernel)):
        cfg = launch_config(name, m, d, C, dot_precision, m_block if name == "chunk_state" else 0)
        # the grid from the same expressions the AOT records carry (GRID_DIMS)
        grid = grid_for({"constexprs": {"H": H, "M": m, "D": d, "C": C, "BM": cfg.BM},
                         "grid_dims": GRID_DIMS[name]}, B, T)
        kernel[grid](*args, T, *outs, *ws, BM=cfg.BM, BD=cfg.BD, BC=cfg.BC, **kw,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return cast(MemoryOutputs, outs)
