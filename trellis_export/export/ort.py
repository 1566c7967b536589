"""Run an exported Trellis ONNX model with ONNX Runtime on a state dict (numpy + onnxruntime only).

State dicts are keyed by the state-spec names without prefix (``position``, ``0.key_memory`` ...),
exactly like ``TrellisLM.init_state``; :func:`run_ort` feeds them as ``past.*`` and returns the
``present.*`` outputs under the same names. Shared by the tests, the runtime and ``verify``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from ..state import PAST_PREFIX, PRESENT_PREFIX

__all__ = ["ort_session", "run_ort", "ORT_NUMPY_TYPES"]

#: ORT type strings of the graph's inputs -> numpy dtypes.
ORT_NUMPY_TYPES: dict[str, type] = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                                    "tensor(int64)": np.int64, "tensor(double)": np.float64}


def ort_session(path: str | os.PathLike[str] | bytes, providers: Sequence[str] | None = None,
                threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession (CPU EP unless ``providers`` say otherwise). ``path`` may be model bytes."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = path if isinstance(path, bytes) else str(path)
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
