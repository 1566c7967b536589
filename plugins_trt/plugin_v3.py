"""``trellis::TrellisMemory`` as a TensorRT IPluginV3 (OneCore / OneBuild / OneRuntime) with an
IPluginCreatorV3One: the plugin kind both TensorRT-RTX and enterprise TensorRT (>= 10.x) accept.

Everything about the op comes from :mod:`trellis_export.opdef`: name, namespace, version, the inputs
and outputs in order, the attributes (plugin fields: ``chunk_size`` INT32, ``phi`` / ``f`` / ``rho``
CHAR, ``eps`` FLOAT32, as TensorRT's ONNX parser hands a node's attributes over). TensorRT maps a
``trellis::TrellisMemory`` node to this plugin by op_type, ``plugin_namespace`` and
``plugin_version`` once :func:`register` has put the creator in the plugin registry.

* Build (no GPU needed): output shapes (o like q, memories like the memory inputs), types (o like q;
  memories float32), formats (linear; q/k/v/a float32 or float16 alike, gates and memories float32,
  position int64). Before the build the kernels are compiled ahead of time for the engine's targets
  and every layer shape (:func:`compile_records`: :func:`trellis_export.kernels.aot.compile_kernel`,
  every specialisation of ``variants_for``); ``configure_plugin`` picks its layer's records and they
  are serialised into the engine as the plugin field ``kernels`` (JSON), so a device needs neither
  triton nor a compiler to run the engine. (An exception raised in a TensorRT callback aborts the
  process, so no callback compiles or raises.)
* Run (GPU): ``enqueue`` picks the records for the device's compute capability (exact, else the
  highest lower one whose PTX the driver JIT-compiles) and launches them with
  :class:`trellis_export.kernels.cuda_launch.CudaDriver` on TensorRT's stream (:func:`plan_launches`
  is the host-side choice): ``fused_recurrent`` for T = 1; for T > 1 the split prefill, ``chunk_state``
  (stage 0) then ``chunk_readout`` (stage 1), with the two workspaces carved out of TensorRT's plugin
  workspace (:func:`workspace_layout`; ``get_workspace_size`` asks for the profile's max shapes). The
  one-launch ``chunk`` kernel is the fallback for engines whose records lack a split kernel (engines
  built before the split, bundles) or a call without a workspace. Within a kernel the most
  specialised record whose preconditions hold (16-byte alignment, T == 1, outputs aliasing inputs);
  at phi = identity the state pass's m-axis split record (``m_split``) while the call's rows leave
  SMs idle (``cuda_launch.split_fills``, with the device's SM count).
* In-place state: the plugin implements ``IPluginV3OneBuildV2`` when the module has it (TensorRT-RTX
  1.7.1 does; enterprise TensorRT >= 10.3) and, when the engine builder turned on the preview feature
  ``ALIASED_PLUGIN_IO_10_03`` (``engine.build_engine`` does; a builder that does not gets no aliasing),
  ``get_aliased_input`` aliases the four memory outputs to their inputs (:func:`aliased_outputs`;
  none at C = 1). TensorRT then hands ``enqueue`` the same address for each pair and T = 1 takes the
  ``decode_in_place`` record. Aliasing holds in every profile: at T > 1 the split prefill (and the
  one-launch fallback) run on aliased buffers too, which is safe because each program reads its
  (row, head) tiles of the memories before it writes them and no other program reads them (the
  read-out reads only the workspaces); tested under the interpreter.
  **Never run**: no GPU was available to this project's CI; the build path is tested on the CPU with
  TensorRT-RTX, and ``enqueue`` with a host stand-in of the driver that runs the chosen records'
  kernels under triton's interpreter (tests/test_plugins_trt.py).

Python plugins live in the process: a runtime that deserialises an engine holding this plugin must
call :func:`register` first (``open_session("trt", ...)`` does, from the engine's sidecar).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from trellis_export.opdef import (
    ATTRIBUTES,
    DOMAIN,
    INPUTS,
    OP_TYPE,
    OUTPUTS,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

#: Plugin field holding the serialised AOT launch records (not an ONNX attribute).
KERNELS_FIELD = "kernels"
#: Inputs whose dtype is the activation dtype (o follows q); the rest are float32 / int64 (spec 1).
ACT_INPUTS: tuple[str, ...] = ("q", "k", "v", "a")
#: Decode (T == 1) / one-launch prefill kernel (the kernels of engines and bundles before the split).
KERNEL_FOR_T = {True: "fused_recurrent", False: "chunk"}
#: The split prefill, in launch order (record field ``stage`` 0, 1): names as in kernels.trellis_memory.utils
#: (not imported: that module needs triton, which a device running an engine may not have).
SPLIT_PREFILL: tuple[str, ...] = ("chunk_state", "chunk_readout")
#: Every kernel an engine built by this module carries.
PLUGIN_KERNELS: tuple[str, ...] = (*KERNEL_FOR_T.values(), *SPLIT_PREFILL)
#: Output index -> input index of the four memories (``IPluginV3OneBuildV2.get_aliased_input``):
#: declared only when the builder enabled TensorRT's aliased-plugin-I/O preview feature; see
#: :func:`aliased_outputs`.
ALIASED_OUTPUTS: dict[int, int] = {OUTPUTS.index(n): INPUTS.index(n) for n in OUTPUTS if n in INPUTS}
#: TensorRT's preview feature that aliased plugin I/O needs (TensorRT >= 10.3, TensorRT-RTX 1.7).
ALIAS_PREVIEW_FEATURE = "ALIASED_PLUGIN_IO_10_03"
#: Alignment of each workspace carved out of TensorRT's plugin workspace (bytes).
WORKSPACE_ALIGN = 256
#: Launch-argument names of the op's inputs and outputs (kernels.trellis_memory.utils INPUT_ARGS /
#: OUTPUT_ARGS, spelled here for the same reason).
INPUT_ARGS: tuple[str, ...] = INPUTS
OUTPUT_ARGS: tuple[str, ...] = tuple(f"out_{n}" for n in OUTPUTS)

_LOCK = threading.Lock()
_CREATORS: dict[int, Any] = {}          # id(trt module) -> registered creator
_COMPILED: dict[tuple[Any, ...], list[dict[str, Any]]] = {}   # compile cache (same shapes, many layers)


def io_dtype_rule(pos: int, act: str) -> str:
    """The dtype allowed at plugin I/O position ``pos`` (inputs then outputs) when the activations
    (q) are ``act``: ``act`` for q/k/v/a/o, int64 for position, float32 otherwise."""
    n_in = len(INPUTS)
    name = INPUTS[pos] if pos < n_in else OUTPUTS[pos - n_in]
    if (pos < n_in and name in ACT_INPUTS) or (pos >= n_in and name == "o"):
        return act
    return "int64" if name == "position" else "float32"


def decode_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Plugin fields as TensorRT hands them (numpy arrays, CHAR as int8 bytes) -> python values."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        arr = np.asarray(value)
        if name in ("phi", "f", "rho", KERNELS_FIELD) or arr.dtype.kind in ("S", "U"):
            raw = arr.tobytes() if arr.dtype.kind not in ("S", "U") else str(arr.item()).encode()
            out[name] = raw.split(b"\0", 1)[0].decode()
        elif name == "chunk_size":
            out[name] = int(arr.reshape(-1)[0])
        elif name == "eps":
            out[name] = float(arr.reshape(-1)[0])
        else:
            out[name] = arr
    missing = [a for a in ATTRIBUTES if a not in out]
    if missing:
        raise ValueError(f"{DOMAIN}::{OP_TYPE} plugin: missing field(s) {', '.join(missing)}")
    return out


def shape_key(*, heads: int, slots: int, head_dim: int, dtype: str) -> tuple[tuple[str, Any], ...]:
    """The key kernels are compiled and looked up under (one per distinct layer shape)."""
    return tuple(sorted({"heads": int(heads), "slots": int(slots), "head_dim": int(head_dim),
                         "dtype": dtype}.items()))


_COMPILE_SCRIPT = """
import json, sys
from trellis_export.plugins_trt.plugin_v3 import compile_records
args = json.loads(sys.argv[1])
json.dump(compile_records(args.pop("attrs"), **args), open(sys.argv[2], "w"))
"""


def plugin_variants(phi: str, slots: int) -> list[tuple[str, dict[str, Any]]]:
    """(kernel, ``compile_kernel`` keywords) of every record an engine of a model with this ``phi`` and
    ``slots`` carries per target, in the order the plugin picks from: :data:`PLUGIN_KERNELS` x
    ``kernels.aot.variants_for``, without the opt-in dot precisions (tf32x3). One list for
    :func:`compile_records` and the deployment bundle's records (``bundle/aot_records.py``)."""
    from trellis_export.kernels.aot import variants_for

    return [(kernel, variant) for kernel in PLUGIN_KERNELS
            for variant in variants_for(kernel, phi=phi, slots=slots)
            if variant.get("dot_precision", "ieee") == "ieee"]


