"""Host time of the TensorRT plugin's enqueue, without a GPU: ``plugin_v3.launch_memory`` (record
choice, workspace carving, grid and workspace expressions, argument packing and checks) on the
records an engine of one config carries, with a driver stand-in whose ``launch_record`` packs the
parameters and computes the grid exactly as ``CudaDriver.launch_record`` does before it calls
``cuLaunchKernel`` (which is not called: no device). What TensorRT pays in Python per plugin layer
and call, on top of the kernels.

Also timed in the same run: the same enqueues with the grid-expression cache cleared before each
(``cuda_launch._compile_dim``: every expression parsed again, as before the cache), so the ratio
says what the cache saves.

    python bench/bench_enqueue.py            # writes bench/results/enqueue_<date-time>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help="JSON results file (default: bench/results/enqueue_<date-time>.json)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cc", type=int, default=90)
    p.add_argument("--calls", type=int, default=2000, help="enqueues per timed repetition")
    p.add_argument("--reps", type=int, default=7, help="repetitions (the median is reported)")
    args = p.parse_args(argv)
    from trellis_export.errors import TrellisExportError
    from trellis_export.outputs import OutputSpec, claim_outputs
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"enqueue_{time.strftime('%Y%m%d-%H%M%S')}.json")
    try:
        claim_outputs([OutputSpec(out, "--out", parents=True)])
    except TrellisExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from trellis_export.kernels import cuda_launch as cl
    from trellis_export.plugins_trt import plugin_v3

    from trellis_export.bench.machine import describe_machine

    attrs = {"chunk_size": args.chunk_size, "phi": "ln_silu", "f": "ln_silu", "rho": "identity", "eps": 1e-5}
    records = plugin_v3.compile_records(attrs, heads=args.heads, slots=args.slots, head_dim=args.head_dim,
                                        dtype="float32", targets=[args.cc])

    class HostOnlyDriver:
        """``CudaDriver``'s interface up to ``cuLaunchKernel``: pack the parameters, compute the grid."""

        def compute_capability(self) -> int:
            return args.cc

        def multiprocessor_count(self) -> int:
            return 132

        def load_record(self, record: dict[str, Any], prefer: str = "auto") -> Any:
            return cl.LoadedKernel(record, None, None, "ptx")  # type: ignore[arg-type]

        def launch_record(self, kernel: Any, pointers: dict[str, int], scalars: dict[str, int], B: int,
                          stream: int = 0) -> None:
            params, keep = cl.pack_params(kernel.record, pointers, scalars)
            cl.grid_for(kernel.record, B, scalars.get("T"))
            del params, keep

    drv, loaded = HostOnlyDriver(), {}
    base = 1 << 32
    ins = [base + (i << 20) for i in range(11)]
    separate = [base + ((20 + i) << 20) for i in range(5)]
    aliased = [separate[0]] + ins[6:10]
    workspace = base + (1 << 30)
    cases = [("decode, aliased state", 1, aliased), ("decode", 1, separate), ("prefill T=512", 512, separate),
             ("prefill T=8192", 8192, separate)]

    def per_call_us(T: int, outs: list[int], clear: bool) -> float:
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                if clear:
                    cl._compile_dim.cache_clear()
                plugin_v3.launch_memory(drv, loaded, records, args.batch, T, ins, outs, workspace, 0)
            times.append((time.perf_counter() - t0) / args.calls * 1e6)
        return statistics.median(times)

    rows = []
    for name, T, outs in cases:
        launched = plugin_v3.launch_memory(drv, loaded, records, args.batch, T, ins, outs, workspace, 0)
        cached = per_call_us(T, outs, clear=False)
        parsed = per_call_us(T, outs, clear=True)
        rows.append({"case": name, "B": args.batch, "T": T, "launched": [f"{k}:{v}" for k, v in launched],
                     "us_per_enqueue": round(cached, 2), "us_per_enqueue_parsing_each_call": round(parsed, 2),
                     "parse_cache_speedup": round(parsed / cached, 2)})
        print(f"{name:24s} {' + '.join(r for r in rows[-1]['launched']):50s} {cached:8.1f} us "
              f"(parsing each call: {parsed:8.1f} us, {parsed / cached:4.1f}x)")
    result = {"bench": "plugin enqueue host time (no device)", "machine": describe_machine(),
              "config": {"heads": args.heads, "slots": args.slots, "head_dim": args.head_dim,
                         "chunk_size": args.chunk_size, "cc": args.cc},
              "calls": args.calls, "reps": args.reps, "rows": rows,
              "note": "median over reps of the mean per enqueue; cuLaunchKernel itself not called"}
    from trellis_export.fileio import atomic_write_bytes
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
