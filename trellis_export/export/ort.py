"""Run an exported Trellis ONNX model with ONNX Runtime on a state dict (numpy + onnxruntime only).

State dicts are keyed by the state-spec names without prefix (``position``, ``0.key_memory`` ...),
exactly like ``TrellisLM.init_state``; :func:`run_ort` feeds them as ``past.*`` and returns the
``present.*`` outputs under the same names. Shared by the tests, the runtime and ``verify``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..state import PAST_PREFIX, PRESENT_PREFIX

__all__ = ["ort_session", "run_ort", "ort_model_source", "ort_model_sources", "OrtSources", "ORT_NUMPY_TYPES",
           "EXTERNAL_FOLDER_KEY"]

#: Session config key telling ONNX Runtime where external data lives when the model comes as bytes.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"

#: ORT type strings of the graph's inputs -> numpy dtypes.
ORT_NUMPY_TYPES: dict[str, type] = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                                    "tensor(int64)": np.int64, "tensor(double)": np.float64}


def _has_external_data(model: Any) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


@dataclass
class OrtSources:
    """What an ORT session loads (:func:`ort_model_sources`): ``model`` (every T; T > 1 when there is a
    lean decode graph), ``decode`` (the
    lean T = 1 graph, or None), ``decode_graph`` (``"lean"``, ``"lean-std"`` or ``"exported"``: what
    decode calls run on) and ``reason`` (why ``decode`` is None when a lean graph was asked for)."""

    model: str | bytes
    decode: bytes | None = None
    decode_graph: str = "exported"
    reason: str | None = None
    #: With a lean graph that leaves the reset of fresh rows to the host: per state tensor the value a
    #: row at position 0 must hold before the call (see ``ort_rewrite.host_reset_values``).
    reset: dict[str, Any] | None = None
    #: What ``model`` is: ``"lean"`` / ``"lean-std"`` (the lean graph for every T of
    #: :func:`trellis_export.export.ort_prefill.lean_prefill_model`) or ``"exported"`` (the file's
    #: graph, its TrellisMemory body in the asked flavour); ``prefill_reason``: why not lean when asked.
    prefill_graph: str = "exported"
    prefill_reason: str | None = None


def ort_model_source(path: str | os.PathLike[str] | bytes, options: ort.SessionOptions,
                     function_body: str = "ort") -> str | bytes:
    """What to hand ``InferenceSession`` for a Trellis model: the model with its TrellisMemory function
    body in ``function_body`` flavour (``"ort"``: the loop-free T = 1 decode step ONNX Runtime runs
    fastest; ``"portable"``: the body every runtime and TensorRT parses; ``"as-is"``: the file
    untouched). Files exported by trellis-export carry the portable body; the rewrite happens in
    memory, the file is never changed. External data stays where it is (``options`` learn its folder).
    """
    return ort_model_sources(path, options, function_body, ort_graph="exported").model


def ort_model_sources(path: str | os.PathLike[str] | bytes, options: ort.SessionOptions,
                      function_body: str = "ort", ort_graph: str = "lean") -> OrtSources:
    """:func:`ort_model_source` plus, for ``ort_graph="lean"`` / ``"lean-std"`` (with / without ORT
    contrib ops), the lean decode graph of :func:`trellis_export.export.ort_rewrite.lean_decode_model`
    and, as ``model``, the lean graph for every T of
    :func:`trellis_export.export.ort_prefill.lean_prefill_model`, both built in memory from the same
    file. A model the rewrites cannot read (float16 activations, external data, another exporter's
    graph) gets ``decode=None`` / the exported graph as ``model`` and the reasons;
    ``ort_graph="exported"`` builds neither. This is the one place ORT sessions of this project load
    models through."""
    from .ort_rewrite import ORT_GRAPHS

    if ort_graph not in ORT_GRAPHS:
        raise ValueError(f"ort_graph must be one of {', '.join(ORT_GRAPHS)}, got {ort_graph!r}")
    from .function_body import FLAVOURS

    if function_body not in (*FLAVOURS, "as-is"):
        raise ValueError(f"function_body must be one of {', '.join((*FLAVOURS, 'as-is'))}, "
                         f"got {function_body!r}")
    if function_body == "as-is" and ort_graph == "exported":
        return OrtSources(path if isinstance(path, bytes) else str(path))
    import onnx

    from .function_body import with_flavour

    external = False
    if isinstance(path, bytes):
        model = onnx.load_model_from_string(path)
    else:
        model = onnx.load(str(path), format="protobuf", load_external_data=False)   # whatever the suffix
        if _has_external_data(model):
            external = True
            options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(Path(path).resolve().parent))
    lean = _LeanGraphs()
    if ort_graph != "exported":
        lean = _lean_graphs(model, ort_graph, external)
    if lean.prefill is not None:
        src: str | bytes = lean.prefill
    elif function_body == "as-is":
        src = path if isinstance(path, bytes) else str(path)
    else:
        src = with_flavour(model, function_body).SerializeToString()
    return OrtSources(src, lean.decode, ort_graph if lean.decode is not None else "exported", lean.reason,
                      lean.reset, ort_graph if lean.prefill is not None else "exported", lean.prefill_reason)


@dataclass
class _LeanGraphs:
    decode: bytes | None = None
    prefill: bytes | None = None
    reason: str | None = None
    prefill_reason: str | None = None
    reset: dict[str, Any] | None = None


def _lean_graphs(model: Any, ort_graph: str, external: bool) -> _LeanGraphs:
    """The lean decode and prefill graphs of ``model`` (from one read of its weights), or why not."""
    from ..config import ConfigError, TrellisConfig
    from .meta import META_ACTIVATION_DTYPE, META_CONFIG
    from .ort_prefill import lean_prefill_model
    from .ort_rewrite import RewriteError, host_reset_values, lean_decode_model, read_weights

    def refused(why: str) -> _LeanGraphs:
        return _LeanGraphs(reason=why, prefill_reason=why)

    if external:
        return refused("the model keeps its weights in external data (the lean graph would copy them)")
    meta = {p.key: p.value for p in model.metadata_props}
    if META_CONFIG not in meta:
        return refused(f"no Trellis config in the model's metadata ({META_CONFIG})")
    contrib = ort_graph == "lean"
    try:
        config = TrellisConfig.from_json(meta[META_CONFIG])
        act = meta.get(META_ACTIVATION_DTYPE, "float32")
        weights = read_weights(model, config) if act == "float32" else None
        dec = lean_decode_model(model, config, contrib=contrib, host_reset=contrib, host_snapshot=contrib,
                                activation_dtype=act, weights=weights)
        out = _LeanGraphs(decode=dec.SerializeToString(),
                          reset=host_reset_values(model, config, weights) if contrib else None)
    except (RewriteError, ConfigError) as exc:
        return refused(str(exc))
    except ValueError as exc:     # protobuf's 2 GiB limit
        return refused(f"cannot serialise the lean graph ({exc})")
    try:
        pre = lean_prefill_model(model, config, contrib=contrib, activation_dtype=act, weights=weights)
        names = [[v.name for v in g] for g in (model.graph.input, model.graph.output)]
        if names != [[v.name for v in g] for g in (pre.graph.input, pre.graph.output)]:
            raise RewriteError("the file's graph inputs / outputs are not the state spec's, in its order")
        out.prefill = pre.SerializeToString()
    except RewriteError as exc:
        out.prefill_reason = str(exc)
    except ValueError as exc:
        out.prefill_reason = f"cannot serialise the lean prefill graph ({exc})"
    return out


def ort_session(path: str | os.PathLike[str] | bytes, providers: Sequence[str] | None = None,
                threads: int | None = None, function_body: str = "ort") -> ort.InferenceSession:
    """An InferenceSession (CPU EP unless ``providers`` say otherwise). ``path`` may be model bytes;
    ``function_body``: see :func:`ort_model_source`."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = ort_model_source(path, opts, function_body)
    return ort.InferenceSession(src, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):                     # a torch tensor, without importing torch
        x = x.detach().to("cpu").numpy()
    return np.asarray(x)


def run_ort(session: ort.InferenceSession, input_ids: Any, state: Mapping[str, Any]
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One streaming call: ``(logits [B, T, vocab], next_state)``.

    Inputs are cast to the graph's declared dtypes (e.g. a float64 reference state to float32, the
    conv cache to float16 for a float16 export). A missing state tensor raises KeyError naming it.
    """
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            value = input_ids
        elif inp.name.startswith(PAST_PREFIX):
            key = inp.name[len(PAST_PREFIX):]
            if key not in state:
                raise KeyError(f"state tensor {key!r} (graph input {inp.name}) is missing")
            value = state[key]
        else:
            raise KeyError(f"graph input {inp.name!r} is neither input_ids nor a past.* state tensor")
        feeds[inp.name] = _to_numpy(value).astype(ORT_NUMPY_TYPES.get(inp.type, None), copy=False)
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, feeds)
    logits = None
    new_state: dict[str, np.ndarray] = {}
    for name, value in zip(names, outs):
        if name == "logits":
            logits = value
        elif name.startswith(PRESENT_PREFIX):
            new_state[name[len(PRESENT_PREFIX):]] = value
    if logits is None:
        raise KeyError("the model has no 'logits' output")
    return logits, new_state
