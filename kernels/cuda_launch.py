"""Launch AOT-compiled Trellis kernels through the CUDA driver API (ctypes on ``libcuda.so.1``).

Importable without a GPU, without torch and without triton: only ``ctypes`` and the standard
library are imported at module level, and ``libcuda`` is opened when a :class:`CudaDriver` is built.
The input is an AOT launch record, ``trellis_export.kernels.aot.AOTKernel.to_dict()`` (a plain dict;
field meanings in the ``aot`` module docstring).

API
---
Pure functions (no GPU; tested on the CPU):

``launch_args(record, pointers, scalars) -> list[LaunchArg]``
    The kernel's parameters in PTX order: every ``record["signature"]`` entry (input pointers,
    integer scalars, output pointers -- the TensorRT AOT plugin order), then one null ``u64`` per
    ``record["hidden_params"]`` (triton's global / profile scratch pointers; the kernels use no
    scratch). ``pointers`` maps signature names (``q`` ... ``position``, ``out_o`` ...
    ``out_value_snapshot``) to device addresses (ints); ``scalars`` maps ``T`` to its value.
    Checks the count against ``record["ptx_params"]``, the types against the PTX (``u64`` / ``u32``),
    the run-time contract of the record's specialisation (:func:`check_launch`) and raises
    :class:`LaunchError` with the offending name.
``pack_params(record, pointers, scalars) -> (kernel_params, keep_alive)``
    ``launch_args`` as the ``void**`` array ``cuLaunchKernel`` takes. Keep ``keep_alive`` referenced
    until the launch call has returned (the driver copies the values at launch).
``grid_for(record, B, T=None) -> (gx, gy, gz)``
    The grid of ``B`` rows: ``record["grid_dims"]`` when present (the split prefill; expressions of
    ``B, H, T`` and the integer constexprs), else one program per (row, head), ``(B * H, 1, 1)``.
``workspace_bytes(record, B, T) -> dict[str, int]``
    The sizes of the workspace pointers a split-prefill record needs (``record["workspaces"]``);
    empty for the one-launch kernels. Pass the workspace addresses in ``pointers`` by these names.
``check_launch(record, pointers, scalars)``
    The run-time preconditions a specialised record carries: ``aligned`` records need every pointer
    16-byte aligned; ``decode`` records need ``T == 1``; ``in_place`` records need the output memory
    pointers equal to the input memory pointers (``out_key_memory == key_memory`` ...), because
    they write only what changed. The caller picks another record (the unaligned / general one)
    when this fails; :func:`select_record` does that choice.
``select_record(records, pointers, scalars, rows=None, sms=None) -> dict``
    The first record of ``records`` whose preconditions hold (order them most specialised first).
    A record of the m-axis split (``m_block`` > 0) is correct for any call but skipped when the
    call's ``rows`` already fill the GPU's ``sms`` streaming multiprocessors (:func:`split_fills`).
``split_fills(B, H, sms) -> bool``
    The occupancy rule of the m-axis split: take it while the unsplit state pass, ``B * H * 2``
    programs, is fewer than the SMs (``sms`` None, unknown: take it).
``module_image(record, prefer="auto") -> (kind, bytes)``
    What to hand ``cuModuleLoadData``: the record's PTX (NUL-terminated) or its cubin
    (``cubin_b64``). ``prefer="auto"`` takes the cubin when present (no JIT at load, no dependence
    on the driver's PTX ISA), else the PTX.

Driver calls (need ``libcuda.so.1`` and a GPU):

``CudaDriver(device=0)``
    ``cuInit``; uses the current context (torch's primary context when torch made one) or retains and
    sets the device's primary context.
``CudaDriver.load_record(record, prefer="auto") -> LoadedKernel``
    Load the module (cubin or PTX; on a PTX ISA the driver rejects, falls back to the cubin when the
    record has one), get the function, opt into ``record["shared_mem"]`` bytes of dynamic shared
    memory when above 48 KB (``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES``).
``CudaDriver.launch_record(kernel, pointers, scalars, B, stream=0)``
    ``pack_params`` + ``cuLaunchKernel`` with ``grid_for(record, B)``, ``record["block"]`` and
    ``record["shared_mem"]`` on ``stream`` (a ``CUstream`` as int; 0 = the legacy default stream).
    Asynchronous, as ``cuLaunchKernel``.
``CudaDriver.load(ptx, name, shared_mem)``, ``load_cubin(cubin, name, shared_mem)``,
``get_function(module, name, shared_mem)``, ``launch(fn, grid, block, shared_mem, stream, params)``,
``driver_version()``, ``compute_capability()`` (e.g. 87, 90), ``multiprocessor_count()``,
``unload(module)``: the lower-level calls the above use.

Errors: :class:`CudaError` (a driver call failed; carries the ``CUresult`` and its string) and
:class:`LaunchError` (arguments that do not fit the record; a ``ValueError``). ``CudaError`` is a
``RuntimeError``.

Nothing here was run on a GPU in this project's CI; the pure functions are tested on the CPU
(``tests/test_kernels_cuda_launch.py``).
"""

