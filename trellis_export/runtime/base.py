"""The streaming-session interface shared by every runtime backend (TRELLIS_SPEC.md section 6).

A :class:`Session` runs ``step(input_ids[B, T], state) -> (logits[B, T, vocab], next_state)`` on numpy
arrays. ``state`` is a flat ``dict[str, np.ndarray]`` keyed by the state-spec names without prefix
(``position``, ``0.key_memory`` ...; see :mod:`trellis_export.state`). Every state that enters a session
is checked against the session's spec: a missing, extra, mis-shaped or mis-typed tensor, or a state
saved by another model (fingerprint), is refused with a :class:`StateError` that names the tensor and
what was expected.

This module imports numpy and safetensors only (never torch): the ORT backend builds on it.
"""

from __future__ import annotations

import json
import os
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TrellisConfig
from ..errors import TrellisExportError, first_line
from ..fileio import atomic_write_bytes
from ..state import StateTensor, state_spec, state_spec_json

StateDict = dict[str, np.ndarray]

#: ``format`` value in the safetensors metadata of a saved state.
STATE_FORMAT = "trellis-state"
STATE_FORMAT_VERSION = "1"


class StateError(TrellisExportError, ValueError):
    """A state (in memory or on disk) does not fit the session's model; the message names the tensor."""


class InputError(TrellisExportError, ValueError):
    """``input_ids`` is not an integer [B, T] array of token ids inside the vocabulary."""


class SessionError(TrellisExportError):
    """A session cannot be opened: missing or unreadable model file, missing metadata, bad backend."""


def _dtype_name(x: np.ndarray) -> str:
    return str(x.dtype)


