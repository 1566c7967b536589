"""Many independent streams over one :class:`~trellis_export.runtime.base.Session`.

A :class:`StreamPool` keeps one batch-1 state per open stream (keyed by any hashable id: a string, a
Triton correlation id ...). :meth:`StreamPool.step` advances one stream; :meth:`StreamPool.step_many`
advances several at once, stacking the rows of all streams that bring the same number of tokens T into
one ``session.step`` call (the rows may sit at different positions: the op resets and advances each
row on its own ``position``). Each stream's logits equal those of running that stream alone (the
streaming contract, TRELLIS_SPEC.md section 6, holds row by row).

Capacity: at most ``capacity`` streams are open; :meth:`open` beyond that raises :class:`PoolFull`
(after expiring idle streams). Idle expiry: a stream not stepped for ``idle_timeout`` seconds is
dropped; stepping it afterwards raises :class:`StreamExpired`, which says so (the pool remembers the
ids of recently expired streams for that message).

Thread safety: every method may be called from any thread. The table of streams is guarded by one
lock that is never held while the model runs; each stream has its own lock, taken (in a fixed global
order, so concurrent ``step_many`` calls cannot deadlock) for the whole of a step, so two calls on the
same stream run one after the other and calls on different streams run concurrently.

Numpy and the session only: importing this module never imports torch.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import TrellisExportError
from .base import InputError, Session, StateDict, StateError

__all__ = ["PoolError", "PoolFull", "StreamExists", "StreamExpired", "StreamPool", "UnknownStream"]


class PoolError(TrellisExportError):
    """A stream-pool operation cannot be done; the message names the stream."""


class UnknownStream(PoolError, KeyError):
    """No open stream has this id (never opened, closed, or expired)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StreamExpired(UnknownStream):
    """The stream was dropped after ``idle_timeout`` seconds without a step."""


class StreamExists(PoolError):
    """``open`` of an id that is already open (pass ``reset=True`` to start it again)."""


class PoolFull(PoolError):
    """``open`` while ``capacity`` streams are open and none is idle long enough to expire."""


@dataclass(eq=False)
class _Stream:
    sid: Hashable
    serial: int
    state: StateDict
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    busy: int = 0          # steps in flight (guarded by the pool lock); busy streams never expire
    tokens: int = 0


def _session_max_batch(session: Session) -> int | None:
    """The largest batch a session takes in one call, when it has a limit (TensorRT profiles)."""
    profiles = getattr(session, "profiles", None)
    try:
        return max(int(p.batch[1]) for p in profiles) if profiles else None
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def _as_ids(ids: Any, sid: Hashable) -> np.ndarray:
    """``ids`` as a [1, T] array: accepts [T] or [1, T] (list or array)."""
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] != 1 or arr.shape[1] < 1:
        raise InputError(f"stream {sid!r}: ids must be [T] or [1, T] with T >= 1, got shape "
                         f"{list(arr.shape)}")
    return arr


