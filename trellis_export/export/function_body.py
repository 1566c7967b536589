"""The model-local ONNX function ``trellis::TrellisMemory`` built from standard opset-18 operators.

Any ONNX runtime without the TensorRT plugin runs the custom op through this body (ONNX Runtime
inlines it). It computes TRELLIS_SPEC.md sections 2-3 token by token in float32:

* ``T == 1`` (decode): an ``If`` whose then-branch is one straight-line step, no ``Loop``;
* ``T > 1``: a ``Loop`` over tokens carrying K, V, S_K, S_V, with the per-row snapshot rule
  ``if (position + t) % C == 0: S <- K``.

``chunk_size`` and ``eps`` are read from the calling node's attributes (``ref_attr_name``). The slot
nonlinearities ``phi``, ``f``, ``rho`` select different operator sequences, which opset 18 cannot
branch on (string ``Equal`` arrives in opset 19), so the body is specialised to one (phi, f, rho)
triple: a model has one config, hence one function, still named ``TrellisMemory``. The triple is
recorded in the function's doc string and :func:`check_function_matches` refuses a node whose
attributes differ from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import AttributeProto, FunctionProto, TensorProto, helper

from ..config import NONLINEARITIES, TrellisConfig
from ..opdef import ATTRIBUTES, DOMAIN, INPUTS, OP_TYPE, OPSET, OUTPUTS, op_attributes
from ..state import MEMORY_FIELDS

__all__ = ["memory_function", "memory_node_model", "function_variant", "check_function_matches",
           "FUNCTION_OUTPUTS", "FUNCTION_ATTRIBUTES"]

#: Formal output names of the function (its inputs are ``opdef.INPUTS``; names must not repeat).
FUNCTION_OUTPUTS: tuple[str, ...] = tuple(n if n == "o" else f"new_{n}" for n in OUTPUTS)
#: Attributes the function declares: the math attributes and the plugin mapping attributes.
FUNCTION_ATTRIBUTES: tuple[str, ...] = tuple(ATTRIBUTES) + ("plugin_namespace", "plugin_version")
_VARIANT_PREFIX = "trellis-variant:"


class _Builder:
    """Emits nodes with unique value names (unique across all nested graphs, as ONNX requires)."""

    def __init__(self, counter: list[int], prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._counter = counter
        self._prefix = prefix

    def name(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{self._prefix}{hint}_{self._counter[0]}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, n_out: int = 1,
           outputs: Sequence[str] | None = None, **attrs: object) -> str | list[str]:
        outs = list(outputs) if outputs is not None else [self.name(hint or op_type.lower())
                                                          for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name("n_" + op_type),
                                           **attrs))
        return outs[0] if n_out == 1 and outputs is None else outs

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
    return b.op("Constant", [], hint, value=t)  # type: ignore[return-value]


class _Consts:
    """Constants shared by the whole body (outer scope is visible from If/Loop subgraphs)."""

    def __init__(self, b: _Builder) -> None:
        self.last = _const(b, [-1], "axis_last")
        self.ax1 = _const(b, [1], "axis1")
        self.ax23 = _const(b, [2, 3], "axes23")
        self.last2 = _const(b, [-2], "axis_last2")
        self.col4 = _const(b, [-1, 1, 1, 1], "shape_b111")
        self.one_f = b.op("Constant", [], "one_f",
                          value=helper.make_tensor(b.name("one_t"), TensorProto.FLOAT, [], [1.0]))
        self.zero_i = b.op("Constant", [], "zero_i",
                           value=helper.make_tensor(b.name("zero_t"), TensorProto.INT64, [], [0]))
        self.chunk = _ref_constant(b, "chunk_size", "value_int", "chunk_size")
        self.eps = _ref_constant(b, "eps", "value_float", "eps")


def _silu(b: _Builder, c: _Consts, z: str) -> tuple[str, str]:
    """s = SiLU(z) and s' = sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    sig = b.op("Sigmoid", [z], "sig")
    s = b.op("Mul", [z, sig], "s")
    one_minus = b.op("Sub", [c.one_f, sig], "one_minus_sig")
    ds = b.op("Mul", [sig, b.op("Add", [c.one_f, b.op("Mul", [z, one_minus])])], "ds")
    return s, ds  # type: ignore[return-value]


