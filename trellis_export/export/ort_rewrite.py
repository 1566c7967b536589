"""ONNX Runtime graph rewrites, applied in memory when an ORT session loads a model (never to the file).

``lean-decode`` (:func:`lean_decode_model`): a second, hand-built graph of the streaming step for
T = 1 only, made from the exported model's own weights. The exported graph stays what every runtime
and TensorRT parse; an ORT session (:class:`trellis_export.runtime.OrtSession`, ``ort_graph="lean"``)
runs this graph for decode calls (T = 1) and the lean prefill graph of :mod:`.ort_prefill` (built
with this module's pieces) for every other T. What it changes, all measured (docs/ort_performance.md):

* no control flow and no shape arithmetic: T = 1 is fixed, the rows stay ``[B, D]`` (2-D) throughout;
* the depthwise causal conv as ``sum_j cache[:, :, j] * W[:, j] + x * W[:, K-1]`` (one Sum of K
  products of the cache's columns; the new cache the Concat of its last columns and x); ORT's grouped
  Conv costs ~20 us per call at B = 1 and scales badly with B, and ``Concat(cache, x) * W -> ReduceSum``
  over the size-K window axis (``conv="window"``) took 1.34x the time at B = 256;
* the six projections of a mixer (q k v, a, beta, gamma, the GELU gate) as one ``Gemm`` whose bias
  holds the gate biases, split once; the FFN's gate and up projections as one MatMul;
* both memory passes of a layer computed together where the tensors are small: the inner gradients
  and gates of the key and value passes stacked on the head axis as ``[B, 2H, 1, m]`` (the slot target
  and the gates duplicated into the Gemm's columns), so one inner-gradient pass serves both; reductions
  always over the last axis (ORT reduces over the m axis of a ``[.., m, 1]`` column ~18x slower);
* the memory writes (``contrib=True``) by ``com.microsoft::LinearAttention(update_rule="gated")``:
  ``S <- exp(log beta) S + (-gamma u) (x) w`` reads and writes each memory once (Mul, Mul, Sub: three
  passes), and for the value memory its read ``r^T S`` is the value read ``V^T r`` in the same kernel;
  measured 3.5x faster than the three ops at B = 256, one kernel instead of four at B = 1. With
  ``contrib=False`` the memories are stacked ``[K; V]`` ``[B, 2H, m, d]`` and written by Mul / Sub
  (``stack=False`` keeps them apart: kept for the measurements of docs/ort_performance.md);
* ``ln_silu`` as ``LayerNormalization`` (its InvStdDev output is the 1/sd the inner gradient needs);
* with ``contrib=True`` (default) ORT's contrib ops: ``SimplifiedLayerNormalization`` (RMSNorm),
  ``com.microsoft::SkipSimplifiedLayerNormalization`` (residual add + RMSNorm in one kernel),
  ``com.microsoft::Gelu``, ``com.microsoft::QuickGelu`` (alpha = 1: SiLU) and LinearAttention.

The math is TRELLIS_SPEC.md sections 2-5 (one token: the recurrence of section 3 at t = 0 of a call).
:func:`lean_decode_model` raises :class:`RewriteError` when the graph is not one it knows how to read
(float16 activations, a graph from another exporter); the session then decodes on the exported graph
and says why in ``describe()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..config import TrellisConfig
from ..opdef import DOMAIN, OP_TYPE
from ..state import state_spec

__all__ = ["lean_decode_model", "host_reset_values", "RewriteError", "ORT_GRAPHS", "LayerWeights",
           "ModelWeights", "read_weights"]

#: ``OrtSession(ort_graph=...)``: ``"lean"`` (decode calls on :func:`lean_decode_model`, others on
#: :func:`.ort_prefill.lean_prefill_model`), ``"lean-std"`` (the same without contrib ops),
#: ``"exported"`` (the file's graph for every T).
ORT_GRAPHS: tuple[str, ...] = ("lean", "lean-std", "exported")
#: ``lean_decode_model(conv=...)``: ``"columns"`` (one Sum of the cache's columns times their taps),
#: ``"window"`` (Concat + Mul + ReduceSum over the window axis), ``"transposed"`` (the window as
#: ``[B, K, 3 H d]``); bench/bench_ort.py's graph variants time them.
CONV_FORMS: tuple[str, ...] = ("columns", "window", "transposed")
#: F.normalize's eps in the layer (``model/lm.py``): q, k / max(||x||, eps).
QK_NORM_EPS = 1e-6


class RewriteError(ValueError):
    """The model's graph is not one this rewrite knows how to read."""


@dataclass
class LayerWeights:
    norm_mixer: np.ndarray
    w_qkv: np.ndarray          # [D, 3 H d]
    conv: np.ndarray           # [3 H d, K]
    w_a: np.ndarray            # [D, H m]
    w_beta: np.ndarray         # [D, H]
    b_beta: np.ndarray
    w_gamma: np.ndarray
    b_gamma: np.ndarray
    w_gate: np.ndarray         # [D, H d] (GELU gate)
    m0_key: np.ndarray         # [H, m, d]
    m0_value: np.ndarray
    out_norm: np.ndarray
    w_out: np.ndarray          # [H d, D]
    norm_ffn: np.ndarray
    w_ffn_gate: np.ndarray     # [D, F]
    w_ffn_up: np.ndarray
    w_ffn_down: np.ndarray     # [F, D]


