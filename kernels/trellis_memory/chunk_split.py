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
   The d-axis split (``chunk_state_dsplit_kernel``, grid ``(B * H * 2 * DS,)``, ``DS = cdiv(D, BD)``;
   any phi): a program holds the memory's columns ``[db*BD, db*BD + BD)`` of all m slots. The chunk's
   ``Z = W S^T`` is a sum over d, so each program stores its partial ``W[:, block] S[:, block]^T``
   (``ws_z``, two chunks deep) and, after all DS programs of the (row, head, pass) have stored theirs,
   each sums the DS partials: with all m slots in every program, the inner gradient (the ln_silu /
   l2_silu statistics included) needs nothing more, and the memory step is local to the columns. The
   work is walked as steps ``s = 0 .. NC``: step s finishes chunk s - 1 (sum, U, step; program 0
   of the group stores U) and starts chunk s (store the chunk-start memory, the partial Z). Where
   the programs meet between steps (``d_sync``): ``"spin"``, one launch walks every step with a spin
   barrier on an int32 counter per group (``ws_sync``, zeroed before the launch; a start-order ticket
   makes the group of a program DS consecutive starters, so a resident group always makes progress
   and no launch deadlocks while one group of DS programs fits on the GPU); ``"launch"``, one launch
   per step (the launch boundary is the barrier; NC + 1 launches). Triton's interpreter runs programs
   one at a time, so only ``"launch"`` (and ``"spin"`` with DS = 1) run there as it is; the tests run
   ``"spin"`` with DS > 1 through a stand-in that runs a launch's programs as concurrent threads.
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

from .utils import (
    D_SPLIT_KERNEL,
    DOT_PRECISIONS,
    M_SPLIT_BLOCK,
    LaunchConfig,
    MemoryOutputs,
    inner_grad,
    launch_config,
    nl_code,
    nl_fwd,
)

#: The split kernels' workspace pointers (their extra arguments after the op's outputs, in this
#: order) and the bytes of each as an expression of B, H, T and the constexprs M, D, C.
WORKSPACE_BYTES: dict[str, str] = {"ws_memory": "B * H * 2 * ((T + 2 * C - 2) // C) * M * D * 4",
                                   "ws_u": "B * H * 2 * ((T + 2 * C - 2) // C) * C * M * 4"}
#: The d-axis split's state pass (``chunk_state_dsplit``): the extra scalars (the steps it walks, after
#: ``T``) and workspaces (after the split prefill's own: each program's partial Z of the last two
#: chunks; the ticket and barrier counters, int32, zeroed before a launch that walks more than one
#: step), their bytes as expressions of B, H and the constexprs (BM, BD, BC: the record's blocks).
DSPLIT_SCALAR_ARGS: tuple[str, ...] = ("S0", "S1")
DSPLIT_WORKSPACE_BYTES: dict[str, str] = {
                                   "ws_z": "B * H * 2 * 2 * ((D + BD - 1) // BD) * BC * BM * 4",
                                   "ws_sync": "(1 + B * H * 2) * 4"}
#: The workspaces (pointer argument -> bytes) of each kernel, in argument order: what its AOT record
#: carries and what the JIT wrapper allocates. The state pass's hold the read-out's.
KERNEL_WORKSPACES: dict[str, dict[str, str]] = {
    "chunk_state": WORKSPACE_BYTES, "chunk_readout": WORKSPACE_BYTES,
    D_SPLIT_KERNEL: {**WORKSPACE_BYTES, **DSPLIT_WORKSPACE_BYTES}}
#: The int32 counter workspaces (the rest are float32): zeroed before every launch that uses them.
COUNTER_WORKSPACES: tuple[str, ...] = ("ws_sync",)
#: Launch grids as expressions (``cuda_launch.grid_for`` evaluates them).
GRID_DIMS: dict[str, list[str]] = {"chunk_state": ["B * H * 2 * ((M + BM - 1) // BM)", "1", "1"],
                                   "chunk_readout": ["(T + 2 * C - 2) // C", "B * H", "1"],
                                   D_SPLIT_KERNEL: ["B * H * 2 * ((D + BD - 1) // BD)", "1", "1"]}
