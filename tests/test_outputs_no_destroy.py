"""Issue 12, class 1: outputs never destroy what they replace (claim_outputs in every command).

Each case: the exit code, the one-line message, every input and unrelated file unchanged (hashes before
and after), no temporary left."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from _filecheck import assert_error, invoke, shared_dir, snapshot, temporaries, tiny_checkpoint, tiny_onnx

from trellis_export.outputs import MARKER, OutputError, OutputSpec, claim_outputs

TRAIN_FLAGS = ["--vocab-size", "32", "--d-model", "16", "--layers", "1", "--heads", "2", "--head-dim", "8",
               "--slots", "5", "--ffn-dim", "24", "--phi", "identity", "--num-pairs", "3", "--seq-len", "13",
               "--batch-size", "4", "--eval-examples", "8", "--threads", "1", "--no-progress", "--steps", "2",
               "--eval-every", "2"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = shared_dir(tmp_path_factory)
    return tiny_checkpoint(base), tiny_onnx(base)


def _user_dir(root: Path) -> Path:
    d = root / "notes"
    d.mkdir()
    (d / "a.txt").write_text("my thesis")
    (d / "sub").mkdir()
    (d / "sub" / "b.bin").write_bytes(b"\x00\x01")
    return d


def test_train_refuses_to_replace_a_directory_it_did_not_write(tmp_path: Path) -> None:
    d = _user_dir(tmp_path)
    before = snapshot(tmp_path)
    res = invoke(["train", "--out", d, *TRAIN_FLAGS])
    assert_error(res, 1, str(d), "did not write", "a.txt", "--force")
    assert snapshot(tmp_path) == before and temporaries(tmp_path) == []


def test_train_force_replaces_it_and_a_checkpoint_is_replaced_without_force(tmp_path: Path) -> None:
    d = _user_dir(tmp_path)
    res = invoke(["train", "--out", d, "--force", *TRAIN_FLAGS])
    assert res.exit_code == 0, res.output
    assert not (d / "a.txt").exists() and (d / "model.safetensors").is_file()
    first = snapshot(d)
    res = invoke(["train", "--out", d, "--seed", "5", *TRAIN_FLAGS])     # a checkpoint: no --force needed
    assert res.exit_code == 0, res.output
    assert snapshot(d) != first and temporaries(tmp_path) == []


@pytest.mark.parametrize("out", [".", "{tmp}"])
def test_train_out_current_directory_is_refused_even_with_force(tmp_path: Path, out: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    res = invoke(["train", "--out", out.format(tmp=tmp_path), "--force", *TRAIN_FLAGS])
    assert_error(res, 1, "current directory")
    assert snapshot(tmp_path) == before and temporaries(tmp_path) == []


def test_verify_json_onto_the_model_is_refused(shared: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, model = shared
    before = snapshot(model.parent)
    for target, needle in ((model, "is also an input"), (ckpt / "config.json", "lies inside the input")):
        res = invoke(["verify", ckpt, model, "--tokens", "4", "--json", target])
        assert_error(res, 1, str(target), needle, "--json")
    assert snapshot(model.parent) == before and temporaries(model.parent) == []


@pytest.mark.parametrize("target,needle", [("{ckpt}/model.safetensors", "lies inside the input"),
                                           ("{ckpt}", "is also an input")])
def test_export_into_its_own_checkpoint_is_refused(shared: tuple[Path, Path], target: str,
                                                   needle: str) -> None:
    ckpt, _ = shared
    before = snapshot(ckpt)
    res = invoke(["export", ckpt, "-o", target.format(ckpt=ckpt)])
    assert_error(res, 1, needle)
    assert snapshot(ckpt) == before and temporaries(ckpt.parent) == []


def test_tensorrt_view_onto_the_output_is_refused(shared: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = shared
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")
    before = snapshot(tmp_path)
    res = invoke(["export", ckpt, "-o", out, "--tensorrt-view", out])
    assert_error(res, 1, "written twice", "-o", "--tensorrt-view")
    assert snapshot(tmp_path) == before and temporaries(tmp_path) == []


def test_inline_export_over_external_data_export_removes_only_its_stale_data(shared: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    ckpt, _ = shared
    out = tmp_path / "m.onnx"
    res = invoke(["export", ckpt, "-o", out, "--external-data"])
    assert res.exit_code == 0, res.output
    data = tmp_path / "m.onnx.data"
    assert data.is_file()
    unrelated = tmp_path / "other.onnx.data"       # not referred to by the model replaced below
    unrelated.write_bytes(b"someone else's")
    res = invoke(["export", ckpt, "-o", out])
    assert res.exit_code == 0, res.output
    assert not data.exists(), "stale external data left beside an inline-weights model"
    assert unrelated.read_bytes() == b"someone else's"
    size_line = next(ln for ln in res.stdout.splitlines() if ln.startswith("size"))
    assert int(size_line.split()[1].replace(",", "")) == out.stat().st_size
    onnx.checker.check_model(str(out), full_check=True)
    assert temporaries(tmp_path) == []


def test_a_data_file_that_another_model_uses_is_not_removed(shared: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """m.onnx.data beside an m.onnx that does not refer to it (e.g. the user's own file) stays."""
    ckpt, model = shared
    out = tmp_path / "m.onnx"
    out.write_bytes(model.read_bytes())            # inline weights: refers to no data file
    (tmp_path / "m.onnx.data").write_bytes(b"mine")
    res = invoke(["export", ckpt, "-o", out])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.onnx.data").read_bytes() == b"mine"


def test_claim_outputs_rules(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "x").write_text("x")
    with pytest.raises(OutputError, match="contains the input"):
        claim_outputs([OutputSpec(tmp_path, "--out", kind="dir")], inputs=[inp / "x"], force=True)
    marked = tmp_path / "work"
    marked.mkdir()
    (marked / "old.onnx").write_text("x")
    with pytest.raises(OutputError, match="did not write"):
        claim_outputs([OutputSpec(marked, "--work-dir", kind="workdir")])
    (marked / MARKER).write_text("")
    assert claim_outputs([OutputSpec(marked, "--work-dir", kind="workdir")]) == [marked]
    with pytest.raises(OutputError, match="inside the directory --out replaces whole"):
        claim_outputs([OutputSpec(tmp_path / "ck", "--out", kind="dir"),
                       OutputSpec(tmp_path / "ck" / "state.safetensors", "--state")])
    link = tmp_path / "alias.txt"                  # a symlink to an input is the input
    link.symlink_to(inp / "x")
    with pytest.raises(OutputError, match="is also an input"):
        claim_outputs([OutputSpec(link, "--json")], inputs=[inp / "x"])
    assert temporaries(tmp_path) == []


def test_save_checkpoint_refuses_a_foreign_directory(tmp_path: Path) -> None:
    import torch
    from conftest import tiny_model

    from trellis_export.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    d = _user_dir(tmp_path)
    before = snapshot(tmp_path)
    model = tiny_model(dtype=torch.float32)
    with pytest.raises(CheckpointError, match="did not write"):
        save_checkpoint(model, d)
    assert snapshot(tmp_path) == before and temporaries(tmp_path) == []
    save_checkpoint(model, d, force=True)
    assert load_checkpoint(d).fingerprint and not (d / "a.txt").exists()
