"""TensorRT engines of a Trellis model: build from a checkpoint or an exported ONNX file, report
what was built, and keep the model's identity beside the engine.

Composable like Polygraphy's loaders: :func:`onnx_for_engine` gives the ONNX bytes TensorRT parses
(the portable function body, or -- with the plugin -- the graph without the function so that every
``trellis::TrellisMemory`` node becomes a plugin layer), :func:`build_engine` parses and builds with
the profiles of :class:`EngineSettings`, and :func:`write_engine` puts the engine and its sidecar
(``<engine>.json``: fingerprint, config, state spec, profiles, the build report) in place
atomically. :func:`read_sidecar` is what a runtime checks before it trusts an engine.

Profiles: ``decode`` (T = 1) and ``prefill`` (T in ``--tokens``), both over ``--batch``; every state
input follows the batch range, its other dimensions are fixed by the config. Networks are strongly
typed (TensorRT-RTX supports nothing else): the ONNX model's types decide the precision, so
``--dtype float16`` means a float16 export (float16 activations, float32 memories and gates).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trellis_export import __version__
from trellis_export.errors import TrellisExportError, first_line
from trellis_export.export.meta import (
    META_ACTIVATION_DTYPE,
    META_CONFIG,
    META_FINGERPRINT,
    META_STATE_SPEC,
)
from trellis_export.opdef import DOMAIN, OP_TYPE
from trellis_export.state import state_spec

from .runtimes import RTX_TARGETS, TensorRT, load_tensorrt, rtx_compute_capabilities

__all__ = ["EngineError", "EngineSettings", "Range", "EngineReport", "onnx_for_engine", "build_engine",
           "resolve_targets", "profile_shapes", "input_dims",
           "write_engine", "read_sidecar", "sidecar_path", "SIDECAR_FORMAT", "PROFILE_NAMES"]

SIDECAR_FORMAT = "trellis-engine"
SIDECAR_FORMAT_VERSION = "1"
PROFILE_NAMES: tuple[str, ...] = ("decode", "prefill")
#: Default TensorRT-RTX targets: every GEMM-capable one but 12.1 (7.5 lacks float32 GEMM).
DEFAULT_RTX_TARGETS: tuple[str, ...] = ("8.0", "8.6", "8.9", "12.0")


class EngineError(TrellisExportError):
    """An engine cannot be built or read; the message names the file, node or flag."""


@dataclass(frozen=True)
class Range:
    """A dynamic dimension's min / opt / max (a TensorRT optimization profile entry)."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, what: str, default_opt: str = "min") -> Range:
        """``"N"``, ``"MIN..MAX"`` or ``"MIN..OPT..MAX"`` (opt defaults to min or max)."""
        parts = [p.strip() for p in str(text).split("..")]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise EngineError(f"{what} expects N, MIN..MAX or MIN..OPT..MAX with integers, "
                              f"got {text!r}") from None
        if len(nums) == 1:
            nums = nums * 3
        elif len(nums) == 2:
            nums = [nums[0], nums[0] if default_opt == "min" else nums[1], nums[1]]
        if len(nums) != 3 or not 1 <= nums[0] <= nums[1] <= nums[2]:
            raise EngineError(f"{what} expects 1 <= MIN <= OPT <= MAX, got {text!r}")
        return cls(*nums)

    def __str__(self) -> str:
        return f"{self.min}..{self.opt}..{self.max}"


@dataclass
class EngineSettings:
    """What to build. ``runtime=None``: TensorRT-RTX when importable, else enterprise TensorRT."""

    runtime: str | None = None
    plugin: bool = False
    batch: Range = field(default_factory=lambda: Range(1, 1, 8))
    tokens: Range = field(default_factory=lambda: Range(1, 256, 256))
    decode_profile: bool = True
    compute_capabilities: tuple[str, ...] = ()      # TensorRT-RTX only; () -> DEFAULT_RTX_TARGETS
    builder_optimization_level: int | None = None

    def profiles(self) -> list[tuple[str, Range]]:
        """(name, tokens range) of each optimization profile, in engine order."""
        out: list[tuple[str, Range]] = []
        if self.decode_profile or self.tokens.max == 1:
            out.append(("decode", Range(1, 1, 1)))
        if self.tokens.max > 1:
            lo = max(self.tokens.min, 2) if out else self.tokens.min
            out.append(("prefill", Range(lo, max(lo, self.tokens.opt), self.tokens.max)))
        return out


