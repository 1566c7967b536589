"""Reference PyTorch Trellis model: the memory op and the language model."""

from .lm import State, TrellisLayer, TrellisLM
from .memory import MemoryState, nonlinearity, nonlinearity_vjp, trellis_memory

__all__ = ["MemoryState", "State", "TrellisLM", "TrellisLayer", "nonlinearity", "nonlinearity_vjp",
           "trellis_memory"]
