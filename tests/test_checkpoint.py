"""Checkpoints: round trip, fingerprint, every way a checkpoint can be bad, atomic save."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_config, tiny_model
from safetensors.torch import save_file

from trellis_export.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    fingerprint,
    load_checkpoint,
    model_fingerprint,
    read_checkpoint,
    save_checkpoint,
)
from trellis_export.config import FINGERPRINT_VERSION, TrellisConfig
from trellis_export.errors import TrellisExportError


def assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, TrellisExportError)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert str(path) in msg, f"does not name {path}: {msg}"
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def load_error(path: Path) -> pytest.ExceptionInfo:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    return info


def write_weights(ckpt: Path, config: TrellisConfig, tensors: dict[str, torch.Tensor],
                  meta_overrides: dict[str, str] | None = None) -> None:
    """Write model.safetensors ourselves with a valid, recomputed fingerprint."""
    meta = {"format": "trellis-export", "format_version": "1",
            "fingerprint": fingerprint(config, tensors), "fingerprint_version": str(FINGERPRINT_VERSION),
            "config": json.dumps(config.to_dict(), sort_keys=True)}
    meta.update(meta_overrides or {})
    save_file(tensors, str(ckpt / WEIGHTS_FILE), metadata=meta)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("config", [tiny_config(), tiny_config(chunk_size=1, tie_embeddings=False,
                                                               phi="l2_silu", qk_norm="none")],
                         ids=["C4", "C1-untied"])
def test_round_trip(config: TrellisConfig, tmp_path: Path) -> None:
    model = tiny_model(config, dtype=torch.float32)
    fp = save_checkpoint(model, tmp_path / "ck", metadata={"steps": 3})
    assert fp == model_fingerprint(model)
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.config == config
    assert loaded.fingerprint == fp == model_fingerprint(loaded)
    assert loaded.checkpoint_path == str(tmp_path / "ck")
    assert not loaded.training
    ids = random_ids(2, 9, config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])
    cfg, tensors, meta = read_checkpoint(tmp_path / "ck")
    assert cfg == config and meta["fingerprint"] == fp
    assert json.loads(meta["training"]) == {"steps": 3}
    assert json.loads((tmp_path / "ck" / "training.json").read_text()) == {"steps": 3}
    assert set(tensors) == set(model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]   # no temp dirs left


def test_fingerprint_depends_on_config_and_every_tensor() -> None:
    model = tiny_model(dtype=torch.float32)
    tensors = dict(model.state_dict())
    fp = fingerprint(model.config, tensors)
    assert fp == fingerprint(model.config, {k: v.clone() for k, v in reversed(tensors.items())})
    assert fp != fingerprint(model.config.replace(eps=2e-5), tensors)
    bumped = dict(tensors)
    bumped["norm.weight"] = bumped["norm.weight"].clone()
    bumped["norm.weight"][0] += 1e-6
    assert fp != fingerprint(model.config, bumped)
    assert fp != fingerprint(model.config, {k: v.double() for k, v in tensors.items()})
    renamed = dict(tensors)
    renamed["norm.weight2"] = renamed.pop("norm.weight")
    assert fp != fingerprint(model.config, renamed)


def test_save_over_an_existing_checkpoint(tmp_checkpoint_pair) -> None:  # noqa: ANN001
    path, first, second = tmp_checkpoint_pair
    fp2 = save_checkpoint(second, path)
    assert load_checkpoint(path).fingerprint == fp2 != model_fingerprint(first)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.fixture
def tmp_checkpoint_pair(tmp_path: Path):  # noqa: ANN201
    first = tiny_model(seed=0, dtype=torch.float32)
    second = tiny_model(seed=1, dtype=torch.float32)
    path = tmp_path / "ck"
    save_checkpoint(first, path)
    return path, first, second


# --------------------------------------------------------------------------- atomic save
class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["weights", "config", "rename_into_place"])
def test_failed_save_keeps_the_previous_checkpoint(where: str, tmp_checkpoint_pair,  # noqa: ANN001
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, first, second = tmp_checkpoint_pair
    fp1 = model_fingerprint(first)
    if where in ("weights", "config"):   # every write goes through outputs.write_file
        import trellis_export.outputs as outputs
        real = outputs.write_file
        name = WEIGHTS_FILE if where == "weights" else CONFIG_FILE

        def fail_write(filename, data):  # noqa: ANN001, ANN202
            if Path(filename).name == name:
                Path(filename).write_bytes(b"half a file")
                raise Boom("disk full")
            return real(filename, data)
        monkeypatch.setattr(outputs, "write_file", fail_write)
    else:   # the final rename of the new directory onto the destination fails
        real_replace = os.replace

        def fail_replace(src, dst):  # noqa: ANN001, ANN202
            src_name = Path(src).name
            if Path(dst) == path and src_name.startswith(f".{path.name}.") and "old" not in src_name:
                raise Boom("interrupted")
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(Boom):
        save_checkpoint(second, path)
    monkeypatch.undo()
    assert load_checkpoint(path).fingerprint == fp1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "temp dirs left behind"


def test_failed_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trellis_export.outputs as outputs

    def fail_save(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise Boom("disk full")
    monkeypatch.setattr(outputs, "write_file", fail_save)
    with pytest.raises(Boom):
        save_checkpoint(tiny_model(dtype=torch.float32), tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad checkpoints
def test_missing_directory(tmp_path: Path) -> None:
    assert_one_line_naming(load_error(tmp_path / "nope"), tmp_path / "nope", "no such checkpoint")


def test_file_instead_of_directory(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert_one_line_naming(load_error(f), f, "got a file")


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_missing_file(name: str, tiny_checkpoint) -> None:  # noqa: ANN001
    path, _ = tiny_checkpoint
    (path / name).unlink()
    assert_one_line_naming(load_error(path), path / name, "missing")


@pytest.mark.parametrize("text,words", [
    ("{\"vocab_size\": 19,", ["not valid JSON"]),
    ("[]", ["expected a JSON object"]),
    ("", ["not valid JSON"]),
])
def test_invalid_config_json(text: str, words: list[str], tiny_checkpoint) -> None:  # noqa: ANN001
    path, _ = tiny_checkpoint
    (path / CONFIG_FILE).write_text(text)
    assert_one_line_naming(load_error(path), path / CONFIG_FILE, *words)


@pytest.mark.parametrize("field,value", [("chunk_size", 0), ("phi", "relu"), ("n_slot", 7)])
def test_bad_config_field(field: str, value: object, tiny_checkpoint) -> None:  # noqa: ANN001
    path, model = tiny_checkpoint
    data = model.config.to_dict() | {field: value}
    (path / CONFIG_FILE).write_text(json.dumps(data))
    assert_one_line_naming(load_error(path), path / CONFIG_FILE, field)


def test_config_edited_after_save(tiny_checkpoint) -> None:  # noqa: ANN001
    path, model = tiny_checkpoint
    (path / CONFIG_FILE).write_text(model.config.replace(eps=2e-5).to_json())
    assert_one_line_naming(load_error(path), path / CONFIG_FILE, "does not match")


def test_config_edited_and_no_config_in_metadata(tiny_checkpoint) -> None:  # noqa: ANN001
    """Without the config in the header, the fingerprint still catches an edited config.json."""
    path, model = tiny_checkpoint
    write_weights(path, model.config, dict(model.state_dict()), {"config": ""})
    load_checkpoint(path)   # consistent: loads
    (path / CONFIG_FILE).write_text(model.config.replace(eps=2e-5).to_json())
    assert_one_line_naming(load_error(path), path / WEIGHTS_FILE, "fingerprint mismatch")


@pytest.mark.parametrize("how", ["truncated", "empty", "header_garbage", "not_safetensors"])
def test_unreadable_safetensors(how: str, tiny_checkpoint) -> None:  # noqa: ANN001
    path, _ = tiny_checkpoint
    w = path / WEIGHTS_FILE
    data = w.read_bytes()
    corrupt = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "header_garbage": data[:8] + b"#" * 16 + data[24:],
        "not_safetensors": b"PK\x03\x04 this is a zip, not safetensors",
    }[how]
    w.write_bytes(corrupt)
    assert_one_line_naming(load_error(path), w, "not a readable safetensors file")


@pytest.mark.parametrize("where", [0.5, -1])
def test_flipped_bytes_in_weights(where: float, tiny_checkpoint) -> None:  # noqa: ANN001
    path, _ = tiny_checkpoint
    w = path / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    i = header + int((len(data) - header) * where) if where >= 0 else len(data) - 1
    data[i] ^= 0x10
    w.write_bytes(bytes(data))
    assert_one_line_naming(load_error(path), w, "fingerprint mismatch")


def test_no_fingerprint_in_metadata(tiny_checkpoint) -> None:  # noqa: ANN001
    path, model = tiny_checkpoint
    save_file(dict(model.state_dict()), str(path / WEIGHTS_FILE), metadata={"format": "other"})
    assert_one_line_naming(load_error(path), path / WEIGHTS_FILE, "no fingerprint")


def test_bad_config_in_metadata(tiny_checkpoint) -> None:  # noqa: ANN001
    path, model = tiny_checkpoint
    write_weights(path, model.config, dict(model.state_dict()),
                  {"config": "{\"chunk_size\": 0}"})
    assert_one_line_naming(load_error(path), path / WEIGHTS_FILE, "chunk_size")


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped", "all_three", "integer"])
def test_tensors_that_do_not_fit_the_config(case: str, tiny_checkpoint) -> None:  # noqa: ANN001
    path, model = tiny_checkpoint
    tensors = _tensors(model)
    words = []
    if case in ("missing", "all_three"):
        del tensors["layers.1.a_proj.weight"]
        words += ["missing tensors", "layers.1.a_proj.weight"]
    if case in ("unexpected", "all_three"):
        tensors["layers.0.extra_bias"] = torch.zeros(3)
        words += ["unexpected tensors", "layers.0.extra_bias"]
    if case in ("misshaped", "all_three"):
        tensors["layers.0.m0_key"] = torch.zeros(3, 8, 5)
        words += ["mis-shaped tensors", "layers.0.m0_key", "[3, 7, 5]", "[3, 8, 5]"]
    if case == "integer":
        tensors["norm.weight"] = torch.ones(model.config.d_model, dtype=torch.int32)
        words += ["floating point", "norm.weight"]
    write_weights(path, model.config, tensors)
    read_checkpoint(path)   # the fingerprint is valid: the shape / dtype check is what fires
    assert_one_line_naming(load_error(path), path / WEIGHTS_FILE, *words)


def test_default_checkpoint_when_present() -> None:
    from trellis_export.checkpoint import default_checkpoint_path

    if not default_checkpoint_path().is_dir():
        pytest.skip("the bundled default checkpoint (trellis_export/assets/default) is not there yet")
    model = load_checkpoint()
    assert model.fingerprint == model_fingerprint(model)