class Session(ABC):
    """A streaming inference session of one Trellis model.

    Attributes set by every backend: ``backend`` (``"torch"`` | ``"ort"``), ``config``
    (:class:`TrellisConfig`), ``fingerprint`` (config + weights, see :mod:`trellis_export.checkpoint`),
    ``activation_dtype`` (``"float32"`` | ``"float16"`` | ``"float64"``), ``memory_dtype`` (float32, or
    float64 for the float64 reference session), ``providers`` (what actually runs the model).
    """

    backend: str = "?"
    config: TrellisConfig
    fingerprint: str
    activation_dtype: str = "float32"
    memory_dtype: str = "float32"
    providers: list[str]
    #: Refuse states holding NaN / Inf (at :meth:`step`, :meth:`load_state`, :meth:`save_state`), naming
    #: the tensor. Set to False on a session to skip the check (one pass over the state per call).
    check_finite: bool = True
    #: Skip re-validating a state this session itself returned from :meth:`step`: the dict passed back
    #: holds exactly the arrays the session produced, under the same names (checked by identity, one
    #: lookup per tensor; the session keeps weak references only). The checks of
    #: :meth:`validate_state` (shapes, dtypes, position, NaN / Inf) then are not repeated; arrays
    #: changed in place are not re-checked. Set to False to validate every state on every call.
    trust_own_state: bool = True
    #: How many returned states :attr:`trust_own_state` remembers (several streams stepped in turn).
    OWN_STATES_REMEMBERED = 16

    # ------------------------------------------------------------------ spec
    @property
    def state_spec(self) -> list[StateTensor]:
        """The state tensors of this model, in graph order."""
        return state_spec(self.config)

    def state_spec_json(self) -> str:
        return state_spec_json(self.config, self.activation_dtype)

    def state_dtype(self, tensor: StateTensor) -> np.dtype:
        """The numpy dtype this session expects for one state tensor."""
        if tensor.dtype == "int64":
            return np.dtype(np.int64)
        if tensor.dtype == "activation":
            return np.dtype(self.activation_dtype)
        return np.dtype(self.memory_dtype)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "fingerprint": self.fingerprint,
                "activation_dtype": self.activation_dtype, "memory_dtype": self.memory_dtype,
                "providers": list(self.providers), "config": self.config.to_dict()}

    # ------------------------------------------------------------------ state
    def init_state(self, batch: int) -> StateDict:
        """A zero state at position 0 for ``batch`` rows: a valid start for every row."""
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise StateError(f"batch must be an integer >= 1, got {batch!r}")
        return {t.name: np.zeros(t.concrete_shape(int(batch)), dtype=self.state_dtype(t))
                for t in self.state_spec}

    def validate_state(self, state: Mapping[str, Any], batch: int | None = None,
                       source: str = "state", finite: bool | None = None) -> int:
        """Check ``state`` against the spec; return its batch size. Raises :class:`StateError`.

        ``finite`` (default: ``self.check_finite``): also refuse float tensors holding NaN / Inf.
        """
        if not isinstance(state, Mapping):
            raise StateError(f"{source}: expected a dict of state tensors keyed by the state-spec names "
                             f"(position, 0.key_memory, ...), got {type(state).__name__}")
        spec = self.state_spec
        names = [t.name for t in spec]
        missing = [n for n in names if n not in state]
        if missing:
            raise StateError(f"{source}: missing state tensor(s) {', '.join(missing)} (this model's state "
                             f"has {len(names)} tensors: {', '.join(names)})")
        extra = sorted(str(n) for n in state if n not in names)
        if extra:
            raise StateError(f"{source}: unexpected state tensor(s) {', '.join(extra)}; this model's "
                             f"state is exactly {', '.join(names)}")
        for t in spec:
            x = state[t.name]
            if not isinstance(x, np.ndarray):
                raise StateError(f"{source}: state tensor '{t.name}' must be a numpy array, got "
                                 f"{type(x).__name__}")
        if batch is None:   # the batch most tensors agree on, so that the odd one out is named
            leading = [int(state[t.name].shape[0]) for t in spec if state[t.name].ndim >= 1]
            batch = max(set(leading), key=leading.count) if leading else 1
        for t in spec:
            x = state[t.name]
            want_shape = t.concrete_shape(batch if batch is not None else 1)
            if tuple(x.shape) != want_shape:
                raise StateError(f"{source}: state tensor '{t.name}' has shape {list(x.shape)}, expected "
                                 f"{list(want_shape)} ([{', '.join(str(s) for s in t.shape)}] with "
                                 f"B = {batch})")
            want = self.state_dtype(t)
            if x.dtype != want:
                raise StateError(f"{source}: state tensor '{t.name}' has dtype {_dtype_name(x)}, "
                                 f"expected {want}")
        pos = state["position"]
        if (pos < 0).any():
            raise StateError(f"{source}: state tensor 'position' must be >= 0, got {pos.tolist()}")
        if self.check_finite if finite is None else finite:
            for t in spec:
                x = state[t.name]
                if x.dtype.kind == "f" and not np.isfinite(x).all():
                    nan = int(np.isnan(x).sum())
                    inf = int(np.isinf(x).sum())
                    raise StateError(f"{source}: state tensor '{t.name}' holds non-finite values ({nan} NaN, "
                                     f"{inf} Inf); refusing it (session.check_finite = False skips this "
                                     "check)")
        assert batch is not None
        return batch

    def check_input_ids(self, input_ids: Any) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise InputError(f"input_ids must be a [B, T] array with B >= 1 and T >= 1, got shape "
                             f"{list(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise InputError(f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size), got "
                             f"values in [{lo}, {hi}]")
        return np.ascontiguousarray(ids, dtype=np.int64)

    # ------------------------------------------------------------------ run
    def step(self, input_ids: Any, state: Mapping[str, np.ndarray] | None = None
             ) -> tuple[np.ndarray, StateDict]:
        """Consume ``input_ids [B, T]``; return ``logits [B, T, vocab]`` and the next state.

        ``state=None`` starts every row fresh. Any split of a stream into calls gives the logits of one
        call over the whole stream.
        """
        ids = self.check_input_ids(input_ids)
        if state is None:
            state = self.init_state(ids.shape[0])
        elif not (self.trust_own_state and self._is_own_state(state, ids.shape[0])):
            self.validate_state(state, batch=ids.shape[0], source=f"state (batch {ids.shape[0]} "
                                "like input_ids)")
        logits, new_state = self._run(ids, dict(state))
        # a state is trusted (not re-validated next call) only when this step's logits are finite: a
        # NaN / Inf the model produced reaches the logits through the memory read, and the next step
        # then validates the state in full and names the tensor (one reduction here, not one per tensor)
        if self.trust_own_state and (not self.check_finite or np.isfinite(logits.sum())):
            self._remember_state(new_state, ids.shape[0])
        return logits, new_state

    def _is_own_state(self, state: Mapping[str, Any], batch: int) -> bool:
        """Whether ``state`` holds exactly the arrays of a state this session returned (same names,
        same array objects, that batch)."""
        own = self.__dict__.get("_own_states")
        if not own or not isinstance(state, Mapping):
            return False
        pos = state.get("position")
        entry = own.get(id(pos))
        if entry is None or entry[0] != batch or len(state) != len(entry[1]):
            return False
        try:
            return all(state[name] is ref() for name, ref in entry[1])
        except KeyError:
            return False

    def _remember_state(self, state: StateDict, batch: int) -> None:
        own = self.__dict__.get("_own_states")
        if own is None:
            own = self.__dict__["_own_states"] = {}
        pos = state.get("position")
        if pos is None:
            return
        try:
            refs = tuple((name, weakref.ref(x)) for name, x in state.items())
        except TypeError:     # a backend returning objects without weak references: never trusted
            return
        key = id(pos)
        own.pop(key, None)
        own[key] = (batch, refs)
        while len(own) > self.OWN_STATES_REMEMBERED:
            own.pop(next(iter(own)))

    def timed_call(self, input_ids: Any, state: Mapping[str, np.ndarray] | None = None
                   ) -> Callable[[], Any]:
        """A cheap prepared call for timing (what ``bench`` times): the inputs are checked once, and
        each call runs the backend on the same ids from the same ``state`` (its output state is
        dropped), with none of :meth:`step`'s per-call checks."""
        ids = self.check_input_ids(input_ids)
        if state is None:
            state = self.init_state(ids.shape[0])
        else:
            self.validate_state(state, batch=ids.shape[0])
        fixed = dict(state)
        return lambda: self._run(ids, fixed)

    @abstractmethod
    def _run(self, input_ids: np.ndarray, state: StateDict) -> tuple[np.ndarray, StateDict]:
        """Backend call on validated inputs."""

    # ------------------------------------------------------------------ rows
    def reset_rows(self, state: Mapping[str, np.ndarray], rows: Sequence[int] | np.ndarray) -> StateDict:
        """A copy of ``state`` whose ``rows`` start a new stream (zero-filled, position 0). A row holding
        NaN / Inf may be reset (that is how a diverged stream recovers)."""
        batch = self.validate_state(state, finite=False)
        idx = self._rows(rows, batch)
        out = {k: v.copy() for k, v in state.items()}
        for v in out.values():
            v[idx] = 0
        return out

    def select_rows(self, state: Mapping[str, np.ndarray], rows: Sequence[int] | np.ndarray) -> StateDict:
        """The state of ``rows`` only, in that order (e.g. to drop finished streams)."""
        batch = self.validate_state(state, finite=False)
        idx = self._rows(rows, batch)
        return {k: np.ascontiguousarray(v[idx]) for k, v in state.items()}

    def concat_states(self, states: Sequence[Mapping[str, np.ndarray]]) -> StateDict:
        """Stack the rows of several states (e.g. to admit a new stream into a running batch)."""
        if not states:
            raise StateError("concat_states: no states given")
        for i, s in enumerate(states):
            self.validate_state(s, source=f"states[{i}]")
        return {t.name: np.concatenate([s[t.name] for s in states], axis=0) for t in self.state_spec}

    @staticmethod
    def _rows(rows: Sequence[int] | np.ndarray, batch: int) -> np.ndarray:
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= batch):
            raise StateError(f"rows {idx.tolist()} out of range for a state of batch {batch}")
        return idx

    # ------------------------------------------------------------------ files
    def save_state(self, state: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
        """Write ``state`` as safetensors (atomic), with this model's fingerprint and state spec."""
        from safetensors.numpy import save

        self.validate_state(state)
        meta = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION,
                "fingerprint": self.fingerprint, "state_spec": self.state_spec_json(),
                "memory_dtype": self.memory_dtype}
        data = save({k: np.ascontiguousarray(state[k]) for k in (t.name for t in self.state_spec)},
                    metadata=meta)
        atomic_write_bytes(path, data)

    def load_state(self, path: str | os.PathLike[str]) -> StateDict:
        """Read a state written by :meth:`save_state`, refusing one from another model or spec."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise StateError(f"{p}: no such state file")
        try:
            with safe_open(str(p), framework="numpy") as fh:
                meta = dict(fh.metadata() or {})
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError ...
            msg = first_line(exc)
            raise StateError(f"{p}: not a readable safetensors state file ({msg})") from None
        if meta.get("format") != STATE_FORMAT:
            raise StateError(f"{p}: not a trellis state file (metadata 'format' is "
                             f"{meta.get('format')!r}, expected {STATE_FORMAT!r})")
        stored = meta.get("fingerprint", "")
        if stored != self.fingerprint:
            raise StateError(f"{p}: state belongs to another model (fingerprint {stored[:12] or 'none'}, "
                             f"this model is {self.fingerprint[:12]})")
        try:
            spec = json.loads(meta["state_spec"])
        except (KeyError, json.JSONDecodeError):
            raise StateError(f"{p}: its metadata has no readable state spec ('state_spec'); save_state "
                             "writes one: the file was not written by a trellis-export session") from None
        if not isinstance(spec, dict) or spec.get("tensors") != json.loads(self.state_spec_json())["tensors"]:
            raise StateError(f"{p}: the state spec in its metadata differs from this model's state spec")
        self.validate_state(state, source=str(p))
        return state
