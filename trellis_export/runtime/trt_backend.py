"""The TensorRT streaming backend: an engine from ``trellis-export engine`` behind the :class:`Session`
interface, on ``tensorrt`` or ``tensorrt_rtx_bindings``, with numpy and cuda-python's
``cuda.bindings`` only (no torch: light enough for a Jetson).

* Identity: the engine's sidecar (``<engine>.json``) gives the config, fingerprint and state spec; a
  state from another model is refused as on every backend.
* Device buffers: two sets of state buffers sized for the engine's largest batch, used in turn
  (ping-pong): call n reads ``past.*`` from one set and writes ``present.*`` into the other. The
  state a call returns is a :class:`DeviceState`, a read-only mapping whose arrays are copied to the
  host only when read; handing it back to :meth:`TrtSession.step` binds its buffers directly, so a
  stream of calls moves only ``input_ids`` in and ``logits`` out. Before a set is overwritten, a
  still-referenced handle that lives there is copied to the host first, so every handle stays valid.
* Profiles: one execution context per optimization profile (``decode`` for T = 1, ``prefill`` for
  the engine's token range), chosen per call; a call outside every profile is refused with the ranges.
* Plugin engines: the ``trellis::TrellisMemory`` creator is registered before deserialising.

GPU only, and **never run**: this project's CI has no GPU; the host-side logic (profile choice,
buffer plan, handle lifetimes) is tested on the CPU against a host-memory stand-in of the device
(``tests/test_trt_session.py``), and the GPU suite runs the real thing when a GPU is lent.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .base import InputError, Session, SessionError, StateDict, StateError

__all__ = ["TrtSession", "DeviceState", "Profile", "choose_profile", "CudaRuntime", "Device"]


@dataclass(frozen=True)
class Profile:
    """One optimization profile of the engine: index, name and the (min, max) of batch and tokens."""

    index: int
    name: str
    batch: tuple[int, int]
    tokens: tuple[int, int]

    def fits(self, B: int, T: int) -> bool:
        return self.batch[0] <= B <= self.batch[1] and self.tokens[0] <= T <= self.tokens[1]


def profiles_from_sidecar(side: Mapping[str, Any]) -> list[Profile]:
    return [Profile(int(p["index"]), str(p["name"]), (int(p["batch"]["min"]), int(p["batch"]["max"])),
                    (int(p["tokens"]["min"]), int(p["tokens"]["max"]))) for p in side["profiles"]]


def choose_profile(profiles: Sequence[Profile], B: int, T: int) -> Profile:
    """The profile a call of ``B`` rows and ``T`` tokens runs in: ``decode`` first for T = 1, else the
    first that fits. Raises :class:`InputError` listing the engine's ranges."""
    ordered = sorted(profiles, key=lambda p: (p.name != "decode") if T == 1 else (p.name == "decode"))
    for p in ordered:
        if p.fits(B, T):
            return p
    ranges = "; ".join(f"{p.name}: batch {p.batch[0]}..{p.batch[1]}, tokens {p.tokens[0]}..{p.tokens[1]}"
                       for p in profiles)
    raise InputError(f"input_ids [B={B}, T={T}] fits no profile of this engine ({ranges}); split the call "
                     "or rebuild the engine with wider --batch / --tokens")


class Device(Protocol):
    """The device-memory operations the session needs (cuda.bindings, or a host stand-in in tests)."""

    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def h2d(self, dst: int, src: np.ndarray) -> None: ...
    def d2h(self, dst: np.ndarray, src: int) -> None: ...
    def d2d(self, dst: int, src: int, nbytes: int) -> None: ...
    def synchronize(self) -> None: ...
    @property
    def stream(self) -> int: ...


class CudaRuntime:
    """:class:`Device` on ``cuda.bindings.runtime`` (one stream; copies are async on it)."""

    def __init__(self, device: int = 0) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise SessionError("the trt backend needs cuda-python's cuda.bindings "
                               '(pip install "cuda-bindings>=12.8,<13")') from None
        self.rt = cudart
        self._check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._stream = self._check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _check(self, res: Any, what: str) -> Any:
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            _, name = self.rt.cudaGetErrorName(err)
            raise SessionError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest

    @property
    def stream(self) -> int:
        return int(self._stream)

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def h2d(self, dst: int, src: np.ndarray) -> None:
        src = np.ascontiguousarray(src)
        self._check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
                    "cudaMemcpyAsync (host to device)")
        self.synchronize()              # the host array may go away when this returns

    def d2h(self, dst: np.ndarray, src: int) -> None:
        self._check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                    "cudaMemcpyAsync (device to host)")
        self.synchronize()

    def d2d(self, dst: int, src: int, nbytes: int) -> None:
        self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                            self._stream), "cudaMemcpyAsync (device to device)")

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")


