#!/usr/bin/env python3
"""On-device parity check of a Trellis engine against the bundle's float64 reference.

    python3 verify_engine.py                 # the engine built by build_engine.sh (model.engine)
    python3 verify_engine.py --runtime ort   # the same check on model.onnx with ONNX Runtime

Feeds the reference token stream (two rows at different stream positions: one prefill call, then
single-token steps) and compares the logits of every token and the state at each checkpoint with
the float64 reference. Relative RMS per tensor, tolerances from manifest.json (TRELLIS_SPEC.md
section 8: float32 <= 1e-5 up to position 64 and <= 1e-4 beyond; float16 engines: <= 5e-3 on the
logits, states reported). Prints a Polygraphy-style report ending in PASSED or FAILED; exit code 0
when PASSED, 1 when FAILED or on any error (one ``error:`` line). Needs numpy, safetensors and either
TensorRT + cuda-python or onnxruntime; the bundle's files are checked against their sha256 first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trellis_bundle import BundleError, fail, load_reference, open_bundle, open_runner, rel_rms  # noqa: E402


def tolerance(tol: dict, position: int, act: str) -> float:
    if act == "float16":
        return float(tol["float16_logits"])
    return float(tol["float32_short"] if position <= int(tol["short_stream"]) else tol["float32_long"])


class Record:
    """Worst case of one tensor over its checks."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.worst = 0.0
        self.worst_at = 0
        self.checks = 0
        self.failed = 0
        self.judged = False

    def add(self, got: np.ndarray, ref: np.ndarray, position: int, tol: float | None) -> None:
        err = rel_rms(got, ref)
        diff = np.abs(np.asarray(got, dtype=np.float64) - ref)
        self.max_abs = max(self.max_abs, float(diff.max()) if diff.size else 0.0)
        if not err <= self.worst:
            self.worst, self.worst_at = err, position
        self.checks += 1
        if tol is not None:
            self.judged = True
            self.failed += int(not err <= tol)

    @property
    def status(self) -> str:
        return ("FAILED" if self.failed else "PASSED") if self.judged else "REPORTED"