@dataclass
class ModelWeights:
    embed: np.ndarray
    layers: list[LayerWeights] = field(default_factory=list)
    norm: np.ndarray | None = None
    lm_head: np.ndarray | None = None   # [D, vocab]


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.values: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.values[n.output[0]] = numpy_helper.to_array(a.t)
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def value(self, name: str, what: str) -> np.ndarray:
        if name not in self.values:
            raise RewriteError(f"{what}: {name!r} is not a constant of the graph")
        return self.values[name]

    def uses(self, name: str, op: str | None = None) -> list[onnx.NodeProto]:
        return [n for n in self.consumers.get(name, []) if op is None or n.op_type == op]

    def one(self, name: str, op: str, what: str) -> onnx.NodeProto:
        found = self.uses(name, op)
        if len(found) != 1:
            raise RewriteError(f"{what}: expected one {op} reading {name!r}, found {len(found)}")
        return found[0]

    def reaches(self, name: str, op: str, depth: int = 4) -> bool:
        """Whether an ``op`` node reads ``name`` within ``depth`` hops downstream."""
        frontier = [name]
        for _ in range(depth):
            nxt = []
            for v in frontier:
                for n in self.uses(v):
                    if n.op_type == op:
                        return True
                    nxt.extend(n.output)
            frontier = nxt
        return False


def read_weights(model: onnx.ModelProto, config: TrellisConfig) -> ModelWeights:
    """The weights of an exported TrellisLM step graph, found by walking its structure from the
    embedding (never by name alone: the exporter merges equal initializers, e.g. norms that are all
    ones, under one name): per layer the RMSNorm chain, the MatMuls that read the normed activations
    (told apart by where their outputs go: the Conv, the TrellisMemory inputs a / beta / gamma, the
    GELU gate), the M0 tensors fed to the TrellisMemory node, the output norm and projection, the
    SwiGLU FFN; then the final norm and the LM head."""
    g = _Graph(model)
    c = config
    D, HD, H, m = c.d_model, c.memory_dim, c.n_heads, c.n_slots
    gather = g.one("input_ids", "Gather", "embedding")
    out = ModelWeights(embed=g.value(gather.input[0], "embedding"))
    x = gather.output[0]

    def rms_after(x: str, what: str) -> tuple[np.ndarray, str]:
        """(weight, output) of the RMSNorm reading ``x``: Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul
        (x * rsqrt), Mul (* weight)."""
        v = g.one(x, "Pow", what).output[0]
        for op in ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul"):
            v = g.one(v, op, what).output[0]
        mul = g.one(v, "Mul", what)
        other = [i for i in mul.input if i != v]
        if len(other) != 1:
            raise RewriteError(f"{what}: unexpected RMSNorm weight Mul")
        return g.value(other[0], what), mul.output[0]

    def residual(x: str, y: str, what: str) -> str:
        adds = [n for n in g.uses(y, "Add") if x in n.input]
        if len(adds) != 1:
            raise RewriteError(f"{what}: no residual Add of the block output")
        return adds[0].output[0]

    for L in range(c.n_layers):
        what = f"layer {L}"
        lw: dict[str, Any] = {}
        lw["norm_mixer"], h = rms_after(x, what)
        memory = None
        for mm in g.uses(h, "MatMul"):
            w = g.value(mm.input[1], what)
            y = mm.output[0]
            if g.reaches(y, "Conv", 3):
                tr = g.one(y, "Transpose", what)
                cat = g.one(tr.output[0], "Concat", what)
                conv = g.one(cat.output[0], "Conv", what)
                if len(conv.input) > 2 and conv.input[2]:
                    raise RewriteError(f"{what}: the conv has a bias")
                lw["w_qkv"], lw["conv"] = w, g.value(conv.input[1], what).reshape(3 * HD, -1)
                continue
            adds = g.uses(y, "Add")
            if len(adds) == 1 and adds[0].input[1] in g.values:
                sig = g.one(adds[0].output[0], "Sigmoid", what)
                for n in g.uses(sig.output[0]):
                    if n.domain == DOMAIN and n.op_type == OP_TYPE:
                        memory = n
                        slot = list(n.input).index(sig.output[0])
                        key = {4: "beta", 5: "gamma"}.get(slot)
                        if key is None:
                            raise RewriteError(f"{what}: a gate feeds TrellisMemory input {slot}")
                        lw[f"w_{key}"], lw[f"b_{key}"] = w, g.value(adds[0].input[1], what)
                continue
            rs = g.uses(y, "Reshape")
            if len(rs) == 1 and any(n.domain == DOMAIN and list(n.input).index(rs[0].output[0]) == 3
                                    for n in g.uses(rs[0].output[0]) if n.op_type == OP_TYPE):
                lw["w_a"] = w
            else:
                lw["w_gate"] = w
        if memory is None:
            raise RewriteError(f"{what}: no TrellisMemory node found")
        for slot, key in ((6, "m0_key"), (7, "m0_value")):
            where = g.producer.get(memory.input[slot])
            expand = g.producer.get(where.input[1]) if where is not None and where.op_type == "Where" \
                else None
            if expand is None or expand.op_type != "Expand":
                raise RewriteError(f"{what}: TrellisMemory input {slot} is not "
                                   "Where(fresh, Expand(M0), past)")
            lw[key] = g.value(expand.input[0], what)
        o = g.one(memory.output[0], "Reshape", what).output[0]
        lw["out_norm"], on = rms_after(o, what)
        gated = g.one(on, "Mul", what)
        w_out = g.one(gated.output[0], "MatMul", what)
        lw["w_out"] = g.value(w_out.input[1], what)
        x = residual(x, w_out.output[0], what)
        lw["norm_ffn"], h2 = rms_after(x, what)
        down = None
        for mm in g.uses(h2, "MatMul"):
            if g.uses(mm.output[0], "Sigmoid"):
                lw["w_ffn_gate"] = g.value(mm.input[1], what)
            else:
                lw["w_ffn_up"] = g.value(mm.input[1], what)
                prod = g.one(mm.output[0], "Mul", what)
                down = g.one(prod.output[0], "MatMul", what)
                lw["w_ffn_down"] = g.value(down.input[1], what)
        missing = [k for k in LayerWeights.__dataclass_fields__ if k not in lw]
        if missing or down is None:
            raise RewriteError(f"{what}: could not find {', '.join(missing)} in the graph")
        x = residual(x, down.output[0], what)
        layer = LayerWeights(**lw)
        shapes = {"w_qkv": (D, 3 * HD), "w_a": (D, H * m), "w_beta": (D, H), "w_gamma": (D, H),
                  "w_gate": (D, HD), "w_out": (HD, D), "conv": (3 * HD, c.conv_size),
                  "m0_key": (H, m, c.head_dim), "m0_value": (H, m, c.head_dim), "b_beta": (H,),
                  "b_gamma": (H,), "norm_mixer": (D,), "out_norm": (HD,), "norm_ffn": (D,),
                  "w_ffn_gate": (D, c.ffn_dim), "w_ffn_up": (D, c.ffn_dim), "w_ffn_down": (c.ffn_dim, D)}
        for k, shape in shapes.items():
            got = tuple(getattr(layer, k).shape)
            if got != shape:
                raise RewriteError(f"{what}: {k} has shape {list(got)}, expected {list(shape)}")
        out.layers.append(layer)
    out.norm, hn = rms_after(x, "final norm")
    head = g.one(hn, "MatMul", "LM head")
    if head.output[0] != "logits":
        raise RewriteError("the LM head MatMul does not write the logits")
    out.lm_head = g.value(head.input[1], "LM head")
    if out.lm_head.shape != (D, c.vocab_size):
        raise RewriteError(f"LM head has shape {list(out.lm_head.shape)}, expected [{D}, {c.vocab_size}]")
    for t in [*out.layers, out]:
        for k, v in vars(t).items():
            if isinstance(v, np.ndarray) and v.dtype != np.float32:
                raise RewriteError(f"{k} is {v.dtype}; the lean decode graph is float32 only")
    return out


