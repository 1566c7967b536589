"""Parsing of the bench command's values: sizes (``1k`` = 1024), comma lists, warm-up amounts.

Plain functions raise :class:`ValueError` with a message; the click parameter types in
``trellis_export.cli.bench`` turn it into a usage error that names the flag.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

#: Binary multipliers of size suffixes: ``1k`` = 1024 tokens, ``1m`` = 1024 * 1024.
SIZE_SUFFIXES: dict[str, int] = {"": 1, "k": 1024, "m": 1024 * 1024}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")


def parse_size(text: str, minimum: int = 1) -> int:
    """``"256"`` -> 256, ``"1k"`` -> 1024, ``"64K"`` -> 65536, ``"1m"`` -> 1048576."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size: expected an integer with an optional k / m suffix "
                         "(1k = 1024), e.g. 256, 1k, 64k")
    value = int(match.group(1)) * SIZE_SUFFIXES[match.group(2).lower()]
    if value < minimum:
        raise ValueError(f"{text!r} must be >= {minimum}")
    return value


def parse_size_list(text: str, minimum: int = 1) -> list[int]:
    """A comma list of sizes, ascending, duplicates removed: ``"8k,1k,1024"`` -> [1024, 8192]."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{text!r} is empty: expected a comma-separated list such as 1k,8k,64k")
    return sorted({parse_size(p, minimum) for p in parts})


def split_choices(values: Iterable[str], choices: Iterable[str]) -> list[str]:
    """Repeatable and/or comma-separated choices (``--backend torch,ort --backend trt``), in order,
    each once."""
    allowed = list(choices)
    out: list[str] = []
    for value in values:
        for part in str(value).split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in allowed:
                raise ValueError(f"{part.strip()!r} is not one of {', '.join(allowed)}")
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"no value given: expected one or more of {', '.join(allowed)}")
    return out


@dataclass(frozen=True)
class Amount:
    """A warm-up amount, like trtexec's ``--warmUp``: either seconds or a number of iterations."""

    seconds: float | None = None
    iterations: int | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"seconds": self.seconds, "iterations": self.iterations}

    def __str__(self) -> str:
        return f"{self.iterations}it" if self.iterations is not None else f"{self.seconds:g}s"


_AMOUNT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|ms|it|iter|iters|x)?\s*$", re.IGNORECASE)


def parse_amount(text: str) -> Amount:
    """``"0.5"`` / ``"0.5s"`` -> 0.5 s, ``"200ms"`` -> 0.2 s, ``"10it"`` / ``"10x"`` -> 10 iterations."""
    match = _AMOUNT_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a warm-up amount: expected seconds (0.5, 0.5s, 200ms) or "
                         "iterations (10it)")
    number, unit = match.group(1), (match.group(2) or "s").lower()
    if unit in ("it", "iter", "iters", "x"):
        if "." in number:
            raise ValueError(f"{text!r}: a number of iterations must be an integer")
        return Amount(iterations=int(number))
    seconds = float(number) / (1000.0 if unit == "ms" else 1.0)
    return Amount(seconds=seconds)


def parse_seconds(text: str) -> float:
    """A duration in seconds (``2``, ``2s``, ``500ms``); iterations are refused."""
    amount = parse_amount(text)
    if amount.seconds is None:
        raise ValueError(f"{text!r}: expected seconds (2, 2s, 500ms), not iterations")
    return amount.seconds
