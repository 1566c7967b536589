"""The model-local ONNX function ``trellis::TrellisMemory`` built from standard opset-18 operators.

Any ONNX runtime without the TensorRT plugin runs the custom op through this body (ONNX Runtime
inlines it), and a TensorRT without the plugin falls back to it. It computes TRELLIS_SPEC.md
sections 2-3 in float32 (activations cast in, o cast back to q's dtype). The body is specialised to
one (phi, f, rho, chunk_size) -- a model has one config, hence one function, still named
``TrellisMemory``; the specialisation is recorded in the function's doc string and
:func:`check_function_matches` refuses a node whose attributes differ from it. ``eps`` is read from
the calling node's attribute (``ref_attr_name``). Two flavours (:data:`FLAVOURS`):

* ``"portable"`` (what every export carries; what ``trtexec --onnx`` parses): no run-time ``If``
  at all -- TensorRT imports both branches of an If it cannot fold, and its builder asserts on a
  Loop nested in a run-time If that reads outer tensors. One recurrence serves every T:
  - C > 1: the chunked closed form of spec section 3, the math of ``model.memory._chunked``. Row b
    is left-padded by ``position_b % C`` no-op tokens (beta = 1, gamma = 0) so that chunk
    boundaries line up across rows; everything independent of the memories (log-space decays
    ``D[t, j] = gamma_j b_t / b_j`` masked before ``Exp``, ``D * (Q K^T)``, write weights
    ``gamma_j b_C / b_j``) is computed for all chunks at once; then a ``Loop`` over chunks carries
    the memories stacked as ``[K; V]`` and, per chunk, computes all C inner gradients from the
    chunk-start snapshot with one MatMul and one VJP pass, the C reads
    ``Kq = b * (Q K0^T) - (D * Q K^T) U_k`` and ``o = rho(b * (R V0) - (D * R U_v^T) V)`` and the
    end-of-chunk memories, all by MatMul. The output snapshot is that of the chunk holding each
    row's last real token. T = 1 is one real token in one chunk: exact, no special case.
  - C = 1: a ``Loop`` over tokens carrying K, V, S_K, S_V (a chunk is one token; the chunked form
    would only add operators).
  The Loops are for-loops (no cond input) whose bodies output a literal true condition: TensorRT's
  Loop importer does not register a body's cond input that the node leaves empty.
* ``"ort"``: the same recurrence behind ``If(T == 1)``, whose then-branch is one straight-line
  decode step (no Loop). ONNX Runtime runs it fastest; this project's ORT sessions swap it in at
  load (:func:`with_flavour`, in memory: the file keeps its portable body).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, TensorProto, helper

from ..config import NONLINEARITIES, TrellisConfig
from ..opdef import ATTRIBUTES, DOMAIN, INPUTS, OP_TYPE, OPSET, OUTPUTS, op_attributes
from ..state import MEMORY_FIELDS

__all__ = ["memory_function", "memory_node_model", "function_variant", "check_function_matches",
           "with_flavour", "node_variant", "BodyVariant", "FLAVOURS", "FUNCTION_OUTPUTS",
           "FUNCTION_ATTRIBUTES"]

#: Formal output names of the function (its inputs are ``opdef.INPUTS``; names must not repeat).
FUNCTION_OUTPUTS: tuple[str, ...] = tuple(n if n == "o" else f"new_{n}" for n in OUTPUTS)
#: Attributes the function declares: the math attributes and the plugin mapping attributes.
FUNCTION_ATTRIBUTES: tuple[str, ...] = tuple(ATTRIBUTES) + ("plugin_namespace", "plugin_version")
_VARIANT_PREFIX = "trellis-variant:"
_CHUNK_PREFIX = "trellis-chunk-size:"
_FLAVOUR_PREFIX = "trellis-flavour:"
#: Function-body flavours: "portable" (every ONNX runtime and TensorRT parser) and "ort".
FLAVOURS: tuple[str, ...] = ("portable", "ort")


class _Builder:
    """Emits nodes with unique value names (unique across all nested graphs, as ONNX requires)."""

    def __init__(self, counter: list[int], prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._counter = counter
        self._prefix = prefix

    def name(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{self._prefix}{hint}_{self._counter[0]}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None,
           output: str | None = None, **attrs: Any) -> str:
        """One node with one output; returns the output's name."""
        return self.ops(op_type, inputs, hint, outputs=[output] if output is not None else None,
                        **attrs)[0]

    def ops(self, op_type: str, inputs: Sequence[str], hint: str | None = None, n_out: int = 1,
            outputs: Sequence[str] | None = None, **attrs: Any) -> list[str]:
        """One node with ``n_out`` outputs (or the given ``outputs``); returns their names."""
        outs = list(outputs) if outputs is not None else [self.name(hint or op_type.lower())
                                                          for _ in range(n_out)]
        # Reshape keeps allowzero = 0 although no shape here holds a literal 0: TensorRT-RTX 1.7.1
        # warns about possible placeholders then, but allowzero = 1 makes its builder segfault
        # (docs/tensorrt.md)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name("n_" + op_type),
                                           **attrs))
        return outs

    def child(self, prefix: str) -> _Builder:
        return _Builder(self._counter, self._prefix + prefix)