class _B:
    """Node builder for the lean graph (unique names, initializers collected)."""

    def __init__(self, contrib: bool) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.contrib = contrib
        self._n = 0
        self._consts: dict[tuple[Any, ...], str] = {}

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs: Any) -> Any:
        outs = outputs or [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n_" + op_type),
                                           domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def init(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        # np.array, not np.ascontiguousarray: the latter turns a 0-d scalar into shape [1]
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(arr, "c")
        return self._consts[key]

    # ---------------------------------------------------------------- fused pieces
    def silu(self, x: str) -> str:
        if self.contrib:
            return self.op("QuickGelu", [x], "silu", domain="com.microsoft", alpha=1.0)
        return self.op("Mul", [x, self.op("Sigmoid", [x])], "silu")

    def gelu(self, x: str) -> str:
        if self.contrib:
            return self.op("Gelu", [x], "gelu", domain="com.microsoft")
        half = self.op("Mul", [x, self.const(0.5, np.float32)])
        erf = self.op("Erf", [self.op("Mul", [x, self.const(1 / np.sqrt(2.0), np.float32)])])
        return self.op("Mul", [half, self.op("Add", [erf, self.const(1.0, np.float32)])], "gelu")

    def rms(self, x: str, w: str, eps: float) -> str:
        if self.contrib:
            return self.op("SimplifiedLayerNormalization", [x, w], "rms", axis=-1, epsilon=eps, stash_type=1)
        ms = self.op("ReduceMean", [self.op("Mul", [x, x]), self.const([-1])], keepdims=1)
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.const(eps, np.float32)])])])
        return self.op("Mul", [self.op("Mul", [x, inv]), w], "rms")

    def skip_rms(self, x: str, y: str, w: str, eps: float) -> tuple[str, str]:
        """(RMSNorm(x + y) * w, x + y)."""
        if self.contrib:
            outs = [self.name("skip_rms"), "", "", self.name("resid")]
            self.op("SkipSimplifiedLayerNormalization", [x, y, w], domain="com.microsoft", outputs=outs,
                    epsilon=eps)
            return outs[0], outs[3]
        s = self.op("Add", [x, y], "resid")
        return self.rms(s, w, eps), s


