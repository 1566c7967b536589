"""Issue 12, class 4: no quiet wrong answers. A requested execution provider that is missing is an error
unless fallback is allowed; bench exits 1 when a requested cell errored (unavailable is not an error);
``train --resume`` refuses another run's state; ``--eval-only`` scores a checkpoint on its own task."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from _filecheck import assert_error, invoke, shared_dir, snapshot, temporaries, tiny_checkpoint, tiny_onnx
from conftest import tiny_config

TRAIN_FLAGS = ["--vocab-size", "32", "--d-model", "16", "--layers", "1", "--heads", "2", "--head-dim", "8",
               "--slots", "5", "--ffn-dim", "24", "--phi", "identity", "--num-pairs", "3", "--seq-len", "13",
               "--batch-size", "4", "--eval-examples", "8", "--threads", "1", "--no-progress", "--steps", "4",
               "--eval-every", "2", "--stop-after", "2"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = shared_dir(tmp_path_factory)
    return tiny_checkpoint(base), tiny_onnx(base)


# --------------------------------------------------------------------------- providers
def test_mistyped_provider_is_an_error(shared: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, model = shared
    before = snapshot(model.parent)
    for extra in ([], ["--allow-fallback"]):        # a typo is never "fallback"
        res = invoke(["verify", ckpt, model, "--tokens", "4", "--providers", "CPUExecutionProvder", *extra,
                      "--json", tmp_path / "r.json"])
        assert_error(res, 1, "unknown execution provider", "CPUExecutionProvder")
    assert snapshot(model.parent) == before and list(tmp_path.iterdir()) == []


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available")
def test_unavailable_provider_needs_allow_fallback(shared: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, model = shared
    res = invoke(["verify", ckpt, model, "--tokens", "4", "--providers", "CUDAExecutionProvider"])
    assert_error(res, 1, "CUDAExecutionProvider", "not available", "--allow-fallback")
    out = tmp_path / "r.json"
    res = invoke(["verify", ckpt, model, "--tokens", "4", "--tolerance", "1", "--providers",
                  "CUDAExecutionProvider,CPUExecutionProvider", "--allow-fallback", "--json", out])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["providers"] == ["CPUExecutionProvider"]
    assert rep["providers_requested"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# --------------------------------------------------------------------------- bench
def _bench_args(tmp_path: Path, backend: str) -> list:
    cfg = tmp_path / "tiny.json"
    cfg.write_text(tiny_config().to_json())
    return ["bench", "--config", cfg, "--backend", backend, "--slots", "3", "--context", "4", "--batch", "1",
            "--phase", "decode", "--iterations", "2", "--duration", "0", "--warmup", "0it", "--no-baseline",
            "--json", tmp_path / "b.json"]


def test_bench_exits_1_when_a_cell_errored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trellis_export.bench.run as run

    def broken(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(run, "_measure", broken)
    res = invoke(_bench_args(tmp_path, "torch"))
    assert_error(res, 1, "1 of 1 cells", "kernel exploded", "JSON report")
    rep = json.loads((tmp_path / "b.json").read_text())      # the report is still written
    assert [c["status"] for c in rep["cells"]] == ["error"]
    assert temporaries(tmp_path) == []


def test_bench_unavailable_backend_is_not_an_error(tmp_path: Path) -> None:
    res = invoke(_bench_args(tmp_path, "trt"))
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "b.json").read_text())
    assert [c["status"] for c in rep["cells"]] == ["unavailable"]


# --------------------------------------------------------------------------- train --resume / --eval-only
def test_resume_refuses_the_state_of_another_run(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke(["train", "--out", a, *TRAIN_FLAGS]).exit_code == 0
    assert invoke(["train", "--out", b, "--seed", "9", *TRAIN_FLAGS]).exit_code == 0
    before = snapshot(tmp_path)
    res = invoke(["train", "--out", a, "--resume", "--state", f"{b}.train-state.safetensors",
                  "--no-progress"])
    assert_error(res, 1, "belongs to another training run", str(a))
    assert snapshot(tmp_path) == before and temporaries(tmp_path) == []
    res = invoke(["train", "--out", a, "--resume", "--no-progress"])       # its own state: fine
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["step"] == 4


def test_eval_only_knows_the_checkpoint_task(tmp_path: Path) -> None:
    from trellis_export.config import TrellisConfig
    from trellis_export.train import TrainArgs, train

    cfg = TrellisConfig(vocab_size=128, d_model=16, n_layers=1, n_heads=2, head_dim=8, n_slots=5,
                        chunk_size=4, ffn_dim=24)
    char = tmp_path / "char"
    train(TrainArgs(task="charlm", steps=2, batch_size=2, seq_len=16, eval_every=2, eval_examples=32,
                    threads=1, corpus_chars=4000), cfg, char, progress=False, log=lambda s: None)
    res = invoke(["train", "--eval-only", char, "--eval-examples", "32"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["task"] == "charlm" and rep["task_source"] == "training.json"
    assert "mqar_accuracy" not in rep and rep["val_bpc"] > 0
    res = invoke(["train", "--eval-only", char, "--num-pairs", "3"])
    assert_error(res, 2, "--num-pairs", "character LM")
    # without training.json the task is assumed, and the report says so
    (char / "training.json").unlink()
    rep = json.loads(invoke(["train", "--eval-only", char, "--eval-examples", "8"]).stdout)
    assert rep["task"] == "mqar" and rep["task_source"].startswith("assumed")