class StreamPool:
    """Independent streams over one session (any backend).

    ``capacity``: the most streams open at once. ``idle_timeout``: seconds after which a stream that was
    not stepped expires (None: never). ``clock``: the time source (``time.monotonic``; tests pass a fake).
    ``remember_expired``: how many expired ids are remembered for the :class:`StreamExpired` message.
    ``max_batch``: the most rows of one session call (None: the session's own limit, e.g. the largest
    batch of a TensorRT engine's profiles, else unlimited); bigger groups run as several calls.
    """

    def __init__(self, session: Session, *, capacity: int = 64, idle_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic, remember_expired: int = 4096,
                 max_batch: int | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise PoolError(f"capacity must be an integer >= 1, got {capacity!r}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise PoolError(f"idle_timeout must be > 0 seconds or None, got {idle_timeout!r}")
        if max_batch is None:
            max_batch = _session_max_batch(session)
        if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
            raise PoolError(f"max_batch must be an integer >= 1 or None, got {max_batch!r}")
        self.session = session
        self.max_batch = None if max_batch is None else int(max_batch)
        self.capacity = capacity
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[Hashable, _Stream] = {}
        self._expired: OrderedDict[Hashable, float] = OrderedDict()
        self._remember = max(0, int(remember_expired))
        self._serial = itertools.count()
        self.calls = 0          # session.step calls made (one per T group of a step_many)
        self.rows = 0           # rows stepped in those calls

    # ------------------------------------------------------------------ table
    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def __contains__(self, stream_id: Hashable) -> bool:
        with self._lock:
            return stream_id in self._streams

    def stream_ids(self) -> list[Hashable]:
        """The open streams, oldest first."""
        with self._lock:
            return list(self._streams)

    def position(self, stream_id: Hashable) -> int:
        """Tokens the stream has consumed (its state's ``position``)."""
        s = self._get(stream_id)
        with s.lock:
            return int(s.state["position"][0])

    def open(self, stream_id: Hashable, *, reset: bool = False, state: Mapping[str, np.ndarray] | None = None
             ) -> None:
        """Open a stream at position 0 (or at ``state``, a batch-1 state of this model).

        An id that is already open raises :class:`StreamExists` unless ``reset=True``, which starts it
        again from scratch (Triton's START on a live correlation id).
        """
        if state is None:
            new_state = self.session.init_state(1)
        else:
            self.session.validate_state(state, batch=1, source=f"stream {stream_id!r} state")
            new_state = {k: np.array(v, copy=True) for k, v in state.items()}
        while True:
            with self._lock:
                now = self._clock()
                self._expire_locked(now)
                old = self._streams.get(stream_id)
                if old is not None and not reset:
                    raise StreamExists(f"stream {stream_id!r} is already open (close it first, or open it "
                                       "with reset=True to start it again)")
                if old is None and len(self._streams) >= self.capacity:
                    raise PoolFull(f"cannot open stream {stream_id!r}: the pool is full ({self.capacity} "
                                   "streams open, none idle long enough to expire); close a stream first")
                if old is None or old.lock.acquire(blocking=False):
                    if old is not None:     # replaced while not stepping: drop it under its own lock
                        old.closed = True
                        del self._streams[stream_id]
                        old.lock.release()
                    self._streams[stream_id] = _Stream(stream_id, next(self._serial), new_state, now)
                    self._expired.pop(stream_id, None)
                    return
            with old.lock:      # a step of the old stream is in flight: wait for it, then retry
                pass

    def close(self, stream_id: Hashable) -> None:
        """Free the stream's state. A step in flight on it finishes first."""
        s = self._get(stream_id)
        with s.lock, self._lock:
            if self._streams.get(stream_id) is s:
                del self._streams[stream_id]
            s.closed = True

    def close_all(self) -> None:
        for sid in self.stream_ids():
            try:
                self.close(sid)
            except UnknownStream:
                pass

    def expire_idle(self) -> list[Hashable]:
        """Drop the streams idle for more than ``idle_timeout`` seconds; returns their ids."""
        with self._lock:
            return self._expire_locked(self._clock())

    def _expire_locked(self, now: float) -> list[Hashable]:
        if self.idle_timeout is None:
            return []
        gone = [sid for sid, s in self._streams.items()
                if s.busy == 0 and now - s.last_used > self.idle_timeout]
        for sid in gone:
            s = self._streams.pop(sid)
            s.closed = True
            if self._remember:
                self._expired[sid] = now - s.last_used
                self._expired.move_to_end(sid)
                while len(self._expired) > self._remember:
                    self._expired.popitem(last=False)
        return gone

    def _get(self, stream_id: Hashable) -> _Stream:
        with self._lock:
            self._expire_locked(self._clock())
            return self._get_locked(stream_id)

    def _get_locked(self, stream_id: Hashable) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            idle = self._expired.get(stream_id)
            if idle is not None:
                raise StreamExpired(f"stream {stream_id!r} expired after {idle:.1f} s idle (idle timeout "
                                    f"{self.idle_timeout:g} s); open it again to start a new stream")
            raise UnknownStream(f"stream {stream_id!r} is not open (never opened, or closed)")
        return s

    # ------------------------------------------------------------------ files
    def save(self, stream_id: Hashable, path: str | os.PathLike[str]) -> None:
        """Write the stream's state (safetensors, with the model's fingerprint; atomic)."""
        s = self._get(stream_id)
        with s.lock:
            if s.closed:
                raise UnknownStream(f"stream {stream_id!r} was closed")
            self.session.save_state(s.state, path)

    def restore(self, stream_id: Hashable, path: str | os.PathLike[str], *, reset: bool = False) -> None:
        """Open ``stream_id`` at the state saved in ``path`` (refused if it is from another model)."""
        state = self.session.load_state(path)
        if int(state["position"].shape[0]) != 1:
            raise StateError(f"{path}: holds {state['position'].shape[0]} rows; a stream restores from a "
                             "batch-1 state")
        self.open(stream_id, reset=reset, state=state)

    def get_state(self, stream_id: Hashable) -> StateDict:
        """A copy of the stream's batch-1 state."""
        s = self._get(stream_id)
        with s.lock:
            return {k: v.copy() for k, v in s.state.items()}

    # ------------------------------------------------------------------ run
    def step(self, stream_id: Hashable, ids: Any) -> np.ndarray:
        """Feed ``ids`` ([T] or [1, T]) to one stream; returns its logits ``[T, vocab]``."""
        return self.step_many({stream_id: ids})[stream_id]

    def check_ids(self, stream_id: Hashable, ids: Any) -> np.ndarray:
        """``ids`` as a validated int64 [1, T] array, or :class:`InputError` naming the stream."""
        arr = _as_ids(ids, stream_id)
        try:
            return self.session.check_input_ids(arr)
        except InputError as exc:
            raise InputError(f"stream {stream_id!r}: {exc}") from None

    def step_many(self, requests: Mapping[Any, Any] | Iterable[tuple[Any, Any]], *,
                  return_errors: bool = False) -> dict[Hashable, Any]:
        """Advance several streams; ``requests`` maps stream id -> ids ([T] or [1, T]).

        The rows of all streams with the same T run as one ``session.step`` call. Returns stream id ->
        logits ``[T, vocab]``. A bad request (unknown or expired stream, ids outside the vocabulary,
        wrong shape) raises before anything runs, unless ``return_errors=True``: then its entry in the
        result is the exception and the other streams run normally. A session call that fails (e.g. a T
        outside a TensorRT engine's profiles) raises, or with ``return_errors`` becomes the entry of
        each stream of that call, whose states stay where they were.
        """
        items = list(requests.items()) if isinstance(requests, Mapping) else list(requests)
        errors: dict[Hashable, Exception] = {}
        checked: list[tuple[Hashable, np.ndarray]] = []
        seen: set[Hashable] = set()
        shaped: list[tuple[Hashable, np.ndarray]] = []
        for sid, ids in items:
            if sid in seen:
                raise PoolError(f"stream {sid!r} appears twice in one step_many call")
            seen.add(sid)
            try:
                shaped.append((sid, _as_ids(ids, sid)))
            except InputError as exc:
                errors[sid] = exc
        # one vectorised range check for all requests; the per-stream check (and its message) only
        # when something is off
        flat = [a.reshape(-1) for _, a in shaped]
        vocab = self.session.config.vocab_size
        if shaped and all(a.dtype.kind in "iu" for a in flat):
            allids = np.concatenate(flat) if len(flat) > 1 else flat[0]
            fast = int(allids.min()) >= 0 and int(allids.max()) < vocab
        else:
            fast = False
        for sid, arr in shaped:
            if fast:
                checked.append((sid, np.ascontiguousarray(arr, dtype=np.int64)))
                continue
            try:
                checked.append((sid, self.check_ids(sid, arr)))
            except InputError as exc:
                errors[sid] = exc
        streams: list[tuple[_Stream, np.ndarray]] = []
        with self._lock:
            self._expire_locked(self._clock())
            for sid, ids in checked:
                try:
                    s = self._get_locked(sid)
                except UnknownStream as exc:
                    errors[sid] = exc
                    continue
                streams.append((s, ids))
            if errors and not return_errors:
                first = next(iter(errors.values()))
                raise first
            for s, _ in streams:
                s.busy += 1
        results: dict[Hashable, Any] = dict(errors)
        order = sorted(streams, key=lambda x: x[0].serial)
        locked: list[_Stream] = []
        try:
            for s, _ in order:
                s.lock.acquire()
                locked.append(s)
            live = []
            for s, ids in order:
                if s.closed:        # closed or replaced while this call waited for its lock
                    results[s.sid] = UnknownStream(f"stream {s.sid!r} was closed while the step waited")
                else:
                    live.append((s, ids))
            groups: dict[int, list[tuple[_Stream, np.ndarray]]] = {}
            for s, ids in live:
                groups.setdefault(int(ids.shape[1]), []).append((s, ids))
            step = self.max_batch or max(1, len(live))
            for group in groups.values():
                for k in range(0, len(group), step):
                    chunk = group[k:k + step]
                    try:
                        self._run_group(chunk, results)
                    except TrellisExportError as exc:   # e.g. a T outside a TensorRT engine's profiles
                        if not return_errors:
                            raise
                        for s, _ in chunk:              # these streams did not advance
                            results[s.sid] = exc
        finally:
            for s in locked:
                s.lock.release()
            with self._lock:
                now = self._clock()
                for s, _ in streams:
                    s.busy -= 1
                    s.last_used = now
        if not return_errors:
            for v in results.values():
                if isinstance(v, Exception):
                    raise v
        return {sid: results[sid] for sid, _ in items if sid in results}

    def _run_group(self, group: list[tuple[_Stream, np.ndarray]], results: dict[Hashable, Any]) -> None:
        names = [t.name for t in self.session.state_spec]
        if len(group) == 1:
            s, ids = group[0]
            batch_ids, state = ids, s.state
        else:
            batch_ids = np.concatenate([ids for _, ids in group], axis=0)
            state = {n: np.concatenate([s.state[n] for s, _ in group], axis=0) for n in names}
        logits, new = self.session.step(batch_ids, state)
        self.calls += 1
        self.rows += len(group)
        for i, (s, ids) in enumerate(group):
            s.state = {n: new[n][i:i + 1] for n in names}
            s.tokens += int(ids.shape[1])
            results[s.sid] = logits[i]
