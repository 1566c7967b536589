"""The devices a bundle can be made for (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trellis_export.errors import TrellisExportError


class BundleError(TrellisExportError):
    """A bundle cannot be made or checked; the message names the flag, file or check."""


@dataclass(frozen=True)
class Target:
    """One deployment target: where the engine is built, and for which GPUs the AOT kernels are."""

    name: str
    description: str
    runtime: str                          # "tensorrt" (enterprise) | "tensorrt-rtx"
    kernel_ccs: tuple[int, ...]           # compute capabilities of the plugin's AOT kernels
    builder: str                          # the trtexec-style binary build_engine.sh runs by default
    tensorrt: str                         # the TensorRT versions the target ships (informational)
    rtx_ccs: tuple[str, ...] = ()         # TensorRT-RTX compute capabilities (runtime tensorrt-rtx)
    ptx_versions: dict[int, int] = field(default_factory=dict)   # PTX ISA overrides (aot default else)
    cubin_ccs: tuple[int, ...] = ()       # targets whose records also carry the cubin (besides aot's)
    kernel_note: str = ""


TARGETS: dict[str, Target] = {
    "orin": Target(
        "orin", "Jetson AGX Orin / Orin NX / Orin Nano (sm_87)", "tensorrt", (87,),
        "/usr/src/tensorrt/bin/trtexec",
        "JetPack 6: TensorRT 10.3 (the function body; plugin_namespace mapping needs TensorRT >= 10.7); "
        "JetPack 7: TensorRT 10.x / 11",
        kernel_note="sm_87, PTX ISA 8.5 (a JetPack 6 / CUDA 12.6 driver accepts it) plus the cubin"),
    "thor": Target(
        "thor", "Jetson AGX Thor (sm_110)", "tensorrt", (110,), "/usr/src/tensorrt/bin/trtexec",
        "JetPack 7: TensorRT 10.x / 11 (CUDA 13)", ptx_versions={110: 90}, cubin_ccs=(110,),
        kernel_note="sm_110 (triton 3.7.1 targets it: .target sm_110a), PTX ISA 9.0 (CUDA 13.0 driver) "
                    "plus the cubin of triton's bundled ptxas; never loaded on a Thor"),
    "rtx": Target(
        "rtx", "GeForce / RTX workstation GPUs with TensorRT for RTX (sm_80, sm_86, sm_89, sm_120)",
        "tensorrt-rtx", (80, 86, 89, 120), "tensorrt_rtx", "TensorRT-RTX 1.x",
        rtx_ccs=("8.0", "8.6", "8.9", "12.0"), ptx_versions={120: 87},
        kernel_note="sm_80 / sm_86 / sm_89 PTX ISA 8.5, sm_120 PTX ISA 8.7 (CUDA 12.8 driver)"),
    "datacenter": Target(
        "datacenter", "A100 / H100 class GPUs with enterprise TensorRT (sm_80, sm_90)", "tensorrt", (80, 90),
        "trtexec", "TensorRT 10.x", kernel_note="sm_80 / sm_90, PTX ISA 8.5 (CUDA 12.6 driver)"),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise BundleError(f"--target must be one of {', '.join(TARGETS)}; got {name!r}") from None