def record_arguments(attrs: dict[str, Any], *, heads: int, slots: int, head_dim: int, dtype: str
                     ) -> list[tuple[str, dict[str, Any]]]:
    """(kernel, ``kernels.aot.compile_kernel`` keyword arguments but the target) of every record a
    layer of these attributes and shapes carries per target, in :func:`plugin_variants` order: what
    :func:`compile_records` compiles (the GPU suite compiles or looks up the same)."""
    common = dict(heads=heads, slots=slots, head_dim=head_dim, chunk_size=int(attrs["chunk_size"]),
                  phi=attrs["phi"], f=attrs["f"], rho=attrs["rho"], eps=float(attrs["eps"]), dtype=dtype)
    return [(kernel, {**common, **variant}) for kernel, variant in plugin_variants(attrs["phi"], slots)]


def compile_records(attrs: dict[str, Any], *, heads: int, slots: int, head_dim: int, dtype: str,
                    targets: Sequence[int]) -> list[dict[str, Any]]:
    """AOT launch records of :func:`plugin_variants` (every kernel of :data:`PLUGIN_KERNELS`, every
    specialisation the plugin can pick) for each target (cached).

    Compiled in a child process when this one runs triton's interpreter (``TRITON_INTERPRET``: its
    kernels cannot be compiled), so that a caller never has to care."""
    import os

    key = (tuple(sorted(attrs.items())), heads, slots, head_dim, dtype, tuple(targets))
    with _LOCK:
        if key in _COMPILED:
            return _COMPILED[key]
    if os.environ.get("TRITON_INTERPRET"):
        records = _compile_in_child(attrs, heads=heads, slots=slots, head_dim=head_dim, dtype=dtype,
                                    targets=list(targets))
    else:
        from trellis_export.kernels.aot import compile_kernel

        records = [compile_kernel(kernel, int(cc), **kw).to_dict()
                   for cc in targets
                   for kernel, kw in record_arguments(attrs, heads=heads, slots=slots, head_dim=head_dim,
                                                      dtype=dtype)]
    with _LOCK:
        _COMPILED[key] = records
    return records


