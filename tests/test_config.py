"""TrellisConfig: validation (ConfigError naming the field), derived sizes, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import tiny_config

from trellis_export.config import NONLINEARITIES, ConfigError, TrellisConfig
from trellis_export.errors import TrellisExportError


def test_defaults_are_the_spec_defaults() -> None:
    c = TrellisConfig()
    assert (c.phi, c.f, c.rho, c.chunk_size, c.conv_size, c.eps) == ("ln_silu", "ln_silu", "identity",
                                                                     16, 4, 1e-5)
    assert c.qk_norm == "l2"


def test_frozen_and_replace_validates() -> None:
    c = tiny_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.chunk_size = 3  # type: ignore[misc]
    assert c.replace(chunk_size=3).chunk_size == 3
    with pytest.raises(ConfigError, match="chunk_size"):
        c.replace(chunk_size=0)


BAD_VALUES = [
    ("vocab_size", 0), ("d_model", -4), ("n_layers", 1.0), ("n_heads", True), ("head_dim", "5"),
    ("n_slots", None), ("chunk_size", 0), ("ffn_dim", 2.5), ("conv_size", 1), ("conv_size", False),
    ("phi", "relu"), ("f", "LN_SILU"), ("rho", None), ("qk_norm", "l1"), ("eps", 0.0), ("eps", -1e-5),
    ("eps", True), ("eps", "1e-5"), ("eps", float("nan")), ("norm_eps", 0), ("beta_init", 1.0),
    ("beta_init", 0.0), ("beta_init", "0.9"), ("tie_embeddings", "yes"), ("tie_embeddings", 1),
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_raises_config_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(**{field: value})
    msg = str(info.value)
    assert f"'{field}'" in msg, msg
    assert "\n" not in msg
    assert isinstance(info.value, TrellisExportError) and isinstance(info.value, ValueError)


def test_d_model_must_divide_by_heads() -> None:
    with pytest.raises(ConfigError, match="'d_model'.*'n_heads'"):
        tiny_config(d_model=13)


@pytest.mark.parametrize("name", NONLINEARITIES)
def test_every_nonlinearity_is_accepted_in_every_role(name: str) -> None:
    c = tiny_config(phi=name, f=name, rho=name)
    assert (c.phi, c.f, c.rho) == (name, name, name)


@pytest.mark.parametrize("config", [
    TrellisConfig(),
    tiny_config(),
    tiny_config(chunk_size=1, phi="identity", f="l2_silu", rho="ln_silu", qk_norm="none",
                tie_embeddings=False, eps=0.25, norm_eps=1e-3, beta_init=0.5),
    tiny_config(extra={"note": "kept", "n": [1, 2]}),
], ids=["default", "tiny", "all-flags", "extra"])
def test_json_round_trip(config: TrellisConfig, tmp_path: Path) -> None:
    text = config.to_json()
    back = TrellisConfig.from_json(text)
    assert back == config
    assert back.to_dict() == config.to_dict()
    assert back.extra == config.extra
    assert json.loads(text) == config.to_dict()
    path = tmp_path / "config.json"
    path.write_text(text)
    assert TrellisConfig.load(path) == config
    assert "extra" in config.to_dict() or not config.extra


def test_unknown_field_is_named() -> None:
    data = tiny_config().to_dict() | {"n_slot": 7}
    with pytest.raises(ConfigError, match="unknown config field.*n_slot"):
        TrellisConfig.from_dict(data)


def test_from_dict_needs_an_object() -> None:
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        TrellisConfig.from_json("[1, 2]")


def test_invalid_json_names_the_source() -> None:
    with pytest.raises(ConfigError, match="my.json: not valid JSON"):
        TrellisConfig.from_json("{\"vocab_size\": ", source="my.json")


def test_load_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config().to_dict() | {"chunk_size": -1}))
    with pytest.raises(ConfigError) as info:
        TrellisConfig.load(path)
    assert str(path) in str(info.value) and "'chunk_size'" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read config"):
        TrellisConfig.load(tmp_path / "missing.json")


def test_partial_dict_uses_defaults() -> None:
    c = TrellisConfig.from_dict({"n_slots": 7, "chunk_size": 3})
    assert c == TrellisConfig(n_slots=7, chunk_size=3)
