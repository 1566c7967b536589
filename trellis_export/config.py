"""Model configuration: the single source of truth for every shape and flag of a Trellis model.

Everything else (the reference model, the state spec, the ONNX export, kernels, plugins, runtimes)
reads these fields; nothing re-derives them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import TrellisExportError

#: Slot / output nonlinearities defined in TRELLIS_SPEC.md section 2.
#: The slot nonlinearities of spec section 2 (re-exported by ``trellis_export.spec``).
NONLINEARITIES: tuple[str, ...] = ("identity", "ln_silu", "l2_silu")
QK_NORMS: tuple[str, ...] = ("l2", "none")


#: Default of ``TrellisConfig.gamma_init`` (the initialisation before the field existed: b_gamma = 0).
_GAMMA_INIT_DEFAULT = 0.5
#: Fingerprint versions: 1 (no version recorded; fields added later are hashed only off their default),
#: 2 (every field hashed, version tag first). New checkpoints get the newest.
FINGERPRINT_VERSIONS: tuple[int, ...] = (1, 2)
FINGERPRINT_VERSION = FINGERPRINT_VERSIONS[-1]
#: Fields added after fingerprint version 1 and the default at which version 1 leaves them out.
_ADDED_AFTER_FINGERPRINT_V1: dict[str, object] = {"gamma_init": _GAMMA_INIT_DEFAULT}


class ConfigError(TrellisExportError, ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


@dataclass(frozen=True)
class TrellisConfig:
    """Hyper-parameters of a Trellis language model (TRELLIS_SPEC.md sections 1, 2 and 5)."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int = 32
    n_slots: int = 32
    chunk_size: int = 16
    conv_size: int = 4
    phi: str = "ln_silu"
    f: str = "ln_silu"
    rho: str = "identity"
    eps: float = 1e-5
    qk_norm: str = "l2"
    ffn_dim: int = 256
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    beta_init: float = 0.95
    gamma_init: float = _GAMMA_INIT_DEFAULT   # initial inner step size sigmoid(b_gamma)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config field '{name}' must be an integer >= 1, got {value!r}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "n_slots",
                     "chunk_size", "ffn_dim"):
            positive(name)
        if isinstance(self.conv_size, bool) or not isinstance(self.conv_size, int) or self.conv_size < 2:
            raise ConfigError(f"config field 'conv_size' must be an integer >= 2, got {self.conv_size!r}")
        for name in ("phi", "f", "rho"):
            value = getattr(self, name)
            if value not in NONLINEARITIES:
                raise ConfigError(
                    f"config field '{name}' must be one of {', '.join(NONLINEARITIES)}; got {value!r}")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"config field 'qk_norm' must be one of {', '.join(QK_NORMS)}; "
                              f"got {self.qk_norm!r}")
        for name in ("eps", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"config field '{name}' must be a number > 0, got {value!r}")
        if not (isinstance(self.beta_init, (int, float)) and 0.0 < self.beta_init < 1.0):
            raise ConfigError(f"config field 'beta_init' must be in (0, 1), got {self.beta_init!r}")
        if not (isinstance(self.gamma_init, (int, float)) and not isinstance(self.gamma_init, bool)
                and 0.0 < self.gamma_init < 1.0):
            raise ConfigError(f"config field 'gamma_init' must be in (0, 1), got {self.gamma_init!r}")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(f"config field 'd_model' ({self.d_model}) must be divisible by "
                              f"'n_heads' ({self.n_heads})")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"config field 'tie_embeddings' must be true or false, got "
                              f"{self.tie_embeddings!r}")

    # ----------------------------------------------------------------- derived quantities
    @property
    def memory_dim(self) -> int:
        """H * d: width of q, k, v and of the concatenated memory output."""
        return self.n_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        """Channels of the causal depthwise convolution (q, k and v concatenated)."""
        return 3 * self.memory_dim

    @property
    def has_snapshots(self) -> bool:
        """Snapshots are state only for C > 1 (with C = 1 they equal the running memories)."""
        return self.chunk_size > 1

    def replace(self, **changes: Any) -> TrellisConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every field (``extra`` only when set): what config.json and exported metadata hold."""
        out = dataclasses.asdict(self)
        if not out["extra"]:
            out.pop("extra")
        return out

    def canonical_dict(self, fingerprint_version: int = FINGERPRINT_VERSION) -> dict[str, Any]:
        """The config as hashed into a fingerprint of ``fingerprint_version``: version 1 (checkpoints
        saved before versions existed, the bundled one included) leaves out the fields added after it
        when they hold their default, so those fingerprints never change; version 2 hashes every field."""
        if fingerprint_version not in FINGERPRINT_VERSIONS:
            raise ConfigError(f"fingerprint version must be one of {FINGERPRINT_VERSIONS}, got "
                              f"{fingerprint_version!r}")
        out = self.to_dict()
        if fingerprint_version == 1:
            for name, default in _ADDED_AFTER_FINGERPRINT_V1.items():
                if out.get(name) == default:
                    out.pop(name)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrellisConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {', '.join(unknown)}; "
                              f"known fields are {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> TrellisConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrellisConfig:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
        return cls.from_json(text, source=str(path))


#: The recipe the bundled checkpoint was trained with (trellis_export/assets/default): what ``train``
#: uses for every model flag that is not given. ``TrellisConfig()``'s own defaults are the paper-sized
#: model of TRELLIS_SPEC.md; this preset is the small model that learned MQAR here.
TRAIN_PRESET = TrellisConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=2, head_dim=32, n_slots=16,
                             chunk_size=4, phi="ln_silu", f="ln_silu", rho="identity", qk_norm="l2",
                             ffn_dim=128, beta_init=0.99, gamma_init=_GAMMA_INIT_DEFAULT)
