"""Long-stream float32 drift of a checkpoint: float32 logits vs the SAME weights in float64.

    python bench/drift.py [--checkpoint DIR] [--tokens 16384] [--piece 256] [--window 256]
                          [--streams random,text] [--mode step|chunked] [--threads 1] [--json PATH]

The model is loaded twice (float32 as stored, and ``.double()`` as the reference) and both stream the
same ids through ``model.step`` in pieces of ``--piece`` tokens (batch 1), each threading its own state.
For every window of ``--window`` tokens it records the relative RMS ``||x - ref|| / ||ref||`` of the
window's logits (``trellis_export.metrics.rel_rms``) and the worst window so far. Streams: ``random``
(uniform ids, seeded) and ``text`` (the generated corpus, bytes mod vocab, as ``trellis-export verify``
streams it). The table goes to stdout; the JSON (machine description, settings, per-window drift and a
summary at 1k/2k/4k/8k/16k tokens) goes to ``--json`` or ``bench/results/drift_<fingerprint>_<time>.json``.
This measures the model's sensitivity to float32 rounding, not any runtime: no export is involved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trellis_export.bench.machine import describe_machine
from trellis_export.checkpoint import default_checkpoint_path, load_checkpoint
from trellis_export.fileio import atomic_write_bytes
from trellis_export.metrics import rel_rms
from trellis_export.verify import text_stream

STREAMS: tuple[str, ...] = ("random", "text")
#: Positions summarised in the JSON and the printed summary (when the stream reaches them).
MARKS: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
RESULTS = Path(__file__).resolve().parent / "results"


def stream_ids(kind: str, tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """``[1, tokens]`` int64 ids: uniform random (seeded) or the generated text corpus."""
    if kind == "random":
        return np.random.default_rng(seed).integers(0, vocab_size, size=(1, tokens), dtype=np.int64)
    if kind == "text":
        return text_stream(tokens, vocab_size, 1)
    raise ValueError(f"stream must be one of {', '.join(STREAMS)}; got {kind!r}")


@torch.no_grad()
def measure_drift(model: torch.nn.Module, ids: np.ndarray, *, piece: int = 256, window: int = 256,
                  mode: str = "step", stop_above: float | None = None) -> list[dict[str, Any]]:
    """Per-window drift rows ``{"end", "rel_rms", "worst_so_far", "max_abs_logit_ref"}``.

    ``model`` is the float32 model; its float64 twin is made here. ``window`` must be a multiple of
    ``piece`` or vice versa (windows are cut from the concatenated logits either way). Stops early
    (after the window) once a window's drift exceeds ``stop_above``.
    """
    if piece < 1 or window < 1:
        raise ValueError("piece and window must be >= 1")
    m32 = model.float().eval()
    m64 = _double_copy(model)
    x = torch.from_numpy(np.ascontiguousarray(ids))
    s32, s64 = m32.init_state(x.shape[0]), m64.init_state(x.shape[0])
    buf32: list[torch.Tensor] = []
    buf64: list[torch.Tensor] = []
    rows: list[dict[str, Any]] = []
    worst = 0.0
    done = 0
    T = x.shape[1]
    while done < T:
        n = min(piece, T - done)
        chunk = x[:, done:done + n]
        l32, s32 = m32.step(chunk, s32, mode=mode)
        l64, s64 = m64.step(chunk, s64, mode=mode)
        buf32.append(l32)
        buf64.append(l64)
        done += n
        have = sum(b.shape[1] for b in buf32)
        while have >= window or (done == T and have > 0):
            a32, a64 = torch.cat(buf32, 1), torch.cat(buf64, 1)
            w = min(window, have)
            err = rel_rms(a32[:, :w], a64[:, :w])
            if not np.isfinite(err):
                err = float("inf")
            worst = max(worst, err)
            end = done - have + w
            rows.append({"end": end, "rel_rms": err, "worst_so_far": worst,
                         "max_abs_logit_ref": float(a64[:, :w].abs().max())})
            buf32, buf64 = [a32[:, w:]], [a64[:, w:]]
            have -= w
            if stop_above is not None and err > stop_above:
                return rows
    return rows


def _double_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy
    twin = copy.deepcopy(model).double().eval()
    twin.memory_fn = model.memory_fn
    return twin


def summarize(rows: list[dict[str, Any]], marks: tuple[int, ...] = MARKS) -> dict[str, dict[str, float]]:
    """For each mark reached: the drift of the window ending at or before it, and the worst so far."""
    out: dict[str, dict[str, float]] = {}
    for mark in marks:
        upto = [r for r in rows if r["end"] <= mark]
        if not upto or rows[-1]["end"] < mark:
            continue
        last = upto[-1]
        out[str(mark)] = {"window": last["rel_rms"], "worst_so_far": last["worst_so_far"]}
    return out


def run(checkpoint: str | None, tokens: int, piece: int, window: int, streams: list[str], mode: str,
        seed: int, stop_above: float | None) -> dict[str, Any]:
    model = load_checkpoint(checkpoint)
    path = str(getattr(model, "checkpoint_path", checkpoint or default_checkpoint_path()))
    result: dict[str, Any] = {
        "what": "float32 vs float64 logits of the same weights, streamed through model.step",
        "checkpoint": path, "fingerprint": getattr(model, "fingerprint", None),
        "config": model.config.to_dict(), "tokens": tokens, "piece": piece, "window": window,
        "mode": mode, "seed": seed, "stop_above": stop_above, "machine": describe_machine(),
        "streams": {}}
    for kind in streams:
        t0 = time.perf_counter()
        rows = measure_drift(model, stream_ids(kind, tokens, model.config.vocab_size, seed),
                             piece=piece, window=window, mode=mode, stop_above=stop_above)
        result["streams"][kind] = {"rows": rows, "summary": summarize(rows),
                                   "seconds": round(time.perf_counter() - t0, 2),
                                   "stopped_early": rows[-1]["end"] < tokens}
    return result


def format_table(result: dict[str, Any]) -> list[str]:
    lines = [f"{result['checkpoint']} ({(result['fingerprint'] or '')[:12]}), mode {result['mode']}, "
             f"pieces of {result['piece']}, windows of {result['window']}"]
    marks = [m for m in MARKS if m <= result["tokens"]]
    lines.append("stream  " + "".join(f"{m:>20}" for m in marks) + "   (window / worst so far)")
    for kind, s in result["streams"].items():
        cells = []
        for m in marks:
            v = s["summary"].get(str(m))
            cells.append(f"{v['window']:.1e} / {v['worst_so_far']:.1e}" if v else "-")
        lines.append(f"{kind:<8}" + "".join(f"{c:>20}" for c in cells))
        if s["stopped_early"]:
            last = s["rows"][-1]
            lines.append(f"{'':<8}stopped at {last['end']} tokens: window drift {last['rel_rms']:.1e} "
                         f"> --stop-above {result['stop_above']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled one)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--piece", type=int, default=256, help="tokens per model.step call")
    p.add_argument("--window", type=int, default=256, help="tokens per drift window")
    p.add_argument("--streams", default="random,text", help="comma list of: " + ", ".join(STREAMS))
    p.add_argument("--mode", choices=("step", "chunked"), default="step", help="memory mode of the calls")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-id stream")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-above", type=float, default=None,
                   help="stop a stream after a window whose drift exceeds this (saves time in trials)")
    p.add_argument("--json", default=None, help="where to write the JSON result")
    a = p.parse_args(argv)
    streams = [s.strip() for s in a.streams.split(",") if s.strip()]
    bad = [s for s in streams if s not in STREAMS]
    if bad or not streams:
        p.error(f"--streams: expected a comma list of {', '.join(STREAMS)}; got {a.streams!r}")
    for name in ("tokens", "piece", "window", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    torch.set_num_threads(a.threads)
    from trellis_export.checkpoint import default_checkpoint_path
    from trellis_export.errors import TrellisExportError
    from trellis_export.outputs import OutputSpec, claim_outputs, signals_raise
    try:
        # the output is checked before the run (minutes); the default one lands in bench/results
        probe = a.json if a.json else RESULTS / "drift_probe.json"
        claim_outputs([OutputSpec(probe, "--json", parents=True)],
                      inputs=[a.checkpoint or default_checkpoint_path()])
        with signals_raise():
            result = run(a.checkpoint, a.tokens, a.piece, a.window, streams, a.mode, a.seed, a.stop_above)
            for line in format_table(result):
                print(line)
            out = Path(a.json) if a.json else RESULTS / (
                f"drift_{(result['fingerprint'] or 'model')[:12]}_{time.strftime('%Y%m%d-%H%M%S')}.json")
            atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
    except TrellisExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
