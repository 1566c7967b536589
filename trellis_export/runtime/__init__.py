"""Streaming runtimes: one session interface (numpy in / out) over PyTorch, ONNX Runtime and TensorRT,
and a pool of many streams over one session (:class:`StreamPool`).

>>> from trellis_export.runtime import open_session
>>> s = open_session("ort", model_path="model.onnx")          # doctest: +SKIP
>>> state = s.init_state(1); logits, state = s.step([[1, 2, 3]], state)   # doctest: +SKIP

Importing this package, and opening and running an ORT or TensorRT session, never imports torch;
the torch backend is imported only when asked for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .base import InputError, Session, SessionError, StateDict, StateError

BACKENDS: tuple[str, ...] = ("torch", "ort", "trt")

__all__ = ["BACKENDS", "InputError", "Session", "SessionError", "StateDict", "StateError", "StreamPool",
           "open_session"]


def __getattr__(name: str) -> Any:
    if name == "StreamPool":
        from .pool import StreamPool

        return StreamPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_session(backend: str = "ort", checkpoint: str | os.PathLike[str] | None = None,
                 model_path: str | os.PathLike[str] | None = None,
                 providers: Sequence[str] | None = None,
                 engine_path: str | os.PathLike[str] | None = None, **options: Any) -> Session:
    """Open a streaming session.

    ``backend="torch"``: the PyTorch model of ``checkpoint`` (None -> the bundled default), or of
    ``model=`` (an in-memory TrellisLM); options ``dtype`` ("float32" | "float64"), ``memory_mode``,
    ``threads``. ``backend="ort"``: the ONNX model at ``model_path``, on ``providers`` (default CUDA
    when available, then CPU); options ``threads``, ``profile``, ``optimization``, ``function_body``.
    ``backend="trt"``: the TensorRT engine at ``engine_path`` (its sidecar beside it; GPU only);
    options ``runtime`` ("tensorrt-rtx" | "tensorrt"), ``device``.
    """
    if backend == "torch":
        if providers:
            raise SessionError("--providers applies to the ort backend only")
        from .torch_backend import TorchSession

        return TorchSession(options.pop("model", None), checkpoint, **options)
    if backend == "ort":
        if model_path is None:
            raise SessionError("the ort backend needs an ONNX model path (model_path)")
        from .ort_backend import OrtSession

        return OrtSession(model_path, providers=providers, **options)
    if backend == "trt":
        if engine_path is None:
            raise SessionError("the trt backend needs an engine path (engine_path)")
        if providers:
            raise SessionError("--providers applies to the ort backend only")
        from .trt_backend import TrtSession

        return TrtSession(engine_path, **options)
    raise SessionError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