class DeviceState(Mapping[str, np.ndarray]):
    """A state that lives in the session's device buffers; reading a tensor copies it to the host
    (once). Pass it back to the session's ``step`` to continue the stream without host copies."""

    def __init__(self, session: TrtSession, slot: int, batch: int, generation: int) -> None:
        self._session = weakref.ref(session)
        self.slot = slot
        self.batch = batch
        self.generation = generation
        self._host: StateDict | None = None

    def _materialise(self) -> StateDict:
        if self._host is None:
            s = self._session()
            if s is None:
                raise StateError("the TensorRT session that produced this state is closed")
            self._host = s._download(self.slot, self.batch)
        return self._host

    @property
    def on_device(self) -> bool:
        return self._host is None

    def __getitem__(self, key: str) -> np.ndarray:
        return self._materialise()[key]

    def __iter__(self) -> Iterator[str]:
        s = self._session()
        names = s._state_names if s is not None else list(self._materialise())
        return iter(names)

    def __len__(self) -> int:
        return len(list(iter(self)))

    def to_numpy(self) -> StateDict:
        """The state as a plain dict of host arrays (copies)."""
        return {k: v.copy() for k, v in self._materialise().items()}


class TrtSession(Session):
    """Streams a TensorRT engine built by ``trellis-export engine`` (see the module docstring).

    ``runtime``: ``"tensorrt-rtx"`` | ``"tensorrt"`` (default: the one the sidecar names). ``device``:
    the CUDA device index. ``device_api``: a :class:`Device` to use instead of cuda.bindings (tests).
    ``check_finite`` is accepted for interface parity; device states are not scanned (it would need
    a host copy), numpy states are checked by :class:`Session`.
    """

    backend = "trt"

    def __init__(self, engine_path: str | os.PathLike[str], *, runtime: str | None = None, device: int = 0,
                 device_api: Device | None = None, engine_api: Any = None) -> None:
        from ..plugins_trt.engine import EngineError, read_sidecar

        path = Path(engine_path)
        try:
            side = read_sidecar(path)
        except EngineError as exc:
            raise SessionError(str(exc)) from None
        self.engine_path = str(path)
        self.sidecar = side
        self.config = side["trellis_config"]
        self.fingerprint = str(side["fingerprint"])
        self.activation_dtype = str(side.get("activation_dtype", "float32"))
        self.memory_dtype = "float32"
        self.profiles = profiles_from_sidecar(side)
        if not self.profiles:
            raise SessionError(f"{path}: the sidecar lists no optimization profile")
        self._state_names = [t.name for t in self.state_spec]
        self.max_batch = max(p.batch[1] for p in self.profiles)
        self.max_tokens = max(p.tokens[1] for p in self.profiles)
        try:
            self.dev: Device = device_api if device_api is not None else CudaRuntime(device)
        except SessionError as exc:
            raise SessionError(f"{path}: a TensorRT engine runs on a CUDA GPU, and none is usable here "
                               f"({exc})") from None
        self._engine = engine_api if engine_api is not None else self._load_engine(path, runtime or
                                                                                    side.get("runtime"))
        self.providers = [f"{self._engine.runtime_name}-{self._engine.runtime_version}"]
        self._alloc()
        self._generation = 0
        self._live: dict[int, weakref.ref[DeviceState]] = {}   # slot -> newest handle living there

    # ------------------------------------------------------------------ set-up
    def _load_engine(self, path: Path, runtime: str | None) -> Any:
        return _TrtEngine(path, runtime, bool(self.sidecar.get("plugin")), self.profiles, self.dev)

    def _nbytes(self, shape: Sequence[int], dtype: np.dtype) -> int:
        return int(np.prod(shape)) * np.dtype(dtype).itemsize

    def _alloc(self) -> None:
        B = self.max_batch
        self._bufs: list[dict[str, int]] = []
        for _ in range(2):
            self._bufs.append({t.name: self.dev.malloc(self._nbytes(t.concrete_shape(B), self.state_dtype(t)))
                               for t in self.state_spec})
        act = np.dtype(self.activation_dtype)
        self._ids_buf = self.dev.malloc(B * self.max_tokens * 8)
        self._logits_buf = self.dev.malloc(B * self.max_tokens * self.config.vocab_size * act.itemsize)

    def close(self) -> None:
        """Free the device buffers (the handles this session returned become host-only or invalid)."""
        for slot in (0, 1):
            self._evict(slot)
        for bufs in getattr(self, "_bufs", []):
            for ptr in bufs.values():
                self.dev.free(ptr)
        for ptr in (getattr(self, "_ids_buf", 0), getattr(self, "_logits_buf", 0)):
            if ptr:
                self.dev.free(ptr)
        self._bufs = []
        self._ids_buf = self._logits_buf = 0

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(engine=self.engine_path, plugin=bool(self.sidecar.get("plugin")),
                   profiles=[p.__dict__ for p in self.profiles])
        return out

    # ------------------------------------------------------------------ state traffic
    def _download(self, slot: int, batch: int) -> StateDict:
        out: StateDict = {}
        for t in self.state_spec:
            arr = np.empty(t.concrete_shape(batch), dtype=self.state_dtype(t))
            self.dev.d2h(arr, self._bufs[slot][t.name])
            out[t.name] = arr
        return out

    def _upload(self, slot: int, state: Mapping[str, np.ndarray]) -> None:
        for t in self.state_spec:
            value = np.ascontiguousarray(state[t.name], dtype=self.state_dtype(t))
            self.dev.h2d(self._bufs[slot][t.name], value)

    def _evict(self, slot: int) -> None:
        """Copy a still-referenced handle living in ``slot`` to the host before the slot is reused."""
        ref = self._live.pop(slot, None)
        handle = ref() if ref is not None else None
        if handle is not None and handle.on_device:
            handle._materialise()

    # ------------------------------------------------------------------ run
    def step(self, input_ids: Any, state: Mapping[str, np.ndarray] | None = None
             ) -> tuple[np.ndarray, StateDict]:
        ids = self.check_input_ids(input_ids)
        B, T = ids.shape
        profile = choose_profile(self.profiles, B, T)
        src = self._source_slot(state, B)
        dst = 1 - src
        self._evict(dst)
        self.dev.h2d(self._ids_buf, ids)
        logits = np.empty((B, T, self.config.vocab_size), dtype=np.dtype(self.activation_dtype))
        self._engine.execute(profile, ids.shape, self._ids_buf, self._bufs[src], self._bufs[dst],
                             self._logits_buf, B)
        self.dev.d2h(logits, self._logits_buf)
        return logits, self._handle(dst, B)  # type: ignore[return-value]

    def _handle(self, slot: int, batch: int) -> DeviceState:
        """A new handle of the state in buffer set ``slot``, the one live there from now on."""
        self._generation += 1
        handle = DeviceState(self, slot, batch, self._generation)
        self._live[slot] = weakref.ref(handle)
        return handle

    def _source_slot(self, state: Mapping[str, np.ndarray] | None, B: int) -> int:
        """The buffer set holding the input state: a handle of this session on the device is used in
        place; anything else is validated and uploaded into a free set."""
        if isinstance(state, DeviceState) and state._session() is self and state.on_device:
            if state.batch != B:
                raise StateError(f"state has batch {state.batch}, input_ids has {B} rows")
            return state.slot
        if state is None:
            state = self.init_state(B)
        else:
            self.validate_state(state, batch=B, source=f"state (batch {B} like input_ids)")
        slot = 0 if 0 not in self._live else 1
        self._evict(slot)
        self._upload(slot, state)
        return slot

    def _run(self, input_ids: np.ndarray, state: StateDict) -> tuple[np.ndarray, StateDict]:
        logits, handle = self.step(input_ids, state)
        return logits, dict(handle)

    def timed_call(self, input_ids: Any, state: Mapping[str, np.ndarray] | None = None
                   ) -> Callable[[], Any]:
        """Each call steps from one device-resident state (uploaded once here) into the other buffer
        set, as a stream of calls does: input_ids in, logits out, no state traffic."""
        ids = self.check_input_ids(input_ids)
        handle = self.to_device(state, ids.shape[0])
        return lambda: self.step(ids, handle)

    def to_device(self, state: Mapping[str, np.ndarray] | None, batch: int) -> DeviceState:
        """``state`` (None: a fresh one) uploaded into one of the session's buffer sets, as a handle
        that :meth:`step` uses in place."""
        return self._handle(self._source_slot(state, batch), batch)


