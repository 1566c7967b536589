"""ONNX export of the Trellis streaming step with the ``trellis::TrellisMemory`` custom op.

* :func:`export_onnx` / :func:`export_model_proto` / :func:`tensorrt_view` (``onnx_export``, imports torch);
* :func:`memory_function` / :func:`memory_node_model` (``function_body``, onnx only);
* :func:`ort_session` / :func:`run_ort` (``ort``, numpy + onnxruntime only, never torch);
* the ``metadata_props`` keys ``META_*`` (``meta``, torch-free).

Names are imported lazily so that ``trellis_export.export.ort`` stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "export_onnx": "onnx_export", "export_model_proto": "onnx_export", "tensorrt_view": "onnx_export",
    "save_tensorrt_view": "onnx_export", "check_exported": "onnx_export", "ExportError": "onnx_export",
    "META_CONFIG": "meta", "META_STATE_SPEC": "meta", "META_FINGERPRINT": "meta",
    "META_EXPORTER_VERSION": "meta", "META_OPSET": "meta", "META_ACTIVATION_DTYPE": "meta",
    "memory_function": "function_body", "memory_node_model": "function_body",
    "ort_session": "ort", "run_ort": "ort",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
