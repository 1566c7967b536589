"""The Triton kernels as ``torch.library`` custom ops, plus a memory backend with the signature of
the reference ``trellis_memory`` (so ``model.memory_fn = trellis_memory_triton`` just works).

``trellis_export::memory_triton`` has a fake (meta) implementation, so ``torch.export`` and
``torch.compile`` trace through it without running a kernel. Forward only: no autograd formula is
registered (training uses the reference op's autograd).

``mode="chunked"`` runs the split prefill (``chunk_split_trellis_fwd``: a sequential state pass, then a
parallel read-out; float32 workspaces of ``2 * m / C`` times q's size per memory pass, allocated per
call), not the one-launch ``chunk_trellis_fwd``: by the ``ptxas -v`` figures of docs/kernels.md it has
no spills where the one-launch kernel spills (d = 128), fewer registers, more CTAs per SM and
``NC * B * H`` read-out programs instead of ``B * H``. No GPU timing backs the choice yet
(bench/gpu_suite.py measures both).
"""

from __future__ import annotations

import torch
from torch import Tensor

from trellis_export.model.memory import MODES, MemoryState

from .chunk_split import chunk_split_trellis_fwd
from .fused_recurrent import fused_recurrent_trellis_fwd

OP_NAME = "trellis_export::memory_triton"


@torch.library.custom_op(OP_NAME, mutates_args=())
def memory_triton(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
                  key_memory: Tensor, value_memory: Tensor, key_snapshot: Tensor, value_snapshot: Tensor,
                  position: Tensor, chunk_size: int, phi: str, f: str, rho: str, eps: float,
                  mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """mode "step": the streaming kernel; mode "chunked": the split prefill. Same results."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    fn = fused_recurrent_trellis_fwd if mode == "step" else chunk_split_trellis_fwd
    o, km, vm, ks, vs = fn(q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot, value_snapshot,
                           position, chunk_size=chunk_size, phi=phi, f=f, rho=rho, eps=eps)
    return o, km, vm, ks, vs


@memory_triton.register_fake
def _memory_triton_fake(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
                        key_memory: Tensor, value_memory: Tensor, key_snapshot: Tensor,
                        value_snapshot: Tensor, position: Tensor, chunk_size: int, phi: str, f: str,
                        rho: str, eps: float, mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, d = q.shape
    m = a.shape[-1]
    o = q.new_empty((B, T, H, d))
    km, vm, ks, vs = (key_memory.new_empty((B, H, m, d), dtype=torch.float32) for _ in range(4))
    return o, km, vm, ks, vs


def trellis_memory_triton(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
                          state: MemoryState, position: Tensor, *, chunk_size: int, phi: str = "ln_silu",
                          f: str = "ln_silu", rho: str = "identity", eps: float = 1e-5,
                          mode: str = "step") -> tuple[Tensor, MemoryState]:
    """Drop-in replacement of ``trellis_memory`` running the Triton kernels (float32 state;
    float32 / float16 / bfloat16 activations)."""
    if not isinstance(state, MemoryState):
        state = MemoryState(*state)
    o, K, V, SK, SV = torch.ops.trellis_export.memory_triton(
        q, k, v, a, beta, gamma, *state, position, int(chunk_size), phi, f, rho, float(eps), mode)
    return o, MemoryState(K, V, SK, SV)