class _TrtEngine:
    """The TensorRT side: runtime, engine, one execution context per profile, tensor binding."""

    def __init__(self, path: Path, runtime: str | None, plugin: bool, profiles: Sequence[Profile],
                 dev: Device) -> None:
        from ..plugins_trt.runtimes import load_tensorrt

        rt = load_tensorrt(runtime)
        trt = rt.trt
        self.runtime_name, self.runtime_version = rt.name, rt.version
        if plugin:
            from ..plugins_trt import plugin_v3

            plugin_v3.register(trt)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise SessionError(f"{path}: {rt.name} {rt.version} cannot deserialise this engine (built for "
                               "another TensorRT version or GPU?)")
        self.contexts = {}
        for p in profiles:
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p.index, dev.stream)
            self.contexts[p.index] = ctx
        self.dev = dev
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def execute(self, profile: Profile, ids_shape: tuple[int, int], ids_buf: int, past: Mapping[str, int],
                present: Mapping[str, int], logits_buf: int, B: int) -> None:
        from ..state import PAST_PREFIX, PRESENT_PREFIX

        ctx = self.contexts[profile.index]
        ctx.set_input_shape("input_ids", ids_shape)
        ctx.set_tensor_address("input_ids", ids_buf)
        for name in self.names:
            if name.startswith(PAST_PREFIX):
                key = name[len(PAST_PREFIX):]
                shape = list(self.engine.get_tensor_shape(name))
                shape[0] = B
                ctx.set_input_shape(name, shape)
                ctx.set_tensor_address(name, past[key])
            elif name.startswith(PRESENT_PREFIX):
                ctx.set_tensor_address(name, present[name[len(PRESENT_PREFIX):]])
        ctx.set_tensor_address("logits", logits_buf)
        if not ctx.execute_async_v3(self.dev.stream):
            raise SessionError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        self.dev.synchronize()
