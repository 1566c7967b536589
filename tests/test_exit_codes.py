"""Issue 12, class 6: one exit-code convention for every command (docs/files_and_errors.md): 2 and one
``error:`` line for usage errors (flag syntax and values), 1 and one ``error:`` line for everything else,
0 for success and ``--help``. Through the installed entry point as well as in process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _filecheck import assert_error, invoke

COMMANDS = ["info", "export", "verify", "train", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_flag_is_a_one_line_usage_error(command: str, tmp_path: Path) -> None:
    res = invoke([command, "--no-such-flag"])
    assert_error(res, 2, "--no-such-flag", f"{command} --help")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,needle", [
    (["verify"], "[CKPT] MODEL.onnx"),                                   # missing argument
    (["verify", "a", "b", "c"], "expected [CKPT] MODEL.onnx"),           # UsageError from the command
    (["export", "-o"], "-o"),                                            # option without its value
    (["train", "--phi", "relu", "--out", "x"], "--phi"),                 # bad choice
    (["train", "--steps", "0", "--out", "x"], "--steps"),                # out of range
    (["train"], "--out"),                                                # required unless --eval-only
    (["bench", "--backend", "cuda"], "--backend"),                       # callback's BadParameter
    (["verify", "m.onnx", "--piece-sizes", "1,x"], "--piece-sizes"),
])
def test_bad_flag_values_exit_2_with_one_line(argv: list[str], needle: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_error(invoke(argv), 2, needle)
    assert list(tmp_path.iterdir()) == [], "a usage error wrote something"


@pytest.mark.parametrize("argv,needle", [
    (["info", "{tmp}/missing"], "no such checkpoint directory"),
    (["export", "{tmp}/missing", "-o", "{tmp}/m.onnx"], "no such checkpoint directory"),
    (["verify", "{tmp}/missing.onnx"], "no such ONNX model file"),
    (["train", "--eval-only", "{tmp}/missing"], "no such checkpoint directory"),
])
def test_bad_inputs_exit_1_with_one_line(argv: list[str], needle: str, tmp_path: Path) -> None:
    assert_error(invoke([a.format(tmp=tmp_path) for a in argv]), 1, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0(command: str) -> None:
    res = invoke([command, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output


def test_installed_entry_point_follows_the_convention(tmp_path: Path) -> None:
    exe = [sys.executable, "-c", "from trellis_export.cli.main import main; main()"]
    r = subprocess.run([*exe, "info", "--bogus"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: ") and "--bogus" in r.stderr
    r = subprocess.run([*exe, "info", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: ") and "no such checkpoint directory" in r.stderr
    r = subprocess.run([*exe, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "trellis-export" in r.stdout