@dataclass
class EngineReport:
    """What a build did, as trtexec / Polygraphy would report it (JSON-able via :meth:`to_dict`)."""

    runtime: str
    runtime_module: str
    runtime_version: str
    source: str
    plugin: bool
    activation_dtype: str
    fingerprint: str
    config: dict[str, Any]
    targets: list[str]
    profiles: list[dict[str, Any]]
    parser_warnings: list[dict[str, Any]]
    layers: int
    layers_by_type: dict[str, int]
    memory_nodes: list[dict[str, str]]
    build_seconds: float
    engine_bytes: int
    plugin_kernels: list[dict[str, Any]]
    trellis_export_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Logger:
    """A TensorRT logger that keeps the messages (the parser's warnings, the builder's errors)."""

    def __init__(self, trt: Any, echo_errors: bool = False) -> None:
        severity = trt.ILogger.Severity

        class Impl(trt.ILogger):
            def __init__(inner) -> None:          # noqa: N805 - nested class
                trt.ILogger.__init__(inner)

            def log(inner, sev: Any, msg: str) -> None:   # noqa: N805
                if sev <= severity.WARNING:
                    self.messages.append((str(sev).rsplit(".", 1)[-1], msg))

        self.messages: list[tuple[str, str]] = []
        self.impl = Impl()

    def warnings(self) -> list[dict[str, Any]]:
        """Warnings and errors, deduplicated (TensorRT repeats one per layer instance), with counts."""
        norm = Counter((sev, re.sub(r"\d+", "#", msg)) for sev, msg in self.messages)
        first: dict[tuple[str, str], str] = {}
        for sev, msg in self.messages:
            first.setdefault((sev, re.sub(r"\d+", "#", msg)), msg)
        return [{"severity": k[0], "count": n, "message": first[k]} for k, n in norm.items()]

    def errors(self) -> list[str]:
        return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR", "kERROR", "kINTERNAL_ERROR")]


# ------------------------------------------------------------------------------------------ sources
@dataclass
class EngineSource:
    """The ONNX model an engine is built from, with the identity the sidecar records."""

    onnx_bytes: bytes
    path_for_external_data: str | None
    description: str
    fingerprint: str
    config: dict[str, Any]
    state_spec: dict[str, Any]
    activation_dtype: str


def _meta(proto: Any) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def onnx_for_engine(source: str | os.PathLike[str] | None, *, plugin: bool, dtype: str | None = None
                    ) -> EngineSource:
    """The ONNX TensorRT parses for ``source``: a trellis-export ONNX file (``*.onnx`` or any file),
    a checkpoint directory, or None (the bundled checkpoint). Without the plugin the portable
    function body is kept (re-made if the file carries another flavour); with it the function is
    dropped so that the parser maps each node to the registered plugin."""
    import onnx

    from trellis_export.export.function_body import check_function_matches, with_flavour
    from trellis_export.export.onnx_export import tensorrt_view

    path = Path(source) if source is not None else None
    external: str | None = None
    if path is not None and path.is_file():
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and friends on a file that is not ONNX
            msg = first_line(exc)
            raise EngineError(f"{path}: not a readable ONNX model ({msg})") from None
        meta = _meta(proto)
        if META_CONFIG not in meta or META_FINGERPRINT not in meta:
            raise EngineError(f"{path}: no Trellis metadata ({META_CONFIG}, {META_FINGERPRINT}); export the "
                              "model with trellis-export export")
        act = meta.get(META_ACTIVATION_DTYPE, "float32")
        if dtype is not None and dtype != act:
            raise EngineError(f"--dtype {dtype}: {path} was exported with {act} activations; re-export it "
                              f"with trellis-export export --dtype {dtype}, or build from the checkpoint")
        from onnx.external_data_helper import uses_external_data
        if any(uses_external_data(t) for t in proto.graph.initializer):
            external = str(path.resolve())
        desc = str(path)
    else:
        if path is not None and not path.is_dir():
            raise EngineError(f"{path}: no such ONNX file or checkpoint directory")
        from trellis_export.checkpoint import load_checkpoint
        from trellis_export.export.onnx_export import export_model_proto

        model = load_checkpoint(source)
        act = dtype or "float32"
        proto = export_model_proto(model, dtype=act)
        meta = _meta(proto)
        desc = f"checkpoint {model.checkpoint_path}" if getattr(model, "checkpoint_path", None) \
            else "checkpoint"
    try:
        check_function_matches(proto)
    except ValueError as exc:
        raise EngineError(f"{desc}: {exc}") from None
    proto = tensorrt_view(proto) if plugin else with_flavour(proto, "portable")
    return EngineSource(proto.SerializeToString(), external, desc, meta[META_FINGERPRINT],
                        json.loads(meta[META_CONFIG]), json.loads(meta.get(META_STATE_SPEC, "{}")), act)


