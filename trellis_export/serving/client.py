"""A small gRPC client for a served Trellis model: sequences of requests under one correlation id.

>>> c = StreamClient("localhost:8001")                                       # doctest: +SKIP
>>> for tok in c.generate(c.encode("The baker "), 40): print(c.decode([tok]), end="")  # doctest: +SKIP

Each request is ``input_ids`` [1, T] (int64) in, ``logits`` [1, T, vocab] out; the first request of a
sequence carries START, the last END; the server keeps the state. Errors come back as
:class:`StreamError` with the server's message (a sequence the server does not know, because it ended,
expired or the server restarted, says so); every call has a timeout, so a dead server never hangs
the client.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import TrellisExportError


class StreamError(TrellisExportError):
    """A request failed; the message says why (server message, unreachable server, timeout)."""


def _explain(exc: Exception, url: str, seq: int) -> str:
    msg = getattr(exc, "message", None)
    msg = msg() if callable(msg) else (msg or str(exc))
    status = getattr(exc, "status", None)
    status = status() if callable(status) else status
    low = str(msg).lower()
    if "must specify the start flag" in low or ("start" in low and "sequence" in low and "first" in low):
        return (f"sequence {seq}: the server has no state for it (never started, ended, expired, or the "
                f"server restarted); start a new sequence ({msg})")
    if status in ("StatusCode.UNAVAILABLE",) or "unavailable" in low or "connect" in low:
        return f"server {url} unreachable ({msg})"
    if status == "StatusCode.DEADLINE_EXCEEDED" or "deadline" in low:
        return f"server {url} did not answer in time ({msg})"
    return str(msg)


@dataclass
class Latencies:
    """Per-request wall times (seconds) of one :meth:`StreamClient.generate`."""

    prefill: float = 0.0
    decode: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        d = np.asarray(self.decode) * 1e3
        out = {"prefill_ms": round(self.prefill * 1e3, 3), "decode_requests": int(d.size)}
        if d.size:
            out.update(decode_p50_ms=round(float(np.percentile(d, 50)), 3),
                       decode_p99_ms=round(float(np.percentile(d, 99)), 3),
                       decode_tokens_per_s=round(float(d.size / (d.sum() / 1e3)), 1))
        return out


class StreamClient:
    """gRPC client of a model served by ``trellis-export serve`` (default model name ``trellis``).

    ``timeout``: seconds per request (client-side deadline).
    """

    def __init__(self, url: str, model: str = "trellis", *, timeout: float = 30.0) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ImportError as exc:
            raise StreamError(f"the stream client needs tritonclient[grpc] ({exc}); pip install "
                              "'trellis-export[serve]'") from None
        self._g = grpcclient
        self.url = url
        self.model = model
        self.timeout = timeout
        from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

        # gRPC's default reconnect backoff (1 s, growing to 2 min) would keep failing fast long after a
        # restarted server is back; cap it at 1 s
        args = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000)]
        self.client = grpcclient.InferenceServerClient(url=url, channel_args=args)
        self.latencies = Latencies()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ server
    def vocab_size(self) -> int:
        try:
            meta = self.client.get_model_metadata(self.model, as_json=True, client_timeout=self.timeout)
        except Exception as exc:  # InferenceServerException or grpc errors
            raise StreamError(_explain(exc, self.url, 0)) from None
        out = next(o for o in meta["outputs"] if o["name"] == "logits")
        return int(out["shape"][-1])

    @staticmethod
    def new_sequence_id() -> int:
        return random.SystemRandom().randrange(1, 2 ** 63)

    # ------------------------------------------------------------------ requests
    def step(self, sequence_id: int, ids: Sequence[int] | np.ndarray, *, start: bool = False,
             end: bool = False, dtype: Any = np.int64) -> np.ndarray:
        """One request: ``ids`` ([T] or [1, T]) of sequence ``sequence_id``; returns logits [T, vocab].

        ``dtype`` exists for tests that send a wrong one.
        """
        arr = np.asarray(ids, dtype=dtype)
        if arr.ndim == 1:
            arr = arr[None, :]
        inp = self._g.InferInput("input_ids", list(arr.shape), self._datatype(arr.dtype))
        inp.set_data_from_numpy(arr)
        out = self._g.InferRequestedOutput("logits")
        try:
            res = self.client.infer(self.model, [inp], outputs=[out], sequence_id=int(sequence_id),
                                    sequence_start=start, sequence_end=end, client_timeout=self.timeout)
        except Exception as exc:
            raise StreamError(_explain(exc, self.url, int(sequence_id))) from None
        logits = res.as_numpy("logits")
        if logits is None:
            raise StreamError(f"sequence {sequence_id}: the response has no logits")
        return logits[0]

    @staticmethod
    def _datatype(dtype: np.dtype) -> str:
        from tritonclient.utils import np_to_triton_dtype

        return np_to_triton_dtype(np.dtype(dtype))

    # ------------------------------------------------------------------ text
    @staticmethod
    def encode(text: str) -> list[int]:
        """ASCII bytes as token ids (the char-LM's vocabulary); other characters become '?'."""
        return [b if b < 128 else 63 for b in text.encode("ascii", errors="replace")]

    @staticmethod
    def decode(ids: Sequence[int]) -> str:
        return "".join(chr(i) if 32 <= i < 127 or i in (9, 10) else "?" for i in ids)

    def generate(self, prompt: Sequence[int], n: int, *, temperature: float = 0.0, top_k: int = 0,
                 seed: int | None = None, sequence_id: int | None = None) -> Iterator[int]:
        """Prefill ``prompt`` in one START request, then ``n`` decode requests (one token each); the last
        carries END. Yields each new token as it comes; timings in ``self.latencies``.

        ``temperature`` 0: greedy; otherwise sampled (``top_k`` > 0 keeps the k most likely).
        """
        if not prompt:
            raise StreamError("the prompt is empty")
        if n < 1:
            raise StreamError("n must be >= 1")
        seq = sequence_id or self.new_sequence_id()
        rng = np.random.default_rng(seed)
        self.latencies = Latencies()
        t0 = time.perf_counter()
        logits = self.step(seq, list(prompt), start=True, end=False)[-1]
        self.latencies.prefill = time.perf_counter() - t0
        ended = False
        try:
            for i in range(n):
                tok = self._pick(logits, temperature, top_k, rng)
                yield tok
                if i == n - 1:
                    break
                last = i == n - 2
                t0 = time.perf_counter()
                logits = self.step(seq, [tok], end=last)[-1]
                self.latencies.decode.append(time.perf_counter() - t0)
                ended = last
        finally:
            if not ended:                       # n == 1, or the caller stopped early: free the state
                try:
                    self.step(seq, [int(prompt[-1])], end=True)
                except StreamError:
                    pass

    @staticmethod
    def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        if 0 < top_k < z.size:
            cut = np.partition(z, -top_k)[-top_k]
            z = np.where(z >= cut, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(rng.choice(z.size, p=p))