def _nonlin(b: _B, name: str, z: str, axis: int, n: int, eps: float, want_vjp: bool
            ) -> tuple[str, dict[str, str]]:
    """y = g(z) over ``axis`` (length ``n``); with ``want_vjp`` the pieces of its VJP."""
    if name == "identity":
        return z, {}
    ax = b.const([axis])
    if want_vjp or not b.contrib:
        sig = b.op("Sigmoid", [z], "sig")
        s = b.op("Mul", [z, sig], "s")
    else:
        sig, s = "", b.silu(z)
    aux: dict[str, str] = {}
    if want_vjp:   # s' = sig (1 + z (1 - sig)) = sig + s - s sig
        aux["ds"] = b.op("Add", [sig, b.op("Sub", [s, b.op("Mul", [s, sig])])], "ds")
    if name == "ln_silu":
        shape = [n] + [1] * (-axis - 1)
        outs = [b.name("y"), "", b.name("inv_sd")] if want_vjp else [b.name("y")]
        unit, zero = b.const(np.ones(shape), np.float32), b.const(np.zeros(shape), np.float32)
        b.op("LayerNormalization", [s, unit, zero], outputs=outs, axis=axis, epsilon=eps, stash_type=1)
        if want_vjp:
            aux["inv_den"] = outs[2]
        return outs[0], aux
    if name == "l2_silu":
        ss = b.op("ReduceSum", [b.op("Mul", [s, s]), ax], keepdims=1)
        inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [ss, b.const(eps, np.float32)])])], "inv_nrm")
        aux["inv_den"] = inv
        return b.op("Mul", [s, inv], "y"), aux
    raise RewriteError(f"unknown nonlinearity {name!r}")


def _inner_grad(b: _B, phi: str, z: str, a: str, axis: int, n: int, eps: float, negate: bool = False) -> str:
    """u = J_phi(z)^T (phi(z) - a) over ``axis`` (TRELLIS_SPEC.md section 2); ``negate``: -u (the VJP
    is linear in the error, so e = a - phi(z) gives -u at no extra kernel)."""
    y, aux = _nonlin(b, phi, z, axis, n, eps, want_vjp=True)
    e = b.op("Sub", [a, y] if negate else [y, a], "e")
    if phi == "identity":
        return e
    ax = b.const([axis])
    if phi == "ln_silu":
        me = b.op("ReduceMean", [e, ax], keepdims=1)
        mey = b.op("ReduceMean", [b.op("Mul", [e, y]), ax], keepdims=1)
        inner = b.op("Sub", [b.op("Sub", [e, me]), b.op("Mul", [y, mey])], "inner")
    else:
        dot = b.op("ReduceSum", [b.op("Mul", [y, e]), ax], keepdims=1)
        inner = b.op("Sub", [e, b.op("Mul", [y, dot])], "inner")
    return b.op("Mul", [b.op("Mul", [aux["ds"], inner]), aux["inv_den"]], "u")


def _memory_linear_attention(b: _B, c: TrellisConfig, lw: LayerWeights, L: int, y3: str, a2: str,
                             gates: str, ins: dict[str, str], outs: dict[str, str], fresh4: str | None,
                             start4: str | None) -> str:
    """One layer's memory step with ``com.microsoft::LinearAttention(update_rule="gated")`` doing the
    writes: ``S_t = exp(g) S + k (x) v`` with S = the memory [m, d], g = log beta, k = -gamma u (the
    inner gradient, an m-vector) and v = the written vector w; its read ``q^T S_t`` with q = r is the
    value read V^T r. One kernel reads and writes each memory once (vs Mul, Mul, Sub and a MatMul).
    The key read K q is a MatMul on the new key memory. Returns o [B, H d] (after rho)."""
    H, m, d, C = c.n_heads, c.n_slots, c.head_dim, c.chunk_size
    cols = b.op("Split", [b.op("Reshape", [y3, b.const([-1, 3 * H, d, 1])]), b.const([H, H, H])],
                n_out=3, axis=1)                                                   # q k v [B, H, d, 1]
    k3, v3 = (b.op("Reshape", [x, b.const([-1, 1, H * d])], "packed") for x in cols[1:])   # [B, 1, H d]
    if fresh4 is None:     # host_reset: rows at position 0 already hold M0 (OrtSession does it)
        Ms = [ins[f"{L}.key_memory"], ins[f"{L}.value_memory"]]
    else:
        Ms = [b.op("Where", [fresh4, b.init(m0x, f"m0_{x}_{L}"), ins[f"{L}.{x}_memory"]], "M")
              for x, m0x in (("key", lw.m0_key), ("value", lw.m0_value))]
    if C > 1 and start4 is None:   # host_snapshot: the caller hands in the chunk-start snapshot S itself
        Ss = [ins[f"{L}.key_snapshot"], ins[f"{L}.value_snapshot"]]
    elif C > 1:
        assert start4 is not None
        Ss = [b.op("Where", [start4, M_, ins[f"{L}.{x}_snapshot"]], outputs=[outs[f"{L}.{x}_snapshot"]])
              for M_, x in zip(Ms, ("key", "value"))]
    else:
        Ss = Ms
    Zc = b.op("Concat", [b.op("MatMul", [S_, w]) for S_, w in zip(Ss, cols[1:])], "Z_cat", axis=1)
    Z = b.op("Reshape", [Zc, b.const([-1, 2 * H, 1, m])], "Z")                       # [B, 2H, 1, m]
    nu = _inner_grad(b, c.phi, Z, b.op("Reshape", [a2, b.const([-1, 2 * H, 1, m])], "a"), -1, m, c.eps,
                     negate=True)                                                  # -u
    gt = b.op("Reshape", [b.op("Sigmoid", [gates]), b.const([-1, 4 * H, 1, 1])], "gates")
    beta, _, gamma2 = b.op("Split", [gt, b.const([H, H, 2 * H])], n_out=3, axis=1)
    decay = b.op("Reshape", [b.op("Log", [beta]), b.const([-1, 1, H])], "log_beta")   # [B, 1, H]
    gk, gv = b.op("Split", [b.op("Reshape", [b.op("Mul", [gamma2, nu]), b.const([-1, 2, H * m])]),
                            b.const([1, 1])], n_out=2, axis=1)                    # -gamma u [B, 1, H m]
    attrs: dict[str, Any] = dict(domain="com.microsoft", update_rule="gated", q_num_heads=H, kv_num_heads=H,
                                 scale=1.0)
    # the key pass: only its new memory is used (its read q^T K is not the key read K q)
    K_new = b.op("LinearAttention", [gk, gk, k3, Ms[0], decay], n_out=2,
                 outputs=[b.name("unused"), outs[f"{L}.key_memory"]], **attrs)[1]
    Kq = b.op("MatMul", [K_new, cols[0]], "Kq")                                      # [B, H, m, 1]
    if c.f in ("identity", "ln_silu"):    # LayerNormalization over the m column is as fast as over a row
        r, _ = _nonlin(b, c.f, Kq, -2, m, c.eps, want_vjp=False)
    else:                                 # a ReduceSum over the column is not (18x at B = 256)
        r, _ = _nonlin(b, c.f, b.op("Reshape", [Kq, b.const([-1, H, m])]), -1, m, c.eps, want_vjp=False)
    r = b.op("Reshape", [r, b.const([-1, 1, H * m])], "r")
    vr = b.op("LinearAttention", [r, gv, v3, Ms[1], decay], n_out=2,
              outputs=[b.name("Vr"), outs[f"{L}.value_memory"]], **attrs)[0]          # [B, 1, H d]
    if c.rho == "identity":
        return b.op("Reshape", [vr, b.const([-1, H * d])], "o")
    o, _ = _nonlin(b, c.rho, b.op("Reshape", [vr, b.const([-1, H, d])]), -1, d, c.eps, want_vjp=False)
    return b.op("Reshape", [o, b.const([-1, H * d])], "o")