def _ref_constant(b: _Builder, attr: str, kind: str, hint: str) -> str:
    """A Constant whose value is the calling node's attribute ``attr`` (ref_attr_name)."""
    ref = AttributeProto()
    ref.name = kind
    ref.ref_attr_name = attr
    ref.type = AttributeProto.INT if kind == "value_int" else AttributeProto.FLOAT
    out = b.name(hint)
    node = helper.make_node("Constant", [], [out], name=b.name("n_Constant"))
    node.attribute.append(ref)
    b.nodes.append(node)
    return out


def _const(b: _Builder, values: Sequence[int], hint: str) -> str:
    t = helper.make_tensor(b.name(hint + "_t"), TensorProto.INT64, [len(values)], list(values))
    return b.op("Constant", [], hint, value=t)


def _scalar(b: _Builder, dtype: int, value: float, hint: str) -> str:
    return b.op("Constant", [], hint,
                value=helper.make_tensor(b.name(hint + "_t"), dtype, [], [value]))


def _true(b: _Builder, hint: str) -> str:
    """A Loop body's condition output: a literal true. The Loops are plain for-loops (empty cond
    input); TensorRT's Loop importer registers the body's cond input only when the node supplies
    one, so a body that passes ``cond_in`` through fails to parse there ("Node input was not
    registered"), and a supplied cond input draws a trip-limit-and-condition warning."""
    true = helper.make_tensor(b.name(hint + "_t"), TensorProto.BOOL, [], [True])
    return b.op("Constant", [], hint, value=true)


class _Consts:
    """Constants shared by the whole body (outer scope is visible from If/Loop subgraphs)."""

    def __init__(self, b: _Builder, chunk_size: int) -> None:
        self.last = _const(b, [-1], "axis_last")
        self.ax1 = _const(b, [1], "axis1")
        self.ax23 = _const(b, [2, 3], "axes23")
        self.last2 = _const(b, [-2], "axis_last2")
        self.col4 = _const(b, [-1, 1, 1, 1], "shape_b111")
        self.one_f = b.op("Constant", [], "one_f",
                          value=helper.make_tensor(b.name("one_t"), TensorProto.FLOAT, [], [1.0]))
        self.zero_i = b.op("Constant", [], "zero_i",
                           value=helper.make_tensor(b.name("zero_t"), TensorProto.INT64, [], [0]))
        self.one_i = _scalar(b, TensorProto.INT64, 1, "one_i")
        self.three_i = _scalar(b, TensorProto.INT64, 3, "three_i")
        self.zero_f = _scalar(b, TensorProto.FLOAT, 0.0, "zero_f")
        self.neg_inf = _scalar(b, TensorProto.FLOAT, float("-inf"), "neg_inf")
        # the reference's guard of log(0): beta clamped to the smallest normal float32
        self.tiny = _scalar(b, TensorProto.FLOAT, float(np.finfo(np.float32).tiny), "tiny")
        self.ax0 = _const(b, [0], "axis0")
        self.ax3 = _const(b, [3], "axis3")
        self.minus1 = _const(b, [-1], "minus1")
        self.int_max = _const(b, [np.iinfo(np.int64).max], "int_max")
        self.shape_1b1111 = _const(b, [1, -1, 1, 1, 1], "shape_1b111")
        self.chunk = _scalar(b, TensorProto.INT64, chunk_size, "chunk_size")
        self.eps = _ref_constant(b, "eps", "value_float", "eps")