# ------------------------------------------------------------------------------------------ build
def resolve_targets(rt: TensorRT, settings: EngineSettings) -> list[str]:
    """The compute capabilities the engine (and the plugin's kernels) are built for, checked."""
    if rt.is_rtx:
        targets = list(settings.compute_capabilities or DEFAULT_RTX_TARGETS)
        rtx_compute_capabilities(rt, targets)            # raises on a target RTX does not have
        return targets
    if settings.compute_capabilities:
        raise EngineError("--compute-capability applies to --runtime tensorrt-rtx only; enterprise TensorRT "
                          "builds for the GPU it runs on")
    from trellis_export.kernels.cuda_launch import CudaDriver

    try:
        cc = CudaDriver().compute_capability()
    except Exception as exc:  # no libcuda, no device
        raise EngineError(f"--runtime tensorrt builds on the GPU it targets, and none is usable here "
                          f"({first_line(exc)})") from None
    return [f"{cc // 10}.{cc % 10}"]


def _shapes_from_dims(inputs: list[tuple[str, list[int]]], settings: EngineSettings, tokens: Range
                      ) -> dict[str, list[list[int]]]:
    """min / opt / max of every input: dimension 0 follows the batch range, ``input_ids``' dimension 1
    the profile's token range, every other dimension is fixed (``inputs``: (name, dims), -1 dynamic)."""
    b = settings.batch
    shapes: dict[str, list[list[int]]] = {}
    for name, dims in inputs:
        rows = []
        for bb, tt in ((b.min, tokens.min), (b.opt, tokens.opt), (b.max, tokens.max)):
            shape = [bb if j == 0 else d for j, d in enumerate(dims)]
            if name == "input_ids":
                shape[1] = tt
            if any(d < 0 for d in shape):
                raise EngineError(f"input {name!r} has a dynamic dimension beyond batch and tokens "
                                  f"({dims}); the engine builder cannot give it a range")
            rows.append(shape)
        shapes[name] = rows
    return shapes


def _profile_shapes(network: Any, settings: EngineSettings, tokens: Range) -> dict[str, list[list[int]]]:
    inputs = [(network.get_input(i).name, list(network.get_input(i).shape))
              for i in range(network.num_inputs)]
    return _shapes_from_dims(inputs, settings, tokens)


def input_dims(config: Any) -> list[tuple[str, list[int]]]:
    """The exported graph's inputs in order with their dims, -1 for the dynamic batch and tokens axes
    (``input_ids`` then every ``past.*`` of the state spec), without parsing a network."""
    return [("input_ids", [-1, -1])] + [(t.past_name, [-1, *t.concrete_shape(1)[1:]])
                                        for t in state_spec(config)]


def profile_shapes(config: Any, settings: EngineSettings) -> list[dict[str, Any]]:
    """Every optimization profile of :meth:`EngineSettings.profiles` with the min / opt / max shape of
    every input, computed from the state spec: the shapes :func:`build_engine` sets (for
    ``build_engine.sh`` / trtexec and other builders that do not go through this module)."""
    dims = input_dims(config)
    return [{"name": name, "index": i, "batch": asdict(settings.batch), "tokens": asdict(tokens),
             "shapes": _shapes_from_dims(dims, settings, tokens)}
            for i, (name, tokens) in enumerate(settings.profiles())]


