"""Issue 12, class 5: SIGTERM / SIGINT during export or training leave no temporary beside the target,
keep the previous output, and end in one ``error:`` line with exit 143 / 130.

The signal is sent by the process to itself at the worst moment: right after a temporary file has been
written inside a temporary directory beside the target (``outputs.write_file`` is wrapped in the child
process; the real signal machinery does the rest)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _filecheck import invoke, shared_dir, snapshot, temporaries, tiny_checkpoint

from trellis_export.outputs import signals_raise

TRAIN_FLAGS = ["--vocab-size", "32", "--d-model", "16", "--layers", "1", "--heads", "2", "--head-dim", "8",
               "--slots", "5", "--ffn-dim", "24", "--phi", "identity", "--num-pairs", "3", "--seq-len", "13",
               "--batch-size", "4", "--eval-examples", "8", "--threads", "1", "--no-progress", "--steps", "2",
               "--eval-every", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(shared_dir(tmp_path_factory))


def _run_with_signal(argv: list[str], signame: str, when_file: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        import trellis_export.outputs as outputs
        real = outputs.write_file
        def write_then_signal(path, data):
            real(path, data)
            if Path(path).name == {when_file!r}:
                assert Path(path).parent.name.startswith("."), path   # inside a temporary
                os.kill(os.getpid(), signal.{signame})
        outputs.write_file = write_then_signal
        from trellis_export.cli.main import main
        sys.argv = ["trellis-export", *{[str(a) for a in argv]!r}]
        main()
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _one_error_line(stderr: str, needle: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], stderr
    assert sum(ln.startswith("error: ") for ln in lines) == 1 and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_during_export_write(ckpt: Path, tmp_path: Path, signame: str, code: int) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    before = snapshot(ckpt)
    r = _run_with_signal(["export", ckpt, "-o", out], signame, "model.onnx")
    assert r.returncode == code, r.stderr
    _one_error_line(r.stderr, signame)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert snapshot(ckpt) == before


def test_sigterm_during_checkpoint_write(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert invoke(["train", "--out", out, *TRAIN_FLAGS]).exit_code == 0
    before = snapshot(out)
    r = _run_with_signal(["train", "--out", out, "--seed", "4", *TRAIN_FLAGS], "SIGTERM", "model.safetensors")
    assert r.returncode == 143, r.stderr
    _one_error_line(r.stderr, "SIGTERM")
    assert snapshot(out) == before, "the previous checkpoint changed"
    assert temporaries(tmp_path) == [] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_from_outside_during_export(ckpt: Path, tmp_path: Path) -> None:
    """A real external SIGTERM while the exporter traces: no output, no temporary, exit 143."""
    out = tmp_path / "m.onnx"
    p = subprocess.Popen([sys.executable, "-c", "from trellis_export.cli.main import main; main()", "export",
                          str(ckpt), "-o", str(out)], stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    first = p.stderr.readline()                     # "exporting ..." is printed before the work
    assert first.startswith("exporting"), first
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    rest = p.stderr.read()
    assert p.wait(timeout=120) == 143, rest
    _one_error_line(rest, "SIGTERM")
    assert list(tmp_path.iterdir()) == []


def test_signals_raise_restores_handlers() -> None:
    def mine(signum: int, frame: object) -> None:
        pass
    old = signal.signal(signal.SIGTERM, mine)
    try:
        with signals_raise():
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)