def _silu(b: _Builder, c: _Consts, z: str, want_ds: bool) -> tuple[str, str | None]:
    """s = SiLU(z) and, if ``want_ds``, s' = sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    sig = b.op("Sigmoid", [z], "sig")
    s = b.op("Mul", [z, sig], "s")
    if not want_ds:
        return s, None
    one_minus = b.op("Sub", [c.one_f, sig], "one_minus_sig")
    ds = b.op("Mul", [sig, b.op("Add", [c.one_f, b.op("Mul", [z, one_minus])])], "ds")
    return s, ds


def _nonlin(b: _Builder, c: _Consts, name: str, z: str, want_vjp: bool = False
            ) -> tuple[str, dict[str, str]]:
    """y = g(z) over the last axis, and (``want_vjp``) the intermediates its vector-Jacobian product
    needs; without ``want_vjp`` no operator of s' is emitted (ORT would run them for nothing)."""
    if name == "identity":
        return z, {}
    s, ds = _silu(b, c, z, want_vjp)
    if name == "ln_silu":
        mu = b.op("ReduceMean", [s, c.last], "mu", keepdims=1)
        cen = b.op("Sub", [s, mu], "cen")
        var = b.op("ReduceMean", [b.op("Mul", [cen, cen]), c.last], "var", keepdims=1)
        sd = b.op("Sqrt", [b.op("Add", [var, c.eps])], "sd")
        y = b.op("Div", [cen, sd], "y")
        return y, {"ds": str(ds), "den": sd} if want_vjp else {}
    if name == "l2_silu":
        ss = b.op("ReduceSum", [b.op("Mul", [s, s]), c.last], "ss", keepdims=1)
        nrm = b.op("Sqrt", [b.op("Add", [ss, c.eps])], "nrm")
        y = b.op("Div", [s, nrm], "y")
        return y, {"ds": str(ds), "den": nrm} if want_vjp else {}
    raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}; got {name!r}")


def _inner_grad(b: _Builder, c: _Consts, phi: str, z: str, a: str) -> str:
    """u = J_phi(z)^T (phi(z) - a) in closed form (TRELLIS_SPEC.md section 2)."""
    y, aux = _nonlin(b, c, phi, z, want_vjp=True)
    e = b.op("Sub", [y, a], "e")
    if phi == "identity":
        return e
    if phi == "ln_silu":
        me = b.op("ReduceMean", [e, c.last], "mean_e", keepdims=1)
        mey = b.op("ReduceMean", [b.op("Mul", [e, y]), c.last], "mean_ey", keepdims=1)
        inner = b.op("Sub", [b.op("Sub", [e, me]), b.op("Mul", [y, mey])], "inner")
    else:  # l2_silu
        dot = b.op("ReduceSum", [b.op("Mul", [y, e]), c.last], "dot_ye", keepdims=1)
        inner = b.op("Sub", [e, b.op("Mul", [y, dot])], "inner")
    return b.op("Div", [b.op("Mul", [aux["ds"], inner]), aux["den"]], "u")


def _step(b: _Builder, c: _Consts, variant: tuple[str, str, str], tok: dict[str, str],
          mem: Sequence[str], n: str) -> tuple[str, list[str]]:
    """One token of the recurrence. ``tok``: q, k, v [B,H,d], a [B,H,m], beta, gamma [B,H]
    (float32); ``mem``: K, V, S_K, S_V [B,H,m,d]; ``n``: absolute token index [B] int64.
    Returns o [B,H,d] and the new memories."""
    phi, f, rho = variant
    K, V, SK, SV = mem
    reset = b.op("Reshape", [b.op("Equal", [b.op("Mod", [n, c.chunk]), c.zero_i]), c.col4], "reset")
    SK = b.op("Where", [reset, K, SK], "SK")
    SV = b.op("Where", [reset, V, SV], "SV")

    def matvec(M: str, w: str, hint: str) -> str:       # [B,H,m,d] x [B,H,d] -> [B,H,m]
        col = b.op("Unsqueeze", [w, c.last], hint + "_col")
        return b.op("Squeeze", [b.op("MatMul", [M, col]), c.last], hint)

    uk = _inner_grad(b, c, phi, matvec(SK, tok["k"], "zk"), tok["a"])
    uv = _inner_grad(b, c, phi, matvec(SV, tok["v"], "zv"), tok["a"])
    b4 = b.op("Unsqueeze", [tok["beta"], c.ax23], "beta4")
    g4 = b.op("Unsqueeze", [tok["gamma"], c.ax23], "gamma4")

    def write(M: str, u: str, w: str, hint: str) -> str:   # beta M - gamma outer(u, w)
        outer = b.op("Mul", [b.op("Unsqueeze", [u, c.last]), b.op("Unsqueeze", [w, c.last2])], "outer")
        return b.op("Sub", [b.op("Mul", [b4, M]), b.op("Mul", [g4, outer])], hint)

    K = write(K, uk, tok["k"], "K")
    V = write(V, uv, tok["v"], "V")
    r, _ = _nonlin(b, c, f, matvec(K, tok["q"], "Kq"))
    row = b.op("Unsqueeze", [r, c.last2], "r_row")                          # [B,H,1,m]
    vr = b.op("Squeeze", [b.op("MatMul", [row, V]), c.last2], "Vr")          # [B,H,d]
    o, _ = _nonlin(b, c, rho, vr)
    return o, [K, V, SK, SV]


