"""``export_onnx``: the streaming step of a TrellisLM as an ONNX graph with one
``trellis::TrellisMemory`` node per layer and a model-local function body (TRELLIS_SPEC.md 6-7)."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper
from torch import Tensor, nn

from .. import __version__
from ..checkpoint import model_fingerprint
from ..errors import TrellisExportError
from ..fileio import current_umask
from ..opdef import DOMAIN, OP_TYPE, OP_VERSION, OPSET
from ..state import state_spec, state_spec_json
from .custom_op import TRANSLATION_TABLE, export_memory_fn
from .function_body import check_function_matches, memory_function
from .meta import (
    META_ACTIVATION_DTYPE,
    META_CONFIG,
    META_EXPORTER_VERSION,
    META_FINGERPRINT,
    META_OPSET,
    META_STATE_SPEC,
)

__all__ = ["export_onnx", "export_model_proto", "save_model_atomic", "tensorrt_view", "save_tensorrt_view",
           "check_exported", "check_output_path", "describe", "wants_external_data", "ExportError",
           "EXTERNAL_DATA_THRESHOLD", "DTYPES", "BATCH_DIM", "TOKENS_DIM"]

#: Models whose weights exceed this many bytes get their tensors in an external data file.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 1024**3)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
#: Names of the dynamic axes in the exported graph.
BATCH_DIM, TOKENS_DIM = "batch", "tokens"


class ExportError(TrellisExportError):
    """The model cannot be exported, or the exported graph fails its checks."""


class _StepGraph(nn.Module):
    """``(input_ids, *past) -> (logits, *present)`` in state-spec order, memory via the custom op."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        state = dict(zip(self.names, past))
        logits, new = self.model(input_ids, state, mode="step", memory_fn=export_memory_fn)
        return (logits, *(new[n] for n in self.names))


def _prepare(model: nn.Module, dtype: str) -> nn.Module:
    """A float32 / float16 copy for export; memories (and the learned M0) stay float32."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    m = copy.deepcopy(model).to("cpu").eval()
    m = m.to(DTYPES[dtype])
    if dtype != "float32":
        for layer in m.layers:
            layer.m0_key.data = layer.m0_key.data.float()
            layer.m0_value.data = layer.m0_value.data.float()
    return m


def _rename_dims(model: onnx.ModelProto, ids_name: str) -> None:
    """Give the dynamic axes stable names: ``batch`` and ``tokens`` everywhere they appear."""
    inp = next(i for i in model.graph.input if i.name == ids_name)
    dims = inp.type.tensor_type.shape.dim
    mapping = {dims[0].dim_param: BATCH_DIM, dims[1].dim_param: TOKENS_DIM}
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in mapping:
                    d.dim_param = mapping[d.dim_param]


def _set_opsets(model: onnx.ModelProto) -> None:
    keep = [o for o in model.opset_import if o.domain not in ("", "ai.onnx", DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, OP_VERSION),
                               *keep])


def export_model_proto(model: nn.Module, *, dtype: str = "float32",
                       fingerprint: str | None = None) -> onnx.ModelProto:
    """The exported ModelProto in memory (weights inline), function attached, metadata set."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "layers"):
        raise ExportError("export_onnx expects a TrellisLM (a model with .config and .layers)")
    fp = fingerprint or getattr(model, "fingerprint", None) or model_fingerprint(model)
    m = _prepare(model, dtype)
    spec = state_spec(config)
    names = [t.name for t in spec]
    batch, tokens = 2, 3
    state = m.init_state(batch)
    state["position"] = torch.tensor([0, 5], dtype=torch.int64)
    ids = torch.zeros(batch, tokens, dtype=torch.int64)
    B = torch.export.Dim("batch", min=1)
    T = torch.export.Dim("tokens", min=1)
    dynamic_shapes = ({0: B, 1: T}, tuple({0: B} for _ in names))
    input_names = ["input_ids", *(t.past_name for t in spec)]
    output_names = ["logits", *(t.present_name for t in spec)]
    # torch's exporter logs one line per torchvision op it cannot register; none is used here
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                _StepGraph(m, names), (ids, *(state[n] for n in names)), dynamo=True,
                opset_version=OPSET, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, custom_translation_table=TRANSLATION_TABLE,
                external_data=False, verbose=False)
        except Exception as exc:  # torch's exporter raises many types; report one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export failed: {first}") from exc
        finally:
            reg_log.setLevel(level)
    proto = program.model_proto
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != input_names or got_out != output_names:
        raise ExportError(f"exported graph I/O names differ from the state spec: inputs {got_in}, "
                          f"outputs {got_out}")
    _rename_dims(proto, "input_ids")
    _set_opsets(proto)
    proto.functions.append(memory_function(config.phi, config.f, config.rho))
    proto.producer_name = "trellis-export"
    proto.producer_version = __version__
    meta = {META_CONFIG: json.dumps(config.to_dict(), sort_keys=True),
            META_STATE_SPEC: state_spec_json(config, dtype),
            META_FINGERPRINT: fp, META_EXPORTER_VERSION: __version__, META_OPSET: str(OPSET),
            META_ACTIVATION_DTYPE: dtype}
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    try:
        check_function_matches(proto)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return proto


