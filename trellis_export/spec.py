"""The numbers and names of TRELLIS_SPEC.md that code checks against, defined once.

``verify``, the tests, the GPU suite and the deployment bundle's manifest import them from here.
"""

from __future__ import annotations

from .config import NONLINEARITIES

__all__ = ["NONLINEARITIES", "SHORT_STREAM", "TOL_SHORT", "TOL_LONG", "TOL_FLOAT16", "spec_tolerance"]

#: Section 8: calls / positions up to this many tokens use the tight float32 tolerance.
SHORT_STREAM = 64
#: Section 8: float32 against the float64 reference, relative RMS per tensor.
TOL_SHORT = 1e-5            # T <= 64
TOL_LONG = 1e-4             # streams up to 100k tokens
#: Section 8: float16 engines, on logits (top-1 agreement reported beside it).
TOL_FLOAT16 = 5e-3


def spec_tolerance(position: int, activation_dtype: str = "float32") -> float:
    """The section-8 tolerance of a check at stream ``position`` for a model of ``activation_dtype``."""
    if activation_dtype == "float16":
        return TOL_FLOAT16
    return TOL_SHORT if position <= SHORT_STREAM else TOL_LONG