def _lean_weights(model: onnx.ModelProto, config: TrellisConfig, weights: ModelWeights | None,
                  activation_dtype: str, what: str) -> ModelWeights:
    """The weights a lean graph is built from (``weights`` when the caller read them already), after
    the checks both lean graphs share: float32 activations, a TrellisMemory node in the graph."""
    if activation_dtype != "float32":
        raise RewriteError(f"the lean {what} graph is float32 only (this model's activations are "
                           f"{activation_dtype})")
    if not any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph.node):
        raise RewriteError("the graph has no trellis::TrellisMemory node")
    return weights or read_weights(model, config)


def _qk_normalise(b: _B, c: TrellisConfig, y3: str) -> str:
    """q and k L2-normalised per head (config qk_norm "l2"; v untouched) over the last axis of
    ``y3`` ``[..., 3H, d]``: ``y / max(||y||, eps)`` with v's divisor forced to 1 by a mask."""
    if c.qk_norm != "l2":
        return y3
    H = c.n_heads
    mask = np.ones((3 * H, 1), np.float32)
    mask[2 * H:] = 0.0
    lo = np.full((3 * H, 1), QK_NORM_EPS, np.float32)
    lo[2 * H:] = 1.0                 # v: max(0 * ||v||, 1) = 1, not normalised
    nrm = b.op("ReduceL2", [y3, b.const([-1])], keepdims=1)
    return b.op("Div", [y3, b.op("Max", [b.op("Mul", [nrm, b.const(mask, np.float32)]),
                                          b.const(lo, np.float32)])], "qkv_n")


def _mixer_out_and_ffn(b: _B, c: TrellisConfig, lw: LayerWeights, L: int, x: str, o: str, g: str
                       ) -> tuple[str, str]:
    """The rest of a layer after its memory (spec section 5), over rows of any rank:
    ``x + W_o (RMSNorm(o) * GELU(g))``, then the SwiGLU FFN's RMSNorm and output. Returns (the
    residual stream before the FFN's add, the FFN output)."""
    on = b.rms(o, b.init(lw.out_norm, f"out_norm_{L}"), c.norm_eps)
    mixed = b.op("MatMul", [b.op("Mul", [on, b.gelu(g)]), b.init(lw.w_out, f"w_out_{L}")], "mixer_out")
    h2, x = b.skip_rms(x, mixed, b.init(lw.norm_ffn, f"norm_ffn_{L}"), c.norm_eps)
    gu = b.op("MatMul", [h2, b.init(np.concatenate([lw.w_ffn_gate, lw.w_ffn_up], axis=1), f"w_gu_{L}")])
    gate, up = b.op("Split", [gu, b.const([c.ffn_dim, c.ffn_dim])], n_out=2, axis=-1)
    return x, b.op("MatMul", [b.op("Mul", [b.silu(gate), up]), b.init(lw.w_ffn_down, f"w_down_{L}")],
                   "ffn_out")


