"""What each TrellisMemory function-body choice costs in ONNX Runtime, measured in one run.

    python bench/bench_body.py [--baseline-rev REV] [--seconds S] [--out JSON]

The bundled checkpoint is exported once; its TrellisMemory body is then swapped (in memory) for:

* ``baseline``: the body of ``function_body.py`` at git revision ``--baseline-rev`` (default: the
  commit before the portable body; If(T == 1) decode step, If(C == 1) token loop / chunked Loop);
* ``portable``: what exports carry now (no run-time If; the chunked Loop serves T = 1 too);
* ``ort``: the portable recurrence behind If(T == 1) with a straight-line decode step (what
  ``OrtSession`` runs by default).

Decode (B = 1, T = 1) and prefill (B = 1, T = ``--prefill``) go through ``Session.step``, the three
sessions interleaved call by call in one loop so that machine noise hits them alike. JSON with the
machine lands in bench/results/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trellis_export.bench.machine import describe_machine
from trellis_export.bench.stats import latency_stats
from trellis_export.fileio import atomic_write_bytes
from trellis_export.runtime import open_session

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "fc9f807"


def _old_function(rev: str, phi: str, f: str, rho: str) -> Any:
    """``memory_function`` of ``trellis_export/export/function_body.py`` at ``rev``."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:trellis_export/export/function_body.py"],
                         check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location("trellis_export.export._baseline_body", fh.name)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    Path(fh.name).unlink()
    return mod.memory_function(phi, f, rho)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--seconds", type=float, default=6.0, help="measurement time per phase")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import onnx

    from trellis_export.checkpoint import load_checkpoint
    from trellis_export.export.function_body import with_flavour
    from trellis_export.export.onnx_export import export_onnx
    from trellis_export.opdef import DOMAIN, OP_TYPE

    model = load_checkpoint()
    cfg = model.config
    work = Path(tempfile.mkdtemp(prefix="bench_body."))
    path = export_onnx(model, work / "model.onnx")
    proto = onnx.load(str(path))
    variants: dict[str, Path] = {}
    for name in ("baseline", "portable", "ort"):
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        if name == "baseline":
            keep = [fn for fn in p.functions if not (fn.domain == DOMAIN and fn.name == OP_TYPE)]
            del p.functions[:]
            p.functions.extend([*keep, _old_function(args.baseline_rev, cfg.phi, cfg.f, cfg.rho)])
        else:
            with_flavour(p, name)
        variants[name] = work / f"{name}.onnx"
        variants[name].write_bytes(p.SerializeToString())
    sessions = {n: open_session("ort", model_path=p, threads=args.threads, function_body="as-is")
                for n, p in variants.items()}
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    for phase, T in (("decode", 1), ("prefill", args.prefill)):
        ids = rng.integers(0, cfg.vocab_size, size=(16, 1, T), dtype=np.int64)
        states = {n: s.init_state(1) for n, s in sessions.items()}
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for i in range(5):                                    # warm-up
            for n, s in sessions.items():
                _, states[n] = s.step(ids[i % 16], states[n])
        start = time.perf_counter()
        i = 0
        while time.perf_counter() - start < args.seconds:
            for n, s in sessions.items():
                a = time.perf_counter()
                _, states[n] = s.step(ids[i % 16], states[n])
                times[n].append(time.perf_counter() - a)
            i += 1
        results[phase] = {n: {**latency_stats(t), "tokens_per_call": T,
                              "tokens_per_s_p50": T / (latency_stats(t)["p50_ms"] / 1e3)}
                          for n, t in times.items()}
        base = results[phase]["baseline"]["p50_ms"]
        for n in sessions:
            results[phase][n]["p50_vs_baseline"] = results[phase][n]["p50_ms"] / base
    payload = {"what": "TrellisMemory function-body flavours in ONNX Runtime (Session.step, B = 1, "
                       "interleaved in one loop)",
               "baseline_rev": args.baseline_rev, "model": f"bundled checkpoint {model.fingerprint[:12]}",
               "config": cfg.to_dict(), "threads": args.threads, "seconds_per_phase": args.seconds,
               "results": results, "machine": describe_machine()}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"body_{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_bytes(out, (json.dumps(payload, indent=1) + "\n").encode())
    for phase in results:
        for n, r in results[phase].items():
            print(f"{phase:8s} {n:9s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                  f"x baseline {r['p50_vs_baseline']:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
