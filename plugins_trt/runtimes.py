"""Which TensorRT: the enterprise ``tensorrt`` module or TensorRT for RTX (``tensorrt_rtx_bindings``).

Both expose the same builder / parser / runtime / IPluginV3 API under different module names; the
differences this project meets are recorded here, once:

* TensorRT-RTX builds ahead of time without a GPU (compute capabilities chosen by flag), networks are
  strongly typed, the targets are SM75/80/86/89/120/121 (no SM87 Jetson, no SM90 Hopper), and only
  IPluginV3 plugins with an IPluginCreatorV3One creator exist (no ``tensorrt.plugin`` decorators).
* TensorRT-RTX 1.7.1 bug: its ONNX parser dlopens the unversioned ``libtensorrt_rtx.so`` when a
  plugin node is imported, but the ``tensorrt-rtx-cu12-libs`` wheel ships only
  ``libtensorrt_rtx.so.1``; the process then dies with ``terminate called without an active
  exception``. :func:`ensure_rtx_library_link` adds the missing symlink in the wheel's library
  folder (once, with a message on stderr), or raises with the one command to run when the folder is
  not writable. ``tests/test_engine.py`` keeps a canary that notices a release that ships the link.
* Enterprise TensorRT (Jetson, Hopper, datacenter) builds on the device it targets, with a GPU.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from trellis_export.errors import TrellisExportError

#: Runtime names as the CLI spells them, in the order tried when none is named (RTX first: it is
#: the one that builds without a GPU).
RUNTIMES: tuple[str, ...] = ("tensorrt-rtx", "tensorrt")
#: Python modules that provide each runtime, in the order tried.
MODULES: dict[str, tuple[str, ...]] = {"tensorrt-rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx"),
                                       "tensorrt": ("tensorrt",)}
#: TensorRT-RTX compute-capability targets (``trt.ComputeCapability`` member names), by CLI spelling.
RTX_TARGETS: dict[str, str] = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89",
                               "12.0": "SM120", "12.1": "SM121"}
RTX_LIBS_DIST = "tensorrt-rtx-cu12-libs"
RTX_LIBRARY = "libtensorrt_rtx.so"


class TensorRTUnavailable(TrellisExportError):
    """No usable TensorRT module (or not the one asked for)."""


@dataclass(frozen=True)
class TensorRT:
    """A loaded TensorRT flavour: ``trt`` is the module (``trt.Builder``, ``trt.OnnxParser`` ...)."""

    name: str            # "tensorrt-rtx" | "tensorrt"
    module_name: str
    trt: ModuleType

    @property
    def version(self) -> str:
        return str(getattr(self.trt, "__version__", "?"))

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"


def _import(name: str) -> TensorRT | None:
    for mod in MODULES[name]:
        try:
            module = importlib.import_module(mod)
        except Exception:  # an absent module, or a stub wheel that fails on import
            continue
        if hasattr(module, "Builder"):
            return TensorRT(name, mod, module)
    return None


def available_runtimes() -> list[str]:
    """The TensorRT flavours importable here, in :data:`RUNTIMES` order."""
    return [n for n in RUNTIMES if _import(n) is not None]


def load_tensorrt(name: str | None = None) -> TensorRT:
    """The TensorRT flavour ``name`` (None: TensorRT-RTX when importable, else enterprise TensorRT).

    Loading TensorRT-RTX also makes sure of the library link its parser needs
    (:func:`ensure_rtx_library_link`)."""
    if name is not None and name not in RUNTIMES:
        raise TensorRTUnavailable(f"--runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
    for candidate in ([name] if name else list(RUNTIMES)):
        rt = _import(candidate)
        if rt is not None:
            if rt.is_rtx:
                ensure_rtx_library_link()
            return rt
    if name == "tensorrt-rtx":
        hint = 'pip install -e ".[tensorrt-rtx]" (TensorRT for RTX 1.7.1, builds without a GPU)'
    elif name == "tensorrt":
        hint = ("install NVIDIA TensorRT >= 10.8 for your device (JetPack on Jetson; the tensorrt wheel "
                "from NVIDIA's index elsewhere)")
    else:
        hint = 'pip install -e ".[tensorrt-rtx]", or install NVIDIA TensorRT for your device'
    tried = ", ".join(m for n in ([name] if name else RUNTIMES) for m in MODULES[n])
    raise TensorRTUnavailable(f"no TensorRT module {'for ' + name + ' ' if name else ''}is importable "
                              f"(tried {tried}); {hint}")


def rtx_library_dir() -> Path | None:
    """The folder holding ``libtensorrt_rtx.so.1`` from the libs wheel (None when not installed)."""
    try:
        files = importlib.metadata.files(RTX_LIBS_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == RTX_LIBRARY + ".1":
            return Path(str(f.locate())).parent
    return None


def rtx_wheel_ships_unversioned_library() -> bool:
    """Whether the installed libs wheel itself lists ``libtensorrt_rtx.so`` (the bug's fix)."""
    try:
        files = importlib.metadata.files(RTX_LIBS_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(f.name == RTX_LIBRARY for f in files)


def ensure_rtx_library_link(quiet: bool = False) -> Path | None:
    """Create ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` beside the wheel's library when missing.

    Returns the link's path (None when the libs wheel is not installed, e.g. a system TensorRT-RTX).
    Raises :class:`TensorRTUnavailable` with the command to run when the folder is not writable."""
    libdir = rtx_library_dir()
    if libdir is None:
        return None
    link = libdir / RTX_LIBRARY
    if link.exists():
        return link
    if link.is_symlink():            # a dangling link: replace it (it points nowhere useful)
        link.unlink()
    try:
        os.symlink(RTX_LIBRARY + ".1", link)
    except OSError as exc:
        raise TensorRTUnavailable(
            f"{link}: TensorRT-RTX 1.7.1's ONNX parser needs this link to import plugin nodes and it "
            f"cannot be created ({exc.strerror}); run once: ln -s {RTX_LIBRARY}.1 {link}") from None
    if not quiet:
        print(f"note: created {link} -> {RTX_LIBRARY}.1 (TensorRT-RTX 1.7.1's parser dlopens the "
              "unversioned library, which its wheel does not ship; see docs/tensorrt.md)", file=sys.stderr)
    return link


def rtx_compute_capabilities(rt: TensorRT, targets: list[str]) -> list[object]:
    """``trt.ComputeCapability`` members for CLI spellings such as ``8.6``; raises on unknown ones."""
    out = []
    for t in targets:
        key = t.strip()
        if key not in RTX_TARGETS:
            raise TensorRTUnavailable(f"--compute-capability {key!r} is not a TensorRT-RTX target; choose "
                                      f"from {', '.join(RTX_TARGETS)} (no 8.7 Jetson Orin, no 9.0 "
                                      "Hopper: use enterprise TensorRT there)")
        out.append(getattr(rt.trt.ComputeCapability, RTX_TARGETS[key]))
    return out
