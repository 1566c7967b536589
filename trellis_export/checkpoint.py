"""Checkpoints: a directory with ``config.json`` and ``model.safetensors`` (never a pickle).

The safetensors header's metadata carries the config and a fingerprint (sha256 of the canonical
config JSON and every tensor's name, dtype, shape and bytes). Loading recomputes the fingerprint, so
a corrupted or edited file is refused, and runtimes can refuse a state or an engine made for another
model. Writes are atomic: a checkpoint directory is built beside its destination, then renamed
(:mod:`trellis_export.outputs`). Loading refuses weights holding NaN or Inf, naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import outputs

if TYPE_CHECKING:
    from .model import TrellisLM
from .config import FINGERPRINT_VERSION, FINGERPRINT_VERSIONS, ConfigError, TrellisConfig
from .errors import TrellisExportError, first_line
from .outputs import (  # noqa: F401  (atomic_write_bytes is re-exported for older imports)
    atomic_write_bytes,
    current_umask,
    replace_dir,
    temporary_sibling,
    write_error,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = "1"


class CheckpointError(TrellisExportError):
    """A checkpoint cannot be read; the message names the file and what is wrong, in one line."""


def default_checkpoint_path() -> Path:
    """The bundled default checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / "default"


def fingerprint(config: TrellisConfig, tensors: dict[str, Tensor], version: int = FINGERPRINT_VERSION) -> str:
    """sha256 of the canonical config (:meth:`TrellisConfig.canonical_dict` of ``version``) and of
    every tensor (name, dtype, shape, little-endian bytes). Version 2 and later start with a version
    tag; version 1 is the unversioned form older checkpoints were saved with."""
    h = hashlib.sha256()
    if version >= 2:
        h.update(f"trellis-fingerprint-v{version}\0".encode())
    h.update(json.dumps(config.canonical_dict(version), sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: TrellisLM) -> str:
    """The fingerprint of a model's config and weights, in the version it was loaded with (a model made
    in memory: the current version)."""
    return fingerprint(model.config, dict(model.state_dict()),
                       getattr(model, "fingerprint_version", FINGERPRINT_VERSION))


def save_checkpoint(model: TrellisLM, path: str | os.PathLike[str],
                    metadata: dict[str, Any] | None = None, *, force: bool = False) -> str:
    """Save ``model`` (a TrellisLM) to the directory ``path``; returns the fingerprint.

    An existing ``path`` is replaced only when it is a checkpoint (or empty, or marked as written by
    trellis-export); any other directory is refused unless ``force`` (its files would be lost)."""
    from safetensors.torch import save

    config: TrellisConfig = model.config
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    fp = fingerprint(config, tensors, FINGERPRINT_VERSION)
    meta = {"format": "trellis-export", "format_version": FORMAT_VERSION, "fingerprint": fp,
            "fingerprint_version": str(FINGERPRINT_VERSION),
            "config": json.dumps(config.to_dict(), sort_keys=True)}
    if metadata:
        meta["training"] = json.dumps(metadata, sort_keys=True)
    dest = Path(os.path.abspath(os.fspath(path)))
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest}: exists and is not a directory; a checkpoint is a directory")
    if dest.is_dir() and not force and not outputs.is_replaceable_dir(dest):
        raise CheckpointError(f"{dest}: directory holds files trellis-export did not write; refusing to "
                              "replace it with a checkpoint (force=True / --force replaces it)")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(dest, exc) from None
    files = {WEIGHTS_FILE: save(tensors, metadata=meta),
             CONFIG_FILE: (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode()}
    if metadata:
        files["training.json"] = (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()
    with temporary_sibling(dest, directory=True) as tmp:
        for name, data in files.items():
            try:
                outputs.write_file(tmp / name, data)
                os.chmod(tmp / name, 0o666 & ~current_umask())
            except OSError as exc:
                raise write_error(dest / name, exc) from None
        replace_dir(tmp, dest)
    return fp


def read_checkpoint(path: str | os.PathLike[str] | None = None, *, check_finite: bool = True
                    ) -> tuple[TrellisConfig, dict[str, Tensor], dict[str, str]]:
    """Read config, tensors and header metadata of a checkpoint directory, verifying its fingerprint
    and (unless ``check_finite=False``) that every weight is finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path) if path is not None else default_checkpoint_path()
    if not root.exists():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if root.is_file():
        raise CheckpointError(f"{root}: expected a checkpoint directory holding {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE}, got a file")
    cfg_path, w_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (a checkpoint directory holds {CONFIG_FILE} and "
                                  f"{WEIGHTS_FILE})")
    try:
        config = TrellisConfig.load(cfg_path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        from safetensors import safe_open
        with safe_open(str(w_path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = first_line(exc)
        raise CheckpointError(f"{w_path}: not a readable safetensors file ({msg})") from None
    stored = meta.get("fingerprint")
    if stored is None:
        raise CheckpointError(f"{w_path}: no fingerprint in the safetensors metadata; not a "
                              "trellis-export checkpoint")
    if meta.get("config"):
        try:
            saved_cfg = TrellisConfig.from_json(meta["config"], source=f"{w_path} metadata")
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        if saved_cfg != config:
            raise CheckpointError(f"{cfg_path}: does not match the config the weights were saved with "
                                  f"(see the metadata of {w_path.name})")
    try:
        version = int(meta.get("fingerprint_version", "1"))
        actual = fingerprint(config, tensors, version)
    except (ValueError, ConfigError):
        raise CheckpointError(f"{w_path}: unknown fingerprint_version {meta.get('fingerprint_version')!r} "
                              f"(this trellis-export knows {', '.join(map(str, FINGERPRINT_VERSIONS))})") \
            from None
    if actual != stored:
        raise CheckpointError(f"{w_path}: fingerprint mismatch (stored {stored[:12]}, computed "
                              f"{actual[:12]}): the weights or {CONFIG_FILE} changed after saving, "
                              "or the file is corrupted")
    if check_finite:
        bad = nonfinite_tensors(tensors)
        if bad:
            raise CheckpointError(f"{w_path}: weights hold non-finite values: {bad}; the checkpoint was "
                                  "saved from a diverged model (pass check_finite=False to load it anyway)")
    return config, tensors, meta


def nonfinite_tensors(tensors: dict[str, Tensor], limit: int = 3) -> str:
    """'' when every floating tensor is finite, else the first offending names with NaN / Inf counts."""
    bad = []
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            bad.append(f"{name} ({nan} NaN, {int((~torch.isfinite(t)).sum()) - nan} Inf)")
    if len(bad) > limit:
        bad = bad[:limit] + [f"and {len(bad) - limit} more"]
    return ", ".join(bad)


def load_checkpoint(path: str | os.PathLike[str] | None = None, *,
                    device: str | torch.device = "cpu", check_finite: bool = True,
                    requires_grad: bool = False) -> TrellisLM:
    """Load a TrellisLM from a checkpoint directory (the bundled default when ``path`` is None).

    Missing, unexpected and mis-shaped tensors are reported by name in a :class:`CheckpointError`, and
    so are weights holding NaN / Inf (``check_finite=False`` skips that check). The model is in eval
    mode with ``requires_grad=False`` parameters, so its outputs carry no autograd history; pass
    ``requires_grad=True`` (or call ``model.requires_grad_()``) to fine-tune it.
    """
    from .model import TrellisLM as _TrellisLM

    config, tensors, meta = read_checkpoint(path, check_finite=check_finite)
    root = Path(path) if path is not None else default_checkpoint_path()
    model = _TrellisLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(f"{k} (expected {list(expected[k].shape)}, got {list(tensors[k].shape)})"
                       for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if misshaped:
        problems.append("mis-shaped tensors: " + ", ".join(misshaped))
    if problems:
        raise CheckpointError(f"{root / WEIGHTS_FILE}: does not fit its config; " + "; ".join(problems))
    bad_dtype = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if bad_dtype:
        raise CheckpointError(f"{root / WEIGHTS_FILE}: tensors must be floating point: "
                              + ", ".join(bad_dtype))
    model.load_state_dict({k: t.to(expected[k].dtype) for k, t in tensors.items()})
    model.fingerprint = meta["fingerprint"]
    model.fingerprint_version = int(meta.get("fingerprint_version", "1"))
    model.checkpoint_path = str(root)
    model.requires_grad_(requires_grad)
    model.to(device).eval()
    return model
