"""Issue 12, class 3: NaN / Inf are caught where it is cheap and matters: checkpoint load and export
(weights), state load / save and session step (states, with an opt-out), and verify reports them as a
failure with NaN-aware statistics (never max_abs 0 or top-1 100 %)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _filecheck import assert_error, invoke, shared_dir, snapshot, temporaries, tiny_checkpoint, tiny_onnx
from conftest import tiny_model
from onnx import numpy_helper

from trellis_export.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from trellis_export.export import ExportError, export_onnx
from trellis_export.metrics import error_stats
from trellis_export.runtime import StateError, open_session


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = shared_dir(tmp_path_factory)
    return tiny_checkpoint(base), tiny_onnx(base)


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A checkpoint whose fingerprint matches its NaN weights (saved from a diverged model)."""
    model = tiny_model(dtype=torch.float32)
    name = "layers.0.q_proj.weight" if "layers.0.q_proj.weight" in model.state_dict() else \
        next(k for k, v in model.state_dict().items() if v.dim() == 2)
    with torch.no_grad():
        model.state_dict()[name][0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "ckpt"
    save_checkpoint(model, path)
    return path, name


def test_checkpoint_load_refuses_nan_weights_naming_the_tensor(nan_checkpoint: tuple[Path, str]) -> None:
    path, name = nan_checkpoint
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + r" \(1 NaN, 0 Inf\)"):
        load_checkpoint(path)
    model = load_checkpoint(path, check_finite=False)          # the opt-out
    assert not bool(torch.isfinite(model.state_dict()[name]).all())
    assert read_checkpoint(path, check_finite=False)[2]["fingerprint"] == model.fingerprint


@pytest.mark.parametrize("command", ["info", "export", "bench"])
def test_cli_commands_refuse_a_nan_checkpoint(nan_checkpoint: tuple[Path, str], tmp_path: Path,
                                              command: str) -> None:
    path, name = nan_checkpoint
    before = snapshot(path)
    out = tmp_path / "m.onnx"
    argv = {"info": ["info", path],
            "export": ["export", path, "-o", out],
            "bench": ["bench", path, "--backend", "torch", "--context", "4", "--batch", "1", "--no-baseline",
                      "--json", tmp_path / "b.json"]}[command]
    assert_error(invoke(argv), 1, name, "non-finite")
    assert snapshot(path) == before and list(tmp_path.iterdir()) == []


def test_export_refuses_a_model_with_inf_weights(tmp_path: Path) -> None:
    model = tiny_model(dtype=torch.float32)
    with torch.no_grad():
        model.embed.weight[1, 2] = float("inf")
    with pytest.raises(ExportError, match=r"embed\.weight \(0 NaN, 1 Inf\)"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_session_refuses_non_finite_states(shared: tuple[Path, Path], tmp_path: Path, backend: str) -> None:
    ckpt, model = shared
    s = open_session("ort", model_path=model) if backend == "ort" else open_session("torch", checkpoint=ckpt)
    state = s.init_state(2)
    state["position"][:] = 5          # mid-stream: the memory is read (position 0 starts from M0)
    bad = next(t.name for t in s.state_spec if t.name.endswith("key_memory"))
    state[bad][1, 0, 0, 0] = np.nan
    ids = np.zeros((2, 3), np.int64)
    with pytest.raises(StateError, match=f"'{bad}' holds non-finite values \\(1 NaN, 0 Inf\\)"):
        s.step(ids, state)
    with pytest.raises(StateError, match=bad):
        s.save_state(state, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()
    s.check_finite = False                                      # the opt-out: NaN in, NaN out
    logits, _ = s.step(ids, state)
    assert not np.isfinite(logits[1]).all() and np.isfinite(logits[0]).all()
    s.save_state(state, tmp_path / "s.safetensors")
    s.check_finite = True
    with pytest.raises(StateError, match=f"s.safetensors: state tensor '{bad}' holds non-finite"):
        s.load_state(tmp_path / "s.safetensors")
    fresh = s.reset_rows(state, [1])                            # a diverged row can be reset
    s.step(ids, fresh)


def test_error_stats_are_nan_aware() -> None:
    ref = np.ones((2, 3))
    x = ref.copy()
    x[0, 1] = np.nan
    st = error_stats(x, ref)
    assert st["max_abs"] == math.inf and st["rel_rms"] == math.inf
    assert not st["finite"] and st["nonfinite"] == 1
    st = error_stats(x, x)                                      # NaN where the reference has NaN too
    assert st["max_abs"] == math.inf and not st["reference_finite"]
    st = error_stats(ref * 1.5, ref)
    assert st["finite"] and math.isclose(st["max_abs"], 0.5) and st["nonfinite"] == 0


@pytest.fixture(scope="module")
def nan_onnx(shared: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared export with its largest weight poisoned; metadata (fingerprint) untouched."""
    _, model = shared
    proto = onnx.load(str(model))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.data_type == 1 else 0)
    arr = numpy_helper.to_array(init).copy()
    arr[...] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    path = tmp_path_factory.mktemp("nanonnx") / "poisoned.onnx"
    onnx.save(proto, str(path))
    return path


def test_verify_reports_nan_as_failure(shared: tuple[Path, Path], nan_onnx: Path, tmp_path: Path) -> None:
    from trellis_export.verify import verify
    ckpt, _ = shared
    rep = verify(ckpt, nan_onnx, tokens=70, interval=32, streams=("random",))
    assert rep["status"] == "FAILED"
    logits = rep["tensors"]["logits"]
    assert logits["status"] == "FAILED" and not logits["finite"] and logits["nonfinite"] > 0
    assert logits["max_abs"] == math.inf and logits["min_tolerance"] == math.inf
    assert rep["top1_agreement"] == 0.0
    res = invoke(["verify", ckpt, nan_onnx, "--tokens", "70", "--json", tmp_path / "r.json"])
    assert res.exit_code == 1 and res.stdout.splitlines()[-1] == "FAILED"
    assert "non-finite" in res.stdout and temporaries(tmp_path) == []
