"""Run an exported Trellis ONNX model with ONNX Runtime on a state dict (numpy + onnxruntime only).

State dicts are keyed by the state-spec names without prefix (``position``, ``0.key_memory`` ...),
exactly like ``TrellisLM.init_state``; :func:`run_ort` feeds them as ``past.*`` and returns the
``present.*`` outputs under the same names. Shared by the tests, the runtime and ``verify``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..state import PAST_PREFIX, PRESENT_PREFIX

__all__ = ["ort_session", "run_ort", "ort_model_source", "ORT_NUMPY_TYPES", "EXTERNAL_FOLDER_KEY"]

#: Session config key telling ONNX Runtime where external data lives when the model comes as bytes.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"

#: ORT type strings of the graph's inputs -> numpy dtypes.
ORT_NUMPY_TYPES: dict[str, type] = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                                    "tensor(int64)": np.int64, "tensor(double)": np.float64}


def _has_external_data(model: Any) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def ort_model_source(path: str | os.PathLike[str] | bytes, options: ort.SessionOptions,
                     function_body: str = "ort") -> str | bytes:
    """What to hand ``InferenceSession`` for a Trellis model: the model with its TrellisMemory function
    body in ``function_body`` flavour (``"ort"``: the loop-free T = 1 decode step ONNX Runtime runs
    fastest; ``"portable"``: the body every runtime and TensorRT parses; ``"as-is"``: the file
    untouched). Files exported by trellis-export carry the portable body; the rewrite happens in
    memory, the file is never changed. External data stays where it is (``options`` learn its folder).
    """
    if function_body == "as-is":
        return path if isinstance(path, bytes) else str(path)
    import onnx

    from .function_body import FLAVOURS, with_flavour

    if function_body not in FLAVOURS:
        raise ValueError(f"function_body must be one of {', '.join((*FLAVOURS, 'as-is'))}, "
                         f"got {function_body!r}")
    if isinstance(path, bytes):
        model = onnx.load_model_from_string(path)
    else:
        model = onnx.load(str(path), format="protobuf", load_external_data=False)   # whatever the suffix
        if _has_external_data(model):
            options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(Path(path).resolve().parent))
    return with_flavour(model, function_body).SerializeToString()


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