def _compile_in_child(attrs: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    import os
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="trellis-aot-") as tmp:
        out = os.path.join(tmp, "records.json")
        args = json.dumps({"attrs": attrs, **kwargs})
        res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, args, out], capture_output=True,
                             text=True, env=env)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"compiling the {DOMAIN}::{OP_TYPE} kernels failed: {tail}")
        with open(out) as fh:
            return list(json.load(fh))


def records_for_device(records: Sequence[dict[str, Any]], cc: int, kernel: str) -> list[dict[str, Any]]:
    """The records of ``kernel`` for a device of compute capability ``cc``: exact target, else the
    highest lower target (its PTX is JIT-compiled by the driver); most specialised first, as
    compiled. Raises ValueError when no target fits."""
    mine = [r for r in records if r["kernel"] == kernel]
    ccs = sorted({int(r["cc"]) for r in mine if int(r["cc"]) <= cc})
    if not ccs:
        have = sorted({int(r["cc"]) for r in mine})
        raise ValueError(f"{DOMAIN}::{OP_TYPE} plugin: the engine holds kernels for sm_{have} only; this "
                         f"GPU is sm_{cc}: rebuild the engine with its compute capability")
    return [r for r in mine if int(r["cc"]) == ccs[-1]]


def prefill_kernels(records: Sequence[dict[str, Any]]) -> list[str]:
    """The kernels a T > 1 call launches with these records, in order: the split prefill when every
    stage of it is there, else the one-launch ``chunk`` kernel (empty when neither is)."""
    have = {r["kernel"] for r in records}
    if all(k in have for k in SPLIT_PREFILL):
        return list(SPLIT_PREFILL)
    return [KERNEL_FOR_T[False]] if KERNEL_FOR_T[False] in have else []