def _nonlin(b: _Builder, c: _Consts, name: str, z: str, want_vjp: bool = False
            ) -> tuple[str, dict[str, str]]:
    """y = g(z) over the last axis, and the intermediates its vector-Jacobian product needs."""
    if name == "identity":
        return z, {}
    s, ds = _silu(b, c, z)
    if name == "ln_silu":
        mu = b.op("ReduceMean", [s, c.last], "mu", keepdims=1)
        cen = b.op("Sub", [s, mu], "cen")
        var = b.op("ReduceMean", [b.op("Mul", [cen, cen]), c.last], "var", keepdims=1)
        sd = b.op("Sqrt", [b.op("Add", [var, c.eps])], "sd")
        y = b.op("Div", [cen, sd], "y")
        return y, {"ds": ds, "den": sd}  # type: ignore[return-value]
    if name == "l2_silu":
        ss = b.op("ReduceSum", [b.op("Mul", [s, s]), c.last], "ss", keepdims=1)
        nrm = b.op("Sqrt", [b.op("Add", [ss, c.eps])], "nrm")
        y = b.op("Div", [s, nrm], "y")
        return y, {"ds": ds, "den": nrm}  # type: ignore[return-value]
    raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}; got {name!r}")


def _inner_grad(b: _Builder, c: _Consts, phi: str, z: str, a: str) -> str:
    """u = J_phi(z)^T (phi(z) - a) in closed form (TRELLIS_SPEC.md section 2)."""
    y, aux = _nonlin(b, c, phi, z)
    e = b.op("Sub", [y, a], "e")
    if phi == "identity":
        return e  # type: ignore[return-value]
    if phi == "ln_silu":
        me = b.op("ReduceMean", [e, c.last], "mean_e", keepdims=1)
        mey = b.op("ReduceMean", [b.op("Mul", [e, y]), c.last], "mean_ey", keepdims=1)
        inner = b.op("Sub", [b.op("Sub", [e, me]), b.op("Mul", [y, mey])], "inner")
    else:  # l2_silu
        dot = b.op("ReduceSum", [b.op("Mul", [y, e]), c.last], "dot_ye", keepdims=1)
        inner = b.op("Sub", [e, b.op("Mul", [y, dot])], "inner")
    return b.op("Div", [b.op("Mul", [aux["ds"], inner]), aux["den"]], "u")  # type: ignore[return-value]


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
        return b.op("Squeeze", [b.op("MatMul", [M, col]), c.last], hint)  # type: ignore[return-value]

    uk = _inner_grad(b, c, phi, matvec(SK, tok["k"], "zk"), tok["a"])
    uv = _inner_grad(b, c, phi, matvec(SV, tok["v"], "zv"), tok["a"])
    b4 = b.op("Unsqueeze", [tok["beta"], c.ax23], "beta4")
    g4 = b.op("Unsqueeze", [tok["gamma"], c.ax23], "gamma4")

    def write(M: str, u: str, w: str, hint: str) -> str:   # beta M - gamma outer(u, w)
        outer = b.op("Mul", [b.op("Unsqueeze", [u, c.last]), b.op("Unsqueeze", [w, c.last2])], "outer")
        return b.op("Sub", [b.op("Mul", [b4, M]), b.op("Mul", [g4, outer])], hint)  # type: ignore

    K = write(K, uk, tok["k"], "K")
    V = write(V, uv, tok["v"], "V")
    r, _ = _nonlin(b, c, f, matvec(K, tok["q"], "Kq"))
    row = b.op("Unsqueeze", [r, c.last2], "r_row")                          # [B,H,1,m]
    vr = b.op("Squeeze", [b.op("MatMul", [row, V]), c.last2], "Vr")          # [B,H,d]
    o, _ = _nonlin(b, c, rho, vr)
    return o, [K, V, SK, SV]


def function_variant(function: FunctionProto) -> tuple[str, str, str] | None:
    """The (phi, f, rho) a TrellisMemory function body was specialised to, from its doc string."""
    for line in function.doc_string.splitlines():
        if line.startswith(_VARIANT_PREFIX):
            parts = line[len(_VARIANT_PREFIX):].strip().split(",")
            if len(parts) == 3:
                return tuple(p.strip() for p in parts)  # type: ignore[return-value]
    return None


