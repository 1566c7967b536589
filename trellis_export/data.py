"""Training data: multi-query associative recall (MQAR) and a deterministic character-level corpus.

MQAR (Zoology, Arora et al. 2023; Based, 2024). Token ids (vocabulary ``V``):

* ``0`` is the padding / filler token;
* keys are ``1 .. K`` and values are ``K+1 .. K+Vv`` with ``K = Vv = (V - 1) // 2`` unless given.

A sequence of length ``seq_len`` is ``k_1 v_1 k_2 v_2 ... k_N v_N`` (N distinct keys, values drawn
with replacement), followed by a query region of ``seq_len - 2N`` tokens split into pair slots; a
seeded random subset of ``num_queries`` slots holds ``k v`` for a key of the context (distinct keys,
each with the value it was paired with); every other position is ``0``. The model sees the value
after the query key (teacher forcing), and is scored only where the *next* token is the answer:
``targets[b, t]`` is the value when ``input_ids[b, t]`` is a query key, ``IGNORE`` elsewhere.

Every batch is a pure function of ``(spec, seed, batch index)`` (a private ``torch.Generator``), so
training resumes bit-for-bit without storing a data-loader state.

The character-level corpus is generated, not downloaded: :func:`generate_corpus` writes English-like
sentences from a small seeded grammar (plus arithmetic facts, which give the model something exact to
learn). Bytes are ASCII, so any model with ``vocab_size >= 128`` reads it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import TrellisExportError

#: Target value that the loss and the accuracy skip (same as ``torch.nn.CrossEntropyLoss``).
IGNORE = -100
PAD = 0


class DataError(TrellisExportError, ValueError):
    """A data-set parameter is invalid; the message names the parameter and what was expected."""


# --------------------------------------------------------------------------- MQAR
@dataclass(frozen=True)
class MQARSpec:
    """Shape of an MQAR task. ``num_keys`` / ``num_values`` 0 means ``(vocab_size - 1) // 2``."""

    vocab_size: int = 128
    num_pairs: int = 16
    seq_len: int = 64
    num_queries: int = 0          # 0: as many as fit (min(num_pairs, query slots))
    num_keys: int = 0
    num_values: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_pairs", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DataError(f"MQAR parameter '{name}' must be an integer >= 1, got {v!r}")
        for name in ("num_queries", "num_keys", "num_values"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DataError(f"MQAR parameter '{name}' must be an integer >= 0, got {v!r}")
        if self.vocab_size < 5:
            raise DataError(f"MQAR parameter 'vocab_size' must be >= 5, got {self.vocab_size}")
        if self.keys + self.values + 1 > self.vocab_size:
            raise DataError(f"MQAR needs 1 + num_keys + num_values <= vocab_size; got 1 + {self.keys} + "
                            f"{self.values} > {self.vocab_size}")
        if self.num_pairs > self.keys:
            raise DataError(f"MQAR parameter 'num_pairs' ({self.num_pairs}) must be <= the number of "
                            f"distinct keys ({self.keys})")
        if self.slots < 1:
            raise DataError(f"MQAR parameter 'seq_len' ({self.seq_len}) leaves no room for a query after "
                            f"{self.num_pairs} pairs; need seq_len >= 2 * num_pairs + 2 = "
                            f"{2 * self.num_pairs + 2}")
        if self.num_queries > min(self.num_pairs, self.slots):
            raise DataError(f"MQAR parameter 'num_queries' ({self.num_queries}) must be <= min(num_pairs, "
                            f"query slots) = {min(self.num_pairs, self.slots)}")

    @property
    def keys(self) -> int:
        return self.num_keys or (self.vocab_size - 1) // 2

    @property
    def values(self) -> int:
        return self.num_values or (self.vocab_size - 1) // 2

    @property
    def slots(self) -> int:
        """Pair slots in the query region."""
        return (self.seq_len - 2 * self.num_pairs) // 2

    @property
    def queries(self) -> int:
        return self.num_queries or min(self.num_pairs, self.slots)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _generator(seed: int, index: int) -> torch.Generator:
    g = torch.Generator()
    # A fixed odd multiplier keeps (seed, index) pairs apart; the result fits in int64.
    g.manual_seed((int(seed) * 1_000_003 + int(index)) % (2**62))
    return g


def mqar_batch(spec: MQARSpec, batch_size: int, seed: int, index: int = 0) -> tuple[Tensor, Tensor]:
    """``(input_ids [B, seq_len] int64, targets [B, seq_len] int64)``; a pure function of its arguments."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    g = _generator(seed, index)
    B, N, T, Q = batch_size, spec.num_pairs, spec.seq_len, spec.queries
    keys = torch.argsort(torch.rand(B, spec.keys, generator=g), dim=1)[:, :N] + 1            # distinct
    values = torch.randint(0, spec.values, (B, N), generator=g) + 1 + spec.keys
    ids = torch.full((B, T), PAD, dtype=torch.int64)
    targets = torch.full((B, T), IGNORE, dtype=torch.int64)
    ids[:, 0:2 * N:2] = keys
    ids[:, 1:2 * N:2] = values
    which = torch.argsort(torch.rand(B, N, generator=g), dim=1)[:, :Q]                       # pairs asked
    slot = torch.sort(torch.argsort(torch.rand(B, spec.slots, generator=g), dim=1)[:, :Q], dim=1).values
    kpos = 2 * N + 2 * slot                                                                  # [B, Q]
    qk = torch.gather(keys, 1, which)
    qv = torch.gather(values, 1, which)
    ids.scatter_(1, kpos, qk)
    ids.scatter_(1, kpos + 1, qv)
    targets.scatter_(1, kpos, qv)
    return ids, targets


# --------------------------------------------------------------------------- character corpus
_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the farmer", "a small bird", "the teacher",
             "our neighbour", "the captain", "a young girl", "the baker", "his brother", "the king",
             "a tired horse", "the children", "the river"]
_VERBS = ["sees", "finds", "likes", "carries", "watches", "follows", "paints", "remembers", "builds",
          "opens", "loses", "holds", "visits", "names", "cleans", "counts"]
_OBJECTS = ["a red box", "the green door", "an apple", "the long road", "a letter", "the bright lamp",
            "a wooden chair", "the quiet garden", "a silver coin", "the tall tree", "a blue cup",
            "the empty house", "a warm coat", "the stone bridge", "an old map", "the white boat"]
_PLACES = ["in the morning", "at night", "near the sea", "by the window", "after dinner", "in the rain",
           "on sunday", "under the bridge"]
_LINKS = ["and then", "because", "but", "while", "so"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}."
    clause = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.4:
        clause += f" {rng.choice(_PLACES)}"
    if rng.random() < 0.35:
        clause += (f", {rng.choice(_LINKS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
                   f"{rng.choice(_OBJECTS)}")
    s = clause + rng.choice([".", ".", ".", "!", "?"])
    return s[0].upper() + s[1:]


def generate_corpus(num_chars: int = 200_000, seed: int = 0) -> str:
    """Deterministic English-like ASCII text of exactly ``num_chars`` characters (paragraphs of sentences)."""
    if isinstance(num_chars, bool) or not isinstance(num_chars, int) or num_chars < 1:
        raise DataError(f"num_chars must be an integer >= 1, got {num_chars!r}")
    rng = random.Random(seed)
    parts: list[str] = []
    n = 0
    while n < num_chars:
        para = " ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) + "\n"
        parts.append(para)
        n += len(para)
    return "".join(parts)[:num_chars]


@dataclass(frozen=True)
class CharCorpus:
    """A byte-level corpus split into train / validation token streams."""

    train: Tensor
    valid: Tensor

    @classmethod
    def build(cls, num_chars: int = 200_000, seed: int = 0, valid_fraction: float = 0.1) -> CharCorpus:
        if not 0.0 < valid_fraction < 1.0:
            raise DataError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
        text = generate_corpus(num_chars, seed)
        ids = torch.tensor(list(text.encode("ascii")), dtype=torch.int64)
        cut = int(len(ids) * (1.0 - valid_fraction))
        return cls(ids[:cut], ids[cut:])

    @property
    def max_token(self) -> int:
        return int(torch.maximum(self.train.max(), self.valid.max()))


def char_batch(stream: Tensor, batch_size: int, seq_len: int, seed: int, index: int = 0
               ) -> tuple[Tensor, Tensor]:
    """Random windows of ``stream``: ``(input_ids [B, T], targets [B, T])``, targets shifted by one."""
    if stream.numel() < seq_len + 2:
        raise DataError(f"corpus of {stream.numel()} tokens is too short for seq_len {seq_len}")
    g = _generator(seed, index)
    start = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=g)
    offs = start[:, None] + torch.arange(seq_len + 1)[None, :]
    window = stream[offs]
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def char_eval_batches(stream: Tensor, batch_size: int, seq_len: int, max_batches: int
                      ) -> list[tuple[Tensor, Tensor]]:
    """Consecutive, non-overlapping windows from the start of ``stream`` (deterministic evaluation)."""
    n = (stream.numel() - 1) // seq_len
    out = []
    for i in range(0, min(n, batch_size * max_batches), batch_size):
        rows = range(i, min(i + batch_size, n))
        x = torch.stack([stream[r * seq_len:(r + 1) * seq_len] for r in rows])
        y = torch.stack([stream[r * seq_len + 1:(r + 1) * seq_len + 1] for r in rows])
        out.append((x, y))
    return out
