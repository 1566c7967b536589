"""Checkpoints: a directory with ``config.json`` and ``model.safetensors`` (never a pickle).

The safetensors header's metadata carries the config and a fingerprint (sha256 of the canonical
config JSON and every tensor's name, dtype, shape and bytes). Loading recomputes the fingerprint, so
a corrupted or edited file is refused, and runtimes can refuse a state or an engine made for another
model. Writes are atomic: a checkpoint directory is built beside its destination, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError, TrellisConfig
from .errors import TrellisExportError
from .fileio import atomic_write_bytes, current_umask  # noqa: F401  (atomic_write_bytes re-exported)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = "1"


class CheckpointError(TrellisExportError):
    """A checkpoint cannot be read; the message names the file and what is wrong, in one line."""


def default_checkpoint_path() -> Path:
    """The bundled default checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / "default"


def fingerprint(config: TrellisConfig, tensors: dict[str, Tensor]) -> str:
    """sha256 of the canonical config and of every tensor (name, dtype, shape, little-endian bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    return fingerprint(model.config, dict(model.state_dict()))


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike[str],
                    metadata: dict[str, Any] | None = None) -> str:
    """Save ``model`` (a TrellisLM) to the directory ``path``; returns the fingerprint."""
    from safetensors.torch import save_file

    config: TrellisConfig = model.config
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    fp = fingerprint(config, tensors)
    meta = {"format": "trellis-export", "format_version": FORMAT_VERSION, "fingerprint": fp,
            "config": json.dumps(config.to_dict(), sort_keys=True)}
    if metadata:
        meta["training"] = json.dumps(metadata, sort_keys=True)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~current_umask())      # a normal directory mode, not mkdtemp's 0700
    old = None
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=meta)
        cfg = config.to_dict()
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if metadata:
            (tmp / "training.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        for written in tmp.iterdir():       # safetensors writes 0600; give files the usual mode
            os.chmod(written, 0o666 & ~current_umask())
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not dest.exists():
            os.replace(old, dest)   # the previous checkpoint goes back where it was
        raise
    return fp


def read_checkpoint(path: str | os.PathLike[str] | None = None
                    ) -> tuple[TrellisConfig, dict[str, Tensor], dict[str, str]]:
    """Read config, tensors and header metadata of a checkpoint directory, verifying its fingerprint."""
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
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
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
    actual = fingerprint(config, tensors)
    if actual != stored:
        raise CheckpointError(f"{w_path}: fingerprint mismatch (stored {stored[:12]}, computed "
                              f"{actual[:12]}): the weights or {CONFIG_FILE} changed after saving, "
                              "or the file is corrupted")
    return config, tensors, meta


def load_checkpoint(path: str | os.PathLike[str] | None = None, *,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a TrellisLM from a checkpoint directory (the bundled default when ``path`` is None).

    Missing, unexpected and mis-shaped tensors are reported by name in a :class:`CheckpointError`.
    """
    from .model import TrellisLM

    config, tensors, meta = read_checkpoint(path)
    root = Path(path) if path is not None else default_checkpoint_path()
    model = TrellisLM(config)
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
    model.checkpoint_path = str(root)
    return model.to(device).eval()
