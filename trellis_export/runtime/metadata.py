"""Where a runtime finds the config, state spec and fingerprint in an exported model's metadata_props.

The key names are the exporter's; this module only lists them (torch-free) for the runtimes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CONFIG_KEYS: tuple[str, ...] = ("trellis.config",)
STATE_SPEC_KEYS: tuple[str, ...] = ("trellis.state_spec",)
FINGERPRINT_KEYS: tuple[str, ...] = ("trellis.fingerprint",)


def lookup(meta: Mapping[str, str], keys: Sequence[str]) -> tuple[str, str | None]:
    """The first of ``keys`` present in ``meta``: (key, value), or (keys[0], None)."""
    for k in keys:
        if k in meta:
            return k, meta[k]
    return keys[0], None
