"""ONNX Runtime streaming benchmark: decode (T = 1, B = 1) vs the PyTorch reference step, and prefill
(T = 256 calls) vs decode tokens/s, through the runtime sessions of :mod:`trellis_export.runtime`.

    python bench/bench_ort.py [--checkpoint DIR] [--threads N] [--seconds S] [--profile]

Model: the bundled checkpoint, or a random model of the default config when it is absent (say so in
the result). Every number comes from this one run on this machine; the JSON lands in bench/results/
with the machine description. Aims (issue 3): ORT decode >= 3x faster than the torch reference step;
ORT prefill >= 10x the decode tokens/s. ``--profile`` adds an ORT profile of both phases (time per
operator type), to show what dominates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from trellis_export.bench.machine import describe_machine
from trellis_export.bench.stats import latency_stats
from trellis_export.fileio import atomic_write_bytes
from trellis_export.runtime import Session, open_session

AIM_DECODE_SPEEDUP = 3.0
AIM_PREFILL_RATIO = 10.0
CONTROL_FLOW = ("If", "Loop", "Scan")


def _load_model(checkpoint: str | None) -> tuple[Any, str]:
    import torch

    from trellis_export.checkpoint import default_checkpoint_path, load_checkpoint
    from trellis_export.config import TrellisConfig
    from trellis_export.model import TrellisLM

    if checkpoint is not None or (default_checkpoint_path() / "model.safetensors").is_file():
        model = load_checkpoint(checkpoint)
        return model, f"checkpoint {model.checkpoint_path}"
    torch.manual_seed(0)
    return TrellisLM(TrellisConfig()).eval(), "random weights, default TrellisConfig (no bundled checkpoint)"


def _time(session: Session, tokens: int, seconds: float, warmup: int, min_iters: int, seed: int
          ) -> dict[str, Any]:
    """Stream calls of ``tokens`` tokens (B = 1), threading the state; per-call latency statistics."""
    rng = np.random.default_rng(seed)
    vocab = session.config.vocab_size
    state = session.init_state(1)
    ids = rng.integers(0, vocab, size=(64, 1, tokens), dtype=np.int64)
    for i in range(warmup):
        _, state = session.step(ids[i % 64], state)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        x = ids[len(times) % 64]
        a = time.perf_counter()
        _, state = session.step(x, state)
        times.append(time.perf_counter() - a)
    st = latency_stats(times)
    st["tokens_per_call"] = tokens
    st["tokens_per_s_p50"] = tokens / (st["p50_ms"] / 1e3)
    st["tokens_per_s_mean"] = tokens / (st["mean_ms"] / 1e3)
    st["final_position"] = int(state["position"][0])
    return st


def _time_raw(session: Any, seconds: float, warmup: int) -> dict[str, Any]:
    """ORT decode through ``InferenceSession.run`` on prepared feeds (no Session.step checks)."""
    state = session.init_state(1)
    names = [t.name for t in session.state_spec]
    out_names = ["logits"] + ["present." + n for n in names]
    feeds = {"input_ids": np.ones((1, 1), dtype=np.int64), **{"past." + n: state[n] for n in names}}
    run = session.session.run
    for _ in range(warmup):
        res = run(out_names, feeds)
        feeds.update({"past." + n: v for n, v in zip(names, res[1:])})
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 20 or time.perf_counter() - start < seconds:
        a = time.perf_counter()
        res = run(out_names, feeds)
        times.append(time.perf_counter() - a)
        feeds.update({"past." + n: v for n, v in zip(names, res[1:])})
    st = latency_stats(times)
    st["tokens_per_call"] = 1
    st["tokens_per_s_p50"] = 1 / (st["p50_ms"] / 1e3)
    st["tokens_per_s_mean"] = 1 / (st["mean_ms"] / 1e3)
    return st


def _profile(model_path: Path, threads: int | None, tokens: int, calls: int, work: Path) -> dict[str, Any]:
    """ORT profile of ``calls`` calls of ``tokens`` tokens: total time per operator type."""
    s = open_session("ort", model_path=model_path, threads=threads, profile=str(work / f"prof_T{tokens}"))
    state = s.init_state(1)
    ids = np.random.default_rng(1).integers(0, s.config.vocab_size, size=(1, tokens), dtype=np.int64)
    for _ in range(calls):
        _, state = s.step(ids, state)
    trace = json.loads(Path(s.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    run_us = 0.0
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            per_op[op] += ev.get("dur", 0)
            count[op] += 1
        elif ev.get("cat") == "Session" and ev.get("name") == "model_run":
            run_us += ev.get("dur", 0)
    # If / Loop / Scan times include the nodes of their subgraphs, which are also listed: keep them
    # apart so that the shares add up to the time spent in real kernels.
    control = {k: per_op.pop(k) for k in CONTROL_FLOW if k in per_op}
    node_us = sum(per_op.values())
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    return {"tokens_per_call": tokens, "calls": calls, "model_run_us_per_call": run_us / calls,
            "kernel_us_per_call": node_us / calls,
            "kernels_per_call": sum(count[k] for k in per_op) / calls,
            "control_flow_us_per_call": {k: v / calls for k, v in control.items()},
            "control_flow_calls_per_call": {k: count[k] / calls for k in control},
            "top_ops": [{"op": k, "us_per_call": v / calls,
                         "share_of_kernel_time": v / node_us if node_us else 0.0,
                         "kernels_per_call": count[k] / calls} for k, v in top]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint dir (default: bundled, else random)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for ORT and torch, the "
                    "same for both (default 1: fair on a small shared machine; 0 = library defaults)")
    ap.add_argument("--seconds", type=float, default=4.0, help="measurement time per case")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up calls per case")
    ap.add_argument("--prefill", type=int, default=256, help="tokens per prefill call")
    ap.add_argument("--profile", action="store_true", help="add an ORT profile of decode and prefill")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/ort_<date>.json)")
    args = ap.parse_args(argv)
    from trellis_export.errors import TrellisExportError
    try:
        return _main(args)
    except TrellisExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    import torch

    from trellis_export.checkpoint import default_checkpoint_path
    from trellis_export.outputs import OutputSpec, claim_outputs, signals_raise

    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"ort_{time.strftime('%Y%m%d-%H%M%S')}.json")
    claim_outputs([OutputSpec(out, "--out", parents=True)],
                  inputs=[args.checkpoint or default_checkpoint_path()])
    with signals_raise():
        return _run(args, out, torch)


def _run(args: argparse.Namespace, out: Path, torch: Any) -> int:
    from trellis_export.export import export_onnx

    machine = describe_machine()
    model, source = _load_model(args.checkpoint)
    args.threads = args.threads or None
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_ort_") as tmp:
        work = Path(tmp)
        onnx_path = work / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, onnx_path)
        export_s = time.perf_counter() - t0
        ort_s = open_session("ort", model_path=onnx_path, threads=args.threads)
        torch_s = open_session("torch", model=model, memory_mode="auto")
        assert ort_s.fingerprint == torch_s.fingerprint
        cases = {
            "torch_decode": (torch_s, 1), "ort_decode": (ort_s, 1),
            "torch_prefill": (torch_s, args.prefill), "ort_prefill": (ort_s, args.prefill),
        }
        results: dict[str, Any] = {"ort_decode_raw": _time_raw(ort_s, args.seconds, args.warmup)}
        for name, (sess, tokens) in cases.items():
            results[name] = _time(sess, tokens, args.seconds, args.warmup if tokens == 1 else 2,
                                  20 if tokens == 1 else 5, seed=0)
            print(f"  {name:<14} p50 {results[name]['p50_ms']:9.3f} ms", file=sys.stderr)
        profile = None
        if args.profile:
            profile = {"decode": _profile(onnx_path, args.threads, 1, 200, work),
                       "prefill": _profile(onnx_path, args.threads, args.prefill, 5, work)}
    decode_speedup = results["torch_decode"]["p50_ms"] / results["ort_decode"]["p50_ms"]
    prefill_ratio = results["ort_prefill"]["tokens_per_s_p50"] / results["ort_decode"]["tokens_per_s_p50"]
    report = {
        "benchmark": "bench_ort",
        "model": {"source": source, "fingerprint": ort_s.fingerprint, "config": ort_s.config.to_dict(),
                  "parameters": int(sum(p.numel() for p in model.parameters()))},
        "machine": machine,
        "settings": {"threads": args.threads, "torch_threads": torch.get_num_threads(),
                     "seconds_per_case": args.seconds, "warmup_calls": args.warmup,
                     "prefill_tokens": args.prefill, "batch": 1, "ort_providers": ort_s.providers,
                     "torch_reference": "TrellisLM float32, memory mode step for T = 1, chunked for T > 1",
                     "interface": "runtime Session.step (numpy in/out, state validated every call)"},
        "export_s": export_s,
        "results": results,
        "ratios": {"ort_decode_speedup_vs_torch": decode_speedup,
                   "ort_prefill_over_decode_tokens_per_s": prefill_ratio,
                   "torch_prefill_over_decode_tokens_per_s": (results["torch_prefill"]["tokens_per_s_p50"]
                                                              / results["torch_decode"]["tokens_per_s_p50"]),
                   "session_overhead_decode_p50_ms": (results["ort_decode"]["p50_ms"]
                                                      - results["ort_decode_raw"]["p50_ms"])},
        "aims": [{"aim": f"ORT decode >= {AIM_DECODE_SPEEDUP:g}x faster than torch", "value": decode_speedup,
                  "met": decode_speedup >= AIM_DECODE_SPEEDUP},
                 {"aim": f"ORT prefill >= {AIM_PREFILL_RATIO:g}x decode tokens/s", "value": prefill_ratio,
                  "met": prefill_ratio >= AIM_PREFILL_RATIO}],
        "profile": profile,
    }
    atomic_write_bytes(out, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())

    print(f"model: {source}; ORT providers {', '.join(ort_s.providers)}; machine "
          f"{machine.get('cpu_model')} ({machine.get('logical_cores')} logical cores)")
    print(f"{'case':<14} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'CV':>6} {'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:<14} {r['p50_ms']:9.3f} {r['p90_ms']:9.3f} {r['p99_ms']:9.3f} {r['cv']:6.2f} "
              f"{r['tokens_per_s_p50']:10.0f}")
    for aim in report["aims"]:
        print(f"aim: {aim['aim']:<40} measured {aim['value']:7.2f}x  {'MET' if aim['met'] else 'NOT MET'}")
    if profile:
        for phase, p in profile.items():
            print(f"ORT profile, {phase} (T = {p['tokens_per_call']}): "
                  f"{p['model_run_us_per_call']:.0f} us/run, {p['kernels_per_call']:.0f} kernels/run, "
                  f"{p['kernel_us_per_call']:.0f} us in kernels")
            for op in p["top_ops"][:6]:
                share = 100 * op["share_of_kernel_time"]
                print(f"    {op['op']:<22} {op['us_per_call']:10.1f} us  {share:5.1f}%"
                      f"  ({op['kernels_per_call']:.0f} kernels)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