def _token_loop(b: _Builder, c: _Consts, variant: tuple[str, str, str], act: dict[str, str],
                mem: Sequence[str], position: str, T: str) -> list[str]:
    """Any T token by token: a Loop over tokens carrying K, V, S_K, S_V, o as scan output. Used for
    C == 1, where a chunk is one token and the chunked form would only add operators. Returns the
    names of o [B, T, H, d] and the four new memories."""
    f32 = TensorProto.FLOAT
    lb = b.child("loop_")
    it, cond_in = lb.name("t"), lb.name("cond_in")
    carried_in = [lb.name(f"{x}_in") for x in ("K", "V", "SK", "SV")]
    tok = {n: lb.op("Gather", [act[n], it], n + "_t", axis=1) for n in act}
    n_abs = lb.op("Add", [position, it], "n")
    o, new_mem = _step(lb, c, variant, tok, carried_in, n_abs)
    cond_out = _true(lb, "cond_out")
    body = helper.make_graph(
        lb.nodes, "trellis_token",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(x, f32, None) for x in carried_in]],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(x, f32, None) for x in (*new_mem, o)]])
    trip = b.op("Squeeze", [T], "trip")
    loop_outs = b.ops("Loop", [trip, "", *mem], n_out=5, body=body)
    o_pre = b.op("Transpose", [loop_outs[4]], "o_pre", perm=[1, 0, 2, 3])
    return [o_pre, *loop_outs[:4]]


