"""The PyTorch side of ``trellis::TrellisMemory`` for export.

``torch.ops.trellis_export.memory`` is a ``torch.library`` custom op: eager it runs the reference
:func:`trellis_memory` (step mode), under tracing its fake impl only produces shapes, so
``torch.export`` keeps it as one opaque node per layer. :data:`TRANSLATION_TABLE` maps that node to
one ONNX node ``trellis::TrellisMemory`` (inputs, outputs and attributes from :mod:`..opdef`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnxscript
import torch
from onnx.defs import OpSchema
from torch import Tensor

from ..model.memory import MemoryState, trellis_memory
from ..opdef import DOMAIN, INPUTS, OP_TYPE, OP_VERSION, OUTPUTS, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = ["memory_op", "export_memory_fn", "TRANSLATION_TABLE", "op_schema"]

_Out = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("trellis_export::memory", mutates_args=())
def memory_op(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
              key_memory: Tensor, value_memory: Tensor, key_snapshot: Tensor, value_snapshot: Tensor,
              position: Tensor, chunk_size: int, phi: str, f: str, rho: str, eps: float) -> _Out:
    """Eager: the reference op in step mode (returns fresh tensors, as custom ops must)."""
    o, st = trellis_memory(q, k, v, a, beta, gamma,
                           MemoryState(key_memory, value_memory, key_snapshot, value_snapshot), position,
                           chunk_size=chunk_size, phi=phi, f=f, rho=rho, eps=eps, mode="step")
    return o.clone(), st[0].clone(), st[1].clone(), st[2].clone(), st[3].clone()


@memory_op.register_fake
def _memory_fake(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
                 key_memory: Tensor, value_memory: Tensor, key_snapshot: Tensor, value_snapshot: Tensor,
                 position: Tensor, chunk_size: int, phi: str, f: str, rho: str, eps: float) -> _Out:
    wide = any(t.dtype == torch.float64 for t in (q, k, v, a, beta, gamma, key_memory, value_memory,
                                                    key_snapshot, value_snapshot))
    st = torch.float64 if wide else torch.float32
    return (torch.empty_like(q), torch.empty_like(key_memory, dtype=st),
            torch.empty_like(value_memory, dtype=st), torch.empty_like(key_snapshot, dtype=st),
            torch.empty_like(value_snapshot, dtype=st))


def export_memory_fn(q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor, gamma: Tensor,
                     state: MemoryState, position: Tensor, *, chunk_size: int, phi: str = "ln_silu",
                     f: str = "ln_silu", rho: str = "identity", eps: float = 1e-5,
                     mode: str = "step") -> tuple[Tensor, MemoryState]:
    """A ``model.memory_fn`` backend that routes every layer through the custom op."""
    o, *st = torch.ops.trellis_export.memory(q, k, v, a, beta, gamma, *state, position,
                                             int(chunk_size), str(phi), str(f), str(rho), float(eps))
    return o, MemoryState(*st)


def op_schema() -> OpSchema:
    """An in-memory OpSchema for the node (only used to build it; never registered globally)."""
    fp = OpSchema.FormalParameter
    act = {"q", "k", "v", "a"}             # beta, gamma are float32 gates (spec section 1)
    types = {"chunk_size": OpSchema.AttrType.INT, "eps": OpSchema.AttrType.FLOAT}
    attrs = ("chunk_size", "phi", "f", "rho", "eps", "plugin_namespace", "plugin_version")
    return OpSchema(
        OP_TYPE, DOMAIN, OP_VERSION,
        inputs=[fp(n, "T" if n in act else ("I" if n == "position" else "S")) for n in INPUTS],
        outputs=[fp(n, "T" if n == "o" else "S") for n in OUTPUTS],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations"),
                          ("S", ["tensor(float)"], "gates and memories (float32)"),
                          ("I", ["tensor(int64)"], "positions")],
        attributes=[OpSchema.Attribute(n, types.get(n, OpSchema.AttrType.STRING), "") for n in attrs])


_OPSET = onnxscript.values.Opset(DOMAIN, OP_VERSION)
_ONNX_OP = onnxscript.values.Op(_OPSET, OP_TYPE, op_schema())


def _translate(q: Any, k: Any, v: Any, a: Any, beta: Any, gamma: Any, key_memory: Any,
               value_memory: Any, key_snapshot: Any, value_snapshot: Any, position: Any,
               chunk_size: int, phi: str, f: str, rho: str, eps: float) -> Any:
    return _ONNX_OP(q, k, v, a, beta, gamma, key_memory, value_memory, key_snapshot, value_snapshot,
                    position, chunk_size=int(chunk_size), phi=phi, f=f, rho=rho, eps=float(eps),
                    plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)


#: ``custom_translation_table`` for ``torch.onnx.export``.
TRANSLATION_TABLE: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.trellis_export.memory.default: _translate}
