"""Error metrics shared by the tests, `verify` and the GPU suite (numpy or torch inputs)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_rms(x: Any, ref: Any) -> float:
    """Relative RMS error ||x - ref|| / ||ref|| (the flash-linear-attention convention).

    When ``ref`` is all zeros, returns the absolute norm of the difference.
    """
    a, b = _np(x), _np(ref)
    if a.shape != b.shape:
        raise ValueError(f"rel_rms: shapes differ, {a.shape} vs reference {b.shape}")
    num = float(np.linalg.norm((a - b).ravel()))
    den = float(np.linalg.norm(b.ravel()))
    return num / den if den > 0 else num


def error_stats(x: Any, ref: Any) -> dict[str, float]:
    """Polygraphy-style statistics of one tensor against its reference."""
    a, b = _np(x), _np(ref)
    diff = np.abs(a - b)
    rel = diff / np.maximum(np.abs(b), 1e-12)
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_rel": float(rel.max()) if rel.size else 0.0,
        "rel_rms": rel_rms(a, b),
        "finite": bool(np.isfinite(a).all()),
    }
