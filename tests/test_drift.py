"""The ``gamma_init`` config field (backwards compatible) and ``bench/drift.py`` (float32 vs float64)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import random_ids, tiny_config, tiny_model
from trellis_export.cli.main import main

from trellis_export.config import ConfigError, TrellisConfig
from trellis_export.metrics import rel_rms
from trellis_export.model import TrellisLM

ROOT = Path(__file__).resolve().parents[1]


def _drift_module():
    spec = importlib.util.spec_from_file_location("bench_drift", ROOT / "bench" / "drift.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_drift"] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- gamma_init
@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5, "0.1", True, float("nan")])
def test_gamma_init_is_validated(value: object) -> None:
    with pytest.raises(ConfigError, match="gamma_init"):
        tiny_config(gamma_init=value)


def test_gamma_init_default_keeps_old_configs_and_initialisation() -> None:
    c = tiny_config()
    assert c.gamma_init == 0.5
    assert "gamma_init" not in c.canonical_dict(1)   # version-1 fingerprints (old checkpoints) unchanged
    assert c.canonical_dict(2)["gamma_init"] == 0.5
    assert TrellisConfig.from_json(c.to_json()) == c
    torch.manual_seed(0)
    model = TrellisLM(c)
    for layer in model.layers:
        assert torch.all(layer.gamma_proj.bias == 0)


def test_gamma_init_sets_the_initial_step_and_round_trips() -> None:
    c = tiny_config(gamma_init=0.1)
    assert c.to_dict()["gamma_init"] == 0.1
    assert TrellisConfig.from_json(c.to_json()) == c
    torch.manual_seed(0)
    model = TrellisLM(c)
    for layer in model.layers:
        gamma = torch.sigmoid(layer.gamma_proj.bias)
        assert torch.allclose(gamma, torch.full_like(gamma, 0.1), atol=1e-6)


def test_train_cli_passes_gamma_init(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    res = CliRunner().invoke(main, ["train", "--out", str(out), "--steps", "1", "--eval-every", "1",
                                    "--eval-examples", "4", "--batch-size", "2", "--d-model", "16",
                                    "--heads", "2", "--head-dim", "4", "--slots", "3", "--ffn-dim", "8",
                                    "--vocab-size", "19", "--num-pairs", "2", "--seq-len", "12",
                                    "--threads", "1", "--no-progress", "--gamma-init", "0.2"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["gamma_init"] == 0.2
    res = CliRunner().invoke(main, ["train", "--out", str(out), "--gamma-init", "1.0"])
    assert res.exit_code != 0 and "--gamma-init" in res.output


# --------------------------------------------------------------------------- drift script
def test_drift_rows_match_a_direct_float32_vs_float64_comparison() -> None:
    drift = _drift_module()
    model = tiny_model(dtype=torch.float32)
    ids = random_ids(1, 37, model.config.vocab_size, seed=3).numpy()
    rows = drift.measure_drift(model, ids, piece=5, window=8)
    assert [r["end"] for r in rows] == [8, 16, 24, 32, 37]
    m64 = tiny_model(dtype=torch.float64)
    x = torch.from_numpy(ids)
    outs: dict[torch.dtype, torch.Tensor] = {}
    with torch.no_grad():   # the same pieces of 5 (float32 rounding depends on the split)
        for m in (model, m64):
            state, parts = m.init_state(1), []
            for a in range(0, 37, 5):
                logits, state = m.step(x[:, a:a + 5], state)
                parts.append(logits)
            outs[m.embed.weight.dtype] = torch.cat(parts, 1)
    l32, l64 = outs[torch.float32], outs[torch.float64]
    worst = 0.0
    for r, (a, b) in zip(rows, [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]):
        ref = rel_rms(l32[:, a:b], l64[:, a:b])
        assert 0 < r["rel_rms"] < 1e-4
        assert math.isclose(r["rel_rms"], ref, rel_tol=1e-9)
        worst = max(worst, r["rel_rms"])
        assert r["worst_so_far"] == worst
    summary = drift.summarize(rows, marks=(16, 32, 64))
    assert set(summary) == {"16", "32"} and summary["32"]["window"] == rows[3]["rel_rms"]


def test_drift_stop_above_and_streams() -> None:
    drift = _drift_module()
    model = tiny_model(dtype=torch.float32)
    rows = drift.measure_drift(model, random_ids(1, 40, 19).numpy(), piece=4, window=4, stop_above=0.0)
    assert len(rows) == 1
    text = drift.stream_ids("text", 50, 19)
    rand = drift.stream_ids("random", 50, 19, seed=1)
    assert text.shape == rand.shape == (1, 50) and text.max() < 19 and rand.max() < 19
    assert not np.array_equal(text, rand)
    with pytest.raises(ValueError, match="stream"):
        drift.stream_ids("noise", 5, 19)


def test_drift_script_writes_json_with_the_machine(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    drift = _drift_module()
    path, _ = tiny_checkpoint
    out = tmp_path / "d.json"
    assert drift.main(["--checkpoint", str(path), "--tokens", "24", "--piece", "7", "--window", "12",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"] and set(data["streams"]) == {"random", "text"}
    assert [r["end"] for r in data["streams"]["text"]["rows"]] == [12, 24]
    assert "random" in capsys.readouterr().out
    assert drift.main(["--checkpoint", str(path), "--tokens", "24", "--window", "8", "--stop-above", "0",
                       "--streams", "text", "--json", str(out)]) == 0
    assert "stopped at 8 tokens" in capsys.readouterr().out
    assert json.loads(out.read_text())["streams"]["text"]["stopped_early"]
    assert drift.main(["--checkpoint", str(tmp_path / "nope"), "--tokens", "8"]) == 1
    assert "error:" in capsys.readouterr().err
