"""GPU validation suite of the Trellis Triton kernels: one call on a lent GPU, no network.

    python bench/gpu_suite.py --out bench/results/gpu_<card>.json [--quick] [--no-timing]

(a) JIT kernels vs the float64 reference op over a grid of shapes (odd ones included), outputs
    poisoned with NaN before each run;
(b) the AOT artifact: PTX compiled by ``trellis_export.kernels.aot`` (or read from ``--aot-json``),
    loaded and launched by the package's driver-API launcher ``trellis_export.kernels.cuda_launch``
    (the one the TensorRT plugin's enqueue uses: cuModuleLoadData / cuModuleGetFunction /
    cuLaunchKernel on torch tensors' data_ptr()) with the recorded launch parameters and argument
    order, outputs checked against the reference;
(c) timings with CUDA events (warm-up, median of N): fused_recurrent decode vs the PyTorch eager
    reference step (aim >= 10x at B=64, H=8, m=64, d=64); the decode step's achieved state bandwidth
    against the measured device-to-device copy bandwidth (aim >= 50% at large B*H); chunk prefill vs
    flash-linear-attention's chunk gated delta rule when ``fla`` is importable.
(d) AOT timing (issue 14): the AOT records timed exactly as the TensorRT plugin launches them
    (``cuda_launch`` on the current stream): decode at B=64, H=8, m=d=64 for every decode variant
    against the in-place bandwidth floor (state bytes / measured copy bandwidth; aim <= 1.5x for the
    in-place decode), and prefill at B=1, H=8, T=8192 for the pre-issue-14 chunk kernel, the aligned
    chunk kernel and the split prefill (ieee and tf32x3), against fla's chunk_gated_delta_rule at
    phi = f = rho = identity when ``fla`` imports (aims: split >= 3x the old kernel, <= 2x fla);
(e) the TensorRT plugin's launch path without TensorRT: ``plugin_v3.launch_memory`` (what the
    plugin's ``enqueue`` calls) with the records an engine carries (``plugin_v3.compile_records`` for
    this card), on device buffers, a plugin workspace sized by ``plugin_v3.workspace_size``, outputs
    separate (NaN-poisoned) or aliased to the memory inputs as an aliased-I/O engine hands them: T = 1
    (decode / in-place decode) and T > 1 (the split prefill) against the float64 reference;

Writes JSON (card, driver, versions, every check) and prints a short table last. Exit code 1 when
a correctness check fails or a section crashes; missed speed aims are reported, not failures.
Runs from a source checkout (the package need not be installed) with torch >= 2.4 and triton >= 3.3.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

if str(ROOT) not in sys.path:            # a bare checkout on the device: the package lives at the root
    sys.path.insert(0, str(ROOT))
# tolerances: TRELLIS_SPEC.md section 8 (trellis_export.spec); float16 / bfloat16 kernel outputs carry
# their own rounding on top (kernel-level bounds of this suite, not spec numbers)
from trellis_export.spec import NONLINEARITIES as NL  # noqa: E402
from trellis_export.spec import SHORT_STREAM, TOL_LONG, TOL_SHORT  # noqa: E402

TOL_OUT = {"float32": TOL_SHORT, "float16": 2e-3, "bfloat16": 1.5e-2}
AIM_DECODE_SPEEDUP = 10.0
AIM_BANDWIDTH_FRACTION = 0.5
# issue 14 aims (AOT code launched as TensorRT would): decode within 1.5x of the in-place bandwidth
# floor; split prefill >= 3x faster than the pre-issue-14 AOT chunk kernel, within 2x of fla
AIM_DECODE_FLOOR_RATIO = 1.5
AIM_PREFILL_SPEEDUP = 3.0
AIM_PREFILL_VS_FLA = 2.0
# the AOT timing section's shapes and records (also what --prepare-records compiles): decode at
# H = 8, m = d = 64, C = 16 (ln_silu, float32), prefill at the same shape with phi = f = rho = identity
# and bfloat16 activations (fla's setting)
TIMING_SHAPE: dict[str, int] = {"H": 8, "m": 64, "d": 64, "C": 16}
DECODE_NL: dict[str, str] = {"phi": "ln_silu", "f": "ln_silu", "rho": "identity", "dtype": "float32"}
DECODE_VARIANTS: tuple[str, ...] = ("unaligned", "aligned", "decode", "decode_in_place")
WARP_COUNTS: tuple[int, ...] = (4, 8, 16)
PREFILL_NL: dict[str, str] = {"phi": "identity", "f": "identity", "rho": "identity", "dtype": "bfloat16"}
PREFILL_RUNS: tuple[tuple[str, str], ...] = (("chunk", "unaligned"), ("chunk", "aligned"),
                                            ("chunk_split", "aligned"), ("chunk_split", "m_split"),
                                            ("chunk_split", "aligned+tf32x3"))
#: The d-axis split study (AOT timing): (H, m, d, C) of the issue's d = 64 and d = 128 prefill shapes,
#: each at phi = identity and ln_silu (which the m-axis split cannot take), the whole-d state pass
#: against the d-axis split with its spin barrier and with a launch per chunk.
D_SPLIT_SHAPES: tuple[tuple[int, int, int, int], ...] = ((8, 64, 64, 16), (16, 64, 128, 16))
D_SPLIT_PHIS: tuple[str, ...] = ("identity", "ln_silu")
D_SPLIT_RUNS: tuple[tuple[str, str], ...] = (("aligned", ""), ("d_split", "spin"), ("d_split", "launch"))
#: Calls per captured CUDA graph in the study (the launch mode is T / C + 2 launches per call).
D_SPLIT_GRAPH_REPS = 3


# =========================================================================== imports
def source_subpackages() -> dict[str, Path]:
    """The sub-packages pyproject.toml's ``package-dir`` installs under ``trellis_export`` from other
    folders of the checkout (``trellis_export.kernels`` <- ``kernels/`` ...): the one list of them."""
    import tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = data["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in dirs.items() if name != "trellis_export"}


def import_project() -> None:
    """Make ``trellis_export`` and its sub-packages kept in other folders (``kernels/``,
    ``plugins_trt/``, ``cli/``: :func:`source_subpackages`) importable from a source checkout.

    Installed, those folders are sub-packages (pyproject package-dir); from a bare checkout (the lent
    GPU machine, where the project is not installed) each is mapped here the same way."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import trellis_export
    for name, folder in source_subpackages().items():
        if importlib.util.find_spec(name) is not None:        # installed (or already mapped)
            importlib.import_module(name)
            continue
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(trellis_export, name.rsplit(".", 1)[1], mod)