def _state_names(config: TrellisConfig) -> tuple[dict[str, str], dict[str, str]]:
    """The lean graphs' state tensor names, state spec order: name -> ``past.*`` input, name ->
    ``present.*`` output."""
    spec = state_spec(config)
    return {t.name: t.past_name for t in spec}, {t.name: t.present_name for t in spec}


def _lean_model(b: _B, model: onnx.ModelProto, config: TrellisConfig, name: str, tokens: Any,
                skip_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The lean graph of ``b``'s nodes as a model with the state spec's inputs and outputs (``tokens``:
    the T axis, 1 or a name; ``skip_outputs``: present names left out), the initializers its nodes and
    their subgraphs read, and ``model``'s metadata."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", tokens])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", tokens, config.vocab_size])]
    for t in state_spec(config):
        dt = TensorProto.INT64 if t.dtype == "int64" else TensorProto.FLOAT
        shape = ["batch", *t.shape[1:]]
        inputs.append(helper.make_tensor_value_info(t.past_name, dt, shape))
        if t.present_name not in skip_outputs:
            outputs.append(helper.make_tensor_value_info(t.present_name, dt, shape))
    used = {i for n in b.nodes for i in n.input}
    for n in b.nodes:                       # outer-scope values read inside Scan / Loop bodies
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= {i for bn in attr.g.node for i in bn.input}
    graph = helper.make_graph(b.nodes, name, inputs, outputs,
                              initializer=[t for t in b.inits if t.name in used])
    lean = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             producer_name=f"trellis-export {name}")
    lean.ir_version = model.ir_version or 9
    for p in model.metadata_props:
        lean.metadata_props.add(key=p.key, value=p.value)
    return lean


def host_reset_values(model: onnx.ModelProto, config: TrellisConfig, weights: ModelWeights | None = None
                      ) -> dict[str, np.ndarray]:
    """What a row at position 0 holds before the step (TRELLIS_SPEC.md section 5), per state tensor
    the lean graph built with ``host_reset=True`` expects the caller to have reset: the learned M0
    ``[H, m, d]`` for the running memories, zeros ``[3 H d, conv_size - 1]`` for the conv caches (the
    snapshots need none: a row at position 0 is at a chunk start, where the snapshot is the memory).
    ``weights``: :func:`read_weights` of ``model`` when the caller has it already."""
    wts = weights or read_weights(model, config)
    out: dict[str, np.ndarray] = {}
    for L, lw in enumerate(wts.layers):
        out[f"{L}.key_memory"] = lw.m0_key
        out[f"{L}.value_memory"] = lw.m0_value
        out[f"{L}.conv"] = np.zeros((3 * config.memory_dim, config.conv_size - 1), np.float32)
    return out