def _chunked(b: _Builder, c: _Consts, variant: tuple[str, str, str], act: dict[str, str],
             mem: Sequence[str], position: str, T: str) -> list[str]:
    """Any T in the chunked closed form of spec section 3 (the math of ``memory._chunked``); for
    T = 1 it is exact too (one real token padded to one chunk). Returns o and the new memories.

    Row b is left-padded by ``phase_b = position_b % C`` no-op tokens (beta = 1, gamma = 0, zeros
    elsewhere) to L = N C tokens, N = ceil((max phase + T) / C); everything that does not depend on
    the memories (decay matrices, q k^T, write weights) is computed for all N chunks at once, then a
    Loop over the chunks carries the memories stacked as M = [K; V] ``[2, B, H, m, d]`` (one MatMul
    and one inner-gradient pass serve both), the chunk-start snapshot and the output snapshot. Layout
    inside: ``[N, B, H, C, *]`` (chunk-major, so the Loop gathers chunk ``i`` on axis 0)."""
    phi, f, rho = variant
    f32 = TensorProto.FLOAT
    C = c.chunk                                                            # scalar int64
    Ts = b.op("Squeeze", [T], "T_s")                                       # scalar int64
    phase = b.op("Mod", [position, C], "phase")                            # [B]
    max_phase = b.op("ReduceMax", [phase], "max_phase", keepdims=0)
    n_chunks = b.op("Div", [b.op("Add", [b.op("Add", [max_phase, Ts]), b.op("Sub", [C, c.one_i])]), C],
                    "n_chunks")                                            # ceil((max phase + T) / C)
    L = b.op("Mul", [n_chunks, C], "L")
    s_idx = b.op("Range", [c.zero_i, L, c.one_i], "s_idx")                 # [L]
    idx = b.op("Sub", [b.op("Unsqueeze", [s_idx, c.ax0]), b.op("Unsqueeze", [phase, c.ax1])], "idx")
    valid = b.op("And", [b.op("GreaterOrEqual", [idx, c.zero_i]), b.op("Less", [idx, Ts])], "valid")
    t_last = b.op("Sub", [Ts, c.one_i], "t_last")
    gidx = b.op("Unsqueeze", [b.op("Min", [b.op("Max", [idx, c.zero_i]), t_last]), c.last], "gidx")
    valid3 = b.op("Unsqueeze", [valid, c.last], "valid3")                  # [B, L, 1]
    valid4 = b.op("Unsqueeze", [valid3, c.last], "valid4")                 # [B, L, 1, 1]

    def pad(x: str, mask: str, fill: str) -> str:                          # [B, T, ...] -> [B, L, ...]
        g = b.op("GatherND", [x, gidx], "padded", batch_dims=1)
        return b.op("Where", [mask, g, fill], "padded")

    B1 = b.op("Shape", [position], "B1")
    N1 = b.op("Unsqueeze", [n_chunks, c.ax0], "N1")
    C1 = b.op("Unsqueeze", [C, c.ax0], "C1")
    H1 = b.op("Shape", [act["q"]], "H1", start=2, end=3)
    shape5 = b.op("Concat", [B1, N1, C1, H1, c.minus1], "shape_bnchx", axis=0)
    shape4 = b.op("Concat", [B1, N1, C1, H1], "shape_bnch", axis=0)

    def chunks(x: str, hint: str) -> str:                                  # [B, L, H, x] -> [N, B, H, C, x]
        return b.op("Transpose", [b.op("Reshape", [x, shape5])], hint,
                    perm=[1, 0, 3, 2, 4])

    def gate_chunks(x: str, hint: str) -> str:                             # [B, L, H] -> [N, B, H, C]
        return b.op("Transpose", [b.op("Reshape", [x, shape4])], hint,
                    perm=[1, 0, 3, 2])

    qc, kc, vc, ac = (chunks(pad(act[n], valid4, c.zero_f), n + "_c") for n in ("q", "k", "v", "a"))
    beta = pad(act["beta"], valid3, c.one_f)
    logb = gate_chunks(b.op("Log", [b.op("Max", [beta, c.tiny])]), "log_beta")
    gc = gate_chunks(pad(act["gamma"], valid3, c.zero_f), "gamma_c")
    cb = b.op("CumSum", [logb, c.three_i], "cb")                           # [N, B, H, C] log b_t
    total = b.op("Slice", [cb, c.minus1, c.int_max, c.ax3], "cb_total")  # [N, B, H, 1] log b_C
    bt = b.op("Unsqueeze", [b.op("Exp", [cb]), c.last], "bt")              # [N, B, H, C, 1]
    decay = b.op("Unsqueeze", [b.op("Exp", [total]), c.last], "decay")     # [N, B, H, 1, 1]
    # log(b_t / b_j) = cb_t - cb_j is summed directly over j < i <= t, not subtracted: after a beta
    # near 0 (log clamped to -87) cb_t - cb_j would cancel two large numbers in float32 (measured
    # 1.4e-5 on the key memory with two zero betas in a chunk, 4e-7 summed directly: see
    # tests/test_export.py::test_function_body_extreme_gates).
    after = b.op("CumSum", [logb, c.three_i], "log_b_after", exclusive=1, reverse=1)   # sum_{i > j}
    w = b.op("Unsqueeze", [b.op("Mul", [b.op("Exp", [after]), gc]), c.last], "w")     # gamma_j b_C / b_j
    c_idx = b.op("Range", [c.zero_i, C, c.one_i], "c_idx")
    row, col = b.op("Unsqueeze", [c_idx, c.ax1], "c_row"), b.op("Unsqueeze", [c_idx, c.ax0], "c_col")
    causal = b.op("GreaterOrEqual", [row, col], "causal")                 # [C, C]: j <= t
    later = b.op("Where", [b.op("Greater", [row, col]), b.op("Unsqueeze", [logb, c.last]), c.zero_f],
                 "log_b_ij")                                               # [N, B, H, C(i), C(j)]: i > j
    seg = b.op("CumSum", [later, c.three_i], "seg")                       # [t, j]: sum_{j < i <= t}
    D = b.op("Mul", [b.op("Exp", [b.op("Where", [causal, seg, c.neg_inf])]),  # masked before Exp
                     b.op("Unsqueeze", [gc, c.last2])], "D")               # [N, B, H, C(t), C(j)]
    qk = b.op("MatMul", [qc, b.op("Transpose", [kc], perm=[0, 1, 2, 4, 3])], "qk")
    Dqk = b.op("Mul", [D, qk], "D_qk")
    kvc = b.op("Concat", [b.op("Unsqueeze", [kc, c.ax1]), b.op("Unsqueeze", [vc, c.ax1])], "kv_c",
               axis=1)                                                     # [N, 2, B, H, C, d]
    kvw = b.op("Mul", [kvc, b.op("Unsqueeze", [w, c.ax1])], "kv_w")

    def stack(x: str, y: str, hint: str) -> str:
        return b.op("Concat", [b.op("Unsqueeze", [x, c.ax0]), b.op("Unsqueeze", [y, c.ax0])],
                    hint, axis=0)

    M0 = stack(mem[0], mem[1], "M0")                                       # [2, B, H, m, d]
    S_stored = stack(mem[2], mem[3], "S_stored")
    mid = b.op("Reshape", [b.op("Greater", [phase, c.zero_i]), c.shape_1b1111], "mid_chunk")
    S0 = b.op("Where", [mid, S_stored, M0], "S0")                          # first chunk's stale state
    last_chunk = b.op("Div", [b.op("Add", [phase, t_last]), C], "last_chunk")  # [B]
    n_idx = b.op("Range", [c.zero_i, n_chunks, c.one_i], "n_idx")
    sel_shape = b.op("Concat", [N1, c.shape_1b1111], "sel_shape", axis=0)
    sel = b.op("Reshape", [b.op("Equal", [b.op("Unsqueeze", [n_idx, c.ax1]),
                                          b.op("Unsqueeze", [last_chunk, c.ax0])]), sel_shape],
               "sel")                                                      # [N, 1, B, 1, 1, 1]

    # ---- Loop over chunks: carried M, S (chunk-start snapshot), S_out (snapshot of the last real chunk)
    lb = b.child("chunk_")
    it, cond_in = lb.name("i"), lb.name("cond_in")
    M, S, S_out = (lb.name(x + "_in") for x in ("M", "S", "S_out"))
    q_i, kv_i, a_i, bt_i, D_i, Dqk_i, kvw_i, decay_i, sel_i = (
        lb.op("Gather", [x, it], hint + "_i", axis=0)
        for x, hint in ((qc, "q"), (kvc, "kv"), (ac, "a"), (bt, "bt"), (D, "D"), (Dqk, "Dqk"),
                        (kvw, "kvw"), (decay, "decay"), (sel, "sel")))
    perm_t = [0, 1, 2, 4, 3]
    Z = lb.op("MatMul", [kv_i, lb.op("Transpose", [S], "S_T", perm=perm_t)], "Z")   # [2, B, H, C, m]
    U = _inner_grad(lb, c, phi, Z, a_i)                                    # [uk; uv]
    U_T = lb.op("Transpose", [U], "U_T", perm=perm_t)                     # [2, B, H, m, C]
    K_T = lb.op("Gather", [lb.op("Transpose", [M], "M_T", perm=perm_t), c.zero_i], "K_T", axis=0)
    V = lb.op("Gather", [M, c.one_i], "V", axis=0)
    uk = lb.op("Gather", [U, c.zero_i], "uk", axis=0)
    # K_t q_t = b_t K0 q_t - sum_j D[t, j] (k_j . q_t) uk_j
    Kq = lb.op("Sub", [lb.op("Mul", [bt_i, lb.op("MatMul", [q_i, K_T])]), lb.op("MatMul", [Dqk_i, uk])],
               "Kq")                                                       # [B, H, C, m]
    r, _ = _nonlin(lb, c, f, Kq)
    # V_t^T r_t = b_t V0^T r_t - sum_j D[t, j] (uv_j . r_t) v_j
    ur = lb.op("MatMul", [r, lb.op("Gather", [U_T, c.one_i], "uv_T", axis=0)], "ur")
    v_i = lb.op("Gather", [kv_i, c.one_i], "v_i", axis=0)
    Vr = lb.op("Sub", [lb.op("Mul", [bt_i, lb.op("MatMul", [r, V])]),
                       lb.op("MatMul", [lb.op("Mul", [D_i, ur]), v_i])], "Vr")   # [B, H, C, d]
    M_new = lb.op("Sub", [lb.op("Mul", [decay_i, M]), lb.op("MatMul", [U_T, kvw_i])], "M_new")
    S_out_new = lb.op("Where", [sel_i, S, S_out], "S_out_new")
    S_new = lb.op("Identity", [M_new], "S_new")                            # the next chunk starts here
    cond_out = _true(lb, "cond_out")
    body = helper.make_graph(
        lb.nodes, "trellis_chunk",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(x, f32, None) for x in (M, S, S_out)]],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(x, f32, None) for x in (M_new, S_new, S_out_new, Vr)]])
    M_fin, _, S_fin, Vr_all = b.ops("Loop", [n_chunks, "", M0, S0, S0], n_out=4, body=body)

    # ---- outputs: o gathered back to [B, T, H, d] (rho per token), memories unstacked
    shape_bl = b.op("Concat", [B1, c.minus1, b.op("Shape", [act["q"]], "Hd", start=2, end=4)], "shape_blhd",
                    axis=0)
    o_pad = b.op("Reshape", [b.op("Transpose", [Vr_all], perm=[1, 0, 3, 2, 4]), shape_bl], "o_pad")
    t_idx = b.op("Range", [c.zero_i, Ts, c.one_i], "t_idx")
    t_pad = b.op("Add", [b.op("Unsqueeze", [t_idx, c.ax0]), b.op("Unsqueeze", [phase, c.ax1])], "t_pad")
    take = b.op("Unsqueeze", [t_pad, c.last], "take")                     # [B, T, 1]
    o, _ = _nonlin(b, c, rho, b.op("GatherND", [o_pad, take], "Vr_bt", batch_dims=1))
    return [o, *(b.op("Gather", [x, i], "mem_out", axis=0)
                 for x in (M_fin, S_fin) for i in (c.zero_i, c.one_i))]           # K, V, S_K, S_V


