"""Streaming runtimes: one session interface (numpy in / out), a PyTorch and an ONNX Runtime backend.

>>> from trellis_export.runtime import open_session
>>> s = open_session("ort", model_path="model.onnx")          # doctest: +SKIP
>>> state = s.init_state(1); logits, state = s.step([[1, 2, 3]], state)   # doctest: +SKIP

Importing this package, and opening and running an ORT session, never imports torch; the torch
backend is imported only when asked for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .base import InputError, Session, SessionError, StateDict, StateError

BACKENDS: tuple[str, ...] = ("torch", "ort")

__all__ = ["BACKENDS", "InputError", "Session", "SessionError", "StateDict", "StateError", "open_session"]


def open_session(backend: str = "ort", checkpoint: str | os.PathLike[str] | None = None,
                 model_path: str | os.PathLike[str] | None = None,
                 providers: Sequence[str] | None = None, **options: Any) -> Session:
    """Open a streaming session.

    ``backend="torch"``: the PyTorch model of ``checkpoint`` (None -> the bundled default), or of
    ``model=`` (an in-memory TrellisLM); options ``dtype`` ("float32" | "float64"), ``memory_mode``,
    ``threads``. ``backend="ort"``: the ONNX model at ``model_path``, on ``providers`` (default CUDA
    when available, then CPU); options ``threads``, ``profile``, ``optimization``.
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
    raise SessionError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
