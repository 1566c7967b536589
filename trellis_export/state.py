"""The streaming state spec (TRELLIS_SPEC.md section 6), derived from the config in one place.

A model's state is a flat mapping ``name -> tensor``; ``name`` is the spec name without the
``past.`` / ``present.`` prefix (``position``, ``0.key_memory`` ...). Graph inputs are
``past.<name>``, graph outputs ``present.<name>``. Every runtime, exporter and checker imports this
module rather than spelling the names, shapes or dtypes again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .config import TrellisConfig

PAST_PREFIX = "past."
PRESENT_PREFIX = "present."

#: Per-layer memory tensors, in the order of the TrellisMemory op's state inputs / outputs.
MEMORY_FIELDS: tuple[str, ...] = ("key_memory", "value_memory", "key_snapshot", "value_snapshot")


@dataclass(frozen=True)
class StateTensor:
    """One state tensor: its name, symbolic shape (``"B"`` is the batch axis) and dtype.

    ``dtype`` is ``"int64"``, ``"float32"`` or ``"activation"`` (the model's activation dtype,
    float32 unless a float16 export says otherwise).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    layer: int | None = None
    field: str | None = None

    @property
    def past_name(self) -> str:
        return PAST_PREFIX + self.name

    @property
    def present_name(self) -> str:
        return PRESENT_PREFIX + self.name

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if s == "B" else int(s) for s in self.shape)

    def resolved_dtype(self, activation_dtype: str = "float32") -> str:
        return activation_dtype if self.dtype == "activation" else self.dtype

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "input": self.past_name, "output": self.present_name,
                "shape": list(self.shape), "dtype": self.dtype}


def memory_fields(config: TrellisConfig) -> tuple[str, ...]:
    """The memory tensors that are state for this config (snapshots only when C > 1)."""
    return MEMORY_FIELDS if config.has_snapshots else MEMORY_FIELDS[:2]


def state_spec(config: TrellisConfig) -> list[StateTensor]:
    """All state tensors of a model, in graph order: position, then per layer memories and conv."""
    H, m, d = config.n_heads, config.n_slots, config.head_dim
    spec = [StateTensor("position", ("B",), "int64")]
    for layer in range(config.n_layers):
        for fld in memory_fields(config):
            spec.append(StateTensor(f"{layer}.{fld}", ("B", H, m, d), "float32", layer, fld))
        spec.append(StateTensor(f"{layer}.conv", ("B", config.conv_channels, config.conv_size - 1),
                                "activation", layer, "conv"))
    return spec


def state_bytes_per_stream(config: TrellisConfig, activation_bytes: int = 4) -> int:
    """Bytes of state one stream (batch row) carries; constant in context length."""
    total = 0
    for t in state_spec(config):
        n = 1
        for s in t.concrete_shape(1):
            n *= s
        size = 8 if t.dtype == "int64" else (activation_bytes if t.dtype == "activation" else 4)
        total += n * size
    return total


def state_spec_json(config: TrellisConfig, activation_dtype: str = "float32") -> str:
    """The spec as JSON, as stored in exported models' metadata."""
    return json.dumps({"activation_dtype": activation_dtype,
                       "tensors": [t.to_dict() for t in state_spec(config)]}, sort_keys=True)