from __future__ import annotations

import base64
import ctypes
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CudaDriver", "CudaError", "LaunchArg", "LaunchError", "LoadedKernel", "check_launch",
           "grid_for", "launch_args", "module_image", "pack_params", "select_record", "STATE_ALIASES",
           "ALIGNMENT", "split_fills", "workspace_bytes"]

#: CUfunction_attribute value of the dynamic shared memory limit (cuda.h).
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
#: CUdevice_attribute values of the compute capability (cuda.h).
CU_DEVICE_ATTRIBUTE_CC_MAJOR = 75
CU_DEVICE_ATTRIBUTE_CC_MINOR = 76
CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
#: Dynamic shared memory a kernel gets without the opt-in.
DEFAULT_SHARED_LIMIT = 48 * 1024
#: Pointer alignment an ``aligned`` record was compiled for (bytes).
ALIGNMENT = 16
#: In-place records: each output memory must alias this input.
STATE_ALIASES: dict[str, str] = {"out_key_memory": "key_memory", "out_value_memory": "value_memory",
                                 "out_key_snapshot": "key_snapshot", "out_value_snapshot": "value_snapshot"}
#: PTX .param type of each signature type class.
_PTX_TYPE = {"ptr": "u64", "i32": "u32"}


class CudaError(RuntimeError):
    """A CUDA driver call returned an error."""

    def __init__(self, what: str, code: int, message: str) -> None:
        super().__init__(f"{what} failed: CUresult {code} ({message})")
        self.what, self.code, self.message = what, code, message


class LaunchError(ValueError):
    """Launch arguments that do not fit the record."""


@dataclass(frozen=True)
class LaunchArg:
    """One kernel parameter: its name, PTX type (``u64`` / ``u32``) and value."""

    name: str
    ptx_type: str
    value: int

    def ctype(self) -> ctypes.c_uint64 | ctypes.c_int32:
        if self.ptx_type == "u64":
            return ctypes.c_uint64(self.value)
        return ctypes.c_int32(self.value)


# --------------------------------------------------------------------------- pure parts
def check_launch(record: Mapping[str, Any], pointers: Mapping[str, int], scalars: Mapping[str, int]) -> None:
    """Raise :class:`LaunchError` when the record's specialisation does not hold for these arguments."""
    name = record.get("name", "?")
    if record.get("aligned"):
        align = int(record.get("alignment", ALIGNMENT))
        for arg, ty in record["signature"]:
            if ty.startswith("*") and int(pointers[arg]) % align:
                raise LaunchError(f"{name}: {arg} = {int(pointers[arg]):#x} is not {align}-byte aligned; "
                                  "use the record compiled without alignment hints")
    if record.get("decode") and int(scalars.get("T", -1)) != 1:
        raise LaunchError(f"{name}: a decode record takes T = 1 only, got T = {scalars.get('T')}")
    if record.get("in_place"):
        for out, inp in STATE_ALIASES.items():
            if out in pointers and inp in pointers and int(pointers[out]) != int(pointers[inp]):
                raise LaunchError(f"{name}: an in-place record needs {out} == {inp} (it writes only what "
                                  "changed)")


