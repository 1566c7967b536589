"""Scoped torch thread counts: library calls never change the process-wide setting for good.

``torch.set_num_threads`` is process-global; two sessions (or a session and a training run) that each
set it overwrite each other. :func:`torch_threads` sets it for the duration of a block and restores the
previous value, so a session can carry its own count and apply it around each of its calls.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave the setting alone)."""
    if n is None:
        yield
        return
    import torch

    with _LOCK:
        before = torch.get_num_threads()
        if before != int(n):
            torch.set_num_threads(int(n))
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
