"""Issue 12, class 7: what a new user meets. ``train``'s defaults are the bundled model's recipe, export
says what it is doing before its silent seconds, verify's ETA waits for real progress, loaded models
give outputs without autograd history, ``use_backend(model, "triton")`` fails at once without a GPU, and
verify's ``min_tol`` is the worst check while ``rel_rms`` is over the whole stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _filecheck import invoke, shared_dir, tiny_checkpoint, tiny_onnx

from trellis_export.checkpoint import default_checkpoint_path, load_checkpoint
from trellis_export.config import TrellisConfig


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = shared_dir(tmp_path_factory)
    return tiny_checkpoint(base), tiny_onnx(base)


def test_train_defaults_are_the_bundled_recipe(tmp_path: Path) -> None:
    """A plain ``train --out x`` makes a model of the bundled model's config (C = 4, beta_init 0.99 ...)."""
    out = tmp_path / "x"
    res = invoke(["train", "--out", out, "--steps", "1", "--batch-size", "2", "--eval-examples", "4",
                  "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    made = TrellisConfig.load(out / "config.json")
    bundled = TrellisConfig.load(default_checkpoint_path() / "config.json")
    assert made == bundled, {k: (v, bundled.to_dict()[k]) for k, v in made.to_dict().items()
                             if bundled.to_dict()[k] != v}
    bundled_args = json.loads((default_checkpoint_path() / "training.json").read_text())["args"]
    made_args = json.loads((out / "training.json").read_text())["args"]
    for k in ("task", "lr", "num_pairs", "seq_len", "warmup_steps", "weight_decay"):
        assert made_args[k] == bundled_args[k], k


def test_export_says_what_it_does_before_the_work(shared: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = shared
    res = invoke(["export", ckpt, "-o", tmp_path / "m.onnx"])
    assert res.exit_code == 0, res.output
    err = res.stderr.splitlines()
    assert err[0].startswith("exporting ") and str(ckpt) in err[0] and "parameters" in err[0]
    assert any(ln.strip().startswith("traced in") for ln in err[1:])


def test_verify_eta_waits_for_real_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    import trellis_export.cli.verify as cli_verify
    clock = [100.0]
    monkeypatch.setattr(cli_verify.time, "perf_counter", lambda: clock[0])
    with cli_verify._Progress(1000, enabled=True) as p:
        assert p.bar is None                   # no bar (and no clock) while the sessions load
        clock[0] += 30.0                       # loading took long: it must not count
        p.update(1)
        assert p.bar is not None and not p.bar.show_eta
        clock[0] += 1.0
        p.update(30)                           # 3 % but only 1 s: still no estimate
        assert not p.bar.show_eta
        clock[0] += 2.0
        p.update(10)
        assert p.bar.show_eta and p.done == 41


def test_loaded_models_return_plain_tensors() -> None:
    model = load_checkpoint()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    state = model.init_state(batch=2)
    logits, state = model.step(ids, state)
    assert not logits.requires_grad and logits.grad_fn is None
    assert not any(t.requires_grad for t in state.values())
    logits, _ = model(ids)
    assert logits.grad_fn is None
    assert load_checkpoint(requires_grad=True).embed.weight.requires_grad     # fine-tuning stays possible


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_triton_backend_without_a_gpu_fails_at_once() -> None:
    from conftest import tiny_model

    from trellis_export.errors import TrellisExportError
    from trellis_export.model.backends import BackendError, use_backend
    model = tiny_model()
    before = model.memory_fn
    with pytest.raises(BackendError, match="triton") as info:
        use_backend(model, "triton")
    assert isinstance(info.value, TrellisExportError) and "\n" not in str(info.value)
    assert model.memory_fn is before
    assert use_backend(model, "reference") is model


def test_verify_min_tol_is_the_worst_check_and_rel_rms_the_stream(shared: tuple[Path, Path]) -> None:
    from trellis_export.verify import verify
    ckpt, model = shared
    rep = verify(ckpt, model, tokens=300, interval=50, streams=("random",), tolerance=1.0)
    logits = rep["tensors"]["logits"]
    drift = rep["streams"]["random"]["drift"]
    assert logits["min_tolerance"] == max(d["logits_rel_rms"] for d in drift)
    assert logits["min_tolerance"] == logits["worst_rel_rms"]
    assert 0 < logits["rel_rms"] < logits["min_tolerance"]
    assert np.isclose(logits["rel_rms"], np.sqrt(logits["sum_sq_diff"] / logits["sum_sq_ref"]))