def launch_args(record: Mapping[str, Any], pointers: Mapping[str, int], scalars: Mapping[str, int],
                *, check: bool = True) -> list[LaunchArg]:
    """The parameters of one launch in PTX order (signature, then null hidden params)."""
    name = record.get("name", "?")
    out: list[LaunchArg] = []
    for arg, ty in record["signature"]:
        if ty.startswith("*"):
            if arg not in pointers:
                raise LaunchError(f"{name}: no pointer given for {arg}")
            val = int(pointers[arg])
            if not 0 <= val < 1 << 64:
                raise LaunchError(f"{name}: pointer {arg} = {val} out of range")
            out.append(LaunchArg(arg, "u64", val))
        elif ty == "i32":
            if arg not in scalars:
                raise LaunchError(f"{name}: no value given for scalar {arg}")
            val = int(scalars[arg])
            if not -(1 << 31) <= val < 1 << 31:
                raise LaunchError(f"{name}: scalar {arg} = {val} does not fit int32")
            out.append(LaunchArg(arg, "u32", val))
        else:
            raise LaunchError(f"{name}: unsupported kernel argument type {ty!r} of {arg}")
    out += [LaunchArg(h, "u64", 0) for h in record.get("hidden_params", [])]
    ptx_params = list(record.get("ptx_params", []))
    if len(out) != len(ptx_params):
        raise LaunchError(f"{name}: {len(out)} launch values but the PTX entry declares "
                          f"{len(ptx_params)} params")
    for a, p in zip(out, ptx_params):
        if a.ptx_type != p:
            raise LaunchError(f"{name}: {a.name} is {a.ptx_type} here but .param .{p} in the PTX")
    if check:
        check_launch(record, pointers, scalars)
    return out


def pack_params(record: Mapping[str, Any], pointers: Mapping[str, int], scalars: Mapping[str, int],
                *, check: bool = True) -> tuple[Any, list[Any]]:
    """``cuLaunchKernel``'s ``kernelParams`` (a ``void*[n]``) and the ctypes values it points at."""
    values = [a.ctype() for a in launch_args(record, pointers, scalars, check=check)]
    arr = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    return arr, values


def grid_for(record: Mapping[str, Any], B: int, T: int | None = None) -> tuple[int, int, int]:
    """The launch grid for ``B`` rows (and ``T`` tokens, which the split read-out's grid needs)."""
    if B < 1:
        raise LaunchError(f"B must be >= 1, got {B}")
    H = int(record["constexprs"]["H"])
    dims = record.get("grid_dims")
    if dims:
        env = {**{k: v for k, v in record["constexprs"].items() if isinstance(v, int)}, "B": B, "H": H}
        if T is not None:
            env["T"] = int(T)
        return tuple(_eval_dim(str(e), env) for e in dims)  # type: ignore[return-value]
    return (B * H, 1, 1)


def workspace_bytes(record: Mapping[str, Any], B: int, T: int) -> dict[str, int]:
    """Bytes of each workspace pointer of a record (empty for the one-launch kernels)."""
    env = {**{k: v for k, v in record["constexprs"].items() if isinstance(v, int)}, "B": B, "T": int(T)}
    return {n: _eval_dim(str(e), env) for n, e in (record.get("workspaces") or {}).items()}


def _eval_dim(expr: str, env: Mapping[str, int]) -> int:
    """Evaluate a grid expression made of names, integers, ``*``, ``+``, ``-``, ``//`` and
    parentheses (``x // 0`` is 0). Parsed once per expression (:func:`_compile_dim`): the plugin's
    enqueue evaluates a record's grid and workspace sizes on every call."""
    return _compile_dim(expr)(env)


