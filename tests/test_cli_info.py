"""``trellis-export info [CKPT] [--json]``: what it reports, and one-line errors for bad checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from trellis_export.cli.main import main

from trellis_export.checkpoint import WEIGHTS_FILE, default_checkpoint_path, model_fingerprint
from trellis_export.state import state_bytes_per_stream, state_spec


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, list(args))


def test_info_text(tiny_checkpoint) -> None:  # noqa: ANN001
    path, model = tiny_checkpoint
    res = invoke("info", str(path))
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert model_fingerprint(model) in out
    assert f"{model.num_parameters():,}" in out
    assert f"{state_bytes_per_stream(model.config):,} bytes" in out
    assert f"({len(state_spec(model.config))} tensors" in out
    for key, value in model.config.to_dict().items():
        assert any(line.split() == [key, str(value)] for line in out.splitlines()), key


def test_info_json(tiny_checkpoint) -> None:  # noqa: ANN001
    path, model = tiny_checkpoint
    res = invoke("info", str(path), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["fingerprint"] == model_fingerprint(model)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["state_bytes_per_stream"] == state_bytes_per_stream(model.config)
    assert report["state_tensors"] == len(state_spec(model.config))
    assert report["config"] == model.config.to_dict()
    assert Path(report["checkpoint"]) == path


def _corrupt(path: Path) -> None:
    w = path / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["missing_dir", "flipped_byte", "bad_json", "no_weights"])
@pytest.mark.parametrize("as_json", [False, True])
def test_bad_checkpoint_is_one_error_line(case: str, as_json: bool, tiny_checkpoint) -> None:  # noqa: ANN001
    path, _ = tiny_checkpoint
    named = path
    if case == "missing_dir":
        path = named = path.parent / "absent"
    elif case == "flipped_byte":
        _corrupt(path)
        named = path / WEIGHTS_FILE
    elif case == "bad_json":
        (path / "config.json").write_text("{")
        named = path / "config.json"
    else:
        (path / WEIGHTS_FILE).unlink()
        named = path / WEIGHTS_FILE
    res = invoke("info", str(path), *(["--json"] if as_json else []))
    assert res.exit_code == 1
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert str(named) in lines[0]
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output


def test_info_in_a_subprocess(tiny_checkpoint) -> None:  # noqa: ANN001
    """The real entry point, once: good checkpoint -> JSON on stdout; bad -> one stderr line, rc 1."""
    path, model = tiny_checkpoint
    cmd = [sys.executable, "-m", "trellis_export.cli.main", "info"]
    ok = subprocess.run([*cmd, str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["fingerprint"] == model_fingerprint(model)
    _corrupt(path)
    bad = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert "Traceback" not in bad.stderr and str(path / WEIGHTS_FILE) in bad.stderr


def test_info_without_argument_uses_the_bundled_default() -> None:
    if not default_checkpoint_path().is_dir():
        pytest.skip("the bundled default checkpoint (trellis_export/assets/default) is not there yet")
    res = invoke("info", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert Path(report["checkpoint"]) == default_checkpoint_path()
    from trellis_export.checkpoint import load_checkpoint
    model = load_checkpoint()
    assert report["fingerprint"] == model.fingerprint == model_fingerprint(model)
    assert torch.isfinite(model(torch.zeros(1, 3, dtype=torch.int64))[0]).all()
