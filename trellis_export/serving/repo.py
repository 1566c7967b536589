"""``trellis-export triton-repo MODEL.onnx -o REPO``: a Triton model repository for one Trellis model.

Layout (``NAME`` defaults to ``trellis``)::

    REPO/trellis-repo.json            what was written: fingerprint, models, flags
    REPO/NAME/config.pbtxt            python backend: a StreamPool behind the sequence batcher (runs here)
    REPO/NAME/1/model.py              serving/triton_model.py
    REPO/NAME/1/model.onnx            the exported model, unchanged
    REPO/NAME_onnx/config.pbtxt       onnxruntime_onnx with implicit state (GPU deployments)
    REPO/NAME_onnx/1/model.onnx       the model with past/present.position as [B, 1] (see below)
    REPO/NAME_trt/config.pbtxt        tensorrt_plan with implicit state (GPU deployments)
    REPO/NAME_trt/model_trt_view.onnx what trtexec builds 1/model.plan from (BUILD.md says how)

Why the position column: Triton's implicit state needs ``dims`` without the batch axis, and a state of
``dims: []`` (the spec's [B] position) gets a garbage initial value when ``max_batch_size`` > 0
(measured: 4479516672); ``dims: [1]`` is right. The GPU copies therefore wrap the graph: ``past.position``
comes in as [B, 1] and is reshaped to [B] in front of the unchanged graph, ``present.position`` leaves
as [B, 1]. Names, every other tensor, and the numbers are the model's own (tests compare them).

``serve`` loads only NAME (``--model-control-mode=explicit``); the GPU models need the onnxruntime /
tensorrt backends of a full Triton image.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import TrellisExportError
from ..state import state_spec
from .checks import GraphIO, check_config, parse_config, state_dims, triton_type

MANIFEST = "trellis-repo.json"
FORMAT = "trellis-triton-repo"


class RepoError(TrellisExportError):
    """The repository cannot be written (bad model, bad flags, a config that fails its checks)."""


@dataclass(frozen=True)
class RepoOptions:
    name: str = "trellis"
    instances: int = 1
    max_sequences: int = 64
    max_batch_size: int = 8
    idle_seconds: float = 60.0
    queue_delay_us: int = 0
    ort_threads: int = 0
    gpu: bool = True


@dataclass(frozen=True)
class ModelFacts:
    fingerprint: str
    vocab: int
    activation_dtype: str
    logits_dtype: str
    state_spec_json: str


def _pbtxt_params(params: dict[str, str]) -> str:
    items = [f'  {{ key: {json.dumps(k)} value {{ string_value: {json.dumps(v)} }} }}'
             for k, v in params.items()]
    return "parameters [\n" + ",\n".join(items) + "\n]\n"


def _io_block(facts: ModelFacts) -> str:
    return ('input [\n  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'
            f'output [\n  {{ name: "logits" data_type: {triton_type(facts.logits_dtype)} '
            f'dims: [ -1, {facts.vocab} ] }}\n]\n')


def _batcher(opts: RepoOptions, idle_us: int, states: str = "") -> str:
    return ("sequence_batching {\n"
            f"  max_sequence_idle_microseconds: {idle_us}\n"
            f"  oldest {{ max_candidate_sequences: {opts.max_sequences} "
            f"max_queue_delay_microseconds: {opts.queue_delay_us} }}\n"
            f"{states}}}\n")


def python_config(opts: RepoOptions, facts: ModelFacts) -> str:
    # Triton keeps a sequence twice as long as the pool, so an idle sequence is refused by the model
    # as "expired" (clear) before Triton forgets its correlation id.
    idle_us = int(round(opts.idle_seconds * 2e6))
    params = {"fingerprint": facts.fingerprint, "state_spec": facts.state_spec_json,
              "max_sequences": str(opts.max_sequences), "idle_seconds": repr(float(opts.idle_seconds)),
              "ort_threads": str(opts.ort_threads), "onnx_file": "model.onnx", "providers": "cpu"}
    return (f'name: "{opts.name}"\nbackend: "python"\nmax_batch_size: {opts.max_batch_size}\n'
            + _io_block(facts) + _batcher(opts, idle_us)
            + f"instance_group [\n  {{ count: {opts.instances} kind: KIND_CPU }}\n]\n"
            + _pbtxt_params(params))


def implicit_state_config(opts: RepoOptions, facts: ModelFacts, config: Any, kind: str) -> str:
    if kind == "onnxruntime":
        name, backend, platform = f"{opts.name}_onnx", "onnxruntime", "onnxruntime_onnx"
    else:
        name, backend, platform = f"{opts.name}_trt", "tensorrt", "tensorrt_plan"
    entries = []
    for t in state_spec(config):
        ttype = triton_type(t.resolved_dtype(facts.activation_dtype))
        dims = ", ".join(str(d) for d in state_dims(t))
        entries.append(f'    {{ input_name: "{t.past_name}" output_name: "{t.present_name}" '
                       f"data_type: {ttype} dims: [ {dims} ]\n"
                       f'      initial_state {{ name: "zero" data_type: {ttype} dims: [ {dims} ] '
                       "zero_data: true } }")
    states = "  state [\n" + ",\n".join(entries) + "\n  ]\n"
    idle_us = int(round(opts.idle_seconds * 1e6))
    text = (f'name: "{name}"\nbackend: "{backend}"\nplatform: "{platform}"\n'
            f"max_batch_size: {opts.max_batch_size}\n" + _io_block(facts) + _batcher(opts, idle_us, states)
            + f"instance_group [\n  {{ count: {opts.instances} kind: KIND_GPU }}\n]\n")
    if kind == "tensorrt":
        text += 'default_model_filename: "model.plan"\n'
    return text


# --------------------------------------------------------------------------- graph
def position_as_column(model: Any) -> Any:
    """A copy of ``model`` whose ``past.position`` input and ``present.position`` output are [B, 1]."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from ..state import PAST_PREFIX, PRESENT_PREFIX

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    past, present = PAST_PREFIX + "position", PRESENT_PREFIX + "position"
    flat_in, flat_out = past + ".flat", present + ".flat"
    inp = next((i for i in g.input if i.name == past), None)
    out = next((o for o in g.output if o.name == present), None)
    if inp is None or out is None:
        raise RepoError(f"the graph has no {past} input or {present} output")
    for node in g.node:
        node.input[:] = [flat_in if x == past else (flat_out if x == present else x) for x in node.input]
        node.output[:] = [flat_out if x == present else x for x in node.output]
    for v in (inp, out):
        dims = v.type.tensor_type.shape.dim
        if len(dims) != 1:
            raise RepoError(f"{v.name} has rank {len(dims)}, expected [B]")
        dims.add().dim_value = 1
    g.initializer.extend([numpy_helper.from_array(np.array([-1], dtype=np.int64), "trellis.shape_flat"),
                          numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "trellis.shape_col")])
    nodes = list(g.node)
    del g.node[:]
    g.node.extend([helper.make_node("Reshape", [past, "trellis.shape_flat"], [flat_in], name="position_in"),
                   *nodes,
                   helper.make_node("Reshape", [flat_out, "trellis.shape_col"], [present],
                                    name="position_out")])
    return m


