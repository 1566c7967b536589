"""Memory backends of the model: the reference op (default) or the Triton kernels.

``use_backend(model, "triton")`` sets ``model.memory_fn``; the reference stays the default, and
triton is imported only when asked for.
"""

from __future__ import annotations

from ..errors import TrellisExportError
from .lm import MemoryFn, TrellisLM
from .memory import trellis_memory

BACKENDS: tuple[str, ...] = ("reference", "triton")


def memory_backend(name: str) -> MemoryFn:
    """The memory function of a backend: "reference" (PyTorch) or "triton" (custom op)."""
    if name == "reference":
        return trellis_memory
    if name == "triton":
        from trellis_export.kernels.trellis_memory import trellis_memory_triton
        return trellis_memory_triton
    raise ValueError(f"memory backend must be one of {', '.join(BACKENDS)}; got {name!r}")


class BackendError(TrellisExportError, RuntimeError):
    """A memory backend cannot run here (no GPU, triton missing, model on the wrong device)."""


def check_backend_usable(model: TrellisLM, name: str) -> None:
    """Raise :class:`BackendError` (one line) when ``name`` cannot run ``model`` on this machine."""
    if name != "triton":
        return
    import importlib.util

    import torch

    if importlib.util.find_spec("triton") is None:
        raise BackendError("memory backend 'triton' needs the triton package (pip install "
                           "trellis-export[triton])")
    if not torch.cuda.is_available():
        raise BackendError(f"memory backend 'triton' needs a CUDA GPU; torch {torch.__version__} sees none "
                           "(use the 'reference' backend on CPU)")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return
    if device.type != "cuda":
        raise BackendError(f"memory backend 'triton' runs on the GPU, but the model is on {device}; call "
                           "model.to('cuda') first")


def use_backend(model: TrellisLM, name: str) -> TrellisLM:
    """Point ``model.memory_fn`` at a backend; returns the model. "triton" is refused at once (not at the
    first call) when this machine has no CUDA GPU or triton, or the model is not on the GPU."""
    fn = memory_backend(name)
    check_backend_usable(model, name)
    model.memory_fn = fn
    return model
