"""What decides a kernel's speed that can be measured without a GPU: ``ptxas -v`` on the shipped PTX.

``find_ptxas()`` locates a ``ptxas`` (``$TRELLIS_PTXAS``, ``$PTXAS``, ``PATH``, ``$CUDA_HOME/bin``,
``/usr/local/cuda*/bin``, then the one bundled with triton); ``ptxas_stats(ptx, arch)`` assembles
the PTX for ``sm_<arch>`` and returns registers, spill bytes, stack frame, static shared memory and
the ptxas version; ``ptx_memory_ops(ptx)`` counts the global loads / stores of the PTX by vector
width (``ld.global.v4.b32`` is one 16-byte load; scalar ``ld.global.b32`` loads 4 bytes);
``ctas_per_sm(...)`` is the occupancy bound from registers, shared memory and warps.

Used by ``tests/test_kernels_ptxas.py`` (the CI bounds) and ``docs/kernels.md``.
Run ``python -m trellis_export.kernels.ptx_stats`` for the table of the issue-14 shapes.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PtxasStats", "ctas_per_sm", "find_ptxas", "ptx_memory_ops", "ptxas_stats", "ptxas_version"]


def find_ptxas() -> str | None:
    """The path of a ptxas binary, or None. Prefers an explicit override, then a CUDA toolkit."""
    for var in ("TRELLIS_PTXAS", "PTXAS"):
        p = os.environ.get(var)
        if p and os.access(p, os.X_OK):
            return p
    p = shutil.which("ptxas")
    if p:
        return p
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    homes += sorted(glob.glob("/usr/local/cuda*"), reverse=True) + ["/opt/cuda"]
    for h in homes:
        if h and os.access(os.path.join(h, "bin", "ptxas"), os.X_OK):
            return os.path.join(h, "bin", "ptxas")
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if os.access(p, os.X_OK):
            return p
    except ImportError:
        pass
    return None


def ptxas_version(ptxas: str) -> str:
    """``13.0`` from ``ptxas --version``."""
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "?"


@dataclass(frozen=True)
class PtxasStats:
    """``ptxas -v`` figures of one entry for one architecture."""

    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem_static: int
    barriers: int
    ptxas: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ptxas_stats(ptx: str, arch: str | int, ptxas: str | None = None, timeout: float = 600) -> PtxasStats:
    """Assemble ``ptx`` for ``arch`` and parse ``ptxas -v``. ``arch`` as ``sm_90`` / ``sm_90a`` is used
    as given; as an int (``90``) it means the PTX's own ``.target`` (``sm_90a`` for triton's Hopper PTX)."""
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise FileNotFoundError("no ptxas found (set TRELLIS_PTXAS or put the CUDA toolkit on PATH)")
    if not str(arch).startswith("sm_"):
        m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
        arch = m.group(1) if m and m.group(1).startswith(f"sm_{arch}") else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{log[-3000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    bars = re.search(r"used (\d+) barriers", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log[-3000:]}")
    return PtxasStats(arch=str(arch), registers=int(regs.group(1)), stack=int(spill.group(1)),
                      spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
                      smem_static=int(smem.group(1)) if smem else 0,
                      barriers=int(bars.group(1)) if bars else 0, ptxas=ptxas_version(ptxas))


_MEM_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[a-z0-9:]+)*)\s", re.M)


def ptx_memory_ops(ptx: str) -> dict[str, float]:
    """Global loads / stores of the PTX text by width: ``ld_v4``, ``ld_v2``, ``ld_scalar``, same for
    ``st_``, ``ld_bytes_per_instr`` (mean bytes one load instruction moves, 32-bit elements) and
    ``bar_sync`` (barrier instructions in the text: a proxy of the CTA-wide synchronisation rounds)."""
    out: dict[str, float] = {f"{op}_{w}": 0 for op in ("ld", "st") for w in ("v4", "v2", "scalar")}
    lanes = 0
    for op, mods in _MEM_RE.findall(ptx):
        w = "v4" if ".v4" in mods else "v2" if ".v2" in mods else "scalar"
        out[f"{op}_{w}"] += 1
        if op == "ld":
            lanes += {"v4": 4, "v2": 2, "scalar": 1}[w]
    out["bar_sync"] = len(re.findall(r"^\s*(?:@!?%p\d+\s+)?(?:bar|barrier)\.sync", ptx, re.M))
    n_ld = out["ld_v4"] + out["ld_v2"] + out["ld_scalar"]
    out["ld_bytes_per_instr"] = round(4 * lanes / n_ld, 2) if n_ld else 0
    return out


#: Per-SM limits (registers, shared memory bytes usable by CTAs, max resident warps, max CTAs).
SM_LIMITS: dict[int, tuple[int, int, int, int]] = {
    80: (65536, 164 * 1024, 64, 32), 86: (65536, 100 * 1024, 48, 16), 87: (65536, 164 * 1024, 48, 16),
    89: (65536, 100 * 1024, 48, 24), 90: (65536, 228 * 1024, 64, 32),
}


def ctas_per_sm(cc: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp in 256-register units),
    shared memory (static + dynamic; 1 KB reserved per CTA) and warps. An upper bound, not a
    measurement."""
    regs, smem, warps, ctas = SM_LIMITS[cc]
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = regs // max(1, per_warp * num_warps)
    by_smem = smem // (shared_bytes + 1024) if shared_bytes else ctas
    return int(min(by_regs, by_smem, warps // num_warps, ctas))


# --------------------------------------------------------------------------- CLI: the issue-14 table
#: (kernel, H, d, m, C) of the issue-14 table.
ISSUE_SHAPES: tuple[tuple[str, int, int, int, int], ...] = (
    ("fused_recurrent", 2, 32, 16, 4), ("chunk", 2, 32, 16, 4),
    ("fused_recurrent", 8, 64, 64, 16), ("chunk", 8, 64, 64, 16),
    ("fused_recurrent", 16, 128, 64, 16), ("chunk", 16, 128, 64, 16),
)


def measure(kernel: str, H: int, d: int, m: int, C: int, variant: dict[str, Any], cc: int) -> dict[str, Any]:
    """Compile one record (``aot.compile_kernel``) and return its row: ptxas figures, loads, CTAs."""
    from .aot import compile_kernel
    rec = compile_kernel(kernel, cc, heads=H, slots=m, head_dim=d, chunk_size=C, **variant)
    st = ptxas_stats(rec.ptx, cc)
    mem = ptx_memory_ops(rec.ptx)
    return dict(kernel=rec.kernel, variant=rec.variant, H=H, d=d, m=m, C=C, cc=cc,
                ptx_version=rec.ptx_version, num_warps=rec.num_warps, shared_mem=rec.shared_mem,
                ctas_per_sm=ctas_per_sm(cc, st.registers, rec.num_warps, rec.shared_mem + st.smem_static),
                mma=len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)", rec.ptx)),
                atomics=len(re.findall(r"\batom\.", rec.ptx)),
                acquire_loads=len(re.findall(r"\bld\.global\.gpu\.acquire\b", rec.ptx)),
                **{k: v for k, v in st.to_dict().items() if k not in ("arch",)}, **mem)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from .aot import variants_for
    from .trellis_memory.utils import SPLIT_KERNELS
    p = argparse.ArgumentParser(prog="python -m trellis_export.kernels.ptx_stats")
    p.add_argument("--targets", default="87,90")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = p.parse_args(argv)
    targets = list(map(int, args.targets.split(",")))
    jobs = [(kernel, H, d, m, C, variant, cc)
            for shape_kernel, H, d, m, C in ISSUE_SHAPES
            for kernel in (shape_kernel,) + (SPLIT_KERNELS if shape_kernel == "chunk" else ())
            for variant in variants_for(kernel) for cc in targets]
    # the state pass's m-axis split exists at phi = identity only: its rows compile a phi = identity op
    jobs += [("chunk_state", H, d, m, C, {**variant, "phi": "identity"}, cc)
             for shape_kernel, H, d, m, C in ISSUE_SHAPES if shape_kernel == "chunk"
             for variant in variants_for("chunk_state", phi="identity", slots=m) if variant.get("m_block")
             for cc in targets]
    # the d-axis split's state pass (any phi; opt-in, no plugin record) at its default column block
    from .trellis_memory.chunk_split import default_d_block
    from .trellis_memory.utils import D_SPLIT_KERNEL
    jobs += [(D_SPLIT_KERNEL, H, d, m, C, {"d_block": default_d_block(d)}, cc)
             for shape_kernel, H, d, m, C in ISSUE_SHAPES if shape_kernel == "chunk" and d >= 64
             for cc in targets]
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.jobs) as ex:
            rows = list(ex.map(measure, *zip(*jobs)))
    else:
        rows = [measure(*j) for j in jobs]
    for r in rows:
        print(f"{r['kernel']:16s} {r['variant']:22s} H={r['H']:<3d}d={r['d']:<4d}m={r['m']:<3d}C={r['C']:<3d}"
              f"sm_{r['cc']} ptx {r['ptx_version']} warps={r['num_warps']:<3d}regs={r['registers']:<4d}"
              f"spill={r['spill_stores']:<6d}smem={r['shared_mem']:<6d}ld v4/v2/s={r['ld_v4']}/"
              f"{r['ld_v2']}/{r['ld_scalar']} bar={r['bar_sync']} mma={r['mma']} "
              f"CTAs/SM<={r['ctas_per_sm']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
