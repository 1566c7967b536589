"""``trellis-export verify``: an exported ONNX model against the float64 PyTorch reference, streamed.

Both runtimes consume the same token streams (seeded random tokens, and a text stream mapped into the
vocabulary), fed in pieces of varied sizes (1, primes, large chunks), through the streaming interface
of :mod:`trellis_export.runtime`. Logits are compared on every token and every state tensor at the end
of each interval. The report is Polygraphy-like: per tensor max abs / max rel error, relative RMS over
all checked values, the minimum uniform tolerance that would have passed (the worst relative RMS of
one check), the count of NaN / Inf values (any makes the tensor FAILED), the error against stream
position (drift), top-1 agreement, and PASSED / FAILED against TRELLIS_SPEC.md section 8:

* relative RMS <= 1e-5 for checks at stream positions <= 64, <= 1e-4 beyond (float32 models);
* <= 5e-3 on the logits of float16 models (their state errors are reported, not judged);
  ``tolerance=`` overrides all of these and judges every tensor.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TrellisExportError
from .fileio import atomic_write_bytes
from .metrics import error_stats
from .spec import SHORT_STREAM, TOL_FLOAT16, TOL_LONG, TOL_SHORT, spec_tolerance  # noqa: F401 (re-exported)

DEFAULT_PIECES: tuple[int, ...] = (1, 7, 13, 300, 2, 64)
DEFAULT_TOKENS = 4096
#: The reference consumes each interval in calls of this many tokens (chunked memory mode): any split
#: of a stream gives the same logits, so it need not follow the runtime's piece sizes.
REFERENCE_PIECE = 512

_FALLBACK_TEXT = (
    "A Trellis layer keeps a fixed number of memory slots per head. Each token writes to the memory "
    "with one step of online gradient descent on a small regression loss, and a forget gate decays "
    "what was written before. The state therefore does not grow with the length of the stream: a "
    "server can hold thousands of streams, save any of them to disk, and resume it later.\n")


class VerifyError(TrellisExportError):
    """verify cannot run: mismatched checkpoint and model, bad flag values."""


def text_stream(tokens: int, vocab_size: int, batch: int, path: str | os.PathLike[str] | None = None
                ) -> np.ndarray:
    """``[batch, tokens]`` ids from a text (bytes mod vocab); row b starts ``b * 997`` bytes later."""
    if path is not None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise VerifyError(f"{path}: cannot read the --text file ({exc.strerror})") from None
        if not data:
            raise VerifyError(f"{path}: the --text file is empty")
    else:
        data = _default_text(tokens + 997 * batch).encode("ascii", "replace")
    need = tokens + 997 * (batch - 1)
    reps = -(-need // len(data))
    buf = np.frombuffer(data * reps, dtype=np.uint8).astype(np.int64) % vocab_size
    return np.stack([buf[997 * b: 997 * b + tokens] for b in range(batch)])


def _default_text(chars: int) -> str:
    try:   # the generated training corpus when the data module is available
        from .data import generate_corpus
    except ImportError:  # pragma: no cover - depends on the installed package
        return _FALLBACK_TEXT
    return generate_corpus(max(chars, 1), seed=1234)


def _boundaries(tokens: int, interval: int) -> list[int]:
    marks = {tokens}
    if tokens > SHORT_STREAM:
        marks.add(SHORT_STREAM)
    marks.update(range(interval, tokens, interval))
    return sorted(marks)


def aggregate_rel_rms(sum_sq_diff: float, sum_sq_ref: float) -> float:
    """Relative RMS over all values of all checks (inf when any value was not finite)."""
    if not math.isfinite(sum_sq_diff):
        return math.inf
    return math.sqrt(sum_sq_diff / sum_sq_ref) if sum_sq_ref > 0 else math.sqrt(sum_sq_diff)


class _TensorRecord:
    """Worst-case statistics of one tensor over the checks of a stream."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.worst_rel_rms = 0.0
        self.worst_position = 0
        self.checks = 0
        self.failed = 0
        self.first_failure: int | None = None
        self.finite = True
        self.nonfinite = 0
        self.sum_sq_diff = 0.0
        self.sum_sq_ref = 0.0
        self.judged = False

    def add(self, stats: dict[str, float], position: int, tol: float | None) -> bool:
        """Record one check; ``tol=None`` reports without judging (float16 states)."""
        self.checks += 1
        self.max_abs = max(self.max_abs, stats["max_abs"])
        self.max_rel = max(self.max_rel, stats["max_rel"])
        finite = bool(stats["finite"]) and bool(stats.get("reference_finite", True))
        self.finite = self.finite and finite
        self.nonfinite += int(stats.get("nonfinite", 0))
        self.sum_sq_diff += stats.get("sum_sq_diff", 0.0)
        self.sum_sq_ref += stats.get("sum_sq_ref", 0.0)
        r = stats["rel_rms"]
        if not math.isfinite(r):
            r = math.inf
        if r >= self.worst_rel_rms:
            self.worst_rel_rms, self.worst_position = r, position
        if tol is None:
            return True
        self.judged = True
        ok = finite and r <= tol
        if not ok:
            self.failed += 1
            if self.first_failure is None:
                self.first_failure = position
        return ok

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel,
                "rel_rms": aggregate_rel_rms(self.sum_sq_diff, self.sum_sq_ref),
                "worst_rel_rms": self.worst_rel_rms, "worst_position": self.worst_position,
                "min_tolerance": self.worst_rel_rms, "sum_sq_diff": self.sum_sq_diff,
                "sum_sq_ref": self.sum_sq_ref,
                "checks": self.checks, "failed_checks": self.failed, "first_failure": self.first_failure,
                "finite": self.finite, "nonfinite": self.nonfinite,
                "status": ("FAILED" if self.failed else "PASSED") if self.judged else "REPORTED"}


