"""The ``trellis::TrellisMemory`` custom op (TRELLIS_SPEC.md section 7): defined once, imported by the
ONNX exporter, the function body builder, the TensorRT plugin and the kernels' launch records."""

from __future__ import annotations

from typing import Any

from .config import TrellisConfig

DOMAIN = "trellis"
OP_TYPE = "TrellisMemory"
OP_VERSION = 1
OPSET = 18                      # standard opset of exported graphs and of the function bodies
PLUGIN_NAMESPACE = "trellis"
PLUGIN_VERSION = "1"
PLUGIN_NAME = f"{DOMAIN}::{OP_TYPE}"

INPUTS: tuple[str, ...] = ("q", "k", "v", "a", "beta", "gamma", "key_memory", "value_memory",
                           "key_snapshot", "value_snapshot", "position")
OUTPUTS: tuple[str, ...] = ("o", "key_memory", "value_memory", "key_snapshot", "value_snapshot")
#: Attributes that carry the math (the plugin fields): name -> python type.
ATTRIBUTES: dict[str, type] = {"chunk_size": int, "phi": str, "f": str, "rho": str, "eps": float}


def op_attributes(config: TrellisConfig) -> dict[str, Any]:
    """Attribute values of a layer's TrellisMemory node, plugin mapping attributes included."""
    return {"chunk_size": config.chunk_size, "phi": config.phi, "f": config.f, "rho": config.rho,
            "eps": float(config.eps), "plugin_namespace": PLUGIN_NAMESPACE,
            "plugin_version": PLUGIN_VERSION}
