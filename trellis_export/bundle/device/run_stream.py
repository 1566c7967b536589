#!/usr/bin/env python3
"""Minimal streaming demo: a prompt in (one prefill call), greedy tokens out (one decode step each),
with the latency of every step.

    python3 run_stream.py --ids 3,17,42 --tokens 32          # on the engine (model.engine)
    python3 run_stream.py --text "hello" --runtime ort       # prompt bytes mod the vocabulary

The state stays on the device between calls (TensorRT) and is constant in size however long the
stream runs. Needs what verify_engine.py needs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trellis_bundle import BundleError, fail, open_bundle, open_runner, zero_state  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description="Stream greedy tokens from a Trellis engine.")
    p.add_argument("engine", nargs="?", type=Path, help="engine file [default: the bundle's model.engine]")
    p.add_argument("--runtime", choices=("trt", "ort"), default="trt")
    p.add_argument("--bundle", type=Path, default=here)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ids", help="prompt token ids, comma-separated")
    src.add_argument("--text", help="prompt text (its bytes mod the vocabulary size)")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate [default: 32]")
    args = p.parse_args(argv)
    try:
        manifest = open_bundle(args.bundle)
        vocab = int(manifest["model"]["config"]["vocab_size"])
        if args.ids:
            try:
                prompt = [int(x) for x in args.ids.split(",") if x.strip()]
            except ValueError:
                raise BundleError(f"--ids expects comma-separated integers, got {args.ids!r}") from None
        else:
            prompt = [b % vocab for b in (args.text or "Trellis").encode()]
        bad = [i for i in prompt if not 0 <= i < vocab]
        if not prompt or bad:
            raise BundleError(f"the prompt needs 1 or more ids in 0..{vocab - 1} (got {bad or 'none'})")
        if args.tokens < 1:
            raise BundleError(f"--tokens must be >= 1, got {args.tokens}")
        max_prefill = max(int(pr["tokens"]["max"]) for pr in manifest["engine"]["profiles"])
        if args.runtime == "trt" and len(prompt) > max_prefill:
            raise BundleError(f"the prompt has {len(prompt)} tokens; the engine's prefill takes "
                              f"<= {max_prefill}")
        runner = open_runner(args.runtime, args.bundle, manifest, engine=args.engine)
        runner.set_state(zero_state(manifest, 1))
        t0 = time.perf_counter()
        logits = runner.step(np.asarray([prompt], dtype=np.int64))
        print(f"prefill {len(prompt)} tokens: {1e3 * (time.perf_counter() - t0):.2f} ms")
        lat = []
        out = []
        for _ in range(args.tokens):
            nxt = int(np.argmax(logits[0, -1]))
            out.append(nxt)
            t1 = time.perf_counter()
            logits = runner.step(np.asarray([[nxt]], dtype=np.int64))
            lat.append(1e3 * (time.perf_counter() - t1))
            print(f"token {len(out):4d}: {nxt:6d}   {lat[-1]:7.2f} ms", flush=True)
    except BundleError as exc:
        fail(str(exc))
    print(f"{len(out)} tokens, decode median {float(np.median(lat)):.2f} ms, p90 "
          f"{float(np.percentile(lat, 90)):.2f} ms ({runner.name} {runner.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