def _run_stream(ids: np.ndarray, ref: Any, rt: Any, pieces: Sequence[int], interval: int,
                tolerance: float | None, progress: Callable[[int], None] | None,
                timing: dict[str, float], resync: bool = False) -> dict[str, Any]:
    batch, tokens = ids.shape
    records: dict[str, _TensorRecord] = {"logits": _TensorRecord()}
    records.update({t.name: _TensorRecord() for t in rt.state_spec})
    drift: list[dict[str, Any]] = []
    ref_state, rt_state = ref.init_state(batch), rt.init_state(batch)
    top1_agree = 0
    pos, i = 0, 0
    calls = 0
    buf_rt: list[np.ndarray] = []
    buf_ref: list[np.ndarray] = []
    for mark in _boundaries(tokens, interval):
        start = pos
        while pos < mark:                      # the runtime: pieces of varied sizes
            n = min(pieces[i % len(pieces)], mark - pos)
            i += 1
            t1 = time.perf_counter()
            lo, rt_state = rt.step(ids[:, pos:pos + n], rt_state)
            timing["runtime_s"] += time.perf_counter() - t1
            calls += 1
            buf_rt.append(lo)
            pos += n
            if progress is not None:
                progress(n)
        for r0 in range(start, mark, REFERENCE_PIECE):   # the reference: long chunked calls
            t0 = time.perf_counter()
            lr, ref_state = ref.step(ids[:, r0:min(r0 + REFERENCE_PIECE, mark)], ref_state)
            timing["reference_s"] += time.perf_counter() - t0
            buf_ref.append(lr)
        tol = tolerance if tolerance is not None else spec_tolerance(pos, rt.activation_dtype)
        # spec section 8 judges float16 models on the logits only; their states are reported
        state_tol = None if tolerance is None and rt.activation_dtype == "float16" else tol
        lo_i, lr_i = np.concatenate(buf_rt, axis=1), np.concatenate(buf_ref, axis=1)
        buf_rt, buf_ref = [], []
        stats = error_stats(lo_i, lr_i)
        ok = records["logits"].add(stats, pos, tol)
        worst_state, worst_state_err = "", 0.0
        for t in rt.state_spec:
            s = error_stats(rt_state[t.name], ref_state[t.name])
            ok = records[t.name].add(s, pos, state_tol) and ok
            if not (s["rel_rms"] <= worst_state_err):
                worst_state, worst_state_err = t.name, s["rel_rms"]
        # a row with NaN / Inf logits never agrees (argmax of NaN is index 0 on both sides)
        same = ((lo_i.argmax(-1) == lr_i.argmax(-1)) & np.isfinite(lo_i).all(-1)
                & np.isfinite(lr_i).all(-1))
        agree = float(same.mean())
        top1_agree += int(same.sum())
        if resync:   # continue from the reference state: each interval is checked on its own
            rt_state = {t.name: ref_state[t.name].astype(rt.state_dtype(t)) for t in rt.state_spec}
        drift.append({"position": pos, "tolerance": tol, "logits_rel_rms": stats["rel_rms"],
                      "logits_max_abs": stats["max_abs"], "top1_agreement": agree,
                      "state_rel_rms_max": worst_state_err, "worst_state": worst_state,
                      "status": "PASSED" if ok else "FAILED"})
    tensors = {k: r.to_dict() for k, r in records.items()}
    passed = all(r.failed == 0 for r in records.values())
    return {"tokens": tokens, "batch": batch, "calls": calls,
            "top1_agreement": top1_agree / float(batch * tokens), "tensors": tensors, "drift": drift,
            "status": "PASSED" if passed else "FAILED"}


