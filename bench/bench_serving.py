"""Serving benchmark: decode requests/s and latency at 1, 4, 16, 64 concurrent sequences through the
real Triton server (gRPC, python backend + StreamPool), and the same streams through StreamPool in
process.

    python bench/bench_serving.py [--model MODEL.onnx] [--concurrency 1,4,16,64] [--requests 1200]

Model: ``--model``, else the bundled char-LM checkpoint exported to a temporary ONNX file. Each
sequence sends an 8-token prefill (START), then decode requests of one token each (greedy: the next
token is the argmax of the last logits), END on the last; only the decode phase is timed. The server
clients run on one asyncio loop (``tritonclient.grpc.aio``, one channel) in this process; the server,
its python-backend stub and this client share the machine's cores. The server's own split of each
request (queue, model execute, input/output copies) comes from Triton's statistics API, to show
where the time goes. Cells run in ``--rounds`` interleaved rounds (1, 4, 16, 64, 1, 4, ...) and
each reports its median round, so a ratio compares cells measured side by side. Every figure comes
from this one run; the JSON lands in bench/results/ with the machine description.

Aims (issue 9): through the server, 16 sequences >= 4x the decode requests/s of 1 sequence; the pool
in process, 64 streams >= 8x the tokens/s of one stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
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
from trellis_export.runtime.pool import StreamPool

AIM_SERVER_16_VS_1 = 4.0
AIM_POOL_64_VS_1 = 8.0
PROMPT = 8


def _stats(lat: list[float]) -> dict[str, float]:
    s = latency_stats(lat)
    return {k: round(float(s[k]), 4) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")}


# --------------------------------------------------------------------------- in process
def bench_pool(model: Path, n: int, decode: int, threads: int) -> dict[str, Any]:
    sess = open_session("ort", model_path=model, threads=threads)
    pool = StreamPool(sess, capacity=max(n, 1))
    rng = np.random.default_rng(n)
    last = {}
    for i in range(n):
        pool.open(i)
        last[i] = int(np.argmax(pool.step(i, rng.integers(32, 127, size=PROMPT))[-1]))
    for _ in range(3):        # warm-up (not timed)
        res = pool.step_many({i: [last[i]] for i in range(n)})
        last = {i: int(np.argmax(r[-1])) for i, r in res.items()}
    lat = []
    t0 = time.perf_counter()
    for _ in range(decode):
        t = time.perf_counter()
        res = pool.step_many({i: [last[i]] for i in range(n)})
        lat.append(time.perf_counter() - t)
        last = {i: int(np.argmax(r[-1])) for i, r in res.items()}
    wall = time.perf_counter() - t0
    return {"streams": n, "steps": decode, "tokens": n * decode, "wall_s": round(wall, 4),
            "tokens_per_s": round(n * decode / wall, 1), "step_many_latency": _stats(lat)}


def bench_validation(model: Path, n: int, threads: int, reps: int = 300) -> dict[str, Any]:
    """What Session.step's per-call checks cost next to the backend call (batch n, T = 1)."""
    sess = open_session("ort", model_path=model, threads=threads)
    state = sess.init_state(n)
    ids = np.ones((n, 1), dtype=np.int64)
    for _ in range(10):
        sess.step(ids, state)
    t0 = time.perf_counter()
    for _ in range(reps):
        sess.step(ids, state)
    full = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        sess._run(ids, dict(state))          # the backend call alone (what step wraps)
    run = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        sess.validate_state(state, batch=n)
        sess.check_input_ids(ids)
    checks = (time.perf_counter() - t0) / reps
    return {"batch": n, "step_ms": round(full * 1e3, 4), "backend_run_ms": round(run * 1e3, 4),
            "checks_ms": round(checks * 1e3, 4), "checks_share_of_step": round(checks / full, 3)}


# --------------------------------------------------------------------------- server
def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (Linux /proc), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="ascii") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _cpu_snapshot(server_pid: int) -> dict[str, float]:
    stubs = _children(server_pid)
    return {"tritonserver": _cpu_seconds(server_pid), "python_stub": sum(_cpu_seconds(p) for p in stubs),
            "client": _cpu_seconds(os.getpid())}