#: How the d-axis split's programs meet once per chunk: ``"spin"``, one launch walking every chunk
#: with a spin barrier per chunk; ``"launch"``, one launch per chunk (the launch boundary is the
#: barrier; T / C + 2 launches).
D_SYNC_MODES: tuple[str, ...] = ("spin", "launch")


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


#: Programs per (row, head, pass) of the d-axis split at its default column block.
D_SPLIT_PROGRAMS = 4


def default_d_block(d: int) -> int:
    """The d-axis split's default column block: :data:`D_SPLIT_PROGRAMS` programs per (row, head,
    pass), 16 columns at least (the smallest tile ``tl.dot`` takes)."""
    return max(16, triton.next_power_of_2(int(d)) // D_SPLIT_PROGRAMS)


def dsplit_spans(T: int, C: int, d_sync: str) -> list[tuple[int, int]]:
    """The launches of the d-axis split's state pass as ``(S0, S1)`` step ranges: steps 0 .. NC
    (step s = B(s - 1) + A(s)) in one launch (``"spin"``) or one launch each (``"launch"``)."""
    if d_sync not in D_SYNC_MODES:
        raise ValueError(f"d_sync must be one of {', '.join(D_SYNC_MODES)}, got {d_sync!r}")
    steps = max_chunks(T, C) + 1
    return [(0, steps)] if d_sync == "spin" else [(s, s + 1) for s in range(steps)]


def max_chunks(T: int, C: int) -> int:
    """The most chunks one row of a T-token call can span (phase up to C - 1)."""
    return (T + 2 * C - 2) // C


@triton.jit
def _chunk_tokens(ci, phase, T, i_b, i_h, offs_c, H: tl.constexpr, C: tl.constexpr):
    """The token slots of chunk ``ci`` of row ``i_b`` (head ``i_h``) at chunk phase ``phase``: which
    are tokens of this call (``valid``), and their flat [B, T, H] index."""
    tt = ci * C + offs_c - phase
    valid = (offs_c < C) & (tt >= 0) & (tt < T)
    return valid, (i_b.to(tl.int64) * T + tt) * H + i_h


@triton.jit
def _chunk_gates(beta, gamma, tok, valid):
    """A chunk's gates: gamma, the running sum of log beta over the chunk and its total (padding
    slots: beta 1, gamma 0, no-op tokens)."""
    bc = tl.load(beta + tok, mask=valid, other=1.0).to(tl.float32)
    gc = tl.load(gamma + tok, mask=valid, other=0.0).to(tl.float32)
    lb = tl.log(tl.maximum(bc, 1.1754943508222875e-38))
    return gc, tl.cumsum(lb, axis=0), tl.sum(lb, axis=0)


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
        valid, tok = _chunk_tokens(ci, phase, T, i_b, i_h, offs_c, H, C)
        Wc = tl.load(w + tok[:, None] * D + offs_d[None, :], mask=valid[:, None] & mask_d[None, :],
                     other=0.0).to(tl.float32)
        Ac = tl.load(a + tok[:, None] * M + offs_m[None, :], mask=valid[:, None] & mask_m[None, :],
                     other=0.0).to(tl.float32)
        gc, cb, total = _chunk_gates(beta, gamma, tok, valid)
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
def _barrier(ws_sync, g, n):
    """Wait until ``n`` arrivals have reached the counter of group ``g`` (a spin barrier among the
    programs of one (row, head, pass) of the d-axis split; module docstring, "The d-axis split")."""
    tl.debug_barrier()                                   # every thread's partial stored before arriving
    cnt = ws_sync + 1 + g
    tl.atomic_add(cnt, 1, sem="release", scope="gpu")
    while tl.atomic_add(cnt, 0, sem="acquire", scope="gpu") < n:
        pass
    tl.debug_barrier()


@triton.jit
def _dsplit_pass(w_ptr, a, beta, gamma, mem_in, snap_in, position, T, S0, S1, out_mem, out_snap,
                 ws_memory, ws_u, ws_z, ws_sync, lid,
                 H: tl.constexpr, M: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
                 BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, PHI: tl.constexpr,
                 EPS: tl.constexpr, DOT_PRECISION: tl.constexpr, IN_PLACE: tl.constexpr):
    DS: tl.constexpr = (D + BD - 1) // BD
    db = lid % DS
    g = lid // DS
    pid_bh = g // 2
    p = g % 2
    i_b = pid_bh // H
    i_h = pid_bh % H
    offs_m = tl.arange(0, BM)
    offs_d = db * BD + tl.arange(0, BD)
    offs_c = tl.arange(0, BC)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    mask_cm = (offs_c < C)[:, None] & mask_m[None, :]
    tile = offs_m[:, None] * D + offs_d[None, :]
    st = pid_bh.to(tl.int64) * (M * D) + tile
    ztile = offs_c[:, None] * BM + offs_m[None, :]
    pos = tl.load(position + i_b).to(tl.int64)
    phase = pos % C
    mid = phase > 0
    n_chunks = ((phase + T + C - 1) // C).to(tl.int32)
    NC = (T + 2 * C - 2) // C
    ws_base = (pid_bh.to(tl.int64) * 2 + p) * NC
    z_base = g.to(tl.int64) * (2 * DS * BC * BM)
    s_end = tl.minimum(S1, n_chunks + 1)
    for s in range(S0, s_end):
        if s == 0:
            Mm = tl.load(mem_in + st, mask=mask_md, other=0.0).to(tl.float32)
        else:
            # B(s - 1): the all-reduced Z of chunk s - 1, its inner gradients, the step to its end
            ci = s - 1
            Mm = tl.load(ws_memory + (ws_base + ci) * (M * D) + tile, mask=mask_md, other=0.0)
            Z = tl.zeros((BC, BM), dtype=tl.float32)
            zb = z_base + (ci % 2) * (DS * BC * BM)
            for j in range(0, DS):
                Z += tl.load(ws_z + zb + j * (BC * BM) + ztile, cache_modifier=".cg")
            valid, tok = _chunk_tokens(ci, phase, T, i_b, i_h, offs_c, H, C)
            Wc = tl.load(w_ptr + tok[:, None] * D + offs_d[None, :], mask=valid[:, None] & mask_d[None, :],
                         other=0.0).to(tl.float32)
            Ac = tl.load(a + tok[:, None] * M + offs_m[None, :], mask=valid[:, None] & mask_m[None, :],
                         other=0.0).to(tl.float32)
            gc, cb, total = _chunk_gates(beta, gamma, tok, valid)
            U = inner_grad(Z, Ac, mask_m[None, :], M, EPS, PHI, 1)
            U = tl.where(valid[:, None], U, 0.0)
            if db == 0:
                tl.store(ws_u + (ws_base + ci) * (C * M) + offs_c[:, None] * M + offs_m[None, :], U,
                         mask=mask_cm)
            wgt = tl.exp(total - cb) * gc
            Mm = tl.exp(total) * Mm - tl.dot(tl.trans(U * wgt[:, None]), Wc, input_precision=DOT_PRECISION)
        if s < n_chunks:
            # A(s): store the chunk-start memory, this block's partial Z = W_s[:, block] S[:, block]^T
            S = Mm
            if s == 0:
                S = tl.where(mid, tl.load(snap_in + st, mask=mask_md & mid, other=0.0).to(tl.float32), Mm)
            tl.store(ws_memory + (ws_base + s) * (M * D) + tile, Mm, mask=mask_md)
            valid, tok = _chunk_tokens(s, phase, T, i_b, i_h, offs_c, H, C)
            Ws = tl.load(w_ptr + tok[:, None] * D + offs_d[None, :], mask=valid[:, None] & mask_d[None, :],
                         other=0.0).to(tl.float32)
            P = tl.dot(Ws, tl.trans(S), input_precision=DOT_PRECISION)
            tl.store(ws_z + z_base + (s % 2) * (DS * BC * BM) + db * (BC * BM) + ztile, P)
        else:
            # the end: the output memory, and the snapshot (the last chunk's start memory)
            last = n_chunks - 1
            from_snap = mid & (last == 0)
            S = tl.where(from_snap, tl.load(snap_in + st, mask=mask_md & from_snap, other=0.0),
                         tl.load(ws_memory + (ws_base + last) * (M * D) + tile, mask=mask_md & (~from_snap),
                                 other=0.0))
            tl.store(out_mem + st, Mm, mask=mask_md)
            if IN_PLACE:
                tl.store(out_snap + st, S, mask=mask_md & ((phase == 0) | (n_chunks > 1)))
            else:
                tl.store(out_snap + st, S, mask=mask_md)
        if s + 1 < s_end:
            _barrier(ws_sync, g, DS * (s - S0 + 1))


@triton.jit
def chunk_state_dsplit_kernel(
    q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot, value_snapshot, position,
    T, S0, S1,
    out_o, out_key_memory, out_value_memory, out_key_snapshot, out_value_snapshot,
    ws_memory, ws_u, ws_z, ws_sync,
    H: tl.constexpr, M: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    PHI: tl.constexpr, F: tl.constexpr, RHO: tl.constexpr, EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DECODE: tl.constexpr = False, IN_PLACE: tl.constexpr = False,
):
    # The d-axis split of the state pass (module docstring): DS programs per (row, head, pass), each
    # holding the memory's columns [db*BD, db*BD + BD) of all m slots, walking steps S0 .. S1 - 1
    # (step s = B(s - 1) then A(s)) with a spin barrier between the steps of one launch.
    DS: tl.constexpr = (D + BD - 1) // BD
    if S1 - S0 > 1:
        # start-order tickets: a group is DS consecutive tickets, so the programs a waiting program
        # needs have started or start once a resident group finishes (one group fits on any GPU)
        lid = tl.atomic_add(ws_sync, 1)
    else:
        lid = tl.program_id(0)
    g = lid // DS                                        # (row, head, pass) group
    if DECODE:
        T = 1
    if g % 2 == 0:
        _dsplit_pass(k, a, beta, gamma, key_memory, key_snapshot, position, T, S0, S1, out_key_memory,
                     out_key_snapshot, ws_memory, ws_u, ws_z, ws_sync, lid, H, M, D, C, BM, BD, BC, PHI,
                     EPS, DOT_PRECISION, IN_PLACE)
    else:
        _dsplit_pass(v, a, beta, gamma, value_memory, value_snapshot, position, T, S0, S1, out_value_memory,
                     out_value_snapshot, ws_memory, ws_u, ws_z, ws_sync, lid, H, M, D, C, BM, BD, BC, PHI,
                     EPS, DOT_PRECISION, IN_PLACE)


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
        valid, tok = _chunk_tokens(ci, phase, T, i_b, i_h, offs_c, H, C)
        vd = valid[:, None] & mask_d[None, :]
        Qc = tl.load(q + tok[:, None] * D + offs_d[None, :], mask=vd, other=0.0).to(tl.float32)
        Kc = tl.load(k + tok[:, None] * D + offs_d[None, :], mask=vd, other=0.0).to(tl.float32)
        gc, cb, _ = _chunk_gates(beta, gamma, tok, valid)
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


def launch_record(cfg: LaunchConfig, H: int, m: int, d: int, C: int) -> dict[str, object]:
    """The parts of an AOT record the launch helpers read (``cuda_launch.grid_for``,
    ``cuda_launch.workspace_bytes``) for a JIT launch of ``cfg.kernel``: its constexprs, grid and
    workspace expressions (:data:`GRID_DIMS`, :data:`KERNEL_WORKSPACES`)."""
    return {"constexprs": {"H": H, "M": m, "D": d, "C": C, "BM": cfg.BM, "BD": cfg.BD, "BC": cfg.BC},
            "grid_dims": GRID_DIMS[cfg.kernel], "workspaces": KERNEL_WORKSPACES[cfg.kernel]}


def workspaces(record: dict[str, object], B: int, T: int, device: torch.device | str
               ) -> dict[str, torch.Tensor]:
    """The workspaces of one call of ``record`` (:func:`launch_record`), sized by its expressions:
    float32, the :data:`COUNTER_WORKSPACES` int32 and zeroed."""
    from trellis_export.kernels.cuda_launch import workspace_bytes
    return {name: torch.zeros(nbytes // 4, dtype=torch.int32, device=device) if name in COUNTER_WORKSPACES
            else torch.empty(nbytes // 4, dtype=torch.float32, device=device)
            for name, nbytes in workspace_bytes(record, B, T).items()}


def chunk_split_trellis_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, beta: torch.Tensor,
    gamma: torch.Tensor, key_memory: torch.Tensor, value_memory: torch.Tensor,
    key_snapshot: torch.Tensor, value_snapshot: torch.Tensor, position: torch.Tensor, *,
    chunk_size: int, phi: str = "ln_silu", f: str = "ln_silu", rho: str = "identity",
    eps: float = 1e-5, dot_precision: str = "ieee", out: tuple[torch.Tensor, ...] | None = None,
    in_place: bool = False, m_block: int | None = None, d_block: int = 0, d_sync: str = "spin",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-launch prefill. Same contract and results as ``chunk_trellis_fwd``; ``in_place`` as in
    ``fused_recurrent_trellis_fwd`` (the state tensors are updated; snapshots written only by rows
    where a chunk starts). ``m_block``: the slot block of the state pass's m-axis split (0: none;
    None: :func:`split_m_block`, the rule the TensorRT plugin's record choice follows). ``d_block``:
    the column block of the state pass's d-axis split (0: none; any phi; not with ``m_block``), its
    programs meeting per chunk as ``d_sync`` says (:data:`D_SYNC_MODES`). Opt-in: whether it pays
    needs GPU timing (``bench/gpu_suite.py``, section ``d_split``)."""
    from .common import outputs, prepare
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {', '.join(DOT_PRECISIONS)}, got {dot_precision!r}")
    if d_sync not in D_SYNC_MODES:
        raise ValueError(f"d_sync must be one of {', '.join(D_SYNC_MODES)}, got {d_sync!r}")
    args, (B, T, H, m, d) = prepare(q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot,
                                    value_snapshot, position)
    C = int(chunk_size)
    if d_block:
        if m_block:
            raise ValueError(f"choose one split of the state pass: m_block = {m_block} or "
                             f"d_block = {d_block}")
        m_block = 0
    if m_block is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count \
            if q.device.type == "cuda" else None
        m_block = split_m_block(phi, m, B, H, sms)
    elif m_block and phi != "identity":
        raise ValueError(f"the m-axis split (m_block = {m_block}) needs phi = identity, got phi = {phi!r}")
    outs = outputs(args, (key_memory, value_memory, key_snapshot, value_snapshot), out, in_place,
                   (B, T, H, m, d))
    kw = dict(H=H, M=m, D=d, C=C, PHI=nl_code(phi, "phi"), F=nl_code(f, "f"), RHO=nl_code(rho, "rho"),
              EPS=float(eps), DOT_PRECISION=dot_precision, DECODE=T == 1, IN_PLACE=bool(in_place))
    from trellis_export.kernels.cuda_launch import grid_for

    # grids and workspaces from the same expressions the AOT records carry; the state pass's
    # workspaces hold the read-out's
    state = launch_config(D_SPLIT_KERNEL if d_block else "chunk_state", m, d, C, dot_precision, m_block,
                          d_block)
    readout = launch_config("chunk_readout", m, d, C, dot_precision)
    state_rec, readout_rec = launch_record(state, H, m, d, C), launch_record(readout, H, m, d, C)
    ws = workspaces(state_rec, B, T, q.device)
    shared = (ws["ws_memory"], ws["ws_u"])
    if d_block:
        if d_sync == "spin" and triton.cdiv(d, d_block) > 1 \
                and type(chunk_state_dsplit_kernel).__name__ == "InterpretedFunction":
            # triton's interpreter runs the programs one after another: the first would wait forever
            raise ValueError("d_sync='spin' needs the programs of a group to run at once, which triton's "
                             "interpreter does not do; use d_sync='launch' there")
        for s0, s1 in dsplit_spans(T, C, d_sync):
            chunk_state_dsplit_kernel[grid_for(state_rec, B, T)](
                *args, T, s0, s1, *outs, *ws.values(), BM=state.BM, BD=state.BD, BC=state.BC, **kw,
                num_warps=state.num_warps, num_stages=state.num_stages)
    else:
        chunk_state_kernel[grid_for(state_rec, B, T)](*args, T, *outs, *shared, BM=state.BM, BD=state.BD,
                                                      BC=state.BC, **kw, num_warps=state.num_warps,
                                                      num_stages=state.num_stages)
    chunk_readout_kernel[grid_for(readout_rec, B, T)](*args, T, *outs, *shared, BM=readout.BM, BD=readout.BD,
                                                      BC=readout.BC, **kw, num_warps=readout.num_warps,
                                                      num_stages=readout.num_stages)
    return cast(MemoryOutputs, outs)