# =========================================================================== CLI, grid, output
#: The suite's sections in their default order.
SECTIONS: tuple[str, ...] = ("jit", "aot", "plugin", "aot_timing", "timing", "trt", "d_split")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON results file, e.g. bench/results/gpu_h100.json "
                   "(required unless --prepare-records)")
    p.add_argument("--quick", action="store_true", help="smaller grid and fewer timing iterations")
    p.add_argument("--no-timing", action="store_true", help="correctness sections only")
    p.add_argument("--no-aot", action="store_true",
                   help="skip the sections that launch AOT records through the driver API (aot, plugin, "
                        "aot_timing, d_split)")
    p.add_argument("--no-trt", action="store_true", help="skip the TensorRT engine section")
    p.add_argument("--aot-json", default=None,
                   help="launch records written by `python -m trellis_export.kernels.aot` to launch "
                        "instead of compiling them here (records for other targets are ignored)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (median is reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sections", default=None,
                   help=f"comma-separated sections to run, in this order (default: {','.join(SECTIONS)} "
                        "less those the --no-* flags drop); e.g. aot_timing,aot,plugin to get the "
                        "issue-14 aims first within a short device lease")
    p.add_argument("--records", default=None,
                   help="record store (--prepare-records) to launch the AOT, AOT timing, plugin and "
                        "d_split sections' records from instead of compiling them on this machine")
    p.add_argument("--prepare-records", default=None, metavar="FILE",
                   help="no GPU needed: compile every record those sections launch for --cc into FILE "
                        "(gzip JSON) and exit")
    p.add_argument("--cc", type=int, default=90, help="compute capability for --prepare-records")
    p.add_argument("--section-timeout", default="", metavar="S|NAME=S,...",
                   help="end the run when a section takes longer than S seconds (every section), or than "
                        "its own limit (e.g. d_split=150; sections not named: no limit): a kernel that "
                        "never finishes would otherwise hold the device to its limit. The results so "
                        "far, the section's own so far included, are written with its error; exit code 3")
    p.add_argument("--compile-child", nargs=2, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.out is None and a.prepare_records is None and a.compile_child is None:
        p.error("--out is required (or --prepare-records FILE)")
    if a.sections is not None:
        a.sections = [x.strip() for x in a.sections.split(",") if x.strip()]
        unknown = [x for x in a.sections if x not in SECTIONS]
        if unknown or not a.sections:
            p.error(f"--sections takes names from {', '.join(SECTIONS)}; got {', '.join(unknown) or 'none'}")
    if a.iters is None:
        a.iters = 10 if a.quick else 30
    if a.warmup is None:
        a.warmup = 3 if a.quick else 10
    if a.iters < 1 or a.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    try:
        a.section_timeout = section_limits(a.section_timeout)
    except ValueError as exc:
        p.error(f"--section-timeout: {exc}")
    return a


def correctness_cases(quick: bool = False) -> list[dict[str, Any]]:
    """The JIT check grid: odd shapes, T = 1 decode, T not a multiple of C, rows at different
    positions, every nonlinearity in every role, three activation dtypes, both kernels, one long
    stream (tolerance 1e-4)."""
    cases: list[dict[str, Any]] = []

    def add(kernel: str, B: int, T: int, H: int, m: int, d: int, C: int, phi: str = "ln_silu",
            f: str = "ln_silu", rho: str = "identity", dtype: str = "float32") -> None:
        cases.append(dict(kernel=kernel, B=B, T=T, H=H, m=m, d=d, C=C, phi=phi, f=f, rho=rho,
                          dtype=dtype, tol=TOL_LONG if T > SHORT_STREAM else TOL_SHORT))

    combos = [(p, f, r) for i, (p, f, r) in enumerate((a, b, c) for a in NL for b in NL for c in NL)
              if not quick or i % 4 == 0]
    for kernel in ("fused_recurrent", "chunk", "chunk_split"):
        for i, (phi, f, rho) in enumerate(combos):
            C = (1, 3, 4, 16)[i % 4]
            T = (1, 7, 13, 33)[i % 4]
            add(kernel, 3, T, 3, 7, 5, C, phi, f, rho)                 # odd shapes
        for C in (1, 4, 16, 64):
            add(kernel, 2, 37, 4, 32, 32, C)                           # default model shape
            add(kernel, 2, 64, 8, 64, 64, C)                           # bench shape
        add(kernel, 4, 1, 8, 64, 64, 16)                               # decode
        for dt in ("float16", "bfloat16"):
            add(kernel, 3, 21, 3, 7, 5, 4, dtype=dt)
            add(kernel, 2, 19, 4, 32, 32, 16, dtype=dt)
        add(kernel, 2, 17, 2, 100, 48, 5)                              # non-power-of-two m, d
    # phi = identity: the split prefill's state pass takes the m-axis split (odd m, non-power-of-two
    # m and d, bench shape; chunk_split_trellis_fwd's rule with this card's SM count)
    add("chunk_split", 3, 13, 3, 19, 5, 3, phi="identity")
    add("chunk_split", 2, 17, 2, 100, 48, 5, phi="identity", f="l2_silu")
    add("chunk_split", 2, 64, 8, 64, 64, 16, phi="identity")
    add("chunk", 2, 1000 if quick else 4000, 4, 32, 32, 16)            # long stream
    add("chunk_split", 2, 1000 if quick else 4000, 4, 32, 32, 16)
    add("fused_recurrent", 2, 500 if quick else 1000, 4, 32, 32, 16)
    return cases


def aot_cases() -> list[dict[str, Any]]:
    """Shapes and variants the AOT section compiles and launches through ``cuda_launch`` (the launcher
    of the TensorRT plugin's enqueue). ``variant`` names the record (``aot.variant_name``);
    ``kernel="chunk_split"`` is the two-launch prefill (records chunk_state, chunk_readout).
    ``opt_in`` cases (tf32x3) are reported but do not decide the exit code."""
    out = []

    def add(kernel: str, variant: str, B: int, T: int, H: int, m: int, d: int, C: int, phi: str = "ln_silu",
            f: str = "ln_silu", rho: str = "identity", dtype: str = "float32", opt_in: bool = False) -> None:
        out.append(dict(kernel=kernel, variant=variant, B=B, T=T, H=H, m=m, d=d, C=C, phi=phi, f=f, rho=rho,
                        dtype=dtype, tol=TOL_SHORT, opt_in=opt_in))

    for kernel in ("fused_recurrent", "chunk", "chunk_split"):
        for variant in ("aligned", "unaligned"):
            add(kernel, variant, 3, 7, 3, 7, 5, 3, phi="l2_silu")               # odd shapes
            add(kernel, variant, 2, 1, 4, 32, 32, 16)                          # decode shape
            add(kernel, variant, 2, 40, 4, 32, 32, 16, rho="ln_silu", dtype="float16")
    for variant in ("decode", "decode_in_place"):
        add("fused_recurrent", variant, 3, 1, 3, 7, 5, 3, phi="l2_silu")
        add("fused_recurrent", variant, 4, 1, 8, 64, 64, 16)
    add("chunk_split", "aligned", 2, 37, 8, 64, 64, 16)
    # the state pass's m-axis split (phi = identity): odd m (a part-filled second block), bench shape
    add("chunk_split", "m_split", 3, 7, 3, 19, 5, 3, phi="identity", f="l2_silu")
    add("chunk_split", "m_split", 2, 37, 8, 64, 64, 16, phi="identity")
    add("chunk_split", "aligned+tf32x3", 2, 37, 8, 64, 64, 16, opt_in=True)
    add("chunk_split", "aligned+tf32x3", 2, 40, 4, 32, 32, 16, opt_in=True)
    return out


def d_split_check_cases(quick: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The d_split section's checks against the float64 reference, (JIT cases, AOT cases): the state
    pass's d-axis split (opt-in, no plugin record) with its spin barrier (one launch; on the CPU only
    run with programs as Python threads, so these are its first checks on a GPU's memory model)
    and with a launch per chunk, at odd shapes (d = 40: a part-filled last column block), the bench
    shape and (JIT) a long stream."""
    jit: list[dict[str, Any]] = []
    aot: list[dict[str, Any]] = []
    for d_sync in ("launch", "spin"):                 # the never-run spin barrier after what is tested
        for B, T, H, m, d, C, phi, rho in ((3, 13, 3, 7, 40, 3, "l2_silu", "ln_silu"),
                                            (2, 37, 8, 64, 64, 16, "ln_silu", "identity")):
            base = dict(kernel="chunk_split", B=B, T=T, H=H, m=m, d=d, C=C, phi=phi, f="ln_silu", rho=rho,
                        dtype="float32", tol=TOL_SHORT, d_sync=d_sync)
            jit.append(dict(base, d_block=16))
            aot.append(dict(base, variant="d_split"))
    T = 1000 if quick else 4000
    jit.append(dict(kernel="chunk_split", B=2, T=T, H=4, m=32, d=32, C=16, phi="ln_silu", f="ln_silu",
                    rho="identity", dtype="float32", tol=TOL_LONG, d_block=16, d_sync="spin"))
    return jit, aot


def variant_kwargs(variant: str, kernel: str = "chunk_state", d: int = 0) -> dict[str, Any]:
    """``compile_kernel`` keyword arguments of a record variant name (``aot.variant_name``'s names;
    ``+w<n>``: a warp count other than the default) for ``kernel``. The m-axis split and a warp
    override of an ``m_split`` case are the state pass's: the split prefill's read-out then takes the
    record of the same alignment and precision. ``d_split``: the d-axis split's state pass
    (``chunk_state_dsplit``) at the default column block of head size ``d``."""
    from trellis_export.kernels.trellis_memory.chunk_split import default_d_block
    from trellis_export.kernels.trellis_memory.utils import D_SPLIT_KERNEL, M_SPLIT_BLOCK
    base, _, warps = variant.partition("+w")
    split = "chunk_state" if base.startswith("m_split") else D_SPLIT_KERNEL if base.startswith("d_split") \
        else ""
    kw: dict[str, Any] = dict(aligned=not base.startswith("unaligned") and "_unaligned" not in base,
                              decode=base.startswith("decode"), in_place="in_place" in base,
                              dot_precision="tf32x3" if "tf32x3" in base else "ieee")
    if split and kernel != split:
        return kw
    if split == "chunk_state":
        kw["m_block"] = M_SPLIT_BLOCK
    elif split:
        if d < 1:
            raise ValueError(f"variant {variant!r} needs the head size d for its column block")
        kw["d_block"] = default_d_block(d)
    if warps:
        kw["num_warps"] = int(warps)
    return kw


def kernel_variant(variant: str, kernel: str, d: int = 0) -> str:
    """The record variant ``kernel`` takes in a case of ``variant`` (:func:`variant_kwargs`)."""
    from trellis_export.kernels.aot import variant_name
    return variant_name(**variant_kwargs(variant, kernel, d))


def case_kernels(case: dict[str, Any]) -> tuple[str, ...]:
    """The kernels a case launches, in order: the split prefill's state pass (the d-axis split's
    for a ``d_split`` case) then its read-out; else the one kernel."""
    if case["kernel"] != "chunk_split":
        return (case["kernel"],)
    state = "chunk_state_dsplit" if case.get("variant", "").startswith("d_split") else "chunk_state"
    return (state, "chunk_readout")


def decode_state_bytes(B: int, H: int, m: int, d: int) -> int:
    """Bytes of state one decode step reads and writes: four float32 [B, H, m, d] in, four out."""
    return 8 * B * H * m * d * 4


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write atomically through the project's one writer (a unique temporary sibling, then a rename)."""
    from trellis_export.outputs import atomic_write_bytes

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(payload, indent=1, default=str).encode())


def section_limits(text: str) -> dict[str, float]:
    """``--section-timeout``'s value as {section: seconds} (``"*"``: every section): ``"300"``, or
    ``"d_split=150,jit=400"``; empty: no limit."""
    if not text.strip():
        return {}
    if "=" not in text:
        parts = [("*", text)]
    else:
        parts = [tuple(x.split("=", 1)) for x in text.split(",")]  # type: ignore[misc]
    out: dict[str, float] = {}
    for name, value in parts:
        name = name.strip()
        if name != "*" and name not in SECTIONS:
            raise ValueError(f"no section {name!r} (sections: {', '.join(SECTIONS)})")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number of seconds") from None
        if not seconds > 0:
            raise ValueError(f"a limit must be > 0 seconds, got {value!r}")
        out[name] = seconds
    return out


#: What a section has finished so far, for the sections that publish it (``run_d_split_section``):
#: written with the section's error when ``--section-timeout`` ends the run inside it.
PROGRESS: dict[str, dict[str, Any]] = {}