def is_engine(path: str | os.PathLike[str]) -> bool:
    """A TensorRT engine of ``trellis-export engine`` (it has a sidecar), not an ONNX model."""
    from .plugins_trt.engine import sidecar_path

    return sidecar_path(path).is_file() or str(path).endswith((".engine", ".plan"))


def _cut(n: int, most: int) -> list[int]:
    return [most] * (n // most) + ([n % most] if n % most else [])


def verify(checkpoint: str | os.PathLike[str] | None, model_path: str | os.PathLike[str], *,
           tokens: int = DEFAULT_TOKENS, batch: int = 1, seed: int = 0,
           piece_sizes: Sequence[int] = DEFAULT_PIECES, tolerance: float | None = None,
           interval: int | None = None, text: str | os.PathLike[str] | None = None,
           providers: Sequence[str] | None = None, allow_fallback: bool = False,
           streams: Sequence[str] = ("random", "text"),
           resync: bool = False, threads: int | None = 1,
           progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Stream the float64 reference of ``checkpoint`` and the ONNX model side by side; return the report.

    ``report["status"]`` is ``"PASSED"`` or ``"FAILED"``. Raises :class:`VerifyError` (or a session /
    checkpoint error) when the two cannot be compared at all. ``resync=True`` restarts the runtime from
    the reference state (cast to its dtypes) after every check, so that each interval measures the
    runtime's own error rather than rounding amplified by a chaotic recurrence (see DEVIATIONS.md).
    ``threads``: intra-op threads of both runtimes (None: library defaults). One thread is the default:
    on small shared machines multi-threaded torch calls can stall for seconds.
    """
    from .runtime import open_session

    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise VerifyError(f"--tokens must be an integer >= 1, got {tokens!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise VerifyError(f"--batch must be an integer >= 1, got {batch!r}")
    pieces = [int(p) for p in piece_sizes]
    if not pieces or min(pieces) < 1:
        raise VerifyError(f"--piece-sizes must be integers >= 1, got {list(piece_sizes)!r}")
    if tolerance is not None and not (tolerance > 0 and math.isfinite(tolerance)):
        raise VerifyError(f"--tolerance must be a positive number, got {tolerance!r}")
    if interval is None:
        interval = max(256, -(-tokens // 16))
    if interval < 1:
        raise VerifyError(f"--interval must be >= 1, got {interval!r}")
    unknown = [s for s in streams if s not in ("random", "text")]
    if unknown or not streams:
        raise VerifyError(f"streams must be a non-empty subset of random, text; got {list(streams)!r}")

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise VerifyError(f"--threads must be an integer >= 1, got {threads!r}")
    if is_engine(model_path):
        if providers:
            raise VerifyError("--providers applies to ONNX models; a TensorRT engine runs on TensorRT")
        rt = open_session("trt", engine_path=model_path)
        # the engine's profiles bound the call sizes: longer pieces are cut to its token range
        max_tokens = int(getattr(rt, "max_tokens"))  # noqa: B009 - a TrtSession attribute
        pieces = [q for p in pieces for q in _cut(p, max_tokens)]
    else:
        rt = open_session("ort", model_path=model_path, providers=providers, threads=threads,
                          allow_fallback=allow_fallback)
    ref = open_session("torch", checkpoint=checkpoint, dtype="float64", threads=threads)
    if ref.fingerprint != rt.fingerprint:
        ck = checkpoint if checkpoint is not None else "the bundled default checkpoint"
        raise VerifyError(f"{model_path}: was exported from another model (fingerprint "
                          f"{rt.fingerprint[:12]}), not from {ck} (fingerprint {ref.fingerprint[:12]})")
    if ref.config != rt.config:
        raise VerifyError(f"{model_path}: its metadata config differs from the checkpoint's config")
    # NaN / Inf in a state is what verify measures and reports as FAILED (NaN-aware statistics), so the
    # sessions' own refusal of non-finite states is off here
    rt.check_finite = ref.check_finite = False

    vocab = rt.config.vocab_size
    rng = np.random.default_rng(seed)
    inputs = {"random": rng.integers(0, vocab, size=(batch, tokens), dtype=np.int64),
              "text": text_stream(tokens, vocab, batch, text)}
    timing = {"reference_s": 0.0, "runtime_s": 0.0}
    t0 = time.perf_counter()
    results = {s: _run_stream(inputs[s], ref, rt, pieces, interval, tolerance, progress, timing, resync)
               for s in streams}
    timing["total_s"] = time.perf_counter() - t0
    # worst case per tensor over all streams
    summary: dict[str, dict[str, Any]] = {}
    for res in results.values():
        for name, rec in res["tensors"].items():
            cur = summary.get(name)
            if cur is None:
                summary[name] = dict(rec)
                continue
            for key in ("max_abs", "max_rel", "checks", "failed_checks", "nonfinite", "sum_sq_diff",
                        "sum_sq_ref"):
                cur[key] = max(cur[key], rec[key]) if key.startswith("max") else cur[key] + rec[key]
            cur["rel_rms"] = aggregate_rel_rms(cur["sum_sq_diff"], cur["sum_sq_ref"])
            if rec["worst_rel_rms"] > cur["worst_rel_rms"]:
                cur["worst_rel_rms"] = cur["min_tolerance"] = rec["worst_rel_rms"]
                cur["worst_position"] = rec["worst_position"]
            cur["finite"] = cur["finite"] and rec["finite"]
            if cur["status"] != "REPORTED":
                cur["status"] = "PASSED" if cur["failed_checks"] == 0 else "FAILED"
            if cur["first_failure"] is None:
                cur["first_failure"] = rec["first_failure"]
    passed = all(r["status"] == "PASSED" for r in results.values())
    return {
        "status": "PASSED" if passed else "FAILED",
        "checkpoint": str(checkpoint) if checkpoint is not None else "bundled default",
        "model": str(model_path),
        "fingerprint": rt.fingerprint,
        "activation_dtype": rt.activation_dtype,
        "providers": rt.providers,
        "providers_requested": getattr(rt, "providers_requested", rt.providers),
        "backend": rt.backend,
        "tokens": tokens, "batch": batch, "seed": seed, "piece_sizes": pieces, "interval": interval,
        "resync": resync, "threads": threads,
        "tolerance": ({"override": tolerance} if tolerance is not None else
                      {"rule": "TRELLIS_SPEC.md section 8: relative RMS per tensor per check",
                       "float32_position_le_64": TOL_SHORT, "float32_longer": TOL_LONG,
                       "float16": TOL_FLOAT16}),
        "reference": f"PyTorch float64, chunked memory mode, calls of <= {REFERENCE_PIECE} tokens",
        "timing": timing,
        "machine": _machine(),
        "top1_agreement": min(r["top1_agreement"] for r in results.values()),
        "tensors": summary,
        "streams": results,
    }


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())


def format_report(report: dict[str, Any]) -> list[str]:
    """Polygraphy-style text lines of a verify report."""
    lines = [f"[I] model {report['model']}  vs  float64 reference of {report['checkpoint']}",
             f"[I] fingerprint {report['fingerprint'][:16]}  providers {', '.join(report['providers'])}"
             f"  activations {report['activation_dtype']}",
             f"[I] {report['tokens']} tokens x {report['batch']} rows per stream, pieces "
             f"{','.join(str(p) for p in report['piece_sizes'])}, checks every {report['interval']} tokens"
             + (" (runtime restarted from the reference state after each check)" if report.get("resync")
                else "")]
    for sname, res in report["streams"].items():
        lines.append(f"[I] stream '{sname}': {res['calls']} calls, top-1 agreement "
                     f"{100 * res['top1_agreement']:.2f}%  -> {res['status']}")
        lines.append(f"    {'tensor':<20} {'max_abs':>10} {'max_rel':>10} {'rel_rms':>10} {'min_tol':>10} "
                     f"{'checks':>7}  status")
        for name, r in res["tensors"].items():
            bad = "" if r["finite"] else f"  (non-finite: {r.get('nonfinite', '?')} values)"
            lines.append(f"    {name:<20} {r['max_abs']:10.3e} {r['max_rel']:10.3e} {r['rel_rms']:10.3e} "
                         f"{r['min_tolerance']:10.3e} {r['checks']:7d}  {r['status']}{bad}")
        lines.append(f"    drift: {'position':>9} {'tol':>8} {'logits':>10} {'worst state':>12}  top-1")
        for d in res["drift"]:
            lines.append(f"           {d['position']:9d} {d['tolerance']:8.0e} {d['logits_rel_rms']:10.3e} "
                         f"{d['state_rel_rms_max']:12.3e}  {100 * d['top1_agreement']:6.2f}%"
                         f"{'' if d['status'] == 'PASSED' else '  FAILED'}")
    t = report["timing"]
    lines.append(f"[I] time {t['total_s']:.1f} s (reference {t['reference_s']:.1f} s, onnxruntime "
                 f"{t['runtime_s']:.1f} s)")
    lines.append(report["status"])
    return lines


def _machine() -> dict[str, Any]:
    """Where the timings in the report were taken (the bench's machine description)."""
    from .bench.machine import describe_machine
    return describe_machine()