def aliased_outputs(chunk_size: int) -> dict[int, int]:
    """The outputs a layer declares aliased to inputs: the four memories when ``chunk_size`` > 1, none
    at ``chunk_size`` 1. A C = 1 graph stores no snapshots and feeds the memory tensors in as the
    snapshot inputs too (spec section 6): a memory written in place would be an input the same layer
    still reads, and TensorRT-RTX 1.7.1 fails such a build ("Cannot reformat", whether the snapshots
    are aliased too or not; tried). Nothing is lost: at C = 1 a chunk starts at every token, so the
    in-place record would move the same bytes as the general ``decode`` record."""
    return dict(ALIASED_OUTPUTS) if int(chunk_size) > 1 else {}


def _align(n: int, to: int = WORKSPACE_ALIGN) -> int:
    return -(-int(n) // to) * to


def workspace_layout(records: Sequence[dict[str, Any]], B: int, T: int) -> dict[str, tuple[int, int]]:
    """Where each workspace of the split prefill lies in the plugin workspace for a (B, T) call:
    name -> (offset, bytes), in the records' order, each offset a multiple of :data:`WORKSPACE_ALIGN`.
    The sizes are :func:`trellis_export.kernels.cuda_launch.workspace_bytes` (the largest over the
    split records; they are the same expressions of the same constexprs). Empty when the records
    carry no split prefill or T == 1 (no call of that shape launches it)."""
    from trellis_export.kernels.cuda_launch import workspace_bytes

    if T <= 1 or prefill_kernels(records) != list(SPLIT_PREFILL):
        return {}
    sizes: dict[str, int] = {}
    for r in records:
        if r["kernel"] in SPLIT_PREFILL:
            for name, n in workspace_bytes(r, B, T).items():
                sizes[name] = max(sizes.get(name, 0), n)
    out: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, n in sizes.items():
        out[name] = (offset, n)
        offset += _align(n)
    return out


def workspace_size(records: Sequence[dict[str, Any]], B: int, T: int) -> int:
    """Bytes of plugin workspace a (B, T) call needs (every workspace rounded up to
    :data:`WORKSPACE_ALIGN`); the sizes grow with B and T, so the profile's max shapes bound every call."""
    return sum(_align(n) for _, n in workspace_layout(records, B, T).values())


def plan_launches(records: Sequence[dict[str, Any]], cc: int, B: int, T: int, inputs: Sequence[int],
                  outputs: Sequence[int], workspace: int = 0, sms: int | None = None
                  ) -> list[tuple[dict[str, Any], dict[str, int], dict[str, int]]]:
    """The launches of one ``enqueue``, in stream order: (record, pointers, scalars) each.

    ``inputs`` / ``outputs``: the device addresses TensorRT passes, in the op's order; ``workspace``:
    the plugin workspace's address (0: none). T == 1: the decode kernel. T > 1: the split prefill
    (stage 0, then stage 1, the same pointers: the workspaces at ``workspace`` + their
    :func:`workspace_layout` offsets) when the records carry it and a workspace was given, else the
    one-launch ``chunk`` kernel. Each launch takes the first record of its kernel for ``cc``
    (:func:`records_for_device`) whose preconditions hold for these pointers
    (:func:`trellis_export.kernels.cuda_launch.select_record`; ``sms``, the device's streaming
    multiprocessors, decides whether the m-axis split record is wanted). Raises ValueError (``LaunchError``)
    when none fits or the engine has no kernel for this GPU."""
    from trellis_export.kernels.cuda_launch import LaunchError, select_record

    if len(inputs) != len(INPUT_ARGS) or len(outputs) != len(OUTPUT_ARGS):
        raise LaunchError(f"{DOMAIN}::{OP_TYPE} plugin: {len(inputs)} inputs / {len(outputs)} outputs, "
                          f"expected {len(INPUT_ARGS)} / {len(OUTPUT_ARGS)}")
    pointers = {**{n: int(p) for n, p in zip(INPUT_ARGS, inputs)},
                **{n: int(p) for n, p in zip(OUTPUT_ARGS, outputs)}}
    scalars = {"T": int(T)}
    if T == 1:
        kernels = [KERNEL_FOR_T[True]]
    else:
        kernels = prefill_kernels(records)
        if kernels == list(SPLIT_PREFILL) and not workspace:
            kernels = [KERNEL_FOR_T[False]]
        if kernels == list(SPLIT_PREFILL):
            for name, (offset, _) in workspace_layout(records, B, T).items():
                pointers[name] = int(workspace) + offset
        if not kernels:
            raise LaunchError(f"{DOMAIN}::{OP_TYPE} plugin: the engine carries no prefill kernel")
    plan = []
    for kernel in kernels:
        rec = dict(select_record(records_for_device(records, cc, kernel), pointers, scalars, rows=B, sms=sms))
        plan.append((rec, pointers, scalars))
    return plan


def launch_memory(driver: Any, loaded: dict[tuple[str, str, int], Any], records: Sequence[dict[str, Any]],
                  B: int, T: int, inputs: Sequence[int], outputs: Sequence[int], workspace: int,
                  stream: int) -> list[tuple[str, str]]:
    """What ``enqueue`` does: :func:`plan_launches` for ``driver.compute_capability()`` and (T > 1)
    ``driver.multiprocessor_count()``, then each
    record loaded once (``driver.load_record``, cached in ``loaded`` by kernel, variant and target) and
    launched with ``driver.launch_record`` on ``stream``, in order (one stream: stage 1 runs after
    stage 0). ``driver``: a :class:`~trellis_export.kernels.cuda_launch.CudaDriver` or anything with
    its interface. Returns the (kernel, variant) launched."""
    plan = plan_launches(records, driver.compute_capability(), B, T, inputs, outputs, workspace,
                         driver.multiprocessor_count() if T > 1 else None)
    for rec, pointers, scalars in plan:
        key = (rec["kernel"], rec["variant"], int(rec["cc"]))
        kernel = loaded.get(key)
        if kernel is None:
            kernel = loaded[key] = driver.load_record(rec)
        driver.launch_record(kernel, pointers, scalars, B, stream=int(stream))
    return [(rec["kernel"], rec["variant"]) for rec, _, _ in plan]


def make_classes(trt: Any) -> tuple[type, type]:
    """The plugin and creator classes for one TensorRT module (``tensorrt`` or
    ``tensorrt_rtx_bindings``): their base classes come from that module."""

    dtypes = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.INT64: "int64"}
    # the build capability with I/O aliasing when the module has it (TensorRT >= 10.3, TensorRT-RTX)
    build_cap: Any = getattr(trt, "IPluginV3OneBuildV2", trt.IPluginV3OneBuild)

    class TrellisMemoryPlugin(trt.IPluginV3, trt.IPluginV3OneCore, build_cap, trt.IPluginV3OneRuntime):
        """One TrellisMemory layer (see the module docstring)."""

        def __init__(self, fields: dict[str, Any], targets: Sequence[int] = (),
                     phase: Any = None, compiled: dict[tuple[Any, ...], list[dict[str, Any]]] | None = None,
                     build_state: dict[str, Any] | None = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            build_cap.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = OP_TYPE
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = len(OUTPUTS)
            self.timing_cache_id = ""
            self.phase = phase
            self.attrs = {a: fields[a] for a in ATTRIBUTES}
            self.targets = tuple(int(t) for t in targets)
            kernels = fields.get(KERNELS_FIELD) or ""
            self.records: list[dict[str, Any]] = json.loads(kernels) if kernels else []
            self.compiled = compiled if compiled is not None else {}    # the creator's build log
            #: the creator's build settings and callback log: ``alias_io`` (declare the memory outputs
            #: aliased to their inputs), ``workspace`` / ``aliased`` (what TensorRT was answered)
            self.build_state = build_state if build_state is not None else {}
            #: the CudaDriver (made at the first enqueue), or anything with its interface
            self.driver: Any = None
            self._loaded: dict[tuple[str, str, int], Any] = {}

        # ---------------------------------------------------------------- core / build
        def get_capability_interface(self, type: Any) -> Any:  # noqa: A002 - TensorRT's name
            return self

        def clone(self) -> TrellisMemoryPlugin:
            twin = TrellisMemoryPlugin({**self.attrs, KERNELS_FIELD: json.dumps(self.records)},
                                       self.targets, self.phase, self.compiled, self.build_state)
            twin.driver = self.driver
            return twin

        def get_output_data_types(self, input_types: Sequence[Any]) -> list[Any]:
            return [input_types[0]] + [trt.DataType.FLOAT] * (len(OUTPUTS) - 1)

        def get_output_shapes(self, inputs: Sequence[Any], shape_inputs: Sequence[Any],
                              expr_builder: Any) -> list[Any]:
            idx = {n: i for i, n in enumerate(INPUTS)}
            return [trt.DimsExprs(inputs[idx["q" if n == "o" else n]]) for n in OUTPUTS]

        def supports_format_combination(self, pos: int, in_out: Sequence[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            got = dtypes.get(desc.type)
            if pos == 0:
                return got in ("float32", "float16")
            return got == io_dtype_rule(pos, dtypes.get(in_out[0].desc.type, "?"))

        def configure_plugin(self, inp: Sequence[Any], out: Sequence[Any]) -> None:
            # TensorRT aborts the process on an exception raised here: the kernels were compiled before
            # the build (engine.build_engine); this only picks them, and notes a miss for the builder
            if self.records:
                return
            q, a = inp[INPUTS.index("q")].desc, inp[INPUTS.index("a")].desc
            key = shape_key(heads=int(q.dims[2]), slots=int(a.dims[3]), head_dim=int(q.dims[3]),
                            dtype=dtypes.get(q.type, "?"))
            found = self.compiled.get(key)
            if found is None:
                self.compiled.setdefault("missing", []).append(dict(key))   # type: ignore[arg-type]
            else:
                self.records = found

        def get_workspace_size(self, inp: Sequence[Any], out: Sequence[Any]) -> int:
            # the split prefill's two workspaces at the profile's max shapes (0 for a decode-only
            # profile); TensorRT aborts on an exception here, so a failure asks for none (enqueue then
            # falls back to the one-launch kernel) and is noted for the build report
            log = self.build_state.setdefault("workspace", [])
            try:
                B, T = int(inp[0].max[0]), int(inp[0].max[1])
                size = workspace_size(self.records, B, T)
                log.append({"B": B, "T": T, "bytes": size})
            except Exception as exc:  # noqa: BLE001 - see above
                log.append({"error": f"{type(exc).__name__}: {exc}"})
                size = 0
            return size

        def get_aliased_input(self, output_index: int) -> int:
            # in-place state: each memory output shares its input's buffer, so that decode launches the
            # in-place record. Safe for every kernel at every T: a program reads the tiles of its (row,
            # head) before it writes them, and no other program reads them (the split prefill's read-out
            # reads only the workspaces); TensorRT copies an input another layer still needs
            pairs = aliased_outputs(self.attrs["chunk_size"]) if self.build_state.get("alias_io") else {}
            out = pairs.get(int(output_index), -1)
            self.build_state.setdefault("aliased", []).append((int(output_index), out))
            return out

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            return None

        def get_fields_to_serialize(self) -> Any:
            # TensorRT reads the fields' buffers after this returns: keep them (and the collection)
            # referenced by the plugin, or it reads freed numpy memory
            self._serialized = plugin_fields(trt, {**self.attrs, KERNELS_FIELD: json.dumps(self.records)})
            self._serialized_fc = trt.PluginFieldCollection(self._serialized)
            return self._serialized_fc

        # ---------------------------------------------------------------- runtime (GPU; never run here)
        def on_shape_change(self, inp: Sequence[Any], out: Sequence[Any]) -> None:
            return None

        def attach_to_context(self, context: Any) -> TrellisMemoryPlugin:
            return self.clone()

        def enqueue(self, input_desc: Sequence[Any], output_desc: Sequence[Any], inputs: Sequence[int],
                    outputs: Sequence[int], workspace: int, stream: int) -> None:
            if self.driver is None:
                from trellis_export.kernels.cuda_launch import CudaDriver

                self.driver = CudaDriver()
            B, T = int(input_desc[0].dims[0]), int(input_desc[0].dims[1])
            launch_memory(self.driver, self._loaded, self.records, B, T, inputs, outputs,
                          int(workspace or 0), int(stream))

    class TrellisMemoryCreator(trt.IPluginCreatorV3One):
        """Creates :class:`TrellisMemoryPlugin` from the node's attributes (build) or the engine's
        serialised fields (run)."""

        def __init__(self, targets: Sequence[int] = ()) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = OP_TYPE
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.targets = tuple(targets)
            #: kernels for the build, per :func:`shape_key` (filled by the builder before parsing)
            self.compiled: dict[Any, list[dict[str, Any]]] = {}
            #: build settings and callback log shared with the plugins (``TrellisMemoryPlugin.build_state``)
            self.build_state: dict[str, Any] = {}
            self._fields = plugin_fields(trt, None)          # kept alive: TensorRT holds their buffers
            self.field_names = trt.PluginFieldCollection(self._fields)

        def create_plugin(self, name: str, fc: Any, phase: Any) -> TrellisMemoryPlugin:
            fields = decode_fields({f.name: f.data for f in fc})
            return TrellisMemoryPlugin(fields, self.targets, phase, self.compiled, self.build_state)

    return TrellisMemoryPlugin, TrellisMemoryCreator


def plugin_fields(trt: Any, values: dict[str, Any] | None) -> list[Any]:
    """PluginField objects for the op's attributes (+ the kernels, when ``values`` are given);
    ``values=None``: the creator's empty field list, the node attributes only (the parser warns
    about a declared field the node lacks)."""
    kinds = {int: trt.PluginFieldType.INT32, float: trt.PluginFieldType.FLOAT32,
             str: trt.PluginFieldType.CHAR}
    out = []
    extra = () if values is None else ((KERNELS_FIELD, str),)
    for name, kind in (*ATTRIBUTES.items(), *extra):
        if values is None:
            data = np.array([], dtype={int: np.int32, float: np.float32, str: np.int8}[kind])
        elif kind is str:
            data = np.frombuffer(str(values[name]).encode() + b"\0", dtype=np.int8).copy()
        elif kind is int:
            data = np.array([int(values[name])], dtype=np.int32)
        else:
            data = np.array([float(values[name])], dtype=np.float32)
        out.append(trt.PluginField(name, data, kinds[kind]))
    return out


@contextlib.contextmanager
def unregistered(trt: Any) -> Iterator[None]:
    """Take this process's creator out of ``trt``'s registry for a while: TensorRT's parser prefers a
    registered plugin over the node's local function, so a function-body build in a process that
    also builds plugin engines must not see it."""
    with _LOCK:
        creator = _CREATORS.pop(id(trt), None)
    if creator is None:
        yield
        return
    registry = trt.get_plugin_registry()
    registry.deregister_creator(creator)
    try:
        yield
    finally:
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise RuntimeError(f"TensorRT refused to re-register the {DOMAIN}::{OP_TYPE} plugin creator")
        with _LOCK:
            _CREATORS[id(trt)] = creator


def register(trt: Any, targets: Sequence[int] = ()) -> Any:
    """Register the creator with ``trt``'s plugin registry (idempotent per module); returns it.

    ``targets``: compute capabilities (e.g. ``[86, 89]``) the kernels are compiled for when an engine
    is built; a runtime that only deserialises engines passes none (the records are in the engine).
    """
    with _LOCK:
        creator = _CREATORS.get(id(trt))
        if creator is not None:
            creator.targets = tuple(targets) or creator.targets
            return creator
        _, creator_cls = make_classes(trt)
        creator = creator_cls(targets)
        if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
            raise RuntimeError(f"TensorRT refused to register the {DOMAIN}::{OP_TYPE} plugin creator")
        _CREATORS[id(trt)] = creator
        return creator