class SectionWatchdog:
    """Ends the process when a section outlives its limit (``limits``: :func:`section_limits`): a GPU
    kernel that never returns (a spin barrier whose peers never arrive) cannot be interrupted from
    Python, and would hold the device to the end of its lease. On expiry the results so far, with
    what the section published in :data:`PROGRESS` and its error, are written to ``out`` (under
    ``lock``, which the main loop's writes hold too), the summary printed, and the process exits
    with code 3 (``os._exit``: the hung thread is not waited for; also when writing fails). A timer
    that fires after ``stop`` (the section finished at its limit) does nothing."""

    EXIT_CODE = 3

    def __init__(self, limits: dict[str, float], out: str | os.PathLike[str],
                 results: dict[str, Any]) -> None:
        import threading
        self.limits, self.out, self.results = dict(limits), out, results
        self.lock = threading.Lock()
        self._timer: Any = None
        self._current: str | None = None

    def limit(self, name: str) -> float:
        return self.limits.get(name, self.limits.get("*", 0.0))

    def start(self, name: str) -> None:
        import threading
        self.stop()
        with self.lock:
            self._current = name
        if self.limit(name) > 0:
            self._timer = threading.Timer(self.limit(name), self.expire, args=(name,))
            self._timer.daemon = True
            self._timer.start()

    def stop(self) -> None:
        with self.lock:
            self._current = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def expire(self, name: str) -> None:
        with self.lock:
            if self._current != name:                        # finished as the timer fired
                return
            try:
                if name not in self.results and name in PROGRESS:
                    self.results[name] = {**PROGRESS[name], "incomplete": True}
                self.results["errors"][name] = (
                    f"section {name} still running after --section-timeout {self.limit(name):g} s (a "
                    "kernel that never finished?); the run stopped there")
                self.results["ok"] = False
                write_json(self.out, self.results)
                print(self.results["errors"][name], file=sys.stderr)
                print(format_table(self.results), flush=True)
            except BaseException as exc:  # noqa: BLE001 - the exit below must happen regardless
                print(f"--section-timeout: could not write the results: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
            finally:
                sys.stderr.flush()
                os._exit(self.EXIT_CODE)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _pass_row(label: str, checks: list[dict[str, Any]], note: str = "") -> tuple[str, str, str]:
    """The summary row of a list of checks: PASS when there are some and all are ok."""
    bad = [c for c in checks if not c.get("ok")]
    worst = max((c.get("max_rel_rms", float("nan")) for c in checks), default=float("nan"))
    return (label, "PASS" if checks and not bad else "FAIL",
            f"{len(checks) - len(bad)}/{len(checks)} cases ok, worst rel RMS {_fmt(worst)}{note}")


def format_table(results: dict[str, Any]) -> str:
    """A short plain-text summary: one line per section / timing."""
    rows: list[tuple[str, str, str]] = []
    for sec in ("jit", "aot", "plugin"):
        checks = results.get(sec, {}).get("checks", [])
        if results.get(sec, {}).get("skipped"):
            rows.append((sec, "skipped", str(results[sec]["skipped"])))
            continue
        if not checks and sec not in results:
            continue
        rows.append(_pass_row(sec, [c for c in checks if not c.get("opt_in")]))
        broke = [c for c in checks if c.get("error")]
        if broke:
            rows.append((f"{sec} errors", "ERROR",
                         f"{len(broke)} cases raised; first: {broke[0]['error'][:80]}"))
        opt = [c for c in checks if c.get("opt_in")]
        if opt:
            ok = sum(bool(c.get("ok")) for c in opt)
            worst_opt = max(c.get("max_rel_rms", float("nan")) for c in opt)
            rows.append((f"{sec} opt-in", "info", f"{ok}/{len(opt)} tf32x3 cases within the float32 "
                         f"tolerance, worst rel RMS {_fmt(worst_opt)} (not gating)"))
    t = results.get("timing", {})
    if t.get("skipped"):
        rows.append(("timing", "skipped", str(t["skipped"])))
    dec = t.get("decode")
    if dec:
        rows.append(("decode speedup", "ok" if dec["meets_aim"] else "below aim",
                     f"{_fmt(dec['speedup'])}x (triton {_fmt(dec['triton_ms'])} ms, reference "
                     f"{_fmt(dec['reference_ms'])} ms; aim {AIM_DECODE_SPEEDUP}x)"))
    for bw in t.get("bandwidth", []):
        rows.append((f"bandwidth B*H={bw['B'] * bw['H']}", "ok" if bw["meets_aim"] else "below aim",
                     f"{_fmt(bw['achieved_GBps'])} GB/s = {_fmt(100 * bw['fraction_of_copy'])}% of copy "
                     f"{_fmt(bw['copy_GBps'])} GB/s"))
    pre = t.get("prefill")
    if pre:
        if pre.get("skipped"):
            rows.append(("prefill vs fla", "skipped", pre["skipped"]))
        for r in pre.get("runs", []):
            fla = f", fla {_fmt(r['fla_ms'])} ms (x{_fmt(r['ratio_vs_fla'])})" if r.get("fla_ms") else ""
            rows.append((f"prefill C={r['C']}", "info",
                         f"trellis {_fmt(r['trellis_ms'])} ms, {_fmt(r['Mtok_per_s'])} Mtok/s{fla}"))
    at = results.get("aot_timing", {})
    adec = at.get("decode")
    if adec:
        for r in adec["runs"]:
            if "error" in r:
                rows.append((f"AOT decode {r['variant']}", "ERROR", r["error"][:100]))
                continue
            rows.append((f"AOT decode {r['variant']}", "ok" if r["meets_aim"] else "below aim",
                         f"{_fmt(r['ms'] * 1e3)} us = {_fmt(r['ratio_to_floor'])}x the in-place floor "
                         f"{_fmt(r['in_place_floor_ms'] * 1e3)} us (aim {AIM_DECODE_FLOOR_RATIO}x for "
                         "decode_in_place)"))
    for r in at.get("decode_warps", []):
        if "default_over_fastest" in r:
            rows.append((f"AOT decode warps B={r['B']}", "info",
                         f"fastest {r['fastest_warps']} warps; the shipped {r['default_warps']} take "
                         f"{_fmt(r['default_over_fastest'])}x its time"))
    apre = at.get("prefill")
    if apre:
        for r in apre["runs"]:
            ok = "ms" in r
            detail = f"{_fmt(r['ms'])} ms, {_fmt(r['Mtok_per_s'])} Mtok/s" if ok else r.get("error", "")
            rows.append((f"AOT prefill {r['kernel']} {r['variant']}", "info" if ok else "ERROR", detail))
        if "speedup_vs_pre_issue14_chunk" in apre:
            rows.append(("AOT prefill split vs old", "ok" if apre["meets_speedup_aim"] else "below aim",
                         f"{_fmt(apre['speedup_vs_pre_issue14_chunk'])}x (aim >= {AIM_PREFILL_SPEEDUP}x)"))
        if "ratio_vs_fla" in apre:
            rows.append(("AOT prefill vs fla", "ok" if apre["meets_fla_aim"] else "below aim",
                         f"{_fmt(apre['ratio_vs_fla'])}x fla's time (aim <= {AIM_PREFILL_VS_FLA}x)"))
        elif apre.get("fla_skipped"):
            rows.append(("AOT prefill vs fla", "skipped", apre["fla_skipped"][:100]))
        for r in apre.get("m_split_rule", []):
            if "m_split_over_aligned" in r:
                rows.append((f"AOT m-axis split B={r['B']}", "ok" if r["rule_picks_faster"] else "rule wrong",
                             f"{_fmt(r['m_split_over_aligned'])}x the whole-m state pass's time; the rule "
                             f"takes {r['rule_takes']} ({r['programs_unsplit']} programs unsplit, "
                             f"{apre.get('sms')} SMs)"))
    ds = results.get("d_split", {})
    for part in ("jit", "aot"):
        sec = ds.get(part)
        if sec is None:
            continue
        if "error" in sec:
            rows.append((f"d_split {part}", "ERROR", sec["error"][:100]))
            continue
        rows.append(_pass_row(f"d_split {part}", sec.get("checks", []),
                              " (spin and launch; opt-in, not gating)"))
    for r in ds.get("timing", []):
        if "error" in r:                                     # the study itself failed (guarded)
            rows.append(("d-axis split timing", "ERROR", r["error"][:100]))
            continue
        for name in ("aligned", "d_split_spin", "d_split_launch"):
            label = f"d-axis split d={r['d']} {r['phi']} {name.removeprefix('d_split_')}"
            if f"{name}_error" in r:
                rows.append((label, "ERROR", r[f"{name}_error"][:100]))
            elif f"{name}_state_over_whole" in r:
                prefill = f"; prefill {_fmt(r[f'{name}_over_whole'])}x" if f"{name}_over_whole" in r else ""
                rows.append((label, "info", f"state pass {_fmt(r[f'{name}_state_over_whole'])}x the whole-d "
                             f"pass's time ({_fmt(r[f'{name}_state_ms'])} vs {_fmt(r['aligned_state_ms'])} "
                             f"ms){prefill}"))
    for name, err in results.get("errors", {}).items():
        rows.append((name, "ERROR", err.splitlines()[-1][:100] if err else ""))
    w0 = max([len(r[0]) for r in rows] + [7])
    w1 = max([len(r[1]) for r in rows] + [6])
    lines = [f"{'section':<{w0}}  {'result':<{w1}}  detail", "-" * (w0 + w1 + 40)]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


# =========================================================================== inputs and reference
def make_inputs(case: dict[str, Any], device: Any, seed: int) -> tuple[list[Any], list[Any], Any]:
    import torch
    import torch.nn.functional as F
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, m, d = (case[k] for k in ("B", "T", "H", "m", "d"))
    dt = getattr(torch, case["dtype"])
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = F.normalize(r(B, T, H, d), dim=-1)
    k = F.normalize(r(B, T, H, d), dim=-1)
    v, a = r(B, T, H, d), r(B, T, H, m)
    beta = 0.5 + 0.5 * torch.rand(B, T, H, generator=g)
    gamma = torch.rand(B, T, H, generator=g)
    acts = [x.to(dt).to(device) for x in (q, k, v, a)]
    acts += [x.to(device) for x in (beta, gamma)]          # gates stay float32 (spec section 1)
    state = [(r(B, H, m, d) / d ** 0.5).to(device) for _ in range(4)]
    pos = torch.randint(0, 3 * case["C"] + 5, (B,), generator=g).to(device)
    return acts, state, pos


def reference(case: dict[str, Any], acts: list[Any], state: list[Any], pos: Any) -> list[Any]:
    from trellis_export.model.memory import MemoryState, trellis_memory
    mode = "step" if case["T"] <= 64 else "chunked"       # the two modes are equal; chunked is faster
    o, st = trellis_memory(*[x.double() for x in acts], MemoryState(*[s.double() for s in state]), pos,
                           chunk_size=case["C"], phi=case["phi"], f=case["f"], rho=case["rho"],
                           eps=1e-5, mode=mode)
    return [o, *st]


def poisoned_outputs(case: dict[str, Any], acts: list[Any]) -> tuple[Any, ...]:
    import torch
    B, T, H, m, d = (case[k] for k in ("B", "T", "H", "m", "d"))
    dev = acts[0].device
    o = torch.full((B, T, H, d), float("nan"), dtype=acts[0].dtype, device=dev)
    return (o, *[torch.full((B, H, m, d), float("nan"), dtype=torch.float32, device=dev)
                 for _ in range(4)])


def compare(case: dict[str, Any], out: tuple[Any, ...], ref: list[Any]) -> dict[str, Any]:
    import torch

    from trellis_export.metrics import rel_rms
    names = ("o", "key_memory", "value_memory", "key_snapshot", "value_snapshot")
    errs, finite = {}, True
    for n, x, r in zip(names, out, ref):
        finite = finite and bool(torch.isfinite(x).all())
        errs[n] = rel_rms(x, r)
    tol_o = max(case["tol"], TOL_OUT[case["dtype"]])
    ok = finite and errs["o"] <= tol_o and all(errs[n] <= case["tol"] for n in names[1:])
    return {**{k: v for k, v in case.items()}, "rel_rms": errs, "max_rel_rms": max(errs.values()),
            "finite": finite, "tol_o": tol_o, "ok": bool(ok)}


# =========================================================================== (a) JIT
def run_jit(cases: list[dict[str, Any]], seed: int, device: str = "cuda") -> dict[str, Any]:
    import torch
    from trellis_export.kernels.trellis_memory import chunk_trellis_fwd, fused_recurrent_trellis_fwd
    from trellis_export.kernels.trellis_memory.chunk_split import chunk_split_trellis_fwd
    fns = {"fused_recurrent": fused_recurrent_trellis_fwd, "chunk": chunk_trellis_fwd,
           "chunk_split": chunk_split_trellis_fwd}
    checks = []
    for i, case in enumerate(cases):
        acts, state, pos = make_inputs(case, device, seed + i)
        ref = reference(case, acts, state, pos)
        out = poisoned_outputs(case, acts)
        split = {k: case[k] for k in ("d_block", "d_sync") if k in case}     # the d-axis split's
        fns[case["kernel"]](*acts, *state, pos, chunk_size=case["C"], phi=case["phi"], f=case["f"],
                            rho=case["rho"], eps=1e-5, out=out, **split)
        if device != "cpu":
            torch.cuda.synchronize()
        checks.append(compare(case, out, ref))
    return {"checks": checks, "ok": all(c["ok"] for c in checks)}


# =========================================================================== (b) AOT via driver API
def cuda_launch() -> Any:
    """The package's driver-API launcher, ``trellis_export.kernels.cuda_launch`` (the one the TensorRT
    plugin's enqueue uses), so the suite launches the AOT records exactly as the plugin does."""
    import_project()
    from trellis_export.kernels import cuda_launch as cl
    return cl


def pack_params(record: dict[str, Any], pointers: dict[str, int], scalars: dict[str, int]
                ) -> tuple[Any, list[Any]]:
    """``cuda_launch.pack_params``: kernelParams in the record's order (hidden params null)."""
    return cuda_launch().pack_params(record, pointers, scalars)


class RecordStore:
    """AOT records by their compile arguments: ``compile`` returns the stored record of a
    ``compile_kernel`` call when the store holds it (``--records FILE``, made by
    ``--prepare-records FILE --cc N`` on any machine: the records then carry the PTX of the pinned
    triton that the TensorRT plugin ships, and the lent GPU spends no time compiling them), else
    compiles it here and keeps it."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.source: str | None = None
        self.triton_version: str | None = None
        self.hits = 0
        self.compiled = 0

    @staticmethod
    def key(kernel: str, cc: int, kw: dict[str, Any]) -> str:
        return json.dumps([kernel, int(cc), sorted(kw.items())])

    def compile(self, kernel: str, cc: int, **kw: Any) -> dict[str, Any]:
        return self.compile_many([(kernel, cc, kw)])[0]

    def compile_many(self, calls: list[tuple[str, int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The records of ``(kernel, cc, compile_kernel keywords)`` calls; the missing ones compiled
        here, or in one child process when this one runs triton's interpreter (whose kernels cannot
        be compiled)."""
        keys = [self.key(k, cc, kw) for k, cc, kw in calls]
        missing = {key: call for key, call in zip(keys, calls) if key not in self.records}
        if missing:
            if os.environ.get("TRITON_INTERPRET"):
                recs = compile_in_child(list(missing.values()))
            else:
                from trellis_export.kernels.aot import compile_kernel
                recs = [compile_kernel(k, cc, **kw).to_dict() for k, cc, kw in missing.values()]
            self.records.update(zip(missing, recs))
            self.compiled += len(missing)
        self.hits += len(calls) - len(missing)
        return [self.records[key] for key in keys]

    def load(self, path: str | os.PathLike[str]) -> None:
        import gzip
        data = json.loads(gzip.decompress(Path(path).read_bytes()))
        if not isinstance(data, dict) or data.get("format") != "trellis-export gpu_suite records 1" \
                or not isinstance(data.get("records"), dict):
            raise ValueError(f"{path}: not a record store written by --prepare-records")
        self.records.update(data["records"])
        self.source, self.triton_version = str(path), data.get("triton_version")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the store through the project's one atomic writer."""
        import gzip

        import triton

        from trellis_export.outputs import atomic_write_bytes
        payload = {"format": "trellis-export gpu_suite records 1", "triton_version": triton.__version__,
                   "records": self.records}
        atomic_write_bytes(path, gzip.compress(json.dumps(payload).encode(), compresslevel=6))

    def summary(self) -> dict[str, Any]:
        return {"source": self.source or "compiled in this run", "store_triton_version": self.triton_version,
                "records_from_store": self.hits, "records_compiled_here": self.compiled}


#: The records this run launches (see RecordStore).
STORE = RecordStore()


def compile_in_child(calls: list[tuple[str, int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """``compile_kernel`` for each call in a child process without TRITON_INTERPRET (this suite's
    hidden ``--compile-child`` mode)."""
    import subprocess
    import tempfile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-aot-") as tmp:
        src, dst = Path(tmp) / "calls.json", Path(tmp) / "records.json"
        src.write_text(json.dumps(calls))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--compile-child", str(src),
                               str(dst)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {len(calls)} records failed: "
                               f"{(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
        return list(json.loads(dst.read_text()))


def plugin_records(attrs: dict[str, Any], case: dict[str, Any], cc: int) -> list[dict[str, Any]]:
    """The records an engine's plugin layer of this case carries for ``cc``
    (``plugin_v3.record_arguments``, what ``plugin_v3.compile_records`` compiles), through STORE."""
    from trellis_export.plugins_trt import plugin_v3
    return STORE.compile_many([(kernel, cc, kw) for kernel, kw in plugin_v3.record_arguments(
        attrs, heads=case["H"], slots=case["m"], head_dim=case["d"], dtype=case["dtype"])])


def prepare_records(path: str, cc: int) -> int:
    """``--prepare-records``: compile every record the AOT, AOT timing, plugin and d_split sections launch for
    ``sm_<cc>`` into a store file (no GPU needed). Returns how many."""
    for case in aot_cases() + timing_cases() + d_split_record_cases():
        aot_records(case, cc, None)
    for case in plugin_cases(quick=False):
        plugin_records(plugin_attrs(case), case, cc)
    STORE.save(path)
    return len(STORE.records)


def aot_records(case: dict[str, Any], cc: int, records: list[dict[str, Any]] | None
                ) -> list[dict[str, Any]]:
    """The launch records of a case, in launch order: from --aot-json when given (must match; a
    record without ``variant`` predates issue 14 and stands for "aligned" / "unaligned"), else
    compiled now (with the cubin, so a driver older than the PTX ISA still checks the code)."""
    from trellis_export.kernels.aot import variant_name
    out = []
    for kernel in case_kernels(case):
        kw = variant_kwargs(case["variant"], kernel, case["d"])
        if records is not None:
            found = None
            shape = (case["H"], case["m"], case["d"], case["C"])
            want, want_block = variant_name(**kw), kw.get("d_block", 0)
            for r in records:
                cx = r["constexprs"]
                var = r.get("variant")
                same_variant = var == want or (var is None and want in ("aligned", "unaligned"))
                if r.get("d_block", 0) != want_block:
                    continue
                if (r["kernel"] == kernel and r["cc"] == cc and r["dtype"] == case["dtype"] and same_variant
                        and (cx["H"], cx["M"], cx["D"], cx["C"]) == shape):
                    found = r
                    break
            if found is None:
                raise LookupError(f"no record in --aot-json for {kernel} {want} sm_{cc} "
                                  f"{case['dtype']} H={case['H']} m={case['m']} d={case['d']} C={case['C']}")
            out.append(found)
        else:
            out.append(STORE.compile(kernel, cc, heads=case["H"], slots=case["m"], head_dim=case["d"],
                                     chunk_size=case["C"], phi=case["phi"], f=case["f"], rho=case["rho"],
                                     eps=1e-5, dtype=case["dtype"], include_cubin=True, **kw))
    return sorted(out, key=lambda r: r.get("stage", 0))


class AotLaunch:
    """One case's records loaded by ``cuda_launch`` with its device buffers, launched as the plugin's
    enqueue does (same stream, stage order, workspaces, in-place aliasing); call it to launch."""

    def __init__(self, drv: Any, recs: list[dict[str, Any]], case: dict[str, Any], acts: list[Any],
                 state: list[Any], pos: Any, out: tuple[Any, ...]) -> None:
        import torch
        cl = cuda_launch()
        self.drv, self.recs, self.case = drv, recs, case
        self.in_place = bool(recs[0].get("in_place"))
        ins = [x.contiguous() for x in acts] + [s.contiguous() for s in state] + [pos.contiguous()]
        if self.in_place:                  # outputs alias the input memories: the state is updated
            out = (out[0], *ins[6:10])
        self.out = out
        self.ws = {n: torch.empty(max(4, nb) // 4, dtype=torch.float32, device=ins[0].device)
                   for n, nb in cl.workspace_bytes(recs[0], case["B"], case["T"]).items()}
        self.keep = (ins, out, self.ws)
        self.ptrs = {n: t.data_ptr() for n, t in zip(recs[0]["inputs"], ins)}
        self.ptrs.update({n: t.data_ptr() for n, t in zip(recs[0]["outputs"], out)})
        self.ptrs.update({n: t.data_ptr() for n, t in self.ws.items()})
        # PTX first (prefer="ptx", what TensorRT hands the driver), the cubin of the same compilation
        # when the driver rejects the PTX ISA
        self.kernels = [drv.load_record(r, prefer="ptx") for r in recs]
        self.grids = [cl.grid_for(r, case["B"], case["T"]) for r in recs]
        # the d-axis split's state pass walks its steps in one launch (spin) or one launch each
        from trellis_export.kernels.trellis_memory.chunk_split import COUNTER_WORKSPACES, dsplit_spans
        self.counters = [self.ws[n] for n in COUNTER_WORKSPACES if n in self.ws]
        self.spans = [dsplit_spans(case["T"], case["C"], case.get("d_sync", "spin"))
                      if "S0" in r.get("scalars", ())
                      else [None] for r in recs]

    def __call__(self) -> None:
        import torch
        stream = torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0
        T = self.case["T"]
        for counter in self.counters:                    # the tickets and barrier counters start at 0
            counter.zero_()
        for k, spans in zip(self.kernels, self.spans):
            for span in spans:
                scalars = {"T": T} if span is None else {"T": T, "S0": span[0], "S1": span[1]}
                self.drv.launch_record(k, self.ptrs, scalars, self.case["B"], stream)


def run_aot(cases: list[dict[str, Any]], seed: int, aot_json: str | None) -> dict[str, Any]:
    import torch
    cc = int("".join(map(str, torch.cuda.get_device_capability())))
    records = json.loads(Path(aot_json).read_text()) if aot_json else None
    drv = cuda_launch().CudaDriver()
    checks = [case_check(functools.partial(aot_check, drv, cc, records, dict(case), seed + 1000 + i), case)
              for i, case in enumerate(cases)]
    gating = [c for c in checks if not c.get("opt_in")]
    return {"checks": checks, "ok": all(c["ok"] for c in gating), "cc": cc,
            "opt_in_note": "opt_in checks (tf32x3) are reported and do not decide the exit code",
            "source": aot_json or "compiled in this run"}


def case_check(fn: Callable[[], dict[str, Any]], case: dict[str, Any]) -> dict[str, Any]:
    """One case's check row, or (when it raises) a failed row carrying the error: a case that breaks
    costs its own row, not the section's other cases."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON
        return {**case, "ok": False, "error": f"{type(exc).__name__}: {exc}"}


def aot_check(drv: Any, cc: int, records: list[dict[str, Any]] | None, case: dict[str, Any],
              seed: int) -> dict[str, Any]:
    """One AOT case: its records launched through ``cuda_launch`` on poisoned outputs, compared with
    the float64 reference."""
    import torch
    recs = aot_records(case, cc, records)
    if records is not None:                 # the record's nonlinearities decide the reference
        inv = dict(enumerate(NL))
        cx = recs[0]["constexprs"]
        case.update(phi=inv[cx["PHI"]], f=inv[cx["F"]], rho=inv[cx["RHO"]])
    acts, state, pos = make_inputs(case, "cuda", seed)
    ref = reference(case, acts, state, pos)
    launch = AotLaunch(drv, recs, case, acts, [s.clone() for s in state], pos,
                       poisoned_outputs(case, acts))
    torch.cuda.synchronize()
    launch()
    torch.cuda.synchronize()
    res = compare(case, launch.out, ref)
    rec = recs[0]
    res.update(target=rec["target"], ptx_target=rec["ptx_target"], ptx_version=rec["ptx_version"],
               entries=[r["name"] for r in recs], variant=rec.get("variant"),
               num_warps=[r["num_warps"] for r in recs], shared_mem=[r["shared_mem"] for r in recs],
               grids=[list(g) for g in launch.grids], block=[list(r["block"]) for r in recs],
               record_triton=rec["triton_version"], loaded=[k.image for k in launch.kernels])
    return res


def guarded(fn: Callable[..., list[dict[str, Any]]], *args: Any) -> list[dict[str, Any]]:
    """``fn(*args)``, or one row carrying its error: a study added to a section must not lose the
    section's aims when it fails."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON
        return [{"error": f"{type(exc).__name__}: {exc}"}]


def default_warps(kernel: str, m: int, d: int, C: int = 1) -> int:
    """The warp count ``launch_config`` gives (what the shipped records take)."""
    from trellis_export.kernels.trellis_memory.utils import launch_config
    return launch_config(kernel, m, d, C).num_warps


def warp_variant(variant: str, warps: int, default: int) -> str:
    """The record variant of ``variant`` at ``warps`` warps (``+w<n>`` unless the default)."""
    return variant + (f"+w{warps}" if warps != default else "")


def timing_cases() -> list[dict[str, Any]]:
    """Every record case the AOT timing section launches (B and T do not change a record): decode
    variants, the decode warp study, the prefill runs (the m-split study is two of them)."""
    dec = dict(kernel="fused_recurrent", B=1, T=1, **TIMING_SHAPE, **DECODE_NL, tol=TOL_SHORT)
    default = default_warps("fused_recurrent", TIMING_SHAPE["m"], TIMING_SHAPE["d"])
    cases = [dict(dec, variant=v) for v in DECODE_VARIANTS]
    cases += [dict(dec, variant=warp_variant("decode_in_place", w, default)) for w in WARP_COUNTS]
    cases += [dict(kernel=k, variant=v, B=1, T=2, **TIMING_SHAPE, **PREFILL_NL, tol=TOL_LONG)
              for k, v in PREFILL_RUNS]
    return cases


def run_decode_warps(drv: Any, cc: int, H: int, m: int, d: int, C: int, w: int, n: int, seed: int,
                     device: str = "cuda") -> list[dict[str, Any]]:
    """The in-place decode record at 4, 8 and 16 warps (``compile_kernel(num_warps=...)``; the shipped
    record takes ``launch_config``'s count) for B = 1, 8 and 64: the data for the issue's "warp layout
    chosen so small batches are not bound by barrier rounds". Per B: each count's time, the fastest,
    and the shipped count's time over the fastest."""
    default = default_warps("fused_recurrent", m, d)
    out = []
    for B in (1, 8, 64):
        row: dict[str, Any] = {"B": B, "default_warps": default, "ms": {}}
        for warps in WARP_COUNTS:
            case = dict(kernel="fused_recurrent", variant=warp_variant("decode_in_place", warps, default),
                        B=B, T=1, H=H, m=m, d=d, C=C, **DECODE_NL, tol=TOL_SHORT)
            acts, state, pos = make_inputs(case, device, seed)
            try:
                launch = AotLaunch(drv, aot_records(case, cc, None), case, acts, state, pos,
                                   poisoned_outputs(case, acts))
                row["ms"][str(warps)] = time_cuda(launch, w, n, graph=True)["median_ms"]
            except Exception as exc:  # noqa: BLE001 - one count failing must not hide the others
                row.setdefault("errors", {})[str(warps)] = f"{type(exc).__name__}: {exc}"
        if row["ms"]:
            best = min(row["ms"], key=row["ms"].get)
            row["fastest_warps"] = int(best)
            if str(default) in row["ms"]:
                row["default_over_fastest"] = row["ms"][str(default)] / row["ms"][best]
        out.append(row)
    return out


def run_m_split_rule(drv: Any, cc: int, sms: int, H: int, m: int, d: int, C: int, w: int, n: int,
                     seed: int, T: int = 1024, device: str = "cuda") -> list[dict[str, Any]]:
    """The split prefill with and without the state pass's m-axis split at batch sizes on both sides
    of the rule ``cuda_launch.split_fills`` (split while B * H * 2 < SMs), T tokens, phi = identity:
    whether the occupancy rule picks the faster record (``rule_picks_faster``)."""
    import torch
    out = []
    last = max(1, -(-sms // (2 * H)) - 1)           # the largest B the rule splits (when any)
    rows = sorted({1, last, last + 1, 2 * (last + 1), 4 * (last + 1)})
    for B in rows:
        base = dict(kernel="chunk_split", B=B, T=T, H=H, m=m, d=d, C=C, **PREFILL_NL, tol=TOL_LONG)
        row: dict[str, Any] = {"B": B, "programs_unsplit": B * H * 2,
                               "rule_takes": "m_split" if cuda_launch().split_fills(B, H, sms) else "aligned"}
        for variant in ("aligned", "m_split"):
            case = dict(base, variant=variant)
            acts, state, pos = make_inputs(case, device, seed)
            try:
                launch = AotLaunch(drv, aot_records(case, cc, None), case, acts, state, torch.zeros_like(pos),
                                   poisoned_outputs(case, acts))
                row[f"{variant}_ms"] = time_cuda(launch, max(1, w // 2), n)["median_ms"]
            except Exception as exc:  # noqa: BLE001 - report, keep the other timings
                row[f"{variant}_error"] = f"{type(exc).__name__}: {exc}"
        if "aligned_ms" in row and "m_split_ms" in row:
            row["m_split_over_aligned"] = row["m_split_ms"] / row["aligned_ms"]
            faster = "m_split" if row["m_split_ms"] < row["aligned_ms"] else "aligned"
            row["rule_picks_faster"] = faster == row["rule_takes"]
        out.append(row)
    return out


def d_split_cases(B: int, T: int) -> list[dict[str, Any]]:
    """The d-axis split study's cases (:data:`D_SPLIT_SHAPES` x :data:`D_SPLIT_PHIS` x
    :data:`D_SPLIT_RUNS`), B rows of T tokens."""
    out = []
    for H, m, d, C in D_SPLIT_SHAPES:
        for phi in D_SPLIT_PHIS:
            for variant, d_sync in D_SPLIT_RUNS:
                case = dict(kernel="chunk_split", variant=variant, B=B, T=T, H=H, m=m, d=d, C=C,
                            **{**PREFILL_NL, "phi": phi}, tol=TOL_LONG)
                out.append(dict(case, d_sync=d_sync) if d_sync else case)
    return out


def d_split_record_cases() -> list[dict[str, Any]]:
    """Every record case the d_split section launches (its AOT checks, its timing study)."""
    return d_split_check_cases()[1] + d_split_cases(1, 2)


def run_d_split(drv: Any, cc: int, B: int, T: int, w: int, n: int, seed: int, device: str = "cuda"
                ) -> list[dict[str, Any]]:
    """The split prefill with the whole-d state pass (``aligned``) and with the d-axis split (spin
    barrier; a launch per chunk) per shape and phi: the state pass alone (``<name>_state_ms``) and
    the prefill (state pass + read-out, ``<name>_ms``), each in CUDA graphs, and the split's times
    over the whole-d ones (``<name>_state_over_whole``, ``<name>_over_whole``; below 1: it pays)."""
    import torch
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for case in d_split_cases(B, T):
        key = (case["H"], case["m"], case["d"], case["C"], case["phi"])
        row = rows.setdefault(key, dict(zip(("H", "m", "d", "C", "phi"), key), B=B, T=T))
        name = case["variant"] + (f"_{case['d_sync']}" if "d_sync" in case else "")
        acts, state, pos = make_inputs(case, device, seed)
        try:
            recs = aot_records(case, cc, None)
            for suffix, stages in (("_state", recs[:1]), ("", recs)):
                launch = AotLaunch(drv, stages, case, acts, state, torch.zeros_like(pos),
                                   poisoned_outputs(case, acts))
                # in a CUDA graph: the launch mode's NC + 1 launches cost ~0.1 ms of host work each
                t = time_cuda(launch, max(1, w // 2), n, graph=True, reps=D_SPLIT_GRAPH_REPS)
                row[f"{name}{suffix}_ms"] = t["median_ms"]
                row.setdefault("methods", {})[f"{name}{suffix}"] = t["method"]
            row.setdefault("grids", {})[name] = launch.grids[0]
        except Exception as exc:  # noqa: BLE001 - report, keep the other timings
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    for row in rows.values():
        for name in ("d_split_spin", "d_split_launch"):
            for suffix in ("_state", ""):
                if f"{name}{suffix}_ms" in row and f"aligned{suffix}_ms" in row:
                    row[f"{name}{suffix}_over_whole"] = row[f"{name}{suffix}_ms"] / row[f"aligned{suffix}_ms"]
    return list(rows.values())


def run_d_split_section(args: argparse.Namespace) -> dict[str, Any]:
    """The d_split section, last by default (its spin barrier has never run on a GPU: a hang here
    costs no other section's results, and ``--section-timeout`` bounds it): the JIT and AOT checks
    of :func:`d_split_check_cases` (each case its own row; launch mode first), then (unless
    --no-timing) :func:`run_d_split` at the AOT timing section's prefill size. What is finished is
    published in ``PROGRESS["d_split"]`` as it goes. Not in the exit code (opt-in kernel)."""
    import torch
    jit_cases, aot_c = d_split_check_cases(args.quick)
    out: dict[str, Any] = PROGRESS.setdefault("d_split", {})
    out.clear()
    cc = int("".join(map(str, torch.cuda.get_device_capability())))
    drv = cuda_launch().CudaDriver()
    parts = (("jit", jit_cases, lambda c, i: run_jit([c], args.seed + i)["checks"][0]),
             ("aot", aot_c, lambda c, i: aot_check(drv, cc, None, dict(c), args.seed + 1000 + i)))
    for name, cases, check in parts:
        part: dict[str, Any] = out.setdefault(name, {"checks": []})
        for i, case in enumerate(cases):
            part["checks"].append(case_check(functools.partial(check, case, i), case))
        part["ok"] = all(c["ok"] for c in part["checks"])
    out["ok"] = all(out[k]["ok"] for k in ("jit", "aot"))
    if not args.no_timing:
        Bp, Tp = (1, 2048) if args.quick else (1, 8192)
        out["timing"] = guarded(run_d_split, drv, cc, Bp, Tp, args.warmup, args.iters, args.seed)
    return out


def in_place_decode_bytes(B: int, H: int, m: int, d: int, C: int, positions: list[int]) -> int:
    """State bytes an in-place decode step moves: K and V read and written, the snapshots read by
    rows mid-chunk and written by rows at a chunk start (position % C == 0), float32."""
    tile = H * m * d * 4
    starts = sum(1 for p in positions if p % C == 0)
    return B * 4 * tile + (B - starts) * 2 * tile + starts * 2 * tile


def run_aot_timing(args: argparse.Namespace) -> dict[str, Any]:
    """The AOT code timed exactly as TensorRT's plugin would launch it (``cuda_launch`` on the
    current stream, records as compiled for this GPU), at the issue-14 shapes."""
    import torch
    cc = int("".join(map(str, torch.cuda.get_device_capability())))
    drv = cuda_launch().CudaDriver()
    w, n = args.warmup, args.iters
    out: dict[str, Any] = {"cc": cc}
    copy = copy_bandwidth(1 << 30, w, n)
    out["copy_GBps"] = copy["GBps"]
    # decode B = 64 at TIMING_SHAPE
    B = 64
    H, m, d, C = (TIMING_SHAPE[k] for k in ("H", "m", "d", "C"))
    dec = []
    for variant in DECODE_VARIANTS:
        case = dict(kernel="fused_recurrent", variant=variant, B=B, T=1, **TIMING_SHAPE, **DECODE_NL,
                    tol=TOL_SHORT)
        acts, state, pos = make_inputs(case, "cuda", args.seed)
        try:
            launch = AotLaunch(drv, aot_records(case, cc, None), case, acts, state, pos,
                               poisoned_outputs(case, acts))
            t = time_cuda(launch, w, n, graph=True)
        except Exception as exc:  # noqa: BLE001 - one variant failing must not hide the others
            dec.append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})
            continue
        positions = [int(p) for p in pos.cpu()]
        nbytes = in_place_decode_bytes(B, H, m, d, C, positions) if launch.in_place else \
            decode_state_bytes(B, H, m, d)
        floor_in_place = in_place_decode_bytes(B, H, m, d, C, positions) / (copy["GBps"] * 1e9) * 1e3
        dec.append({"variant": variant, "ms": t["median_ms"], "method": t["method"], "state_bytes": nbytes,
                    "achieved_GBps": nbytes / (t["median_ms"] * 1e-3) / 1e9,
                    "in_place_floor_ms": floor_in_place, "ratio_to_floor": t["median_ms"] / floor_in_place,
                    "meets_aim": t["median_ms"] / floor_in_place <= AIM_DECODE_FLOOR_RATIO})
    out["decode"] = {"B": B, "H": H, "m": m, "d": d, "C": C, "runs": dec,
                     "aim": f"decode_in_place within {AIM_DECODE_FLOOR_RATIO}x of the in-place floor "
                            "(state bytes / measured copy bandwidth)"}
    out["decode_warps"] = guarded(run_decode_warps, drv, cc, H, m, d, C, w, n, args.seed)
    # prefill B = 1, T = 8192 at TIMING_SHAPE, phi = f = rho = identity (fla's setting)
    Bp, Tp = (1, 2048) if args.quick else (1, 8192)
    pre = []
    base = dict(B=Bp, T=Tp, **TIMING_SHAPE, **PREFILL_NL, tol=TOL_LONG)
    for kernel, variant in PREFILL_RUNS:
        case = dict(base, kernel=kernel, variant=variant)
        acts, state, pos = make_inputs(case, "cuda", args.seed)
        pos = torch.zeros_like(pos)
        try:
            launch = AotLaunch(drv, aot_records(case, cc, None), case, acts, state, pos,
                               poisoned_outputs(case, acts))
            t = time_cuda(launch, max(1, w // 2), n)
            pre.append({"kernel": kernel, "variant": variant, "ms": t["median_ms"], "grids": launch.grids,
                        "Mtok_per_s": Bp * Tp / (t["median_ms"] * 1e-3) / 1e6})
        except Exception as exc:  # noqa: BLE001 - one variant failing must not hide the others
            pre.append({"kernel": kernel, "variant": variant, "error": f"{type(exc).__name__}: {exc}"})
    before = next((r["ms"] for r in pre if r["variant"] == "unaligned" and "ms" in r), None)
    # what the plugin launches at this B on this card: the m-axis split while B * H * 2 < SMs
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = "m_split" if cuda_launch().split_fills(Bp, H, sms) else "aligned"
    split = next((r["ms"] for r in pre if r["kernel"] == "chunk_split" and r["variant"] == chosen
                  and "ms" in r), None)
    res: dict[str, Any] = {"B": Bp, "T": Tp, "H": H, "m": m, "d": d, "C": C, "runs": pre, "sms": sms,
                           "split_variant_timed_for_aims": chosen,
                           "m_split_rule": guarded(run_m_split_rule, drv, cc, sms, H, m, d, C, w, n,
                                                   args.seed)}
    if before and split:
        res["speedup_vs_pre_issue14_chunk"] = before / split
        res["meets_speedup_aim"] = before / split >= AIM_PREFILL_SPEEDUP
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # type: ignore[import-not-found]
        acts, state, pos = make_inputs(dict(base, kernel="chunk"), "cuda", args.seed)
        q, k, v = acts[0], acts[1], acts[2]
        g = torch.log(acts[4].float())
        beta = acts[5].to(q.dtype)
        h0 = state[0].transpose(-1, -2).contiguous()
        tf = time_cuda(functools.partial(chunk_gated_delta_rule, q, k, v, g, beta, initial_state=h0,
                                         output_final_state=True), max(1, w // 2), n)
        res["fla_ms"] = tf["median_ms"]
        if split:
            res["ratio_vs_fla"] = split / tf["median_ms"]
            res["meets_fla_aim"] = split / tf["median_ms"] <= AIM_PREFILL_VS_FLA
        res["fla_note"] = ("fla: one gated-delta-rule pass; trellis: K and V passes plus the read-out, at "
                           "phi = f = rho = identity, bf16 activations, float32 state")
    except Exception as exc:  # noqa: BLE001
        res["fla_skipped"] = f"{type(exc).__name__}: {exc}"
    out["prefill"] = res
    return out


# =========================================================================== (c) timing
def time_cuda(fn: Callable[[], Any], warmup: int, iters: int, graph: bool = False, reps: int = 20
              ) -> dict[str, Any]:
    """Median milliseconds per call with CUDA events. ``graph=True`` captures ``reps`` calls in a
    CUDA graph (kernel time without Python launch overhead); falls back to plain calls."""
    import torch
    method = "events"
    run: Callable[[], Any] = fn
    per = 1
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    fn()
            run, per, method = g.replay, reps, "cuda_graph"
        except Exception as exc:  # noqa: BLE001 - any capture failure: time plain calls instead
            method = f"events (graph capture failed: {type(exc).__name__})"
            run, per = fn, 1
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per)
    return {"median_ms": median(times), "min_ms": min(times), "iters": iters, "method": method}


def copy_bandwidth(nbytes: int, warmup: int, iters: int) -> dict[str, Any]:
    import torch
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), warmup, iters)
    return {"bytes": nbytes, "GBps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9, **t}


def run_timing(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from trellis_export.kernels.trellis_memory import chunk_trellis_fwd, fused_recurrent_trellis_fwd

    from trellis_export.model.memory import MemoryState, trellis_memory
    w, n = args.warmup, args.iters
    out: dict[str, Any] = {}

    def decode_setup(B: int, H: int, m: int, d: int) -> tuple[list[Any], list[Any], Any, dict[str, Any]]:
        case = dict(B=B, T=1, H=H, m=m, d=d, C=16, dtype="float32")
        acts, state, pos = make_inputs(case, "cuda", args.seed)
        return acts, state, pos, dict(chunk_size=16, phi="ln_silu", f="ln_silu", rho="identity", eps=1e-5)

    # decode speedup vs the eager reference step
    B, H, m, d = 64, 8, 64, 64
    acts, state, pos, kw = decode_setup(B, H, m, d)
    call = functools.partial(fused_recurrent_trellis_fwd, *acts, *state, pos, **kw)
    tri = time_cuda(call, w, n)
    tri_graph = time_cuda(call, w, n, graph=True)
    ref = time_cuda(functools.partial(trellis_memory, *acts, MemoryState(*state), pos, mode="step", **kw),
                    w, n)
    speed = ref["median_ms"] / tri["median_ms"]
    out["decode"] = {"B": B, "H": H, "m": m, "d": d, "T": 1, "triton_ms": tri["median_ms"],
                     "triton_graph_ms": tri_graph["median_ms"], "reference_ms": ref["median_ms"],
                     "speedup": speed, "speedup_graph": ref["median_ms"] / tri_graph["median_ms"],
                     "aim": AIM_DECODE_SPEEDUP, "meets_aim": speed >= AIM_DECODE_SPEEDUP,
                     "note": "both timed as plain calls (launch overhead included); *_graph: the triton "
                             "kernel in a CUDA graph", "methods": [tri["method"], tri_graph["method"]]}
    # decode bandwidth vs device-to-device copy
    copy = copy_bandwidth(1 << 30, w, n)
    out["copy"] = copy
    bws = []
    for B in ((64, 256) if args.quick else (64, 256, 1024)):
        acts, state, pos, kw = decode_setup(B, H, m, d)
        t = time_cuda(functools.partial(fused_recurrent_trellis_fwd, *acts, *state, pos, **kw), w, n,
                      graph=True)
        nbytes = decode_state_bytes(B, H, m, d)
        gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
        bws.append({"B": B, "H": H, "m": m, "d": d, "state_bytes": nbytes, "ms": t["median_ms"],
                    "method": t["method"], "achieved_GBps": gbps, "copy_GBps": copy["GBps"],
                    "fraction_of_copy": gbps / copy["GBps"],
                    "meets_aim": gbps / copy["GBps"] >= AIM_BANDWIDTH_FRACTION})
    out["bandwidth"] = bws
    out["bandwidth_aim"] = f">= {AIM_BANDWIDTH_FRACTION:.0%} of copy bandwidth at the largest B*H"
    # chunk prefill, and fla's chunk gated delta rule at phi = identity when available
    pre: dict[str, Any] = {"runs": []}
    try:
        import fla  # type: ignore[import-not-found]
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # type: ignore[import-not-found]
        pre["fla_version"] = getattr(fla, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        chunk_gated_delta_rule = None
        pre["skipped"] = f"fla not importable ({type(exc).__name__}: {exc}); trellis timed alone"
    Bp, Tp, Hp = (2, 1024, 8) if args.quick else (8, 4096, 8)
    for C in (16, 64):
        case = dict(B=Bp, T=Tp, H=Hp, m=64, d=64, C=C, dtype="bfloat16")
        acts, state, pos = make_inputs(case, "cuda", args.seed)
        pos = torch.zeros_like(pos)
        kwp = dict(chunk_size=C, phi="identity", f="ln_silu", rho="identity", eps=1e-5)
        t = time_cuda(functools.partial(chunk_trellis_fwd, *acts, *state, pos, **kwp), max(1, w // 2), n)
        run = {"B": Bp, "T": Tp, "H": Hp, "m": 64, "d": 64, "C": C, "dtype": "bfloat16",
               "trellis_ms": t["median_ms"], "Mtok_per_s": Bp * Tp / (t["median_ms"] * 1e-3) / 1e6}
        if chunk_gated_delta_rule is not None:
            q, k, v = acts[0], acts[1], acts[2]
            g = torch.log(acts[4].float())
            beta = acts[5].to(q.dtype)                               # fla takes beta in q's dtype
            h0 = state[0].transpose(-1, -2).contiguous()          # [B, H, d_k, d_v]
            try:
                tf = time_cuda(functools.partial(chunk_gated_delta_rule, q, k, v, g, beta, initial_state=h0,
                                                 output_final_state=True), max(1, w // 2), n)
                run.update(fla_ms=tf["median_ms"], ratio_vs_fla=t["median_ms"] / tf["median_ms"],
                           note="fla: one gated-delta-rule pass (chunk 64, tensor cores, bf16); trellis: "
                                "two passes (K and V memories) plus f, float32 ieee dots")
            except Exception as exc:  # noqa: BLE001 - an fla API mismatch must not hide our timings
                run["fla_error"] = f"{type(exc).__name__}: {exc}"
        pre["runs"].append(run)
    out["prefill"] = pre
    return out


# =========================================================================== machine
def machine_info() -> dict[str, Any]:
    """The project's machine description (``trellis_export.bench.machine``) plus the GPU's details."""
    from trellis_export.bench.machine import describe_machine

    info: dict[str, Any] = describe_machine()
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda_runtime"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(card=p.name, cc=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                        memory_GiB=round(p.total_memory / 2 ** 30, 1))
    except Exception as exc:  # noqa: BLE001
        info["torch_error"] = repr(exc)
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton_error"] = repr(exc)
    try:
        v = cuda_launch().CudaDriver().driver_version()
        info["cuda_driver_api"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception as exc:  # noqa: BLE001
        info["cuda_driver_error"] = repr(exc)
    try:
        import subprocess
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


# =========================================================================== (e) the plugin's launch path
def plugin_cases(quick: bool = False) -> list[dict[str, Any]]:
    """Cases of the plugin's launch path: odd shapes and the bench shape, decode and prefill, outputs
    separate or aliased to the memory inputs, float32 and float16 activations."""
    cases: list[dict[str, Any]] = []

    def add(B: int, T: int, H: int, m: int, d: int, C: int, aliased: bool, dtype: str = "float32",
            phi: str = "ln_silu", f: str = "l2_silu", rho: str = "identity") -> None:
        cases.append(dict(kernel="plugin", B=B, T=T, H=H, m=m, d=d, C=C, phi=phi, f=f, rho=rho, dtype=dtype,
                          aliased=aliased, tol=TOL_LONG if T > SHORT_STREAM else TOL_SHORT))

    for T in (1, 13):
        for aliased in (False, True):
            add(3, T, 3, 7, 5, 3, aliased)                   # odd shapes, T not a multiple of C
    add(2, 1, 8, 64, 64, 16, True)                           # in-place decode, bench shape
    add(2, 64, 8, 64, 64, 16, True)
    add(2, 21, 4, 32, 32, 4, False, dtype="float16")
    # phi = identity: the state pass's m-axis split (odd m: a part-filled second block; bench shape)
    add(3, 13, 3, 19, 5, 3, False, phi="identity")
    add(2, 64, 8, 64, 64, 16, True, phi="identity", f="identity")
    if not quick:
        add(2, 300, 4, 32, 32, 16, False, phi="identity", f="ln_silu", rho="ln_silu")
    return cases


def plugin_attrs(case: dict[str, Any]) -> dict[str, Any]:
    """The op attributes of a plugin case."""
    return dict(chunk_size=case["C"], phi=case["phi"], f=case["f"], rho=case["rho"], eps=1e-5)


def run_plugin(cases: list[dict[str, Any]], seed: int, device: str = "cuda", cc: int | None = None,
               make_driver: Callable[[list[Any]], Any] | None = None) -> dict[str, Any]:
    """Section (e) on this card (``cc`` default: torch's device capability). ``make_driver(buffers)``
    gives the driver of one case (default: one ``CudaDriver`` for all; the tests pass a host stand-in,
    which is told the case's buffers)."""
    import torch

    if cc is None:
        cc = int("".join(map(str, torch.cuda.get_device_capability())))
    shared: list[Any] = []
    checks = [case_check(functools.partial(plugin_check, case, seed + 3000 + i, device, cc, make_driver,
                                           shared), case)
              for i, case in enumerate(cases)]
    return {"checks": checks, "ok": all(c["ok"] for c in checks)}


def plugin_check(case: dict[str, Any], seed: int, device: str, cc: int,
                 make_driver: Callable[[list[Any]], Any] | None, shared: list[Any]) -> dict[str, Any]:
    """One plugin case: ``plugin_v3.launch_memory`` on its buffers, compared with the float64
    reference (``shared`` holds the one CudaDriver of the section)."""
    import torch
    from trellis_export.plugins_trt import plugin_v3
    B, T = case["B"], case["T"]
    recs = plugin_records(plugin_attrs(case), case, cc)
    acts, state, pos = make_inputs(case, device, seed)
    ref = reference(case, acts, state, pos)
    ins = [x.contiguous() for x in acts] + [s.clone().contiguous() for s in state] + [pos.contiguous()]
    out = poisoned_outputs(case, acts)
    if case["aliased"]:                  # what an engine with aliased plugin I/O hands enqueue
        out = (out[0], *ins[6:10])
    size = plugin_v3.workspace_size(recs, B, T)
    align = plugin_v3.WORKSPACE_ALIGN
    arena = torch.empty(size + align, dtype=torch.uint8, device=device)
    ws = arena.data_ptr() + (-arena.data_ptr()) % align             # TensorRT's are 256-aligned
    if make_driver is not None:
        drv = make_driver([*ins, *out, arena])
    else:
        if not shared:
            shared.append(cuda_launch().CudaDriver())
        drv = shared[0]
    stream = torch.cuda.current_stream().cuda_stream if device != "cpu" else 0
    launched = plugin_v3.launch_memory(drv, {}, recs, B, T, [t.data_ptr() for t in ins],
                                       [t.data_ptr() for t in out], ws if size else 0, stream)
    if device != "cpu":
        torch.cuda.synchronize()
    res = compare(case, out, ref)
    res.update(cc=cc, launched=[f"{k}:{v}" for k, v in launched], workspace_bytes=size)
    return res


# =========================================================================== TensorRT engines
def run_trt(args: argparse.Namespace) -> dict[str, Any]:
    """TensorRT engines of the bundled model on this card (issue "TensorRT engines"): for each of the
    function-body and plugin engines, build with TensorRT-RTX for this GPU's compute capability when
    it is a TensorRT-RTX target (else try once and record exactly what happened), stream it against the
    float64 reference over 4k tokens (``verify``: logits and states, spec tolerances), time decode and
    prefill through the TensorRT session against the ORT CUDA provider when present, and run the
    deployment bundle's on-device check (``trellis_export.bundle.gpu_check``)."""
    import tempfile

    import numpy as np
    from trellis_export.kernels.cuda_launch import CudaDriver
    from trellis_export.plugins_trt.engine import (
        EngineSettings,
        Range,
        build_engine,
        onnx_for_engine,
        write_engine,
    )
    from trellis_export.plugins_trt.runtimes import RTX_TARGETS, available_runtimes, load_tensorrt

    from trellis_export.errors import TrellisExportError
    from trellis_export.runtime import open_session
    from trellis_export.verify import verify

    cc = CudaDriver().compute_capability()
    cc_text = f"{cc // 10}.{cc % 10}"
    out: dict[str, Any] = {"compute_capability": cc_text, "runtimes": available_runtimes(), "engines": {}}
    if not out["runtimes"]:
        out["skipped"] = "no TensorRT module importable"
        return out
    rt = load_tensorrt()
    out["runtime"] = f"{rt.name} {rt.version}"
    if rt.is_rtx and cc_text not in RTX_TARGETS:
        out["note"] = (f"sm_{cc} is not a TensorRT-RTX target ({', '.join(RTX_TARGETS)}): trying once with "
                       "the nearest lower target, recording what happens")
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_trt."))
    tokens = 256 if args.quick else 1024
    for plugin in (False, True):
        name = "plugin" if plugin else "function_body"
        rec: dict[str, Any] = {}
        out["engines"][name] = rec
        try:
            targets = (cc_text,) if (not rt.is_rtx or cc_text in RTX_TARGETS) else \
                (max((t for t in RTX_TARGETS if float(t) <= cc / 10), key=float),)
            settings = EngineSettings(plugin=plugin, batch=Range(1, 1, 8), tokens=Range(1, tokens, tokens),
                                      compute_capabilities=targets if rt.is_rtx else ())
            src = onnx_for_engine(None, plugin=plugin)
            data, report = build_engine(src, settings, rt)
            engine = write_engine(work / f"{name}.engine", data, report, src)
            rec["build"] = {k: report.to_dict()[k] for k in ("layers", "layers_by_type", "build_seconds",
                                                              "engine_bytes", "targets", "memory_nodes",
                                                              "plugin_kernels")}
        except (TrellisExportError, RuntimeError, OSError) as exc:
            rec["build_error"] = str(exc)
            continue
        try:
            rep = verify(None, engine, tokens=512 if args.quick else 4096, batch=2)
            rec["verify"] = {"status": rep["status"], "top1_agreement": rep["top1_agreement"],
                             "tensors": {k: {"rel_rms": v["rel_rms"], "worst_rel_rms": v.get("worst_rel_rms"),
                                             "status": v["status"]} for k, v in rep["tensors"].items()}}
        except Exception as exc:  # noqa: BLE001 - record and go on
            rec["verify_error"] = f"{type(exc).__name__}: {exc}"
        try:
            sess = open_session("trt", engine_path=engine)
            rng = np.random.default_rng(0)
            vocab = sess.config.vocab_size
            timing: dict[str, Any] = {}
            for phase, T in (("decode", 1), ("prefill", tokens)):
                ids = rng.integers(0, vocab, size=(1, T), dtype=np.int64)
                _, h = sess.step(ids)
                times = []
                for i in range(10 + (args.iters or 100)):
                    t0 = time.perf_counter()
                    _, h2 = sess.step(ids, h)
                    if i >= 10:
                        times.append(time.perf_counter() - t0)
                timing[phase] = {"p50_ms": median(times) * 1e3, "tokens": T,
                                 "tokens_per_s": T / median(times)}
            rec["timing_trt_session"] = timing
        except Exception as exc:  # noqa: BLE001
            rec["timing_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            from trellis_export.checkpoint import load_checkpoint
            from trellis_export.export.onnx_export import export_onnx

            path = export_onnx(load_checkpoint(), work / "model.onnx")
            s = open_session("ort", model_path=path, providers=["CUDAExecutionProvider"])
            ids = np.ones((1, 1), dtype=np.int64)
            _, st = s.step(ids)
            times = []
            for i in range(110):
                t0 = time.perf_counter()
                _, st = s.step(ids, st)
                if i >= 10:
                    times.append(time.perf_counter() - t0)
            out["ort_cuda_decode_p50_ms"] = median(times) * 1e3
        else:
            out["ort_cuda"] = "onnxruntime has no CUDAExecutionProvider here"
    except Exception as exc:  # noqa: BLE001
        out["ort_cuda_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from trellis_export.bundle import gpu_check
        from trellis_export.bundle.build import build_bundle

        bdir = work / "bundle"
        build_bundle(None, bdir, target="rtx")
        out["bundle_check"] = gpu_check(bdir)
    except Exception as exc:  # noqa: BLE001
        out["bundle_error"] = f"{type(exc).__name__}: {exc}"
    out["ok"] = all(r.get("verify", {}).get("status") == "PASSED" for r in out["engines"].values()) \
        if out["engines"] else False
    return out


# =========================================================================== main
def chosen_sections(args: argparse.Namespace) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """The sections to run, in order: ``--sections`` when given, else :data:`SECTIONS`; the ``--no-*``
    flags drop theirs either way."""
    run: dict[str, Callable[[], dict[str, Any]]] = {
        "jit": lambda: run_jit(correctness_cases(args.quick), args.seed),
        "aot": lambda: run_aot(aot_cases(), args.seed, args.aot_json),
        "plugin": lambda: run_plugin(plugin_cases(args.quick), args.seed),
        "aot_timing": lambda: run_aot_timing(args),
        "timing": lambda: run_timing(args),
        "trt": lambda: run_trt(args),
        "d_split": lambda: run_d_split_section(args)}
    dropped = set()
    if args.no_aot:
        dropped |= {"aot", "plugin", "aot_timing", "d_split"}
    if args.no_timing:
        dropped |= {"aot_timing", "timing"}
    if args.no_trt:
        dropped.add("trt")
    return [(name, run[name]) for name in (args.sections or SECTIONS) if name not in dropped]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import_project()
    if args.compile_child:                     # compile_in_child's worker
        from trellis_export.kernels.aot import compile_kernel
        calls = json.loads(Path(args.compile_child[0]).read_text())
        Path(args.compile_child[1]).write_text(json.dumps([compile_kernel(k, cc, **kw).to_dict()
                                                           for k, cc, kw in calls]))
        return 0
    if args.prepare_records:
        from trellis_export.errors import TrellisExportError
        from trellis_export.outputs import OutputSpec, claim_outputs
        try:           # the path is checked before the minute of compiling, and written atomically
            claim_outputs([OutputSpec(args.prepare_records, "--prepare-records", parents=True)])
            t0 = time.time()
            n = prepare_records(args.prepare_records, args.cc)
        except TrellisExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        size = Path(args.prepare_records).stat().st_size
        print(f"{n} records for sm_{args.cc} in {args.prepare_records} ({size / 2**20:.1f} MiB, "
              f"{time.time() - t0:.0f} s)")
        return 0
    store_error = None
    if args.records:
        try:
            STORE.load(args.records)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # on a lent GPU a bad store must not cost the run: say so, compile the records here
            store_error = f"--records {args.records}: {type(exc).__name__}: {exc}; records compiled here"
            print(f"warning: {store_error}", file=sys.stderr)
    results: dict[str, Any] = {"suite": "trellis-export gpu_suite", "args": vars(args), "errors": {}}
    if store_error:
        results["errors"]["records"] = store_error
    results["machine"] = machine_info()
    import torch
    if not torch.cuda.is_available():
        results["errors"]["cuda"] = "no CUDA device visible to torch"
        write_json(args.out, results)
        print(format_table(results))
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False           # the float64 reference stays exact anyway
    watchdog = SectionWatchdog(args.section_timeout, args.out, results)
    for name, fn in chosen_sections(args):
        t0 = time.time()
        watchdog.start(name)
        section, error = None, None
        try:
            section = fn()
        except Exception:  # noqa: BLE001 - record the crash, go on with the other sections
            error = traceback.format_exc()
        watchdog.stop()
        with watchdog.lock:
            if section is None:
                results["errors"][name] = error or f"section {name} returned no results"
            else:
                results[name] = section
                section["seconds"] = round(time.time() - t0, 2)
            results["record_store"] = STORE.summary()
            write_json(args.out, results)                    # partial results survive a later crash
        if error:
            print(error, file=sys.stderr)
    ok = not results["errors"] and all(results[s].get("ok", True) for s in ("jit", "aot", "plugin")
                                       if s in results)
    results["ok"] = ok
    write_json(args.out, results)
    print(f"results: {args.out}")
    print(format_table(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