def _memory_node_names(onnx_bytes: bytes) -> list[str]:
    import onnx

    proto = onnx.load_model_from_string(onnx_bytes)
    return [n.name for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def build_engine(source: EngineSource, settings: EngineSettings, rt: TensorRT | None = None
                 ) -> tuple[bytes, EngineReport]:
    """Parse ``source`` and build the engine; returns its bytes and the report. A parse failure
    raises :class:`EngineError` naming the ONNX node and the parser's message."""
    from . import plugin_v3

    rt = rt or load_tensorrt(settings.runtime)
    if settings.plugin:
        return _build(source, settings, rt)
    with plugin_v3.unregistered(rt.trt):
        return _build(source, settings, rt)


def _build(source: EngineSource, settings: EngineSettings, rt: TensorRT) -> tuple[bytes, EngineReport]:
    trt = rt.trt
    targets = resolve_targets(rt, settings)
    creator = None
    if settings.plugin:
        from . import plugin_v3

        creator = plugin_v3.register(trt, targets=[_cc_int(t) for t in targets])
        creator.compiled.clear()
        creator.build_state.clear()
        cfg = source.config
        from trellis_export.config import TrellisConfig
        from trellis_export.opdef import ATTRIBUTES, op_attributes

        attrs = {k: v for k, v in op_attributes(TrellisConfig.from_dict(cfg)).items() if k in ATTRIBUTES}
        heads, slots, head_dim = int(cfg["n_heads"]), int(cfg["n_slots"]), int(cfg["head_dim"])
        dtype = source.activation_dtype
        try:
            key = plugin_v3.shape_key(heads=heads, slots=slots, head_dim=head_dim, dtype=dtype)
            creator.compiled[key] = plugin_v3.compile_records(
                attrs, heads=heads, slots=slots, head_dim=head_dim, dtype=dtype,
                targets=[_cc_int(t) for t in targets])
        except Exception as exc:  # triton's compiler raises many kinds; one line for the user
            first = first_line(exc)
            raise EngineError(f"{source.description}: compiling the plugin's Triton kernels failed: "
                              f"{first}") from None
    log = _Logger(trt)
    builder = trt.Builder(log.impl)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log.impl)
    ok = parser.parse(source.onnx_bytes, source.path_for_external_data) if source.path_for_external_data \
        else parser.parse(source.onnx_bytes)
    if not ok:
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        err = errs[0] if errs else None
        where = f"node {err.node_name()!r} ({err.node_operator()})" if err is not None else "the model"
        desc = err.desc().strip().splitlines()[0] if err is not None else "no message"
        raise EngineError(f"{source.description}: {rt.name} {rt.version} cannot parse {where}: {desc}")
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    by_type = Counter(str(layer.type).rsplit(".", 1)[-1] for layer in layers)
    plugin_layers = {layer.name for layer in layers if layer.type == trt.LayerType.PLUGIN_V3}
    nodes = []
    for name in _memory_node_names(source.onnx_bytes):
        if not settings.plugin:
            nodes.append({"node": name, "became": "function body (expanded into standard layers)",
                          "layer": ""})
            continue
        hit = next((p for p in plugin_layers if p.startswith(name)), None)  # named after the node
        nodes.append({"node": name, "became": "plugin layer" if hit else "missing", "layer": hit or ""})
    if not settings.plugin:
        if plugin_layers:
            raise EngineError(f"{source.description}: plugin layers {sorted(plugin_layers)} in a "
                              "--no-plugin build")
    elif any(n["became"] == "missing" for n in nodes):
        missing = [n["node"] for n in nodes if n["became"] == "missing"]
        raise EngineError(f"{source.description}: TrellisMemory node(s) {missing} did not become plugin "
                          "layers")

    config = builder.create_builder_config()
    if rt.is_rtx:
        ccs = rtx_compute_capabilities(rt, targets)
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(cc, i)
    if creator is not None:
        # in-place state (the memory outputs aliased to their inputs): needs TensorRT's preview feature
        feature = getattr(getattr(trt, "PreviewFeature", None), plugin_v3.ALIAS_PREVIEW_FEATURE, None)
        if feature is not None and hasattr(trt, "IPluginV3OneBuildV2"):
            config.set_preview_feature(feature, True)
            creator.build_state["alias_io"] = True
    if settings.builder_optimization_level is not None:
        config.builder_optimization_level = int(settings.builder_optimization_level)
    profiles: list[dict[str, Any]] = []
    for name, tokens in settings.profiles():
        prof = builder.create_optimization_profile()
        shapes = _profile_shapes(network, settings, tokens)
        for inp, (mn, op, mx) in shapes.items():
            prof.set_shape(inp, mn, op, mx)
        config.add_optimization_profile(prof)
        profiles.append({"name": name, "index": len(profiles), "batch": asdict(settings.batch),
                         "tokens": asdict(tokens), "input_ids": shapes["input_ids"]})
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        errs = log.errors()
        raise EngineError(f"{source.description}: {rt.name} {rt.version} failed to build the engine: "
                          f"{(errs[0].strip().splitlines() or ['no message'])[0] if errs else 'no message'}")
    data = bytes(serialized)
    kernels = []
    if creator is not None:
        missing = creator.compiled.pop("missing", None)
        if missing:
            raise EngineError(f"{source.description}: plugin layer(s) of shape {missing} had no compiled "
                              "kernels (the config's heads / slots / head_dim differ from the graph's)")
        # what get_workspace_size answered TensorRT, per (max B, max T) it was asked about
        asked = creator.build_state.get("workspace") or []
        workspace = [dict(t) for t in sorted({tuple(sorted(w.items())) for w in asked})]
        from trellis_export.opdef import INPUTS, OUTPUTS

        aliased = {OUTPUTS[o]: INPUTS[i] for o, i in sorted(set(creator.build_state.get("aliased") or []))
                   if i >= 0}
        for key, recs in creator.compiled.items():
            kernels.append({"shape": dict(key), "records": len(recs),
                            "targets": sorted({r["target"] for r in recs}),
                            "variants": sorted({f"{r['kernel']}:{r['variant']}" for r in recs}),
                            "decode_kernel": plugin_v3.KERNEL_FOR_T[True],
                            "prefill_kernels": plugin_v3.prefill_kernels(recs),
                            "workspace_requests": workspace,
                            "aliased_outputs": aliased,
                            "decode_record": "decode_in_place" if len(aliased) == 4 else "decode"})
    report = EngineReport(
        runtime=rt.name, runtime_module=rt.module_name, runtime_version=rt.version, source=source.description,
        plugin=settings.plugin, activation_dtype=source.activation_dtype, fingerprint=source.fingerprint,
        config=source.config, targets=targets, profiles=profiles, parser_warnings=log.warnings(),
        layers=len(layers), layers_by_type=dict(sorted(by_type.items())), memory_nodes=nodes,
        build_seconds=round(seconds, 3), engine_bytes=len(data), plugin_kernels=kernels)
    return data, report


