"""Checks of generated Triton ``config.pbtxt`` files: syntax by ``model_config_pb2`` (protobuf
``text_format``), meaning by this project's rules against the ONNX graph and the state spec.

Rules (each violation is one line of a :class:`ConfigCheckError`):

* ``input_ids`` in: TYPE_INT64, dims ``[-1]`` (the batch axis is Triton's, ``max_batch_size`` >= 1),
  a graph input of type int64 and rank 2; ``logits`` out: the graph output's type, dims ``[-1, vocab]``.
* sequence batching with the ``oldest`` strategy (cross-sequence batching) and an idle timeout.
* python backend: no ``state`` block (the python backend ignores implicit state silently), and the
  parameters ``fingerprint`` / ``state_spec`` equal to the ONNX metadata.
* implicit state (onnxruntime / tensorrt): exactly one ``state`` entry per tensor of the state spec;
  ``input_name`` is ``past.<name>`` and ``output_name`` is the pairing ``present.<name>`` (both graph
  tensors); ``data_type`` the spec's (and the graph's) dtype; ``dims`` the spec's shape without B, but
  never ``[]``: Triton gives a ``dims: []`` state a garbage initial value when ``max_batch_size`` > 0
  (measured), so ``position`` is ``[1]`` and the graph must take it as [B, 1]; a zero ``initial_state``
  of the same type and dims.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import TrellisExportError
from ..state import StateTensor

_TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                 "float64": "TYPE_FP64"}
_ONNX_TYPES = {7: "int64", 1: "float32", 10: "float16", 11: "float64"}


class ConfigCheckError(TrellisExportError):
    """A generated config breaks a rule; the message lists every problem."""


def triton_type(dtype: str) -> str:
    return _TRITON_TYPES[dtype]


@dataclass
class GraphIO:
    """Names, dtypes and shapes (ints, or strings for symbolic axes) of an ONNX graph's inputs/outputs."""

    inputs: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)
    outputs: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, model: Any) -> GraphIO:
        def info(v: Any) -> tuple[str, list[Any]]:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            return _ONNX_TYPES.get(t.elem_type, f"onnx-type-{t.elem_type}"), dims

        inits = {i.name for i in model.graph.initializer}
        return cls({v.name: info(v) for v in model.graph.input if v.name not in inits},
                   {v.name: info(v) for v in model.graph.output})


def parse_config(text: str, where: str) -> Any:
    """Parse config.pbtxt text with ``model_config_pb2`` (syntax only)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ConfigCheckError(f"checking Triton configs needs tritonclient[grpc] ({exc}); "
                               "pip install 'trellis-export[serve]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigCheckError(f"{where}: not a valid Triton model config ({exc})") from None


def _dims(x: Any) -> list[int]:
    return [int(d) for d in x]


def check_config(cfg: Any, *, kind: str, graph: GraphIO, spec: list[StateTensor], vocab: int,
                 activation_dtype: str, fingerprint: str, state_spec_json: str, where: str) -> None:
    """Apply the rules to one parsed config; ``kind`` is ``python`` | ``onnxruntime`` | ``tensorrt``."""
    from tritonclient.grpc import model_config_pb2 as pb

    p: list[str] = []
    want_backend = {"python": ("python", ""), "onnxruntime": ("onnxruntime", "onnxruntime_onnx"),
                    "tensorrt": ("tensorrt", "tensorrt_plan")}[kind]
    if cfg.backend != want_backend[0] or (want_backend[1] and cfg.platform != want_backend[1]):
        p.append(f"backend/platform {cfg.backend!r}/{cfg.platform!r}, expected {want_backend[0]!r}/"
                 f"{want_backend[1]!r}")
    if cfg.max_batch_size < 1:
        p.append(f"max_batch_size {cfg.max_batch_size}: must be >= 1 (requests of several sequences "
                 "batch together)")
    ins = {i.name: i for i in cfg.input}
    outs = {o.name: o for o in cfg.output}
    if set(ins) != {"input_ids"}:
        p.append(f"inputs {sorted(ins)}, expected exactly ['input_ids']")
    if set(outs) != {"logits"}:
        p.append(f"outputs {sorted(outs)}, expected exactly ['logits']")
    if "input_ids" in ins:
        i = ins["input_ids"]
        if i.data_type != pb.TYPE_INT64:
            p.append(f"input_ids data_type {pb.DataType.Name(i.data_type)}, expected TYPE_INT64")
        if _dims(i.dims) != [-1]:
            p.append(f"input_ids dims {_dims(i.dims)}, expected [-1] (T; the batch axis is Triton's)")
    g_ids = graph.inputs.get("input_ids")
    if g_ids is None or g_ids[0] != "int64" or len(g_ids[1]) != 2:
        p.append(f"the ONNX graph's input_ids is {g_ids}, expected int64 [B, T]")
    g_logits = graph.outputs.get("logits")
    if g_logits is None or len(g_logits[1]) != 3:
        p.append(f"the ONNX graph's logits is {g_logits}, expected [B, T, vocab]")
    if "logits" in outs:
        o = outs["logits"]
        want_t = triton_type(g_logits[0]) if g_logits and g_logits[0] in _TRITON_TYPES else "?"
        if pb.DataType.Name(o.data_type) != want_t:
            p.append(f"logits data_type {pb.DataType.Name(o.data_type)}, expected {want_t} (the graph's)")
        if _dims(o.dims) != [-1, vocab]:
            p.append(f"logits dims {_dims(o.dims)}, expected [-1, {vocab}]")
        if g_logits and len(g_logits[1]) == 3 and g_logits[1][2] not in (vocab, "?"):
            p.append(f"the graph's logits has vocab axis {g_logits[1][2]}, the config says {vocab}")
    if not cfg.HasField("sequence_batching"):
        p.append("no sequence_batching block (the model is stateful)")
    sb = cfg.sequence_batching
    if cfg.HasField("sequence_batching"):
        if not sb.HasField("oldest"):
            p.append("sequence_batching has no 'oldest' strategy (needed to batch several sequences)")
        elif sb.oldest.max_candidate_sequences < 1:
            p.append("oldest.max_candidate_sequences must be >= 1")
        if sb.max_sequence_idle_microseconds == 0:
            p.append("max_sequence_idle_microseconds is 0 (Triton's default of 1 s would apply)")
    if kind == "python":
        if len(sb.state):
            p.append("the python backend ignores implicit state silently; the state block must be absent")
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        if params.get("fingerprint") != fingerprint:
            p.append(f"parameter fingerprint {params.get('fingerprint', '')[:12]!r} differs from the ONNX "
                     f"model's {fingerprint[:12]!r}")
        try:
            same = json.loads(params.get("state_spec", "null")) == json.loads(state_spec_json)
        except json.JSONDecodeError:
            same = False
        if not same:
            p.append("parameter state_spec differs from the ONNX model's state spec")
        for key in ("max_sequences", "idle_seconds"):
            if key not in params:
                p.append(f"parameter {key} missing")
        if cfg.HasField("sequence_batching") and sb.HasField("oldest") and \
                params.get("max_sequences") != str(sb.oldest.max_candidate_sequences):
            p.append(f"parameter max_sequences {params.get('max_sequences')} differs from "
                     f"oldest.max_candidate_sequences {sb.oldest.max_candidate_sequences}")
    else:
        p.extend(_check_states(sb, graph, spec, activation_dtype))
    if p:
        raise ConfigCheckError(f"{where}: " + "; ".join(p))


def state_dims(t: StateTensor) -> list[int]:
    """A state tensor's dims in a Triton config (no batch axis; ``[1]`` for the [B] position)."""
    dims = [int(s) for s in t.shape if s != "B"]
    return dims or [1]