@functools.lru_cache(maxsize=512)
def _compile_dim(expr: str) -> Callable[[Mapping[str, int]], int]:
    """The expression as a function of the names' values (an unknown name: :class:`LaunchError` when
    evaluated; an unsupported construct: when compiled)."""
    import ast
    import operator

    ops: dict[type, Callable[[int, int], int]] = {
        ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub,
        ast.FloorDiv: lambda a, b: a // b if b else 0}

    def build(n: ast.AST) -> Callable[[Mapping[str, int]], int]:
        if isinstance(n, ast.Expression):
            return build(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int) and not isinstance(n.value, bool):
            value = n.value
            return lambda env: value
        if isinstance(n, ast.Name):
            name = n.id

            def lookup(env: Mapping[str, int]) -> int:
                if name not in env:
                    raise LaunchError(f"unsupported grid expression {expr!r} (no value for {name})")
                return int(env[name])
            return lookup
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            op, left, right = ops[type(n.op)], build(n.left), build(n.right)
            return lambda env: op(left(env), right(env))
        raise LaunchError(f"unsupported grid expression {expr!r}")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise LaunchError(f"unsupported grid expression {expr!r}") from None
    return build(tree)


def split_fills(B: int, H: int, sms: int | None) -> bool:
    """Whether the m-axis split of the state pass is wanted for B rows of H heads on a GPU of ``sms``
    streaming multiprocessors: while the unsplit pass (``B * H * 2`` programs, one per row, head and
    pass, each walking every chunk in order) leaves SMs idle. Beyond that the split only loads each
    chunk's keys once per slot block more. An occupancy rule, not a timing (``bench/gpu_suite.py``
    times both); ``sms`` None (unknown): take the split."""
    return sms is None or int(B) * int(H) * 2 < int(sms)


def select_record(records: Sequence[Mapping[str, Any]], pointers: Mapping[str, int],
                  scalars: Mapping[str, int], *, rows: int | None = None, sms: int | None = None
                  ) -> Mapping[str, Any]:
    """The first record whose run-time preconditions hold (most specialised first); records of the
    m-axis split only while :func:`split_fills` (``rows``: the call's B; None: not known, take it)."""
    errors = []
    for r in records:
        if r.get("m_block") and rows is not None \
                and not split_fills(rows, int(r["constexprs"]["H"]), sms):
            errors.append(f"{r.get('name', '?')}: {rows} rows fill the {sms} SMs without the m-axis split")
            continue
        try:
            check_launch(r, pointers, scalars)
            return r
        except LaunchError as exc:
            errors.append(str(exc))
    raise LaunchError("no record fits these arguments: " + "; ".join(errors))


def module_image(record: Mapping[str, Any], prefer: str = "auto") -> tuple[str, bytes]:
    """``("cubin", bytes)`` or ``("ptx", NUL-terminated bytes)`` for ``cuModuleLoadData``."""
    if prefer not in ("auto", "ptx", "cubin"):
        raise ValueError(f"prefer must be 'auto', 'ptx' or 'cubin', got {prefer!r}")
    cubin = record.get("cubin_b64") or ""
    if prefer == "cubin" or (prefer == "auto" and cubin):
        if not cubin:
            raise LaunchError(f"{record.get('name', '?')}: the record carries no cubin")
        return "cubin", base64.b64decode(cubin)
    return "ptx", record["ptx"].encode() + b"\0"


# --------------------------------------------------------------------------- driver calls
@dataclass
class LoadedKernel:
    """A loaded module and function with the record it came from."""

    record: Mapping[str, Any]
    module: ctypes.c_void_p
    function: ctypes.c_void_p
    image: str                 # "ptx" | "cubin" | "cubin (PTX load failed: ...)"


class CudaDriver:
    """The few CUDA driver API calls an AOT launch needs, through ctypes on ``libcuda.so.1``."""

    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

    def __init__(self, device: int = 0, lib: Any = None) -> None:
        self.lib = lib if lib is not None else ctypes.CDLL("libcuda.so.1")
        self._check(self.lib.cuInit(0), "cuInit")
        ctx = ctypes.c_void_p()
        self._check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:                       # torch / TensorRT normally made a context current
            dev = ctypes.c_int()
            self._check(self.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
            self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self.context = ctx
        self._cc: int | None = None           # the context's device does not change: asked once
        self._sms: int | None = None

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise CudaError(what, int(rc), (msg.value or b"?").decode())

    def driver_version(self) -> int:
        """``cuDriverGetVersion``: e.g. 12080 for CUDA 12.8."""
        v = ctypes.c_int()
        self._check(self.lib.cuDriverGetVersion(ctypes.byref(v)), "cuDriverGetVersion")
        return v.value

    def _device_attribute(self, attribute: int) -> int:
        """``cuDeviceGetAttribute`` of the current context's device."""
        dev = ctypes.c_int()
        self._check(self.lib.cuCtxGetDevice(ctypes.byref(dev)), "cuCtxGetDevice")
        val = ctypes.c_int()
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(val), attribute, dev), "cuDeviceGetAttribute")
        return val.value

    def compute_capability(self) -> int:
        """The current context's device as ``major * 10 + minor`` (87 for Orin, 90 for H100 / H200)."""
        if self._cc is None:
            self._cc = 10 * self._device_attribute(CU_DEVICE_ATTRIBUTE_CC_MAJOR) \
                + self._device_attribute(CU_DEVICE_ATTRIBUTE_CC_MINOR)
        return self._cc

    def multiprocessor_count(self) -> int:
        """Streaming multiprocessors of the current context's device (132 on an H100 / H200 SXM)."""
        if self._sms is None:
            self._sms = self._device_attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        return self._sms

    def load_module(self, image: bytes) -> ctypes.c_void_p:
        """``cuModuleLoadData`` on a PTX (NUL-terminated) or cubin image."""
        mod = ctypes.c_void_p()
        buf = ctypes.create_string_buffer(image, len(image))
        self._check(self.lib.cuModuleLoadData(ctypes.byref(mod), buf), "cuModuleLoadData")
        return mod

    def unload(self, module: ctypes.c_void_p) -> None:
        self._check(self.lib.cuModuleUnload(module), "cuModuleUnload")

    def get_function(self, module: ctypes.c_void_p, name: str, shared_mem: int) -> ctypes.c_void_p:
        """The kernel ``name`` of a loaded module, allowed ``shared_mem`` bytes of dynamic shared memory."""
        fn = ctypes.c_void_p()
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()),
                    "cuModuleGetFunction")
        if shared_mem > DEFAULT_SHARED_LIMIT:
            self._check(self.lib.cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                    ctypes.c_int(shared_mem)), "cuFuncSetAttribute")
        return fn

    def load(self, ptx: str, name: str, shared_mem: int) -> ctypes.c_void_p:
        """Load PTX text and return the function (kept for older callers)."""
        return self.get_function(self.load_module(ptx.encode() + b"\0"), name, shared_mem)

    def load_cubin(self, cubin: bytes, name: str, shared_mem: int) -> ctypes.c_void_p:
        """Load a cubin and return the function."""
        return self.get_function(self.load_module(cubin), name, shared_mem)

    def load_record(self, record: Mapping[str, Any], prefer: str = "auto") -> LoadedKernel:
        """Load a record's module and function (see the module docstring)."""
        kind, image = module_image(record, prefer)
        try:
            mod = self.load_module(image)
        except CudaError as exc:
            # e.g. CUresult 222 (unsupported PTX version): the driver is older than the PTX ISA
            if kind != "ptx" or not record.get("cubin_b64"):
                raise
            kind, image = "cubin", base64.b64decode(record["cubin_b64"])
            mod = self.load_module(image)
            kind = f"cubin (PTX load failed: {exc})"
        fn = self.get_function(mod, record["name"], int(record["shared_mem"]))
        return LoadedKernel(record, mod, fn, kind)

    def launch(self, fn: ctypes.c_void_p, grid: tuple[int, int, int], block: tuple[int, int, int],
               shared_mem: int, stream: int, params: Any) -> None:
        """``cuLaunchKernel`` (asynchronous on ``stream``)."""
        self._check(self.lib.cuLaunchKernel(fn, ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]),
                                            ctypes.c_uint(grid[2]), ctypes.c_uint(block[0]),
                                            ctypes.c_uint(block[1]), ctypes.c_uint(block[2]),
                                            ctypes.c_uint(shared_mem), ctypes.c_void_p(stream),
                                            params, None), "cuLaunchKernel")

    def launch_record(self, kernel: LoadedKernel, pointers: Mapping[str, int], scalars: Mapping[str, int],
                      B: int, stream: int = 0) -> None:
        """Launch a loaded record for ``B`` rows on ``stream``."""
        rec = kernel.record
        if rec.get("global_scratch_size", 0):
            raise LaunchError(f"{rec['name']} needs {rec['global_scratch_size']} B of global scratch")
        params, keep = pack_params(rec, pointers, scalars)
        self.launch(kernel.function, grid_for(rec, B, scalars.get("T")), tuple(rec["block"]),
                    int(rec["shared_mem"]), stream, params)
        del keep
