"""Triton kernels of the Trellis memory op (layout after flash-linear-attention's op folders)."""

from .chunk import chunk_trellis_fwd
from .chunk_split import chunk_split_trellis_fwd
from .fused_recurrent import fused_recurrent_trellis_fwd
from .ops import memory_triton, trellis_memory_triton

__all__ = ["chunk_split_trellis_fwd", "chunk_trellis_fwd", "fused_recurrent_trellis_fwd", "memory_triton",
           "trellis_memory_triton"]