def _check_states(sb: Any, graph: GraphIO, spec: list[StateTensor], activation_dtype: str) -> list[str]:
    from tritonclient.grpc import model_config_pb2 as pb

    p: list[str] = []
    by_in: dict[str, Any] = {}
    for s in sb.state:
        if s.input_name in by_in:
            p.append(f"state {s.input_name} declared twice")
        by_in[s.input_name] = s
    want = {t.past_name: t for t in spec}
    for name in sorted(set(by_in) - set(want)):
        p.append(f"state {name} is not in the state spec")
    for name in sorted(set(want) - set(by_in)):
        p.append(f"state {name} missing (one entry per past/present pair)")
    for name, t in want.items():
        s = by_in.get(name)
        if s is None:
            continue
        if s.output_name != t.present_name:
            p.append(f"state {name}: output_name {s.output_name!r}, expected {t.present_name!r} "
                     "(replace past. by present.)")
        dtype = t.resolved_dtype(activation_dtype)
        if pb.DataType.Name(s.data_type) != triton_type(dtype):
            p.append(f"state {name}: data_type {pb.DataType.Name(s.data_type)}, expected "
                     f"{triton_type(dtype)}")
        dims = _dims(s.dims)
        if not dims:
            p.append(f"state {name}: dims [] (Triton gives it a garbage initial value with max_batch_size > "
                     "0; use [1] and a graph input of shape [B, 1])")
        elif dims != state_dims(t):
            p.append(f"state {name}: dims {dims}, expected {state_dims(t)}")
        for io, gname in (("input", t.past_name), ("output", t.present_name)):
            g = (graph.inputs if io == "input" else graph.outputs).get(gname)
            if g is None:
                p.append(f"state {name}: the graph has no {io} {gname}")
                continue
            if g[0] != dtype:
                p.append(f"state {name}: the graph's {gname} is {g[0]}, expected {dtype}")
            if len(g[1]) != 1 + len(state_dims(t)) or any(
                    isinstance(a, int) and a != b for a, b in zip(g[1][1:], state_dims(t))):
                p.append(f"state {name}: the graph's {gname} has shape {g[1]}, expected [B, "
                         f"{', '.join(map(str, state_dims(t)))}]")
        if len(s.initial_state) != 1:
            p.append(f"state {name}: {len(s.initial_state)} initial_state entries, expected one zero state "
                     "(a zero state is the valid start)")
        else:
            init = s.initial_state[0]
            if not init.zero_data:
                p.append(f"state {name}: initial_state is not zero_data")
            if init.data_type != s.data_type or _dims(init.dims) != dims:
                p.append(f"state {name}: initial_state type/dims differ from the state's")
    extra_in = sorted(set(graph.inputs) - set(want) - {"input_ids"})
    extra_out = sorted(set(graph.outputs) - {t.present_name for t in spec} - {"logits"})
    if extra_in or extra_out:
        p.append(f"graph tensors outside the spec: {extra_in + extra_out}")
    return p
