"""Deployment bundles: one directory a device needs to build, check and run a Trellis engine.

* :func:`build_bundle` (``trellis-export bundle``): model.onnx, build_engine.sh / build_engine.py,
  the plugin's AOT kernels, the float64 reference stream, verify_engine.py, run_stream.py,
  manifest.json and README.md, written atomically (docs/bundle.md).
* :func:`gpu_check`: on a machine with a GPU, build the bundle's engine there and run its
  verify_engine.py (the GPU suite calls it).

The device-side scripts live in ``device/`` and are copied verbatim; they never import this package.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import first_line
from .targets import TARGETS, BundleError, Target, get_target

__all__ = ["TARGETS", "Target", "BundleError", "get_target", "build_bundle", "parse_build_script",
           "gpu_check", "check_bundle"]

_LAZY = {"build_bundle": "build", "parse_build_script": "build"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def device_module() -> Any:
    """``device/trellis_bundle.py``, the device scripts' shared helpers, as they import it themselves
    (a top-level module beside them): the package uses the same hashing and checks."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))
    try:
        import trellis_bundle
    finally:
        sys.path.pop(0)
    return trellis_bundle


def check_bundle(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The bundle's manifest after checking that every listed file is present with its sha256 (the
    device scripts' own check); raises :class:`BundleError` naming the first file that is not."""
    trellis_bundle = device_module()
    try:
        return trellis_bundle.open_bundle(Path(bundle_dir))
    except trellis_bundle.BundleError as exc:
        raise BundleError(str(exc)) from None


def gpu_check(bundle_dir: str | os.PathLike[str], *, runtime: str | None = None, timeout: float = 1800,
              engine: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """On a GPU machine: build the bundle's engine with its build_engine.py (TensorRT Python API) and run
    its verify_engine.py against it, as a user on the device would.

    ``runtime``: ``"tensorrt-rtx"`` | ``"tensorrt"`` (default: the bundle target's). TensorRT-RTX builds
    for this GPU's compute capability when it is a TensorRT-RTX target (sm_75/80/86/89/120/121), so
    any bundle can be checked that way on such a card. The engine and its verify report go to
    ``engine`` and ``<engine>.verify.json``, which must not exist yet (ERROR otherwise: nothing is
    overwritten); by default to a temporary directory of this call's own, removed afterwards (the
    report is returned), so neither the bundle nor anything beside it changes.

    Returns ``{"status": "PASSED" | "FAILED" | "ERROR" | "SKIPPED", "reason": ..., "build": {...},
    "verify": {...}}`` with each step's command, exit code, seconds and output tail (and the verify
    report); SKIPPED says why the check cannot run here (no GPU, no such TensorRT, a GPU that is not
    a TensorRT-RTX target). Never raises for a failed step."""
    bundle = Path(bundle_dir).resolve()
    result: dict[str, Any] = {"bundle": str(bundle), "status": "ERROR"}
    try:
        manifest = check_bundle(bundle)
    except BundleError as exc:
        result["reason"] = str(exc)
        return result
    if engine is not None:
        eng = Path(engine)
        taken = [p for p in (eng, eng.with_name(eng.name + ".verify.json")) if p.exists() or p.is_symlink()]
        if taken:
            result["reason"] = (f"{taken[0]}: exists; gpu_check writes the engine and its report to new "
                                "paths only")
            return result
        return _gpu_check(bundle, manifest, result, runtime, timeout, eng)
    work = Path(tempfile.mkdtemp(prefix="trellis-gpu-check-"))
    try:
        return _gpu_check(bundle, manifest, result, runtime, timeout, work / (bundle.name + ".engine"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gpu_check(bundle: Path, manifest: dict[str, Any], result: dict[str, Any], runtime: str | None,
               timeout: float, eng: Path) -> dict[str, Any]:
    from importlib.util import find_spec

    rt = runtime or manifest["target"]["runtime"]
    result["runtime"] = rt
    modules = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx")}
    if rt not in modules:
        result["reason"] = f"runtime must be tensorrt or tensorrt-rtx, got {rt!r}"
        return result
    if not any(find_spec(m) is not None for m in modules[rt]):
        return {**result, "status": "SKIPPED", "reason": f"{rt} is not installed here"}
    try:
        from trellis_export.kernels.cuda_launch import CudaDriver

        cc = CudaDriver().compute_capability()
    except Exception as exc:  # no libcuda, no device
        why = first_line(exc)
        return {**result, "status": "SKIPPED", "reason": f"no usable GPU ({why})"}
    result["compute_capability"] = f"{cc // 10}.{cc % 10}"
    build_cmd = [sys.executable, str(bundle / "build_engine.py"), "--runtime", rt, "-o", str(eng)]
    if rt == "tensorrt-rtx":
        from trellis_export.plugins_trt.runtimes import RTX_TARGETS

        if result["compute_capability"] not in RTX_TARGETS:
            return {**result, "status": "SKIPPED",
                    "reason": f"this GPU (sm_{cc}) is not a TensorRT-RTX target ({', '.join(RTX_TARGETS)})"}
        build_cmd += ["--compute-capability", result["compute_capability"]]
    steps = [("build", build_cmd),
             ("verify", [sys.executable, str(bundle / "verify_engine.py"), str(eng), "--json",
                         str(eng.with_name(eng.name + ".verify.json"))])]
    for name, cmd in steps:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, out = proc.returncode, (proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired:
            rc, out = 124, f"timed out after {timeout} s"
        result[name] = {"command": cmd, "rc": rc, "seconds": round(time.perf_counter() - t0, 3),
                        "output_tail": out[-4000:]}
        if rc != 0:
            failed = name == "verify" and rc == 1 and "] FAILED |" in out
            result["status"] = "FAILED" if failed else "ERROR"
            result["reason"] = f"{name} step exited {rc}"
            return result
    rep = eng.with_name(eng.name + ".verify.json")
    if rep.is_file():
        result["verify"]["report"] = json.loads(rep.read_text())
    result["status"] = "PASSED"
    return result
