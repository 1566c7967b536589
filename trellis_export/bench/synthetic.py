"""States at stream position N, built directly instead of by streaming N tokens (too slow for 64k here).

Latency does not depend on the values a state holds, only on its shapes, so the bench builds:

* Trellis: memories and snapshots ~ N(0, 1/d) (the scale of the learned M0), the conv cache ~ N(0, 1),
  ``position = N`` for every row (the rows are mid-stream: the layers do not reset them);
* KV-cache baseline: a cache of N random keys and values ~ N(0, 1) per layer, ``position = N``.

Every state tensor's name, shape and dtype comes from :func:`trellis_export.state.state_spec` and
:func:`trellis_export.baseline.kv_state_shapes`.
"""

from __future__ import annotations

import math

import numpy as np

from ..baseline import kv_state_shapes
from ..config import TrellisConfig
from ..state import state_spec

#: The method, as written into the bench JSON and docs.
CONTEXT_METHOD = (
    "synthetic: the state at context N is built directly, not by streaming N tokens. Trellis: memories "
    "and snapshots ~ N(0, 1/d) (the scale of the learned M0), conv cache ~ N(0, 1), position = N. "
    "KV-cache baseline: N random keys and values ~ N(0, 1) per layer, position = N. Every timed call "
    "starts from the same state at context N (its output state is discarded), so each iteration is one "
    "decode step (T = 1) or one prefill call (T = prefill-len) at context N.")


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        x *= np.float32(scale)
    return x


def trellis_state(config: TrellisConfig, batch: int, context: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """A float32 Trellis state of ``batch`` rows at position ``context``."""
    out: dict[str, np.ndarray] = {}
    for t in state_spec(config):
        shape = t.concrete_shape(batch)
        if t.name == "position":
            out[t.name] = np.full(shape, context, dtype=np.int64)
        elif t.field == "conv":
            out[t.name] = _normal(rng, shape)
        else:
            out[t.name] = _normal(rng, shape, 1.0 / math.sqrt(config.head_dim))
    return out


def kv_state(config: TrellisConfig, batch: int, context: int, rng: np.random.Generator
             ) -> dict[str, np.ndarray]:
    """A float32 KV cache of ``context`` tokens for ``batch`` rows, at position ``context``."""
    out: dict[str, np.ndarray] = {}
    for name, shape in kv_state_shapes(config, batch, context).items():
        if name == "position":
            out[name] = np.full(shape, context, dtype=np.int64)
        else:
            out[name] = _normal(rng, shape)
    return out


def kv_cell_bytes(config: TrellisConfig, batch: int, context: int, tokens: int) -> int:
    """Rough peak bytes of one baseline call: past and present caches plus a few score matrices."""
    L, H, d = config.n_layers, config.n_heads, config.head_dim
    past = batch * L * 2 * H * context * d * 4
    present = batch * L * 2 * H * (context + tokens) * d * 4
    scores = batch * H * tokens * (context + tokens) * 4
    return past + present + 4 * scores