@dataclass(frozen=True)
class BodyVariant:
    """What a TrellisMemory function body was specialised to (recorded in its doc string).

    ``flavour``: ``"portable"`` (no run-time If: one recurrence serves every T; what TensorRT's
    parser takes) or ``"ort"`` (an ``If(T == 1)`` picks a loop-free decode step; ONNX Runtime only).
    """

    phi: str
    f: str
    rho: str
    chunk_size: int
    flavour: str = "portable"

    def doc_lines(self) -> str:
        return (f"{_VARIANT_PREFIX} {self.phi},{self.f},{self.rho}\n"
                f"{_CHUNK_PREFIX} {self.chunk_size}\n{_FLAVOUR_PREFIX} {self.flavour}")


def function_variant(function: FunctionProto) -> BodyVariant | None:
    """The specialisation of a TrellisMemory function body, from its doc string (None if absent)."""
    found: dict[str, str] = {}
    for line in function.doc_string.splitlines():
        for prefix in (_VARIANT_PREFIX, _CHUNK_PREFIX, _FLAVOUR_PREFIX):
            if line.startswith(prefix):
                found[prefix] = line[len(prefix):].strip()
    parts = [p.strip() for p in found.get(_VARIANT_PREFIX, "").split(",")]
    if len(parts) != 3 or _CHUNK_PREFIX not in found:
        return None
    try:
        chunk = int(found[_CHUNK_PREFIX])
    except ValueError:
        return None
    return BodyVariant(parts[0], parts[1], parts[2], chunk, found.get(_FLAVOUR_PREFIX, "portable"))


