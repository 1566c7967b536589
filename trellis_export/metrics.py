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
    """Polygraphy-style statistics of one tensor against its reference, NaN-aware.

    When either side holds NaN / Inf, every error statistic is ``inf`` (never a NaN that ``max`` would
    silently drop, never a 0 from comparisons with NaN), ``finite`` is False if ``x`` is not finite,
    ``reference_finite`` likewise for ``ref``, and ``nonfinite`` counts the non-finite entries of ``x``.
    ``sum_sq_diff`` / ``sum_sq_ref`` let callers aggregate a relative RMS over several checks.
    """
    a, b = _np(x), _np(ref)
    if a.shape != b.shape:
        raise ValueError(f"error_stats: shapes differ, {a.shape} vs reference {b.shape}")
    fin_a, fin_b = np.isfinite(a), np.isfinite(b)
    finite, ref_finite = bool(fin_a.all()), bool(fin_b.all())
    if not (finite and ref_finite):
        inf = float("inf")
        return {"max_abs": inf, "mean_abs": inf, "max_rel": inf, "rel_rms": inf, "finite": finite,
                "reference_finite": ref_finite, "nonfinite": int((~fin_a).sum()),
                "sum_sq_diff": inf, "sum_sq_ref": float(np.square(b[fin_b]).sum())}
    diff = np.abs(a - b)
    rel = diff / np.maximum(np.abs(b), 1e-12)
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_rel": float(rel.max()) if rel.size else 0.0,
        "rel_rms": rel_rms(a, b),
        "finite": True,
        "reference_finite": True,
        "nonfinite": 0,
        "sum_sq_diff": float(np.square(diff).sum()),
        "sum_sq_ref": float(np.square(b).sum()),
    }
