"""A small text progress line for library loops (no click outside ``cli/``).

``progress_iter(items, label, show, enabled)`` yields ``items`` and, when enabled, redraws one
stderr line ``label  done/total  <show()>`` at most every 0.2 s, ending it with a newline.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def progress_iter(items: Sequence[T], label: str, show: Callable[[], str] = lambda: "", enabled: bool = True,
                  every: float = 0.2) -> Iterator[T]:
    """Iterate ``items`` with a progress line on stderr (nothing when not ``enabled``)."""
    total = len(items)
    last = 0.0
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if enabled and (now - last >= every or done == total):
                last = now
                extra = show()
                sys.stderr.write(f"\r{label}  {done}/{total}" + (f"  {extra}" if extra else "") + "\x1b[K")
                sys.stderr.flush()
    finally:
        if enabled and done:
            sys.stderr.write("\n")
            sys.stderr.flush()