def run_check(bundle: Path, manifest: dict, runner: Any, resync: bool) -> dict:
    ref = load_reference(bundle, manifest)
    info = manifest["reference"]
    act = manifest["model"]["activation_dtype"]
    tol = manifest["tolerances"]
    names = [t["name"] for t in manifest["state_spec"]["tensors"]]
    ids = ref["input_ids"]
    starts = [int(p) for p in info["start_positions"]]
    prefill, total = int(info["prefill"]), int(ids.shape[1])
    checkpoints = [int(c) for c in info["checkpoints"]]
    records = {"logits": Record(), **{n: Record() for n in names}}
    # the stream indices whose reference logits are stored (every token unless the vocabulary is large)
    kept = ref["logits_positions"] if "logits_positions" in ref else np.arange(total)
    slot = np.full(total, -1)
    slot[kept] = np.arange(len(kept))
    got = np.empty(ref["logits"].shape, dtype=np.float64)

    def store(t0: int, logits: np.ndarray) -> None:
        idx = slot[t0:t0 + logits.shape[1]]
        got[:, idx[idx >= 0]] = logits[:, idx >= 0]

    runner.set_state({n: ref[f"start.{n}"] for n in names})
    t0 = time.perf_counter()
    store(0, runner.step(ids[:, :prefill]))
    lat = []
    pos = prefill
    last = 0
    for mark in checkpoints:
        while pos < mark:
            t1 = time.perf_counter()
            out = runner.step(ids[:, pos:pos + 1])
            lat.append(time.perf_counter() - t1)
            store(pos, out)
            pos += 1
        state = runner.get_state()
        window = slot[last:mark][slot[last:mark] >= 0]
        for b, start in enumerate(starts):
            at = start + mark                       # the row's stream position at this check
            if window.size:
                records["logits"].add(got[b, window], ref["logits"][b, window], at, tolerance(tol, at, act))
            for n in names:
                state_tol = None if act == "float16" else tolerance(tol, at, act)
                records[n].add(state[n][b], ref[f"state.{mark}.{n}"][b], at, state_tol)
        if resync:
            runner.set_state({n: ref[f"state.{mark}.{n}"].astype(state[n].dtype) for n in names})
        last = mark
    seconds = time.perf_counter() - t0
    top1 = float((got.argmax(-1) == ref["logits"].argmax(-1)).mean())
    passed = all(r.failed == 0 for r in records.values())
    return {"status": "PASSED" if passed else "FAILED", "seconds": seconds, "top1_agreement": top1,
            "decode_ms_median": 1e3 * float(np.median(lat)) if lat else None, "tokens": total,
            "prefill": prefill, "rows": len(starts), "start_positions": starts, "checkpoints": checkpoints,
            "resync": resync,
            "tensors": {k: {"max_abs": r.max_abs, "rel_rms_worst": r.worst, "worst_position": r.worst_at,
                            "checks": r.checks, "failed_checks": r.failed, "status": r.status}
                        for k, r in records.items()}}


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description="Check a Trellis engine against the bundle's float64 reference.")
    p.add_argument("engine", nargs="?", type=Path, help="engine file [default: the bundle's model.engine]")
    p.add_argument("--runtime", choices=("trt", "ort"), default="trt",
                   help="trt: the TensorRT engine; ort: model.onnx on ONNX Runtime (CPU)")
    p.add_argument("--model", type=Path, help="with --runtime ort: an ONNX file instead of the bundle's")
    p.add_argument("--bundle", type=Path, default=here, help="bundle directory [default: this script's]")
    p.add_argument("--resync", action="store_true",
                   help="restart from the reference state after each checkpoint (judges each interval alone)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    try:
        manifest = open_bundle(args.bundle)
        runner = open_runner(args.runtime, args.bundle, manifest, engine=args.engine, model=args.model)
        report = run_check(args.bundle, manifest, runner, args.resync)
    except BundleError as exc:
        fail(str(exc))
    except (OSError, KeyError, ValueError) as exc:
        fail(f"{args.bundle}: cannot run the check ({type(exc).__name__}: {exc})")
    act = manifest["model"]["activation_dtype"]
    tol = manifest["tolerances"]
    what = f"{runner.name} {runner.version}"
    print(f"[I] {what} vs float64 reference of model {manifest['model']['fingerprint'][:16]} "
          f"({act} activations, target {manifest['target']['name']})")
    print(f"[I] {report['tokens']} tokens x {report['rows']} rows (stream positions start at "
          f"{', '.join(map(str, report['start_positions']))}): prefill {report['prefill']}, "
          "then 1-token steps; "
          f"checks at {', '.join(map(str, report['checkpoints']))}"
          + (" (restarted from the reference state after each)" if report["resync"] else ""))
    if act == "float16":
        print(f"[I] tolerance: relative RMS <= {tol['float16_logits']:g} on logits (states reported)")
    else:
        print(f"[I] tolerance: relative RMS <= {tol['float32_short']:g} up to position "
              f"{tol['short_stream']}, "
              f"<= {tol['float32_long']:g} beyond")
    print(f"    {'tensor':<22} {'max_abs':>10} {'rel_rms':>10} {'at':>6} {'checks':>6}  status")
    for name, r in report["tensors"].items():
        print(f"    {name:<22} {r['max_abs']:10.3e} {r['rel_rms_worst']:10.3e} {r['worst_position']:6d} "
              f"{r['checks']:6d}  {r['status']}")
    dec = report["decode_ms_median"]
    print(f"[I] top-1 agreement {100 * report['top1_agreement']:.2f}%"
          + (f", decode step median {dec:.2f} ms" if dec is not None else ""))
    if args.json:
        args.json.write_text(json.dumps({"runtime": what, **report}, indent=1) + "\n")
    print(f"[I] {report['status']} | Runtime: {report['seconds']:.3f}s | Command: {' '.join(sys.argv)}")
    return 0 if report["status"] == "PASSED" else 1


if __name__ == "__main__":
    sys.exit(main())