def memory_function(phi: str, f: str, rho: str, opset: int = OPSET) -> FunctionProto:
    """The FunctionProto ``trellis::TrellisMemory`` for one (phi, f, rho) triple."""
    for value, what in ((phi, "phi"), (f, "f"), (rho, "rho")):
        if value not in NONLINEARITIES:
            raise ValueError(f"{what} must be one of {', '.join(NONLINEARITIES)}; got {value!r}")
    variant = (phi, f, rho)
    counter = [0]
    b = _Builder(counter, "")
    c = _Consts(b)
    f32 = TensorProto.FLOAT
    act = {n: b.op("Cast", [n], n + "_f32", to=f32) for n in INPUTS[:6]}   # q k v a beta gamma
    mem_in = list(INPUTS[6:10])
    position = INPUTS[10]
    T = b.op("Shape", [INPUTS[0]], "T", start=1, end=2)                      # [1] int64
    is_one = b.op("Equal", [T, b.op("Constant", [], "one_i",
                                    value=helper.make_tensor("one_i_t", TensorProto.INT64, [1], [1]))],
                  "is_decode")

    # ---- then: T == 1, straight-line decode step (no Loop)
    tb = b.child("dec_")
    zero = tb.op("Constant", [], "idx0", value=helper.make_tensor("idx0_t", TensorProto.INT64, [], [0]))
    tok = {n: tb.op("Gather", [act[n], zero], n + "_t", axis=1) for n in act}
    o, mem = _step(tb, c, variant, tok, mem_in, position)
    o_seq = tb.op("Unsqueeze", [o, c.ax1], "o_seq")
    then_outs = [o_seq, *mem]
    then_graph = helper.make_graph(tb.nodes, "trellis_decode", [],
                                   [helper.make_tensor_value_info(x, f32, None) for x in then_outs])

    # ---- else: T > 1, Loop over tokens carrying K, V, S_K, S_V; o is a scan output [T, B, H, d]
    lb = b.child("loop_")
    it, cond_in = lb.name("t"), lb.name("cond_in")
    carried_in = [lb.name(f"{x}_in") for x in ("K", "V", "SK", "SV")]
    tok = {n: lb.op("Gather", [act[n], it], n + "_t", axis=1) for n in act}
    n_abs = lb.op("Add", [position, it], "n")
    o, mem = _step(lb, c, variant, tok, carried_in, n_abs)
    cond_out = lb.op("Identity", [cond_in], "cond_out")
    body = helper.make_graph(
        lb.nodes, "trellis_token",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(x, f32, None) for x in carried_in]],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(x, f32, None) for x in (*mem, o)]])
    eb = b.child("pre_")
    trip = eb.op("Squeeze", [T], "trip")
    loop_outs = eb.op("Loop", [trip, "", *mem_in], n_out=5, body=body)
    o_pre = eb.op("Transpose", [loop_outs[4]], "o_pre", perm=[1, 0, 2, 3])
    else_graph = helper.make_graph(eb.nodes, "trellis_prefill", [],
                                   [helper.make_tensor_value_info(x, f32, None)
                                    for x in (o_pre, *loop_outs[:4])])

    res = b.op("If", [is_one], n_out=5, then_branch=then_graph, else_branch=else_graph)
    b.op("CastLike", [res[0], INPUTS[0]], outputs=[FUNCTION_OUTPUTS[0]])
    for src, dst in zip(res[1:], FUNCTION_OUTPUTS[1:]):
        b.op("Identity", [src], outputs=[dst])

    fn = helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), list(FUNCTION_OUTPUTS), b.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(FUNCTION_ATTRIBUTES),
        doc_string=(f"Trellis memory (TRELLIS_SPEC.md sections 2-3) in standard opset-{opset} ops, float32 "
                    "state math; chunk_size and eps come from the node's attributes.\n"
                    f"{_VARIANT_PREFIX} {phi},{f},{rho}"))
    assert tuple(MEMORY_FIELDS) == tuple(n.removeprefix("new_") for n in FUNCTION_OUTPUTS[1:])
    return fn


def check_function_matches(model: onnx.ModelProto) -> None:
    """Raise ValueError unless every TrellisMemory node's phi/f/rho equal the attached body's."""
    fns = [fn for fn in model.functions if fn.domain == DOMAIN and fn.name == OP_TYPE]
    if not fns:
        return
    variant = function_variant(fns[0])
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            got = tuple(v.decode() if isinstance(v, bytes) else v for v in
                        (attrs.get("phi"), attrs.get("f"), attrs.get("rho")))
            if variant is not None and got != variant:
                raise ValueError(f"node {node.name}: phi/f/rho {got} differ from the attached "
                                 f"TrellisMemory function body {variant}")


def memory_node_model(config: TrellisConfig, act_dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A one-node model ``TrellisMemory`` with its function attached (used by the tests and the
    plugin work): inputs/outputs named as in :mod:`trellis_export.opdef`, dynamic shapes."""
    attrs = op_attributes(config)
    fn = memory_function(attrs["phi"], attrs["f"], attrs["rho"])
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

