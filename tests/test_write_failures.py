"""Issue 12, class 2: write failures end in one ``error:`` line naming the path and the reason, before
any work where they can be foreseen (unwritable directory), and with the previous file intact and no
temporary left where they cannot (ENOSPC). Every writer is covered: the ENOSPC fault is injected into
``outputs.write_file`` (the one low-level write) and into ``onnx.save_model`` (external-data exports),
and, where this machine lets the tests mount one, a real 64 KiB tmpfs is filled."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from _filecheck import assert_error, invoke, shared_dir, snapshot, temporaries, tiny_checkpoint, tiny_onnx

import trellis_export.outputs as outputs
from trellis_export.outputs import OutputError

TRAIN_FLAGS = ["--vocab-size", "32", "--d-model", "16", "--layers", "1", "--heads", "2", "--head-dim", "8",
               "--slots", "5", "--ffn-dim", "24", "--phi", "identity", "--num-pairs", "3", "--seq-len", "13",
               "--batch-size", "4", "--eval-examples", "8", "--threads", "1", "--no-progress", "--steps", "2",
               "--eval-every", "2"]
ENOSPC = os.strerror(errno.ENOSPC)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = shared_dir(tmp_path_factory)
    return tiny_checkpoint(base), tiny_onnx(base)


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file write of the package writes half its bytes, then fails with ENOSPC."""
    def full(path, data):  # noqa: ANN001, ANN202
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, ENOSPC)
    monkeypatch.setattr(outputs, "write_file", full)

    real_save = onnx.save_model

    def full_save(proto, f, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        Path(f).write_bytes(b"\x08")
        raise OSError(errno.ENOSPC, ENOSPC)
    monkeypatch.setattr(onnx, "save_model", full_save)
    yield
    monkeypatch.setattr(onnx, "save_model", real_save)


def _previous(path: Path) -> bytes:
    data = b"the previous file " + path.name.encode()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("external", [False, True])
def test_export_enospc(shared: tuple[Path, Path], tmp_path: Path, disk_full: None, external: bool) -> None:
    ckpt, _ = shared
    out = tmp_path / "m.onnx"
    old = _previous(out)
    before = snapshot(ckpt)
    res = invoke(["export", ckpt, "-o", out, *(["--external-data"] if external else [])])
    assert_error(res, 1, str(out), ENOSPC)
    assert out.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert snapshot(ckpt) == before


def test_train_enospc_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    assert invoke(["train", "--out", out, *TRAIN_FLAGS]).exit_code == 0
    before = snapshot(tmp_path)

    def full(path, data):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, ENOSPC)
    monkeypatch.setattr(outputs, "write_file", full)
    res = invoke(["train", "--out", out, "--seed", "9", *TRAIN_FLAGS])
    assert_error(res, 1, ENOSPC, "run")
    assert snapshot(tmp_path) == before and temporaries(tmp_path) == []


def test_verify_json_enospc(shared: tuple[Path, Path], tmp_path: Path, disk_full: None) -> None:
    ckpt, model = shared
    out = tmp_path / "report.json"
    old = _previous(out)
    res = invoke(["verify", ckpt, model, "--tokens", "4", "--quiet", "--json", out])
    assert_error(res, 1, str(out), ENOSPC)
    assert out.read_bytes() == old and temporaries(tmp_path) == []


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_report_enospc(tmp_path: Path, disk_full: None, flag: str) -> None:
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    from conftest import tiny_config
    cfg = tmp_path / "tiny.json"
    cfg.write_text(tiny_config().to_json())
    out = tmp_path / ("b.json" if flag == "--json" else "b.png")
    old = _previous(out)
    res = invoke(["bench", "--config", cfg, "--backend", "torch", "--slots", "3", "--context", "4", "--batch",
                  "1", "--phase", "decode", "--iterations", "2", "--duration", "0", "--warmup", "0it",
                  "--no-baseline", flag, out])
    assert_error(res, 1, str(out), ENOSPC)
    assert out.read_bytes() == old and temporaries(tmp_path) == []


def test_session_save_state_enospc(shared: tuple[Path, Path], tmp_path: Path, disk_full: None) -> None:
    from trellis_export.runtime import open_session
    _, model = shared
    s = open_session("ort", model_path=model)
    out = tmp_path / "stream.safetensors"
    old = _previous(out)
    with pytest.raises(OutputError, match=ENOSPC) as info:
        s.save_state(s.init_state(1), out)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert out.read_bytes() == old and temporaries(tmp_path) == []