def _model_facts(path: Path) -> tuple[ModelFacts, Any, Any]:
    from ..runtime import SessionError, open_session

    try:
        sess = open_session("ort", model_path=path, providers=["CPUExecutionProvider"])
    except SessionError as exc:
        raise RepoError(f"not a Trellis ONNX model: {exc}") from None
    import onnx

    proto = onnx.load(str(path))
    graph = GraphIO.from_proto(proto)
    logits_dtype = graph.outputs.get("logits", ("float32", []))[0]
    facts = ModelFacts(sess.fingerprint, sess.config.vocab_size, sess.activation_dtype, logits_dtype,
                       sess.state_spec_json())
    return facts, sess.config, proto


def write_repository(model_path: str | os.PathLike[str], out: str | os.PathLike[str],
                     opts: RepoOptions | None = None, *, force: bool = False) -> dict[str, Any]:
    """Write the repository; returns the manifest. An existing directory is replaced when trellis-export
    wrote it (a repository, or marked), any other only with ``force`` (the rules of
    :func:`trellis_export.outputs.claim_outputs`)."""
    import onnx

    opts = opts or RepoOptions()
    if not opts.name.replace("_", "").replace("-", "").isalnum():
        raise RepoError(f"--name {opts.name!r}: use letters, digits, '_' and '-'")
    for key, lo in (("instances", 1), ("max_sequences", 1), ("max_batch_size", 1)):
        if getattr(opts, key) < lo:
            raise RepoError(f"{key} must be >= {lo}, got {getattr(opts, key)}")
    if not opts.idle_seconds > 0:
        raise RepoError(f"idle seconds must be > 0, got {opts.idle_seconds}")
    src = Path(model_path)
    if not src.is_file():
        raise RepoError(f"{src}: no such ONNX model file")
    dest = Path(os.path.abspath(os.fspath(out)))
    from ..outputs import MARKER, OutputSpec, claim_outputs, replace_dir, temporary_sibling, write_marker

    def owns(name: str) -> bool:       # a repository written before markers existed still counts
        return name in (MANIFEST, MARKER) or (dest / name / "config.pbtxt").is_file()

    # the project's output rules: a directory trellis-export wrote is replaced, any other only with force
    claim_outputs([OutputSpec(dest, "-o/--output", kind="dir", parents=True, owns=owns)], inputs=[src],
                  force=force)
    facts, config, proto = _model_facts(src)
    spec = state_spec(config)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with temporary_sibling(dest, directory=True) as tmp:
        written = _write_tree(tmp, src, opts, facts, config, proto, spec, onnx)
        manifest = {"format": FORMAT, "format_version": 1, "fingerprint": facts.fingerprint,
                    "source_model": str(src.resolve()), "serve_model": opts.name, "models": written,
                    "vocab_size": facts.vocab, "options": asdict(opts)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_marker(tmp)
        replace_dir(tmp, dest)
    return manifest


def _write_tree(root: Path, src: Path, opts: RepoOptions, facts: ModelFacts, config: Any, proto: Any,
                spec: list, onnx: Any) -> dict[str, str]:
    written: dict[str, str] = {}
    checks = []
    # python backend
    py_dir = root / opts.name
    (py_dir / "1").mkdir(parents=True)
    shutil.copy2(Path(__file__).with_name("triton_model.py"), py_dir / "1" / "model.py")
    shutil.copy2(src, py_dir / "1" / "model.onnx")
    data = src.parent / (src.name + ".data")
    if data.exists():
        shutil.copy2(data, py_dir / "1" / data.name)
    text = python_config(opts, facts)
    (py_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    checks.append(("python", py_dir / "config.pbtxt", text, GraphIO.from_proto(proto)))
    written[opts.name] = "python"
    if opts.gpu:
        wrapped = position_as_column(proto)
        onnx.checker.check_model(wrapped)
        ort_dir = root / f"{opts.name}_onnx"
        (ort_dir / "1").mkdir(parents=True)
        onnx.save(wrapped, str(ort_dir / "1" / "model.onnx"))
        text = implicit_state_config(opts, facts, config, "onnxruntime")
        (ort_dir / "config.pbtxt").write_text(text, encoding="utf-8")
        checks.append(("onnxruntime", ort_dir / "config.pbtxt", text, GraphIO.from_proto(wrapped)))
        written[f"{opts.name}_onnx"] = "onnxruntime_onnx"
        from ..opdef import DOMAIN, OP_TYPE

        view = onnx.ModelProto()
        view.CopyFrom(wrapped)          # export.tensorrt_view does the same: drop the local function
        keep = [f for f in view.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
        del view.functions[:]
        view.functions.extend(keep)
        trt_dir = root / f"{opts.name}_trt"
        (trt_dir / "1").mkdir(parents=True)
        onnx.save(view, str(trt_dir / "model_trt_view.onnx"))
        text = implicit_state_config(opts, facts, config, "tensorrt")
        (trt_dir / "config.pbtxt").write_text(text, encoding="utf-8")
        (trt_dir / "BUILD.md").write_text(_trt_build_note(opts), encoding="utf-8")
        checks.append(("tensorrt", trt_dir / "config.pbtxt", text, GraphIO.from_proto(view)))
        written[f"{opts.name}_trt"] = "tensorrt_plan (build 1/model.plan first: BUILD.md)"
    for kind, path, text, graph in checks:
        where = f"{path.parent.name}/config.pbtxt"
        cfg = parse_config(text, where)
        check_config(cfg, kind=kind, graph=graph, spec=spec, vocab=facts.vocab,
                     activation_dtype=facts.activation_dtype, fingerprint=facts.fingerprint,
                     state_spec_json=facts.state_spec_json, where=where)
    return written


def check_repository(repo: str | os.PathLike[str]) -> dict[str, Any]:
    """Re-check an existing repository's configs against its ONNX files; returns its manifest."""
    import onnx

    root = Path(repo)
    man_path = root / MANIFEST
    if not man_path.is_file():
        raise RepoError(f"{root}: not a trellis model repository ({MANIFEST} missing); write one with "
                        "`trellis-export triton-repo MODEL.onnx -o REPO`")
    try:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RepoError(f"{man_path}: not valid JSON ({exc})") from None
    name = manifest.get("serve_model", "")
    model = root / name / "1" / "model.onnx"
    if not model.is_file():
        raise RepoError(f"{root}: {name}/1/model.onnx missing")
    facts, config, proto = _model_facts(model)
    spec = state_spec(config)
    for mname, kind in manifest.get("models", {}).items():
        path = root / mname / "config.pbtxt"
        if not path.is_file():
            raise RepoError(f"{path}: missing")
        k = "python" if kind == "python" else (
            "onnxruntime" if kind.startswith("onnxruntime") else "tensorrt")
        g_model = {"python": model, "onnxruntime": root / mname / "1" / "model.onnx",
                   "tensorrt": root / mname / "model_trt_view.onnx"}[k]
        graph = GraphIO.from_proto(onnx.load(str(g_model), load_external_data=False)) if k != "python" \
            else GraphIO.from_proto(proto)
        where = f"{mname}/config.pbtxt"
        check_config(parse_config(path.read_text(encoding="utf-8"), where), kind=k, graph=graph, spec=spec,
                     vocab=facts.vocab, activation_dtype=facts.activation_dtype,
                     fingerprint=facts.fingerprint, state_spec_json=facts.state_spec_json, where=where)
    return manifest


def _trt_build_note(opts: RepoOptions) -> str:
    return f"""# Building {opts.name}_trt/1/model.plan (on the GPU that will serve it)

`model_trt_view.onnx` is the model with `past.position` / `present.position` as [B, 1] and without the
TrellisMemory local function: TensorRT parses the `trellis::TrellisMemory` nodes with the plugin of
`trellis_export.plugins_trt`. Build the plan with the plugin library loaded, e.g.

    trtexec --onnx=model_trt_view.onnx --saveEngine=1/model.plan \\
        --staticPlugins=<libtrellis_plugin.so> \\
        --minShapes=input_ids:1x1 --optShapes=input_ids:{opts.max_batch_size}x1 \\
        --maxShapes=input_ids:{opts.max_batch_size}x512

(state inputs take the same batch range), and start tritonserver with the plugin in `LD_PRELOAD` and
`--model-control-mode=explicit --load-model={opts.name}_trt`.
"""
