"""The lean ONNX Runtime graph for every T (prefill), applied in memory like the lean decode graph.

:func:`lean_prefill_model` builds, from an exported model's own weights (:func:`ort_rewrite.read_weights`),
a graph with the exported graph's inputs and outputs that runs any T >= 1 and any mix of row positions.
An :class:`~trellis_export.runtime.OrtSession` with ``ort_graph="lean"`` / ``"lean-std"`` runs it for
calls with T > 1 (T = 1 goes to the lean decode graph); the file is never changed. What it changes
against the exported graph's TrellisMemory body (one ONNX Loop iteration per chunk doing the whole
chunk, ~60 kernels, the read-out inside), all measured in ``bench/bench_ort.py``:

* **Only the state pass is sequential.** A Scan over the chunks (one per layer) carries the memories
  ``M = [K; V]`` ``[B, 2H, m, d]`` (both passes stacked on the head axis: one batched MatMul serves
  both) and does per chunk just ``Z = W M^T``, the inner gradient ``U`` (TRELLIS_SPEC.md section 2)
  and the write ``M <- b_C M - U^T (G * W)``; its scan outputs are the chunk-start memories and ``U``
  (19 kernels a chunk for ln_silu; the Scan slices its inputs itself, no Gather). Everything that does
  not depend on the chunk-start state comes out of it: the projections, the gates, the in-chunk
  decays (cumulative sums of log beta, section 3), and the **read-out**, computed after the Scan for
  all chunks at once from the chunk-start memories and ``U`` by the chunked parallel form
  (``K_t q = b_t M q - sum_{j<=t} gamma_j (b_t / b_j) (w_j . q) u_j``, the same for ``V^T r``).
* Rows at different positions: each row's tokens are shifted by ``position % C`` into a padded
  ``[B, nC * C]`` grid where chunk boundaries line up (one Gather per per-token input); padded
  tokens get beta = 1, gamma = 0, so they change nothing; the outputs are gathered back. A row that
  starts the call mid-chunk takes its first inner gradients at its stored snapshot (a correction Scan
  input, zero after the first chunk). With C = 1 there is nothing to shift.
* For ``phi = ln_silu`` the target's mean is taken once outside the Scan (``e - mean(e) = y - (a - mean
  a)`` because a LayerNormalization output has zero mean), which saves two kernels per chunk.
* The rest of the layer as in the lean decode graph (fused projections, contrib norms with
  ``contrib=True``), over ``[B, T, ...]``; the causal conv stays ORT's grouped Conv over
  ``[cache, tokens]``.

The scan outputs grow with T; :class:`~trellis_export.runtime.OrtSession` runs calls longer than its
``prefill_budget_bytes`` in pieces. Float32 activations only;
:class:`~trellis_export.export.ort_rewrite.RewriteError` otherwise (the session then runs the exported
graph for T > 1 and says why in ``describe()``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..config import TrellisConfig
from .ort_rewrite import (
    _B,
    ModelWeights,
    _inner_grad,
    _lean_model,
    _lean_weights,
    _mixer_out_and_ffn,
    _nonlin,
    _qk_normalise,
    _state_names,
)

__all__ = ["lean_prefill_model"]

_INT_MAX = np.iinfo(np.int64).max


def _mm(b: _B, x: str, y: str, hint: str, rank: int, trans_a: bool = False, trans_b: bool = False) -> str:
    """x @ y of rank-``rank`` tensors, either operand transposed on its last two axes (one FusedMatMul
    with contrib ops, else Transpose + MatMul)."""
    if b.contrib and (trans_a or trans_b):
        return b.op("FusedMatMul", [x, y], hint, domain="com.microsoft", transA=int(trans_a),
                    transB=int(trans_b), alpha=1.0)
    perm = [*range(rank - 2), rank - 1, rank - 2]
    xs = b.op("Transpose", [x], perm=perm) if trans_a else x
    ys = b.op("Transpose", [y], perm=perm) if trans_b else y
    return b.op("MatMul", [xs, ys], hint)


def _ln_silu_grad_centred(b: _B, z: str, a_centred: str, n: int, eps: float) -> str:
    """u = J_phi(z)^T (phi(z) - a) for phi = ln_silu over the last axis, given ``a - mean(a)``:
    with y = phi(z) (zero mean), ``e - mean e = y - a_c`` and ``mean(e y) = mean((y - a_c) y)``."""
    sig = b.op("Sigmoid", [z], "sig")
    s = b.op("Mul", [z, sig], "s")
    y, inv = b.name("y"), b.name("inv_sd")
    b.op("LayerNormalization", [s, b.const(np.ones(n), np.float32), b.const(np.zeros(n), np.float32)],
         outputs=[y, "", inv], axis=-1, epsilon=eps, stash_type=1)
    ds = b.op("Add", [sig, b.op("Sub", [s, b.op("Mul", [s, sig])])], "ds")   # sig (1 + z (1 - sig))
    ec = b.op("Sub", [y, a_centred], "ec")
    mey = b.op("ReduceMean", [b.op("Mul", [y, ec]), b.const([-1])], keepdims=1)
    inner = b.op("Sub", [ec, b.op("Mul", [y, mey])], "inner")
    return b.op("Mul", [b.op("Mul", [ds, inner]), inv], "u")


class _Index:
    """The per-call index tensors shared by every layer: the shift of each row's tokens onto a grid
    where chunk boundaries line up (C > 1), and the scalars T, B, nC."""

    def __init__(self, b: _B, C: int, pos: str) -> None:
        self.C = C
        i64 = np.int64
        self.T = b.op("Shape", ["input_ids"], "T", start=1, end=2)                  # [1]
        self.B = b.op("Shape", ["input_ids"], "B", start=0, end=1)
        self.B0 = b.op("Squeeze", [self.B, b.const([0])], "B0")
        self.T0 = b.op("Squeeze", [self.T, b.const([0])], "T0")
        zero, one = b.const(0, i64), b.const(1, i64)
        if C == 1:
            self.nC = self.T
            return
        self.p = b.op("Mod", [pos, b.const(C)], "phase")                             # [B]
        maxp = b.op("ReduceMax", [self.p, b.const([0])], "max_phase", keepdims=1)
        self.nC = b.op("Add", [b.op("Div", [b.op("Add", [self.T, b.op("Sub", [maxp, b.const([1])])]),
                                            b.const([C])]), b.const([1])], "nC")
        Tp = b.op("Mul", [self.nC, b.const([C])], "Tp")
        self.Tp0 = b.op("Squeeze", [Tp, b.const([0])], "Tp0")
        rows = b.op("Range", [zero, self.B0, one], "rows")                           # [B]
        p_col = b.op("Unsqueeze", [self.p, b.const([1])], "p_col")
        # forward: grid cell s of row b holds token s - p_b (when 0 <= s - p_b < T)
        grid = b.op("Sub", [b.op("Unsqueeze", [b.op("Range", [zero, self.Tp0, one]), b.const([0])]), p_col],
                    "grid")                                                           # [B, Tp]
        valid = b.op("And", [b.op("GreaterOrEqual", [grid, b.const(0)]), b.op("Less", [grid, self.T])])
        self.valid = b.op("Unsqueeze", [b.op("Cast", [valid], to=TensorProto.FLOAT), b.const([2])], "valid")
        clipped = b.op("Max", [b.op("Min", [grid, b.op("Sub", [self.T, b.const([1])])]), b.const(0)])
        self.fwd = b.op("Add", [clipped, b.op("Unsqueeze", [b.op("Mul", [rows, self.T0]), b.const([1])])],
                        "fwd")                                                        # into [B*T, ...]
        # back: token t of row b sits in grid cell t + p_b
        tok = b.op("Unsqueeze", [b.op("Range", [zero, self.T0, one]), b.const([0])])
        self.back = b.op("Add", [b.op("Add", [tok, p_col]),
                                 b.op("Unsqueeze", [b.op("Mul", [rows, self.Tp0]), b.const([1])])], "back")
        # the chunk that holds each row's last token (its snapshot is the present snapshot), flat into
        # the Loop's [nC * B, ...] scan output
        last = b.op("Div", [b.op("Add", [self.p, b.op("Sub", [self.T, b.const([1])])]), b.const([C])])
        self.snap = b.op("Add", [b.op("Mul", [last, self.B0]), rows], "snap_idx")
        self.snap_first = b.op("Reshape", [b.op("Equal", [last, b.const(0)]), b.const([-1, 1, 1, 1])],
                               "in_first")
        self.start4 = b.op("Reshape", [b.op("Equal", [self.p, b.const(0)]), b.const([-1, 1, 1, 1])], "start4")


def _memory(b: _B, c: TrellisConfig, L: int, ix: _Index, y3: str, a: str, gates: str,
            M_in: str, S_in: str | None) -> tuple[str, str, list[str] | None]:
    """One layer's TrellisMemory over T tokens (see the module doc). ``y3``: normalised q k v
    ``[B, T, 3H, d]``; ``a`` ``[B, T, H m]``; ``gates`` (beta, gamma logits) ``[B, T, 2H]``; ``M_in``
    the stacked running memories ``[B, 2H, m, d]`` (already reset), ``S_in`` the stacked stored
    snapshots (C > 1). Returns (o ``[B, T, H d]``, final memories, the present key and value snapshots
    or None).

    Chunk tensors are laid out ``[nC, B, heads, C, ...]``: the Scan slices them on axis 0 without a
    kernel, and the batched MatMuls of the read-out broadcast over the two leading axes."""
    H, m, d, C = c.n_heads, c.n_slots, c.head_dim, c.chunk_size
    f32 = np.float32
    qkv = b.op("Reshape", [y3, b.const([0, 0, 3 * H * d])], "qkv")
    if C > 1:   # the per-token inputs onto the aligned grid: [B, T, X] -> [B, Tp, X], one copy each
        qkv, a, gates = (b.op("Gather", [b.op("Reshape", [x, b.const([-1, X])]), ix.fwd], "on_grid", axis=0)
                         for x, X in ((qkv, 3 * H * d), (a, H * m), (gates, 2 * H)))
    bl, gl = b.op("Split", [gates, b.const([H, H])], n_out=2, axis=2)
    log_beta = b.op("Neg", [b.op("Softplus", [b.op("Neg", [bl])])], "log_beta")     # log sigmoid, no -inf
    gamma = b.op("Sigmoid", [gl], "gamma")
    if C > 1:   # padded cells: beta = 1, gamma = 0
        log_beta = b.op("Mul", [log_beta, ix.valid])
        gamma = b.op("Mul", [gamma, ix.valid])

    def chunked(x: str, heads: int, width: int | None) -> str:
        """[B, T', heads*width] -> [nC,B,heads,C,width]; no width: [B, T', heads] -> [nC,B,heads,C]."""
        if width is None:
            return b.op("Transpose", [b.op("Reshape", [x, b.const([0, -1, C, heads])])], perm=[1, 0, 3, 2])
        return b.op("Transpose", [b.op("Reshape", [x, b.const([0, -1, C, heads, width])])],
                    perm=[1, 0, 3, 2, 4])

    q, kv = b.op("Split", [chunked(qkv, 3 * H, d), b.const([H, 2 * H])], n_out=2, axis=2)   # [nC,B,*,C,d]
    k, v = b.op("Split", [kv, b.const([H, H])], n_out=2, axis=2)
    a5 = chunked(a, H, m)
    if c.phi == "ln_silu":
        a5 = b.op("Sub", [a5, b.op("ReduceMean", [a5, b.const([-1])], keepdims=1)], "a_centred")
    A2 = b.op("Concat", [a5, a5], "A2", axis=2)                                         # same target a
    cum = b.op("CumSum", [chunked(log_beta, H, None), b.const(3)], "cum_log_beta")     # [nC, B, H, C]
    gam = chunked(gamma, H, None)
    cum_end = b.op("Slice", [cum, b.const([C - 1]), b.const([C]), b.const([3])], "cum_end")   # [nC,B,H,1]
    # the write's weight of token j at the chunk end, gamma_j b_C / b_j, folded into the written rows
    g_end = b.op("Unsqueeze", [b.op("Mul", [gam, b.op("Exp", [b.op("Sub", [cum_end, cum])])]), b.const([4])])
    GW = b.op("Mul", [kv, b.op("Concat", [g_end, g_end], axis=2)], "GW")              # [nC, B, 2H, C, d]
    b_end = b.op("Exp", [cum_end])
    b_end = b.op("Unsqueeze", [b.op("Concat", [b_end, b_end], axis=2), b.const([4])], "b_end") # nC,B,2H,1,1
    # Rows that start the call mid-chunk take the first chunk's inner gradients at the stored snapshot
    # S_in, not at the running memory the Scan carries: Z_0 = W_0 S0^T = W_0 M_in^T + W_0 (S0 - M_in)^T,
    # the second term a Scan input that is zero for every later chunk.
    if S_in is None:
        S0, Zc = M_in, None
    else:
        S0 = b.op("Where", [ix.start4, M_in, S_in], "S0")
        first = b.op("Gather", [kv, b.const(0)], "W0", axis=0)
        z0 = b.op("Unsqueeze", [_mm(b, first, b.op("Sub", [S0, M_in]), "Z0", 4, trans_b=True), b.const([0])])
        pads = b.op("Concat", [b.const([0] * 5), b.op("Sub", [ix.nC, b.const([1])]), b.const([0] * 4)],
                    axis=0)
        Zc = b.op("Pad", [z0, pads], "Z_first")                                        # [nC, B, 2H, C, m]

    # ---- the Scan: the state pass only
    saved, b.nodes = b.nodes, []
    M, W, A, GWc, bc = (b.name(x) for x in ("M", "W", "A", "GW", "bc"))
    Z = _mm(b, W, M, "Z", 4, trans_b=True)                                              # [B, 2H, C, m]
    Zcc = None
    if Zc is not None:
        Zcc = b.name("Zc")
        Z = b.op("Add", [Z, Zcc], "Z")
    U = _ln_silu_grad_centred(b, Z, A, m, c.eps) if c.phi == "ln_silu" else \
        _inner_grad(b, c.phi, Z, A, -1, m, c.eps)
    upd = _mm(b, U, GWc, "upd", 4, trans_a=True)                                       # [B, 2H, m, d]
    M_next = b.op("Sub", [b.op("Mul", [bc, M]), upd], "M_next")
    # the chunk-start memories K, V as scan outputs (a Split: one kernel, and the read-out needs them
    # apart; Identity of a carried value measured slower)
    K_start, V_start = b.op("Split", [M, b.const([H, H])], n_out=2, axis=1)
    body_nodes, b.nodes = b.nodes, saved
    f32t = TensorProto.FLOAT
    scan_in = [W, A, GWc, bc] + ([Zcc] if Zcc is not None else [])
    body = helper.make_graph(
        body_nodes, f"state_pass_{L}",
        [helper.make_tensor_value_info(n, f32t, None) for n in [M, *scan_in]],
        [helper.make_tensor_value_info(n, f32t, None) for n in (M_next, K_start, V_start, U)])
    outer_in = [kv, A2, GW, b_end] + ([Zc] if Zc is not None else [])
    M_end, Mk, Mv, U_scan = b.op("Scan", [M_in, *outer_in], n_out=4, body=body,
                                 num_scan_inputs=len(outer_in))

    # ---- the read-out, all chunks at once (Mk, Mv: the chunk-start memories [nC, B, H, m, d])
    Uk, Uv = b.op("Split", [U_scan, b.const([H, H])], n_out=2, axis=2)
    b_t = b.op("Unsqueeze", [b.op("Exp", [cum]), b.const([4])], "b_t")                # [nC, B, H, C, 1]
    diff = b.op("Sub", [b.op("Unsqueeze", [cum, b.const([4])]), b.op("Unsqueeze", [cum, b.const([3])])])
    tril = b.const(np.tril(np.ones((C, C), dtype=bool)), np.bool_)
    decay = b.op("Mul", [b.op("Exp", [b.op("Where", [tril, diff, b.const(-np.inf, f32)])]),
                         b.op("Unsqueeze", [gam, b.const([3])])], "decay")    # gamma_j b_t / b_j, j <= t
    Kq = b.op("Sub", [b.op("Mul", [b_t, _mm(b, q, Mk, "qM", 5, trans_b=True)]),
                      b.op("MatMul", [b.op("Mul", [_mm(b, q, k, "qk", 5, trans_b=True), decay]), Uk])], "Kq")
    r, _ = _nonlin(b, c.f, Kq, -1, m, c.eps, want_vjp=False)
    O = b.op("Sub", [b.op("Mul", [b_t, b.op("MatMul", [r, Mv])]),
                     b.op("MatMul", [b.op("Mul", [_mm(b, r, Uv, "rU", 5, trans_b=True), decay]), v])], "O")
    o, _ = _nonlin(b, c.rho, O, -1, d, c.eps, want_vjp=False)
    o = b.op("Transpose", [o], perm=[1, 0, 3, 2, 4])                                  # [B, nC, C, H, d]
    if C > 1:
        o = b.op("Gather", [b.op("Reshape", [o, b.const([-1, H * d])]), ix.back], "o", axis=0)
    else:
        o = b.op("Reshape", [o, b.const([0, -1, H * d])], "o")
    snaps: list[str] | None = None
    if C > 1:   # each row's snapshot: the start of the chunk holding its last token (chunk 0: S0)
        S0k, S0v = b.op("Split", [S0, b.const([H, H])], n_out=2, axis=1)
        snaps = [b.op("Where", [ix.snap_first, first_,
                                b.op("Gather", [b.op("Reshape", [M_, b.const([-1, H, m, d])]), ix.snap],
                                     "last_start", axis=0)], "snapshot")
                 for first_, M_ in ((S0k, Mk), (S0v, Mv))]
    return o, M_end, snaps


def lean_prefill_model(model: onnx.ModelProto, config: TrellisConfig, *, contrib: bool = True,
                       activation_dtype: str = "float32", weights: ModelWeights | None = None
                       ) -> onnx.ModelProto:
    """The streaming step of ``model`` for any T as the lean graph of the module doc: same inputs,
    outputs (``input_ids`` ``[batch, T]``) and metadata as the exported graph. ``contrib``: ORT's
    contrib ops (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, Gelu, QuickGelu,
    FusedMatMul) or standard opset-18 ops only. Raises :class:`RewriteError` for a graph it cannot read
    or a float16 export."""
    wts = _lean_weights(model, config, weights, activation_dtype, "prefill")
    c = config
    H, m, d, HD, C, K = c.n_heads, c.n_slots, c.head_dim, c.memory_dim, c.chunk_size, c.conv_size
    f32 = np.float32
    b = _B(contrib)
    ins, outs = _state_names(c)
    pos = ins["position"]
    ix = _Index(b, C, pos)
    b.op("Add", [pos, ix.T], outputs=[outs["position"]])
    fresh = b.op("Equal", [pos, b.const(0)], "fresh")
    fresh3 = b.op("Reshape", [fresh, b.const([-1, 1, 1])], "fresh3")
    fresh4 = b.op("Unsqueeze", [fresh3, b.const([3])], "fresh4")
    x = b.op("Gather", [b.init(wts.embed, "embed"), "input_ids"], "x", axis=0)          # [B, T, D]
    h = b.rms(x, b.init(wts.layers[0].norm_mixer, "norm_mixer_0"), c.norm_eps)
    f_out = None
    for L, lw in enumerate(wts.layers):
        if L > 0:
            assert f_out is not None
            h, x = b.skip_rms(x, f_out, b.init(lw.norm_mixer, f"norm_mixer_{L}"), c.norm_eps)
        w_mix = np.concatenate([lw.w_qkv, lw.w_a, lw.w_beta, lw.w_gamma, lw.w_gate], axis=1)
        bias = np.zeros(w_mix.shape[1], f32)
        o0 = 3 * HD + H * m
        bias[o0:o0 + H], bias[o0 + H:o0 + 2 * H] = lw.b_beta, lw.b_gamma
        mix = b.op("Add", [b.op("MatMul", [h, b.init(w_mix, f"w_mix_{L}")]), b.init(bias, f"b_mix_{L}")],
                   "mix")
        qkv, a, gates, g = b.op("Split", [mix, b.const([3 * HD, H * m, 2 * H, HD])], n_out=4, axis=2)
        # ---- causal depthwise conv over [cache, tokens]; the new cache is the window's last K - 1
        cache = b.op("Where", [fresh3, b.const(0.0, f32), ins[f"{L}.conv"]], "cache")
        win = b.op("Concat", [cache, b.op("Transpose", [qkv], perm=[0, 2, 1])], "win", axis=2)
        b.op("Slice", [win, b.const([-(K - 1)]), b.const([_INT_MAX]), b.const([2])],
             outputs=[outs[f"{L}.conv"]])
        y = b.op("Conv", [win, b.init(lw.conv.reshape(3 * HD, 1, K), f"conv_{L}")], "conv", group=3 * HD)
        y3 = b.op("Reshape", [b.op("Transpose", [b.silu(y)], perm=[0, 2, 1]), b.const([0, 0, 3 * H, d])],
                  "qkv3")                                                             # [B, T, 3H, d]
        y3 = _qk_normalise(b, c, y3)
        m0 = np.concatenate([lw.m0_key, lw.m0_value], axis=0).astype(f32)
        M_stored = b.op("Concat", [ins[f"{L}.key_memory"], ins[f"{L}.value_memory"]], axis=1)
        M_in = b.op("Where", [fresh4, b.init(m0, f"m0_{L}"), M_stored], "M_in")
        S_in = b.op("Concat", [ins[f"{L}.key_snapshot"], ins[f"{L}.value_snapshot"]], "S_in", axis=1) \
            if C > 1 else None
        o2, M_end, snaps = _memory(b, c, L, ix, y3, a, gates, M_in, S_in)
        b.op("Split", [M_end, b.const([H, H])], outputs=[outs[f"{L}.key_memory"], outs[f"{L}.value_memory"]],
             axis=1)
        if snaps is not None:
            for kind, snap in zip(("key", "value"), snaps):
                b.op("Identity", [snap], outputs=[outs[f"{L}.{kind}_snapshot"]])
        x, f_out = _mixer_out_and_ffn(b, c, lw, L, x, o2, g)
    assert f_out is not None and wts.norm is not None and wts.lm_head is not None
    hn, _ = b.skip_rms(x, f_out, b.init(wts.norm, "norm"), c.norm_eps)
    b.op("MatMul", [hn, b.init(wts.lm_head, "lm_head")], outputs=["logits"])

    return _lean_model(b, model, c, "lean-prefill", "tokens")