def _cc_int(text: str) -> int:
    major, _, minor = text.partition(".")
    return int(major) * 10 + int(minor or 0)


# ------------------------------------------------------------------------------------------ files
def sidecar_path(engine: str | os.PathLike[str]) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine)
    return p.with_name(p.name + ".json")


def sidecar(report: EngineReport, source: EngineSource) -> dict[str, Any]:
    return {"format": SIDECAR_FORMAT, "format_version": SIDECAR_FORMAT_VERSION,
            "fingerprint": source.fingerprint, "config": source.config, "state_spec": source.state_spec,
            "activation_dtype": source.activation_dtype, "plugin": report.plugin,
            "runtime": report.runtime, "runtime_version": report.runtime_version,
            "profiles": report.profiles, "report": report.to_dict()}


def write_engine(path: str | os.PathLike[str], data: bytes, report: EngineReport, source: EngineSource,
                 json_report: str | os.PathLike[str] | None = None) -> Path:
    """Write the engine and its sidecar atomically (sidecar first: an engine never lands without its
    identity), and the report to ``json_report`` when given."""
    from trellis_export.outputs import atomic_write_bytes

    dest = Path(path)
    atomic_write_bytes(sidecar_path(dest), (json.dumps(sidecar(report, source), indent=1) + "\n").encode())
    atomic_write_bytes(dest, data)
    if json_report is not None:
        atomic_write_bytes(json_report, (json.dumps(report.to_dict(), indent=1) + "\n").encode())
    return dest