def memory_function(phi: str, f: str, rho: str, chunk_size: int, *, flavour: str = "portable",
                    opset: int = OPSET) -> FunctionProto:
    """The FunctionProto ``trellis::TrellisMemory`` for one (phi, f, rho, chunk_size).

    ``flavour="portable"`` (default; what exports carry): no run-time ``If``, Loops with explicit
    conditions; C > 1 runs the chunked closed form for every T (T = 1 included), C = 1 the token loop.
    ``flavour="ort"``: the same plus ``If(T == 1)`` -> a straight-line decode step (no Loop); ONNX
    Runtime sessions of this project swap it in at load (:func:`with_flavour`).
    """
    for value, what in ((phi, "phi"), (f, "f"), (rho, "rho")):
        if value not in NONLINEARITIES:
            raise ValueError(f"{what} must be one of {', '.join(NONLINEARITIES)}; got {value!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1; got {chunk_size!r}")
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {', '.join(FLAVOURS)}; got {flavour!r}")
    variant = (phi, f, rho)
    counter = [0]
    b = _Builder(counter, "")
    c = _Consts(b, chunk_size)
    f32 = TensorProto.FLOAT
    act = {n: b.op("Cast", [n], n + "_f32", to=f32) for n in INPUTS[:6]}   # q k v a beta gamma
    mem_in = list(INPUTS[6:10])
    position = INPUTS[10]
    T = b.op("Shape", [INPUTS[0]], "T", start=1, end=2)                      # [1] int64
    recurrence = _token_loop if chunk_size == 1 else _chunked

    if flavour == "portable":
        rb = b.child("rec_")
        res = recurrence(rb, c, variant, act, mem_in, position, T)
        b.nodes.extend(rb.nodes)
    else:
        is_one = b.op("Equal", [T, b.op("Constant", [], "one_i", value=helper.make_tensor(
            "one_i_t", TensorProto.INT64, [1], [1]))], "is_decode")
        # then: T == 1, one straight-line step (no Loop)
        tb = b.child("dec_")
        zero = tb.op("Constant", [], "idx0", value=helper.make_tensor("idx0_t", TensorProto.INT64, [], [0]))
        tok = {n: tb.op("Gather", [act[n], zero], n + "_t", axis=1) for n in act}
        o, mem = _step(tb, c, variant, tok, mem_in, position)
        then_graph = _graph(tb, "trellis_decode", [tb.op("Unsqueeze", [o, c.ax1], "o_seq"), *mem])
        eb = b.child("pre_")
        else_graph = _graph(eb, "trellis_prefill", recurrence(eb, c, variant, act, mem_in, position, T))
        res = b.ops("If", [is_one], n_out=5, then_branch=then_graph, else_branch=else_graph)
    b.op("CastLike", [res[0], INPUTS[0]], output=FUNCTION_OUTPUTS[0])
    for src, dst in zip(res[1:], FUNCTION_OUTPUTS[1:]):
        b.op("Identity", [src], output=dst)

    info = BodyVariant(phi, f, rho, chunk_size, flavour)
    fn = helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), list(FUNCTION_OUTPUTS), b.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(FUNCTION_ATTRIBUTES),
        doc_string=(f"Trellis memory (TRELLIS_SPEC.md sections 2-3) in standard opset-{opset} ops, float32 "
                    "state math; eps comes from the node's attribute, chunk_size and phi/f/rho are "
                    f"fixed below (checked against every node).\n{info.doc_lines()}"))
    assert tuple(MEMORY_FIELDS) == tuple(n.removeprefix("new_") for n in FUNCTION_OUTPUTS[1:])
    return fn


