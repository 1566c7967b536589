"""``export_onnx``: the streaming step of a TrellisLM as an ONNX graph with one
``trellis::TrellisMemory`` node per layer and a model-local function body (TRELLIS_SPEC.md 6-7)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper
from torch import Tensor, nn

from .. import __version__, outputs
from ..checkpoint import model_fingerprint, nonfinite_tensors
from ..errors import TrellisExportError, first_line
from ..model import TrellisLM
from ..opdef import DOMAIN, OP_TYPE, OP_VERSION, OPSET
from ..outputs import OutputError, OutputSpec, claim_outputs, current_umask, temporary_sibling, write_error
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
           "check_exported", "check_output_path", "check_finite_weights", "external_data_locations",
           "describe", "wants_external_data", "ExportError",
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


def _prepare(model: TrellisLM, dtype: str) -> TrellisLM:
    """A float32 / float16 copy for export; memories (and the learned M0) stay float32."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    m = copy.deepcopy(model)
    m.to("cpu").eval()
    m.to(DTYPES[dtype])
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


def export_model_proto(model: TrellisLM, *, dtype: str = "float32",
                       fingerprint: str | None = None) -> onnx.ModelProto:
    """The exported ModelProto in memory (weights inline), function attached, metadata set."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "layers"):
        raise ExportError("export_onnx expects a TrellisLM (a model with .config and .layers)")
    check_finite_weights(model)
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
    proto = torch_export(_StepGraph(m, names), (ids, *(state[n] for n in names)), input_names=input_names,
                         output_names=output_names, dynamic_shapes=dynamic_shapes,
                         custom_translation_table=TRANSLATION_TABLE, error=ExportError, what="")
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != input_names or got_out != output_names:
        raise ExportError(f"exported graph I/O names differ from the state spec: inputs {got_in}, "
                          f"outputs {got_out}")
    _rename_dims(proto, "input_ids")
    _set_opsets(proto)
    proto.functions.append(memory_function(config.phi, config.f, config.rho, config.chunk_size))
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


def torch_export(module: nn.Module, args: tuple[Tensor, ...], *, input_names: list[str],
                 output_names: list[str], dynamic_shapes: Any,
                 custom_translation_table: dict[Any, Any] | None = None,
                 error: type[TrellisExportError] = TrellisExportError, what: str = "") -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)`` at this project's opset, quietly, as one ModelProto: the one
    place both exporters (the Trellis step, the KV-cache baseline) call it. The exporter's warnings and
    its log line per torchvision op it cannot register (none is used) are silenced; a failure is one
    ``error`` line."""
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    label = f"torch.onnx.export{' of ' + what if what else ''}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                                        input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic_shapes,
                                        custom_translation_table=custom_translation_table,
                                        external_data=False, verbose=False)
        except Exception as exc:  # torch's exporter raises many types; report one line
            raise error(f"{label} failed: {first_line(exc)}") from exc
        finally:
            reg_log.setLevel(level)
    if program is None:
        raise error(f"{label} returned no program")
    return program.model_proto


def _weights_bytes(model: nn.Module, dtype: str) -> int:
    size = torch.empty((), dtype=DTYPES.get(dtype, torch.float32)).element_size()
    return sum(p.numel() for p in model.parameters()) * size


def check_exported(path: str | os.PathLike[str], *, strict_shapes: bool = True) -> None:
    """onnx.checker (full) and, unless ``strict_shapes=False``, strict shape inference on a saved
    model; raises ExportError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        if strict_shapes:
            proto = onnx.load(str(path), format="protobuf", load_external_data=False)
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = first_line(exc)
        raise ExportError(f"{path}: exported model fails the ONNX checks: {first}") from exc


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """An output file path whose directory exists and is writable; raises ExportError otherwise
    (the checks of :func:`trellis_export.outputs.claim_outputs` for one file)."""
    try:
        return claim_outputs([OutputSpec(path, "output")])[0]
    except OutputError as exc:
        raise ExportError(str(exc)) from None


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold NaN / Inf, naming the tensors."""
    bad = nonfinite_tensors({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)})
    if bad:
        raise ExportError(f"the model's weights hold non-finite values: {bad}; refusing to export it")


def external_data_locations(path: str | os.PathLike[str]) -> set[str]:
    """The external data files an ONNX model on disk refers to (empty for inline weights or a file that
    is not a readable model)."""
    try:
        proto = onnx.load(str(path), format="protobuf", load_external_data=False)
    except Exception:  # not a model: nothing it refers to
        return set()
    out: set[str] = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            out.update(e.value for e in t.external_data if e.key == "location")
    return out


def export_onnx(model: TrellisLM, path: str | os.PathLike[str], *, dtype: str = "float32",
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
    it in place (the external data file ``<name>.data`` first, then the model).

    Whatever the suffix of ``path`` (``.json`` included) the model is written as binary protobuf. A
    ``<name>.data`` that the replaced model referred to is removed when the new one has inline weights.
    On any failure the previous files are intact, the temporaries are gone and an OSError becomes one
    :class:`~trellis_export.outputs.OutputError` line naming the path and the reason.
    """
    dest = check_output_path(path)
    data_name = dest.name + ".data"
    stale = dest.parent / data_name
    stale_is_ours = (not external_data and stale.is_file() and dest.is_file()
                     and data_name in external_data_locations(dest))
    with temporary_sibling(dest, directory=True) as tmpdir:
        tmp_model = tmpdir / "model.onnx"        # a fixed suffix: onnx picks the format from it
        try:
            if external_data:
                copy_ = onnx.ModelProto()
                copy_.CopyFrom(proto)
                onnx.save_model(copy_, str(tmp_model), format="protobuf", save_as_external_data=True,
                                all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            else:
                outputs.write_file(tmp_model, proto.SerializeToString())
        except OSError as exc:
            raise write_error(dest, exc) from None
        except ValueError as exc:   # protobuf's 2 GiB limit and similar
            raise ExportError(f"{dest}: cannot serialise the model ({exc})") from None
        if check:
            check_exported(tmp_model, strict_shapes=strict_shapes)
        try:
            os.chmod(tmp_model, 0o666 & ~current_umask())
            if external_data and (tmpdir / data_name).exists():
                os.chmod(tmpdir / data_name, 0o666 & ~current_umask())
                os.replace(tmpdir / data_name, dest.parent / data_name)
            os.replace(tmp_model, dest)
        except OSError as exc:
            raise write_error(dest, exc) from None
    if stale_is_ours:
        with contextlib.suppress(OSError):
            stale.unlink()
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
