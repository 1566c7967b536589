"""Helpers of the issue-12 tests (files, errors, exit codes): snapshots of directory trees by content
hash, the one-line-error assertion, temporaries, and one cached tiny checkpoint + ONNX export shared by
every test module (an export takes seconds; it is made once per session)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner, Result
from trellis_export.cli.main import main

_CACHE: dict[str, Any] = {}


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (directories by their files)."""
    out: dict[str, str] = {}
    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temporaries(root: Path) -> list[str]:
    """Leftover temporaries anywhere under ``root``: hidden ``.NAME.*.tmp``, ``.old-`` and probe files."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if name.startswith(".") and (name.endswith(".tmp") or ".old-" in name
                                         or name.startswith(".trellis-probe")):
                found.append(str(Path(dirpath) / name))
    return found


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(res: Result, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one ``error:`` line on stderr which is its last line, no traceback, and every
    needle in that line; returns the line."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert "Traceback" not in res.output and "Usage:" not in res.output, res.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def tiny_checkpoint(base: Path) -> Path:
    """A tiny float32 checkpoint (session-cached, read-only by convention)."""
    if "ckpt" not in _CACHE:
        from conftest import tiny_model

        from trellis_export.checkpoint import save_checkpoint
        path = base / "ckpt"
        save_checkpoint(tiny_model(dtype=torch.float32), path, metadata={"note": "issue-12 tests"})
        _CACHE["ckpt"] = path
    return _CACHE["ckpt"]


def tiny_onnx(base: Path) -> Path:
    """The ONNX export of :func:`tiny_checkpoint` (session-cached)."""
    if "onnx" not in _CACHE:
        from trellis_export.checkpoint import load_checkpoint
        from trellis_export.export import export_onnx
        ckpt = tiny_checkpoint(base)
        path = base / "tiny.onnx"
        export_onnx(load_checkpoint(ckpt), path)
        _CACHE["onnx"] = path
    return _CACHE["onnx"]


def shared_dir(tmp_path_factory: Any) -> Path:
    if "base" not in _CACHE:
        _CACHE["base"] = tmp_path_factory.mktemp("issue12-shared")
    return _CACHE["base"]