def read_sidecar(engine: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of ``engine``, checked: format, fingerprint, config and a state spec that is the
    config's. Raises :class:`EngineError` naming the file."""
    from trellis_export.config import ConfigError, TrellisConfig

    p = sidecar_path(engine)
    if not Path(engine).is_file():
        raise EngineError(f"{engine}: no such engine file")
    if not p.is_file():
        raise EngineError(f"{p}: the engine's sidecar is missing (it holds the model's fingerprint and state "
                          "spec); rebuild the engine with trellis-export engine")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{p}: not a readable engine sidecar ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise EngineError(f"{p}: not a trellis engine sidecar (format {fmt!r}, expected {SIDECAR_FORMAT!r})")
    for key in ("fingerprint", "config", "state_spec", "profiles"):
        if key not in data:
            raise EngineError(f"{p}: the sidecar lacks {key!r}")
    try:
        config = TrellisConfig.from_dict(data["config"], source=f"{p} config")
    except ConfigError as exc:
        raise EngineError(str(exc)) from None
    mine = [t.to_dict() for t in state_spec(config)]
    if data["state_spec"].get("tensors") != mine:
        raise EngineError(f"{p}: the sidecar's state spec does not match its config's state spec")
    data["trellis_config"] = config
    return data


def format_report(report: EngineReport, engine: str | os.PathLike[str] | None = None) -> list[str]:
    """The human summary lines ``trellis-export engine`` prints."""
    lines = []
    if engine is not None:
        lines.append(f"wrote        {engine} (+ {sidecar_path(engine).name})")
    lines.append(f"runtime      {report.runtime} {report.runtime_version} ({report.runtime_module})")
    lines.append(f"source       {report.source}")
    lines.append(f"memory       {len(report.memory_nodes)} x trellis::TrellisMemory -> "
                 f"{'plugin layers' if report.plugin else 'function body'}")
    top = ", ".join(f"{k} {v}" for k, v in sorted(report.layers_by_type.items(), key=lambda kv: -kv[1])[:6])
    lines.append(f"layers       {report.layers} ({top}{', ...' if len(report.layers_by_type) > 6 else ''})")
    for p in report.profiles:
        lines.append(f"profile {p['index']}    {p['name']}: batch {Range(**p['batch'])}, "
                     f"tokens {Range(**p['tokens'])}")
    lines.append(f"targets      {', '.join(report.targets)}")
    for k in report.plugin_kernels:
        prefill = " + ".join(k.get("prefill_kernels") or ["none"])
        ws = max((w.get("bytes", 0) for w in k.get("workspace_requests") or []), default=0)
        lines.append(f"kernels      {k['records']} records: decode {k.get('decode_kernel', '?')}, prefill "
                     f"{prefill}; plugin workspace {ws:,} bytes at most")
    lines.append(f"dtype        {report.activation_dtype} activations, float32 memories and gates")
    lines.append(f"build        {report.build_seconds:.1f} s, {report.engine_bytes:,} bytes")
    n_warn = sum(w["count"] for w in report.parser_warnings)
    lines.append(f"warnings     {n_warn} ({len(report.parser_warnings)} distinct; in the JSON report)")
    lines.append(f"fingerprint  {report.fingerprint}")
    return lines


def parse_targets(text: str | None) -> tuple[str, ...]:
    """``--compute-capability 8.0,8.6`` -> ("8.0", "8.6"); checked against the RTX targets later."""
    if not text:
        return ()
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    for t in out:
        if not re.fullmatch(r"\d+\.\d+", t):
            raise EngineError(f"--compute-capability expects comma-separated MAJOR.MINOR values such as "
                              f"{','.join(RTX_TARGETS)}; got {text!r}")
    return out
