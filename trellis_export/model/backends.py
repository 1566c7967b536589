"""Memory backends of the model: the reference op (default) or the Triton kernels.

``use_backend(model, "triton")`` sets ``model.memory_fn``; the reference stays the default, and
triton is imported only when asked for.
"""

from __future__ import annotations

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


def use_backend(model: TrellisLM, name: str) -> TrellisLM:
    """Point ``model.memory_fn`` at a backend; returns the model."""
    model.memory_fn = memory_backend(name)
    return model