def test_baseline_export_enospc(tmp_path: Path, disk_full: None) -> None:
    from conftest import tiny_config

    from trellis_export.baseline import KVCacheLM, export_baseline_onnx
    out = tmp_path / "kv.onnx"
    old = _previous(out)
    with pytest.raises(OutputError, match=ENOSPC):
        export_baseline_onnx(KVCacheLM(tiny_config()).eval(), out)
    assert out.read_bytes() == old and temporaries(tmp_path) == []


# --------------------------------------------------------------------------- foreseeable failures
def test_unwritable_output_directory_is_refused_before_work(shared: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, model = shared
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:     # root writes anywhere: make the probe see what a user would
        real = outputs.tempfile.mkstemp

        def denied(*a, dir=None, **k):  # noqa: ANN001, ANN002, ANN003, ANN202, A002
            if dir is not None and Path(dir) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real(*a, dir=dir, **k)
        monkeypatch.setattr(outputs.tempfile, "mkstemp", denied)
    else:
        locked.chmod(0o555)
    try:
        called = []
        monkeypatch.setattr("trellis_export.checkpoint.load_checkpoint", lambda *a, **k: called.append(1))
        for argv in (["export", ckpt, "-o", locked / "m.onnx"],
                     ["verify", ckpt, model, "--json", locked / "r.json"],
                     ["train", "--out", locked / "run", *TRAIN_FLAGS]):
            res = invoke(argv)
            assert_error(res, 1, str(locked), os.strerror(errno.EACCES))
        assert called == [], "work started before the output was checked"
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_json_suffix_export_is_binary_onnx(shared: tuple[Path, Path], tmp_path: Path) -> None:
    """onnx picks a serialiser from the suffix; the exporter does not let it."""
    ckpt, _ = shared
    out = tmp_path / "x.json"
    res = invoke(["export", ckpt, "-o", out, "--external-data"])
    assert res.exit_code == 0, res.output
    proto = onnx.load(str(out), format="protobuf")
    assert len(proto.graph.node) > 0 and (tmp_path / "x.json.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    res = invoke(["verify", ckpt, out, "--tokens", "4", "--tolerance", "1", "--quiet"])   # and it runs
    assert res.exit_code == 0 and res.stdout.strip() == "PASSED", res.output
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_directory_as_a_file_output(shared: tuple[Path, Path], tmp_path: Path, flag: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, model = shared
    (tmp_path / "keep").write_text("x")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    if flag == "--out":
        res = invoke(["train", "--out", ".", *TRAIN_FLAGS])
        assert_error(res, 1, "current directory")
    else:
        res = invoke(["verify", ckpt, model, "--tokens", "4", "--json", "."])
        assert_error(res, 2, "is a directory", "--json")      # a bad flag value: a usage error
    assert snapshot(tmp_path) == before and temporaries(tmp_path) == []


# --------------------------------------------------------------------------- a real full disk
@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only, where mounting is allowed); skipped elsewhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_disk(shared: tuple[Path, Path], tiny_tmpfs: Path) -> None:
    ckpt, model = shared
    old = _previous(tiny_tmpfs / "m.onnx")
    old_json = _previous(tiny_tmpfs / "r.json")
    free = os.statvfs(tiny_tmpfs).f_bavail * os.statvfs(tiny_tmpfs).f_frsize
    (tiny_tmpfs / "filler").write_bytes(b"\0" * max(0, free - 4096))   # 4 KiB left: less than any output
    assert model.stat().st_size > 4096
    res = invoke(["export", ckpt, "-o", tiny_tmpfs / "m.onnx"])
    assert_error(res, 1, str(tiny_tmpfs / "m.onnx"), ENOSPC)
    res = invoke(["verify", ckpt, model, "--tokens", "300", "--quiet", "--json", tiny_tmpfs / "r.json"])
    assert_error(res, 1, str(tiny_tmpfs / "r.json"), ENOSPC)
    assert (tiny_tmpfs / "m.onnx").read_bytes() == old and (tiny_tmpfs / "r.json").read_bytes() == old_json
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["filler", "m.onnx", "r.json"]
    from trellis_export.runtime import open_session
    s = open_session("ort", model_path=model)
    with pytest.raises(OutputError, match=ENOSPC):
        s.save_state({k: np.repeat(v, 64, axis=0) for k, v in s.init_state(1).items()},
                     tiny_tmpfs / "state.safetensors")
    assert temporaries(tiny_tmpfs) == [] and not json.dumps(sorted(os.listdir(tiny_tmpfs))).count(".tmp")