def _stat_snapshot(url: str, model: str) -> dict[str, float]:
    import tritonclient.grpc as g

    c = g.InferenceServerClient(url)
    try:
        st = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        c.close()
    inf = st.get("inference_stats", {})

    def ns(k: str) -> float:
        return float(inf.get(k, {}).get("ns", 0))

    return {"requests": float(inf.get("success", {}).get("count", 0)),
            "executions": float(st.get("execution_count", 0)),
            "inferences": float(st.get("inference_count", 0)),
            "queue_ns": ns("queue"), "compute_input_ns": ns("compute_input"),
            "compute_infer_ns": ns("compute_infer"), "compute_output_ns": ns("compute_output"),
            "success_ns": ns("success")}


async def _server_cell(url: str, model: str, n: int, decode: int, timeout: float,
                       server_pid: int) -> dict[str, Any]:
    import tritonclient.grpc as g
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    rng = np.random.default_rng(1000 + n)
    seqs = list(range(10_000 * (n + 1), 10_000 * (n + 1) + n))
    last: dict[int, int] = {}

    def req(ids: np.ndarray) -> list[Any]:
        inp = g.InferInput("input_ids", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        return [inp]

    async def infer(seq: int, ids: np.ndarray, **kw: Any) -> np.ndarray:
        res = await client.infer(model, req(ids), sequence_id=seq, client_timeout=timeout, **kw)
        return res.as_numpy("logits")

    lat: list[float] = []

    async def prefill(seq: int) -> None:
        ids = rng.integers(32, 127, size=(1, PROMPT), dtype=np.int64)
        logits = await infer(seq, ids, sequence_start=True)
        last[seq] = int(np.argmax(logits[0, -1]))

    async def run(seq: int, steps: int, timed: bool) -> None:
        for k in range(steps):
            t = time.perf_counter()
            logits = await infer(seq, np.array([[last[seq]]], dtype=np.int64),
                                 sequence_end=timed and k == steps - 1)
            if timed:
                lat.append(time.perf_counter() - t)
            last[seq] = int(np.argmax(logits[0, -1]))

    try:
        await asyncio.gather(*(prefill(s) for s in seqs))
        await asyncio.gather(*(run(s, 3, False) for s in seqs))      # warm-up
        before = _stat_snapshot(url, model)
        cpu0 = _cpu_snapshot(server_pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(run(s, decode, True) for s in seqs))
        wall = time.perf_counter() - t0
        cpu1 = _cpu_snapshot(server_pid)
        after = _stat_snapshot(url, model)
    finally:
        await client.close()
    d = {k: after[k] - before[k] for k in after}
    reqs = max(d["requests"], 1.0)
    split = {k.replace("_ns", "_ms_per_request"): round(d[k] / reqs / 1e6, 4)
             for k in ("queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns", "success_ns")}
    return {"sequences": n, "decode_requests": n * decode, "wall_s": round(wall, 4),
            "requests_per_s": round(n * decode / wall, 1), "latency": _stats(lat),
            "server_split": split,
            "cpu_ms_per_request": {k: round((cpu1[k] - cpu0[k]) * 1e3 / (n * decode), 4) for k in cpu0},
            "cpu_cores_busy": {k: round((cpu1[k] - cpu0[k]) / wall, 3) for k in cpu0},
            "mean_batch_size": round(d["inferences"] / max(d["executions"], 1.0), 2),
            "model_executions": int(d["executions"])}


def _median_cells(cells: list[dict[str, Any]], key: str, rate: str) -> list[dict[str, Any]]:
    """Per concurrency, the round whose rate is the median (all rounds stay in the JSON)."""
    out = []
    for n in sorted({c[key] for c in cells}):
        runs = sorted((c for c in cells if c[key] == n), key=lambda c: c[rate])
        pick = dict(runs[(len(runs) - 1) // 2])
        pick["rounds"] = [c[rate] for c in cells if c[key] == n]
        out.append(pick)
    return out


def bench_server(model: Path, concurrency: list[int], requests: int, threads: int, max_batch: int,
                 tmp: Path, rounds: int) -> dict[str, Any]:
    from trellis_export.serving.repo import RepoOptions, write_repository
    from trellis_export.serving.server import TritonServer

    repo = tmp / "repo"
    opts = RepoOptions(max_sequences=max(concurrency), max_batch_size=max_batch, idle_seconds=120,
                       ort_threads=threads, gpu=False)
    write_repository(model, repo, opts)
    server = TritonServer(repo, log=tmp / "server.log").start(timeout=120)
    cells = []
    try:
        for n in [n for _ in range(rounds) for n in concurrency]:
            decode = max(40, math.ceil(requests / n))
            assert server.proc is not None
            cell = asyncio.run(_server_cell(server.grpc_url, opts.name, n, decode, timeout=60.0,
                                            server_pid=server.proc.pid))
            print(f"server  {n:>3} sequences: {cell['requests_per_s']:>8.1f} decode requests/s  "
                  f"p50 {cell['latency']['p50_ms']:.2f} ms  p99 {cell['latency']['p99_ms']:.2f} ms  "
                  f"batch {cell['mean_batch_size']:.1f}", file=sys.stderr)
            cells.append(cell)
    finally:
        server.stop()
    return {"repository_options": opts.__dict__, "cells": _median_cells(cells, "sequences", "requests_per_s"),
            "all_rounds": cells}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="ONNX model [default: the bundled char-LM, exported]")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=1200, help="decode requests per cell (about)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--max-batch-size", type=int, default=64, help="the server's max_batch_size")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over all concurrencies (interleaved); each cell reports its median round")
    ap.add_argument("--no-server", action="store_true", help="only the in-process pool")
    ap.add_argument("--out", help="result JSON [default: bench/results/serving_<date>.json]")
    args = ap.parse_args(argv)
    conc = [int(x) for x in args.concurrency.split(",")]
    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as td:
        tmp = Path(td)
        if args.model:
            model, source = Path(args.model), args.model
        else:
            from trellis_export.checkpoint import load_checkpoint
            from trellis_export.export import export_onnx

            ckpt = Path(__file__).resolve().parent.parent / "trellis_export" / "assets" / "charlm"
            model, source = tmp / "charlm.onnx", f"{ckpt} (bundled char-LM, exported here)"
            export_onnx(load_checkpoint(ckpt), model)
        pool_cells = []
        for n in [n for _ in range(args.rounds) for n in conc]:
            steps = max(40, math.ceil(args.requests / n))
            cell = bench_pool(model, n, steps, args.threads)
            print(f"pool    {n:>3} streams:   {cell['tokens_per_s']:>8.1f} tokens/s  step_many p50 "
                  f"{cell['step_many_latency']['p50_ms']:.2f} ms", file=sys.stderr)
            pool_cells.append(cell)
        validation = [bench_validation(model, n, args.threads) for n in (1, max(conc))]
        server = None if args.no_server else bench_server(model, conc, args.requests, args.threads,
                                                          args.max_batch_size, tmp, args.rounds)
        pool_cells = _median_cells(pool_cells, "streams", "tokens_per_s")
    by_pool = {c["streams"]: c for c in pool_cells}
    aims: dict[str, Any] = {}
    if 1 in by_pool and 64 in by_pool:
        r = by_pool[64]["tokens_per_s"] / by_pool[1]["tokens_per_s"]
        aims["pool_64_vs_1_tokens_per_s"] = {"ratio": round(r, 2), "aim": AIM_POOL_64_VS_1,
                                             "met": r >= AIM_POOL_64_VS_1}
    if server:
        by_srv = {c["sequences"]: c for c in server["cells"]}
        if 1 in by_srv and 16 in by_srv:
            r = by_srv[16]["requests_per_s"] / by_srv[1]["requests_per_s"]
            aims["server_16_vs_1_requests_per_s"] = {"ratio": round(r, 2), "aim": AIM_SERVER_16_VS_1,
                                                     "met": r >= AIM_SERVER_16_VS_1}
        if 1 in by_srv and 1 in by_pool:
            srv, pl = by_srv[1], by_pool[1]
            aims["server_overhead_1_sequence"] = {
                "client_p50_ms": srv["latency"]["p50_ms"],
                "server_success_ms_per_request": srv["server_split"]["success_ms_per_request"],
                "model_execute_ms_per_request": srv["server_split"]["compute_infer_ms_per_request"],
                "in_process_pool_step_p50_ms": pl["step_many_latency"]["p50_ms"]}
    result = {"benchmark": "serving", "model": source, "prompt_tokens": PROMPT, "ort_threads": args.threads,
              "machine": machine, "pool": pool_cells, "session_step_checks": validation,
              "server": server, "aims": aims,
              "note": "server clients: one asyncio loop (tritonclient.grpc.aio) in the benchmark process, "
                      "sharing the cores with tritonserver and its python-backend stub"}
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"serving_{time.strftime('%Y%m%d-%H%M%S')}.json")
    atomic_write_bytes(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    print(json.dumps(aims, indent=2), file=sys.stderr)
    print(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