def lean_decode_model(model: onnx.ModelProto, config: TrellisConfig, *, contrib: bool = True,
                      stack: bool = True, linear_attention: bool | None = None, host_reset: bool = False,
                      host_snapshot: bool = False, conv: str = "columns",
                      activation_dtype: str = "float32", weights: ModelWeights | None = None
                      ) -> onnx.ModelProto:
    """The T = 1 streaming step of ``model`` as one straight-line graph (see the module doc).

    Same inputs and outputs as the exported graph (``input_ids`` is ``[batch, 1]``), same metadata.
    ``host_reset=True`` leaves out the reset of rows at position 0 (memories <- M0, conv cache <- 0:
    two Where per memory and one per conv cache, each a full pass over that state tensor at large B);
    the caller must then hand in such rows already reset (:func:`host_reset_values` gives the
    values; :class:`~trellis_export.runtime.OrtSession` does it, only on calls that have such rows).
    ``host_snapshot=True`` (with ``host_reset``; C > 1) goes one step further: the ``past.*_snapshot``
    inputs must already hold the chunk-start snapshot S of this token (the memory for rows at a chunk
    start, position % C == 0, else the stored snapshot), and the graph has no ``present.*_snapshot``
    outputs: the present snapshot is S itself, which the caller returns as it is (no Where pass, no
    copy; when the rows step in lockstep S is one of the two input arrays, chosen per call).
    ``conv``: how the causal conv is written (:data:`CONV_FORMS`; the default ``"columns"``, and the
    two earlier forms, kept for the measurements of ``bench/bench_ort.py``).
    Raises :class:`RewriteError` for a graph it cannot read or a float16 export."""
    if conv not in CONV_FORMS:
        raise ValueError(f"conv must be one of {', '.join(CONV_FORMS)}, got {conv!r}")
    wts = _lean_weights(model, config, weights, activation_dtype, "decode")
    if linear_attention is None:
        linear_attention = contrib
    if linear_attention and not contrib:
        raise RewriteError("linear_attention needs contrib ops (com.microsoft::LinearAttention)")
    c = config
    H, m, d, HD, C = c.n_heads, c.n_slots, c.head_dim, c.memory_dim, c.chunk_size
    K = c.conv_size
    f32 = np.float32
    b = _B(contrib)
    ins, outs = _state_names(c)

    pos = ins["position"]
    b.op("Add", [pos, b.const(1)], outputs=[outs["position"]])
    fresh3 = fresh4 = None
    if not host_reset:
        fresh = b.op("Equal", [pos, b.const(0)], "fresh")
        fresh3 = b.op("Reshape", [fresh, b.const([-1, 1, 1])], "fresh3")
        fresh4 = b.op("Unsqueeze", [fresh3, b.const([3])], "fresh4")
    elif not linear_attention:
        raise RewriteError("host_reset is implemented for the LinearAttention graph only")
    start4 = None
    if host_snapshot and not host_reset:
        raise RewriteError("host_snapshot needs host_reset")
    if C > 1 and not host_snapshot:
        start = b.op("Equal", [b.op("Mod", [pos, b.const(C)]), b.const(0)], "chunk_start")
        start4 = b.op("Reshape", [start, b.const([-1, 1, 1, 1])], "start4")
    ids = b.op("Reshape", ["input_ids", b.const([-1])], "ids")
    x = b.op("Gather", [b.init(wts.embed, "embed"), ids], "x", axis=0)              # [B, D]
    h = b.rms(x, b.init(wts.layers[0].norm_mixer, "norm_mixer_0"), c.norm_eps)
    f_out = None
    for L, lw in enumerate(wts.layers):
        if L > 0:
            assert f_out is not None
            h, x = b.skip_rms(x, f_out, b.init(lw.norm_mixer, f"norm_mixer_{L}"), c.norm_eps)
        # ---- one Gemm: [q k v | a a | beta beta gamma gamma | gate]
        w_mix = np.concatenate([lw.w_qkv, lw.w_a, lw.w_a, lw.w_beta, lw.w_beta, lw.w_gamma, lw.w_gamma,
                                lw.w_gate], axis=1)
        bias = np.zeros(w_mix.shape[1], f32)
        o0 = 3 * HD + 2 * H * m
        bias[o0:o0 + 2 * H] = np.tile(lw.b_beta, 2)
        bias[o0 + 2 * H:o0 + 4 * H] = np.tile(lw.b_gamma, 2)
        mix = b.op("Gemm", [h, b.init(w_mix, f"w_mix_{L}"), b.init(bias, f"b_mix_{L}")], "mix")
        qkv, a2, gates, g = b.op("Split", [mix, b.const([3 * HD, 2 * H * m, 4 * H, HD])], n_out=4, axis=1)
        # ---- causal depthwise conv over the window [cache, x]; the new cache is the window's last K - 1
        cache = ins[f"{L}.conv"] if fresh3 is None else \
            b.op("Where", [fresh3, b.const(0.0, f32), ins[f"{L}.conv"]], "cache")
        if conv == "window":      # y = ReduceSum(window * W) over the size-K window axis
            win = b.op("Concat", [cache, b.op("Unsqueeze", [qkv, b.const([2])])], "win", axis=2)
            b.op("Slice", [win, b.const([1]), b.const([K]), b.const([2])], outputs=[outs[f"{L}.conv"]])
            y = b.op("ReduceSum", [b.op("Mul", [win, b.init(lw.conv, f"conv_{L}")]), b.const([2])],
                     keepdims=0)
        elif conv == "transposed":   # the window as [B, K, 3 H d]: ops along a contiguous 3 H d axis
            cache_t = b.op("Transpose", [cache], "cache_t", perm=[0, 2, 1])
            win = b.op("Concat", [cache_t, b.op("Unsqueeze", [qkv, b.const([1])])], "win", axis=1)
            b.op("Transpose", [b.op("Slice", [win, b.const([1]), b.const([K]), b.const([1])])],
                 outputs=[outs[f"{L}.conv"]], perm=[0, 2, 1])
            y = b.op("ReduceSum", [b.op("Mul", [win, b.init(np.ascontiguousarray(lw.conv.T), f"conv_{L}")]),
                                   b.const([1])], keepdims=0)
        else:   # "columns": y = sum_j col_j * W[:, j] (one Sum over the columns), cache <- [cols 1.., x]
            x3 = b.op("Unsqueeze", [qkv, b.const([2])], "x3")                           # [B, 3 H d, 1]
            cols = [cache] if K == 2 else list(b.op("Split", [cache, b.const([1] * (K - 1))], n_out=K - 1,
                                                    axis=2))
            terms = [b.op("Mul", [col, b.init(np.ascontiguousarray(lw.conv[:, j:j + 1]), f"conv_{L}_{j}")])
                     for j, col in enumerate([*cols, x3])]
            y = b.op("Reshape", [b.op("Sum", terms), b.const([-1, 3 * HD])], "conv")
            b.op("Concat", [*cols[1:], x3], outputs=[outs[f"{L}.conv"]], axis=2)
        y3 = b.op("Reshape", [b.silu(y), b.const([-1, 3 * H, d])], "qkv3")              # [B, 3H, d]
        y3 = _qk_normalise(b, c, y3)
        if linear_attention:
            o2 = _memory_linear_attention(b, c, lw, L, y3, a2, gates, ins, outs, fresh4, start4)
        else:
            q, kv = b.op("Split", [y3, b.const([H, 2 * H])], n_out=2, axis=1)            # [B,H,d], [B,2H,d]
            # ---- the memory step. The small tensors of both passes (inner gradients, gates) are always
            # stacked on the head axis as [K-pass; V-pass] [B, 2H, ...]; ``stack`` also stacks the
            # memories M = [K; V] [B, 2H, m, d] (fewest kernels), else the per-pass memory ops are kept
            # apart (no Concat / Split of the big tensors: less memory traffic at large B).
            mem_out = [outs[f"{L}.key_memory"], outs[f"{L}.value_memory"]]
            snap_out = [outs[f"{L}.key_snapshot"], outs[f"{L}.value_snapshot"]] if C > 1 else []
            if fresh4 is None:
                raise RewriteError("host_reset needs the LinearAttention memory step (contrib ops)")
            if stack:
                m0 = np.concatenate([lw.m0_key, lw.m0_value], axis=0).astype(f32)
                M_in = b.op("Concat", [ins[f"{L}.key_memory"], ins[f"{L}.value_memory"]], "M_in", axis=1)
                Ms = [b.op("Where", [fresh4, b.init(m0, f"m0_{L}"), M_in], "M")]
                if C > 1:
                    assert start4 is not None
                    S_in = b.op("Concat", [ins[f"{L}.key_snapshot"], ins[f"{L}.value_snapshot"]], "S_in",
                                axis=1)
                    Ss = [b.op("Where", [start4, Ms[0], S_in], "S")]   # a fresh row is at a chunk start too
                else:
                    Ss = Ms
                ws = [kv]
            else:
                Ms = [b.op("Where", [fresh4, b.init(m0x, f"m0_{x}_{L}"), ins[f"{L}.{x}_memory"]], "M")
                      for x, m0x in (("key", lw.m0_key), ("value", lw.m0_value))]
                if C > 1:
                    assert start4 is not None
                    Ss = [b.op("Where", [start4, M_, ins[f"{L}.{x}_snapshot"]], outputs=[o_])
                          for M_, x, o_ in zip(Ms, ("key", "value"), snap_out)]
                else:
                    Ss = Ms
                ws = b.op("Split", [kv, b.const([H, H])], n_out=2, axis=1)                   # k, v [B,H,d]
            w_rows = [b.op("Unsqueeze", [w, b.const([2])], "w_row") for w in ws]            # [B,*,1,d]
            Zs = [b.op("MatMul", [S_, b.op("Unsqueeze", [w, b.const([3])], "w_col")])       # [B,*,m,1]
                  for S_, w in zip(Ss, ws)]
            Zc = Zs[0] if stack else b.op("Concat", Zs, "Z_cat", axis=1)
            # the inner gradient in row layout [B, 2H, 1, m]: ORT reduces over the last axis ~18x faster
            # than over the m axis of a [.., m, 1] column (measured at B = 256)
            Z = b.op("Reshape", [Zc, b.const([-1, 2 * H, 1, m])], "Z")
            a4 = b.op("Reshape", [a2, b.const([-1, 2 * H, 1, m])], "a")
            u = _inner_grad(b, c.phi, Z, a4, -1, m, c.eps)
            gt = b.op("Reshape", [b.op("Sigmoid", [gates]), b.const([-1, 4 * H, 1, 1])], "gates")
            if stack:
                beta2, gamma2 = b.op("Split", [gt, b.const([2 * H, 2 * H])], n_out=2, axis=1)
                betas = [beta2]
            else:
                beta1, _, gamma2 = b.op("Split", [gt, b.const([H, H, 2 * H])], n_out=3, axis=1)
                betas = [beta1, beta1]
            gu = b.op("Reshape", [b.op("Mul", [gamma2, u]), b.const([-1, 2 * H, m, 1])], "gu")   # column
            gus = [gu] if stack else b.op("Split", [gu, b.const([H, H])], n_out=2, axis=1)
            news = [b.op("Sub", [b.op("Mul", [beta_, M_]), b.op("Mul", [gu_, w_row], "outer")],
                         outputs=None if stack else [o_])
                    for beta_, M_, gu_, w_row, o_ in zip(betas, Ms, gus, w_rows, mem_out)]
            if stack:
                K_new, V_new = b.op("Split", [news[0], b.const([H, H])], outputs=mem_out, n_out=2, axis=1)
                if C > 1:
                    b.op("Split", [Ss[0], b.const([H, H])], outputs=snap_out, n_out=2, axis=1)
            else:
                K_new, V_new = news
            Kq = b.op("MatMul", [K_new, b.op("Unsqueeze", [q, b.const([3])], "q_col")], "Kq")   # [B,H,m,1]
            Kq_row = b.op("Reshape", [Kq, b.const([-1, H, 1, m])], "Kq_row")
            r_row, _ = _nonlin(b, c.f, Kq_row, -1, m, c.eps, want_vjp=False)
            vr = b.op("MatMul", [r_row, V_new], "Vr")                                        # [B,H,1,d]
            o, _ = _nonlin(b, c.rho, vr, -1, d, c.eps, want_vjp=False)
            o2 = b.op("Reshape", [o, b.const([-1, HD])], "o")
        x, f_out = _mixer_out_and_ffn(b, c, lw, L, x, o2, g)
    assert f_out is not None and wts.norm is not None and wts.lm_head is not None
    hn, _ = b.skip_rms(x, f_out, b.init(wts.norm, "norm"), c.norm_eps)
    logits2 = b.op("MatMul", [hn, b.init(wts.lm_head, "lm_head")], "logits2")
    b.op("Reshape", [logits2, b.const([-1, 1, c.vocab_size])], outputs=["logits"])

    skip = tuple(p for n, p in outs.items() if host_snapshot and n.endswith("_snapshot"))
    return _lean_model(b, model, c, "lean-decode", 1, skip)
