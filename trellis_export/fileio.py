"""Torch-free file helpers shared by checkpoints, runtimes and reports.

Kept for compatibility: the implementations live in :mod:`trellis_export.outputs`, the one place
every writer goes through (atomic writes, OSError -> one-line OutputError, temporaries removed on
errors and on SIGINT / SIGTERM).
"""

from __future__ import annotations

from .outputs import OutputError, atomic_write_bytes, current_umask

__all__ = ["OutputError", "atomic_write_bytes", "current_umask"]