def _weights_bytes(model: nn.Module, dtype: str) -> int:
    size = torch.empty((), dtype=DTYPES.get(dtype, torch.float32)).element_size()
    return sum(p.numel() for p in model.parameters()) * size


def check_exported(path: str | os.PathLike[str], *, strict_shapes: bool = True) -> None:
    """onnx.checker (full) and, unless ``strict_shapes=False``, strict shape inference on a saved
    model; raises ExportError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        if strict_shapes:
            proto = onnx.load(str(path), load_external_data=False)
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: exported model fails the ONNX checks: {first}") from exc


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """An output file path whose directory exists; raises ExportError otherwise."""
    dest = Path(path)
    if dest.is_dir():
        raise ExportError(f"{dest}: is a directory; expected an output file path such as model.onnx")
    if not dest.parent.is_dir():
        raise ExportError(f"{dest.parent}: output directory does not exist")
    return dest


def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, dtype: str = "float32",
                external_data: bool | None = None, fingerprint: str | None = None,
                check: bool = True) -> Path:
    """Export the streaming step of ``model`` (a TrellisLM) to ``path``; returns the path.

    Graph: ``input_ids [B, T] int64`` and ``past.*`` -> ``logits [B, T, vocab]`` and ``present.*``
    (names, shapes and dtypes from :func:`trellis_export.state.state_spec`), B and T dynamic, one
    ``trellis::TrellisMemory`` node per layer plus its standard-ops function. ``dtype="float16"``
    makes activations (and logits, conv cache) float16; memories stay float32. ``external_data``:
    None -> only when the weights exceed 1.5 GiB; the data file is ``<name>.data`` beside the model.
    Writes are atomic (temp files + rename); the checks run before the files are moved in place.
    """
    dest = check_output_path(path)
    proto = export_model_proto(model, dtype=dtype, fingerprint=fingerprint)
    return save_model_atomic(proto, dest, external_data=wants_external_data(model, dtype, external_data),
                             check=check)


def wants_external_data(model: nn.Module, dtype: str, external_data: bool | None = None) -> bool:
    """``external_data`` when given, else whether the weights in ``dtype`` exceed 1.5 GiB."""
    if external_data is not None:
        return bool(external_data)
    return _weights_bytes(model, dtype) > EXTERNAL_DATA_THRESHOLD


def save_model_atomic(proto: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool = False,
                      check: bool = True, strict_shapes: bool = True) -> Path:
    """Save ``proto`` to ``path`` through a temporary directory beside it, check it there, then move
    it in place (the external data file ``<name>.data`` first, then the model)."""
    dest = check_output_path(path)
    data_name = dest.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tmp_model = tmpdir / dest.name
        if external_data:
            copy_ = onnx.ModelProto()
            copy_.CopyFrom(proto)
            onnx.save_model(copy_, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        else:
            tmp_model.write_bytes(proto.SerializeToString())
        if check:
            check_exported(tmp_model, strict_shapes=strict_shapes)
        if external_data and (tmpdir / data_name).exists():
            os.chmod(tmpdir / data_name, 0o666 & ~current_umask())
            os.replace(tmpdir / data_name, dest.parent / data_name)
        os.replace(tmp_model, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return dest


def tensorrt_view(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph without the TrellisMemory local function: what TensorRT's ONNX parser sees
    when the ``trellis::TrellisMemory`` plugin is registered (nodes keep every attribute)."""
    view = onnx.ModelProto()
    view.CopyFrom(model_proto)
    keep = [f for f in view.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del view.functions[:]
    view.functions.extend(keep)
    return view


def save_tensorrt_view(model_proto: onnx.ModelProto, path: str | os.PathLike[str], *,
                       external_data: bool = False) -> Path:
    """Write :func:`tensorrt_view` of a model atomically, after onnx.checker (shape inference cannot
    see through the custom node once its function body is gone)."""
    return save_model_atomic(tensorrt_view(model_proto), path, external_data=external_data,
                             strict_shapes=False)


def describe(model_proto: onnx.ModelProto) -> dict[str, Any]:
    """Counts for the CLI summary."""
    nodes = list(model_proto.graph.node)
    custom = [n for n in nodes if n.domain == DOMAIN and n.op_type == OP_TYPE]
    meta = {p.key: p.value for p in model_proto.metadata_props}
    return {"nodes": len(nodes), "custom_nodes": len(custom),
            "functions": [f"{f.domain}::{f.name}" for f in model_proto.functions],
            "opsets": {o.domain or "ai.onnx": o.version for o in model_proto.opset_import},
            "fingerprint": meta.get(META_FINGERPRINT), "activation_dtype": meta.get(META_ACTIVATION_DTYPE)}