def _graph(b: _Builder, name: str, outputs: Sequence[str]) -> onnx.GraphProto:
    """The nodes of ``b`` as an If branch with float32 outputs."""
    return helper.make_graph(b.nodes, name, [],
                             [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in outputs])


def _memory_functions(model: onnx.ModelProto) -> list[FunctionProto]:
    return [fn for fn in model.functions if fn.domain == DOMAIN and fn.name == OP_TYPE]


def _memory_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def node_variant(node: onnx.NodeProto) -> tuple[str, str, str, int]:
    """(phi, f, rho, chunk_size) of a TrellisMemory node, from its attributes."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    phi, f, rho = (v.decode() if isinstance(v, bytes) else str(v)
                   for v in (attrs.get("phi"), attrs.get("f"), attrs.get("rho")))
    return phi, f, rho, int(attrs.get("chunk_size", 0))


def check_function_matches(model: onnx.ModelProto) -> None:
    """Raise ValueError unless every TrellisMemory node's phi/f/rho and chunk_size equal the ones the
    attached body was specialised to (a body without that record is refused too)."""
    fns = _memory_functions(model)
    if not fns:
        return
    variant = function_variant(fns[0])
    if variant is None:
        raise ValueError("the attached TrellisMemory function body does not record its specialisation "
                         "(phi, f, rho, chunk_size); re-export the model with this trellis-export")
    want = (variant.phi, variant.f, variant.rho, variant.chunk_size)
    for node in _memory_nodes(model):
        got = node_variant(node)
        if got != want:
            raise ValueError(f"node {node.name}: (phi, f, rho, chunk_size) {got} differ from the attached "
                             f"TrellisMemory function body {want}")


def with_flavour(model: onnx.ModelProto, flavour: str) -> onnx.ModelProto:
    """``model`` with its TrellisMemory function body rebuilt in ``flavour`` (the model is modified in
    place and returned). Nodes and weights are untouched; a model without the body is returned as is."""
    fns = _memory_functions(model)
    if not fns:
        return model
    variant = function_variant(fns[0])
    if variant is None:
        nodes = _memory_nodes(model)
        if not nodes:
            return model
        phi, f, rho, chunk = node_variant(nodes[0])
        variant = BodyVariant(phi, f, rho, chunk)
    if variant.flavour == flavour:
        return model
    keep = [fn for fn in model.functions if fn not in fns]
    del model.functions[:]
    model.functions.extend([*keep, memory_function(variant.phi, variant.f, variant.rho,
                                                   variant.chunk_size, flavour=flavour)])
    check_function_matches(model)
    return model


def memory_node_model(config: TrellisConfig, act_dtype: int = TensorProto.FLOAT,
                      flavour: str = "portable") -> onnx.ModelProto:
    """A one-node model ``TrellisMemory`` with its function attached (used by the tests and the
    plugin work): inputs/outputs named as in :mod:`trellis_export.opdef`, dynamic shapes."""
    attrs = op_attributes(config)
    fn = memory_function(attrs["phi"], attrs["f"], attrs["rho"], attrs["chunk_size"], flavour=flavour)
    dims = {"q": ["B", "T", "H", "d"], "k": ["B", "T", "H", "d"], "v": ["B", "T", "H", "d"],
            "a": ["B", "T", "H", "m"], "beta": ["B", "T", "H"], "gamma": ["B", "T", "H"],
            "position": ["B"]}
    acts = ("q", "k", "v", "a")       # beta, gamma (gates) and the memories are float32
    inputs = []
    for n in INPUTS:
        dt = TensorProto.INT64 if n == "position" else (act_dtype if n in acts else TensorProto.FLOAT)
        inputs.append(helper.make_tensor_value_info(f"in_{n}", dt, dims.get(n, ["B", "H", "m", "d"])))
    outputs = [helper.make_tensor_value_info(f"out_{n}", act_dtype if n == "o" else TensorProto.FLOAT,
                                             ["B", "T", "H", "d"] if n == "o" else ["B", "H", "m", "d"])
               for n in OUTPUTS]
    node = helper.make_node(OP_TYPE, [f"in_{n}" for n in INPUTS], [f"out_{n}" for n in OUTPUTS],
                            name="trellis_memory", domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "trellis_memory_op", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(DOMAIN, 1)],
                              functions=[fn])
    model.ir_version = 9
    return model

