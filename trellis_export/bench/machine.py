"""The machine description recorded with every bench result."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
from typing import Any


def _cpuinfo() -> tuple[str | None, int | None]:
    """CPU model name and physical core count from /proc/cpuinfo (Linux); (None, None) elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None, None
    model = None
    cores: set[tuple[str, str]] = set()
    phys = core = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
            cores.add((phys, core))
    return model, (len(cores) or None)


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, CPU affinity, memory, OS, load, library versions and the date (UTC)."""
    model, physical = _cpuinfo()
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "cpu_model": model or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "cpu_affinity": affinity,
        "memory_bytes": _mem_total_bytes(),
        "gpu": gpu,
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in
                     ("torch", "onnxruntime", "onnx", "onnxscript", "numpy", "triton", "tensorrt",
                      "trellis-export")},
        "load_average_at_start": load,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
