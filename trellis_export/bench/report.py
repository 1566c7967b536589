"""The bench report for people: a compact text table, a markdown table and a matplotlib figure."""

from __future__ import annotations

import os
from typing import Any

from .run import KV, TRELLIS, _human

_MARK = {"unavailable": "n/a", "skipped": "skip", "error": "err"}


def _row_label(cell: dict[str, Any]) -> str:
    return f"trellis m={cell['n_slots']}" if cell["model"] == TRELLIS else "kv-cache"


def _rows(report: dict[str, Any], phase: str) -> tuple[list[int], dict[tuple, dict[int, dict[str, Any]]]]:
    contexts = sorted({c["context"] for c in report["cells"]})
    rows: dict[tuple, dict[int, dict[str, Any]]] = {}
    for c in report["cells"]:
        if c["phase"] != phase or c["status"] == "unavailable":
            continue
        key = (c["backend"], c["batch"], c["model"] == KV, c["n_slots"] or 0)
        rows.setdefault(key, {})[c["context"]] = c
    return contexts, dict(sorted(rows.items()))


def format_table(report: dict[str, Any]) -> str:
    """p50 latency (ms) per model / backend / batch against context, state bytes, crossover, aims."""
    lines: list[str] = []
    for phase in report["settings"]["phases"]:
        contexts, rows = _rows(report, phase)
        if not rows:
            continue
        tokens = next(iter(next(iter(rows.values())).values()))["tokens"]
        lines.append(f"{phase} (T = {tokens}): p50 latency in ms at context")
        head = f"  {'model':<14}{'backend':<8}{'B':>3}  " + "".join(f"{_human(n):>9}" for n in contexts)
        lines.append(head + "     tok/s@max")
        for (_backend, _batch, _kv, _m), by_ctx in rows.items():
            first = next(iter(by_ctx.values()))
            vals = []
            for n in contexts:
                c = by_ctx.get(n)
                if c is None:
                    vals.append(f"{'-':>9}")
                elif c["status"] == "ok":
                    vals.append(f"{c['latency']['p50_ms']:>9.3f}")
                else:
                    vals.append(f"{_MARK.get(c['status'], c['status']):>9}")
            last = by_ctx.get(contexts[-1])
            tps = f"{last['tokens_per_s']:>14,.0f}" if last and last["status"] == "ok" else f"{'-':>14}"
            lines.append(f"  {_row_label(first):<14}{first['backend']:<8}{first['batch']:>3}  "
                         + "".join(vals) + tps)
        lines.append("")
    # state bytes
    models = report["models"]
    lines.append("state bytes per stream")
    for t in models["trellis"]:
        lines.append(f"  trellis m={t['n_slots']:<5} {t['state_bytes_per_stream']:>14,}  (any context)")
    if models.get("kv_cache"):
        sb = models["kv_cache"]["state_bytes_per_stream"]
        lines.append("  kv-cache       " + ", ".join(f"{_human(int(n))}: {b:,}" for n, b in sb.items()))
    # problems
    notes: dict[tuple[str, str, str], list[str]] = {}
    for c in report["cells"]:
        if c["status"] != "ok":
            where = f"{_row_label(c)} B={c['batch']} {_human(c['context'])} {c['phase']}"
            notes.setdefault((c["backend"], c["status"], c["reason"]), []).append(where)
    if notes:
        lines.append("")
        lines.append("not measured")
        for (backend, status, reason), places in sorted(notes.items()):
            which = "; ".join(places) if len(places) <= 3 else f"{len(places)} cells"
            lines.append(f"  {backend:<7}{status} ({which}): {reason}")
    if report["crossover"]:
        lines.append("")
        lines.append("crossover (smallest context where Trellis decode p50 < KV-cache decode p50)")
        for x in report["crossover"]:
            lines.append(f"  {x['backend']:<7}B={x['batch']:<3} m={x['n_slots']:<5} {x['text']}")
    lines.append("")
    lines.append("aims")
    for a in report["aims"]:
        method = f"; {a['method']}" if a.get("method") else ""
        lines.append(f"  [{a['status']}] {a['aim']} ({a['target']}{method})")
        for r in a["results"]:
            if "error" in r:
                what = f"error: {r['error']}"
            elif "ratio" in r:
                seq = r.get("sequential_ratio")
                what = f"ratio {r['ratio']:.3f}" + (f" (cells timed apart: {seq:.3f})" if seq else "")
            else:
                what = f"speedup {r['speedup']:.2f}x"
            lines.append(f"      {r['backend']:<7}B={r['batch']:<3} m={r['n_slots']:<5} {what} "
                         f"{'met' if r['met'] else 'NOT met'}")
    return "\n".join(lines)


def markdown_table(report: dict[str, Any], batch: int | None = None) -> str:
    """Decode p50 (ms) against context as a markdown table, with the state bytes per stream."""
    contexts, rows = _rows(report, "decode")
    batches = sorted({k[1] for k in rows})
    batch = batch if batch is not None else (batches[0] if batches else 1)
    out = ["| model | backend | " + " | ".join(f"{_human(n)}" for n in contexts) + " | state bytes/stream |",
           "|---|---|" + "---:|" * len(contexts) + "---:|"]
    kv_bytes = (report["models"].get("kv_cache") or {}).get("state_bytes_per_stream", {})
    for (backend, b, is_kv, m), by_ctx in rows.items():
        if b != batch:
            continue
        cells = []
        for n in contexts:
            c = by_ctx.get(n)
            cells.append(f"{c['latency']['p50_ms']:.3f}" if c and c["status"] == "ok"
                         else (_MARK.get(c["status"], "-") if c else "-"))
        if is_kv:
            sb = " / ".join(f"{kv_bytes[str(n)] / 1024**2:.1f} MiB" for n in contexts if str(n) in kv_bytes)
        else:
            sb = f"{next(iter(by_ctx.values()))['state_bytes_per_stream'] / 1024:.1f} KiB"
        label = "KV-cache" if is_kv else f"Trellis m={m}"
        out.append(f"| {label} | {backend} | " + " | ".join(cells) + f" | {sb} |")
    return "\n".join(out)


def plot_report(report: dict[str, Any], path: str | os.PathLike[str], batch: int | None = None) -> None:
    """Three panels: decode p50 against memory size, against context length, and state bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_write_bytes

    dec = [c for c in report["cells"] if c["phase"] == "decode" and c["status"] == "ok"]
    batches = sorted({c["batch"] for c in dec}) or [1]
    batch = batch if batch is not None else batches[0]
    dec = [c for c in dec if c["batch"] == batch]
    backends = sorted({c["backend"] for c in dec})
    styles = {b: s for b, s in zip(backends, ("-", "--", ":", "-."))}
    contexts = sorted({c["context"] for c in dec})
    slots = sorted({c["n_slots"] for c in dec if c["model"] == TRELLIS})
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    cmap = plt.get_cmap("viridis")

    # (a) latency vs memory size, one line per (backend, context); KV baseline as flat markers
    for backend in backends:
        for ci, n in enumerate(contexts):
            pts = sorted((c["n_slots"], c["latency"]["p50_ms"]) for c in dec
                         if c["model"] == TRELLIS and c["backend"] == backend and c["context"] == n)
            color = cmap(ci / max(len(contexts) - 1, 1))
            if pts:
                ax[0].plot(*zip(*pts), styles[backend], marker="o", color=color,
                           label=f"Trellis {backend} ctx {_human(n)}")
            kv = [c["latency"]["p50_ms"] for c in dec
                  if c["model"] == KV and c["backend"] == backend and c["context"] == n]
            if kv and slots:
                ax[0].hlines(kv[0], slots[0], slots[-1], colors=[color], linestyles=styles[backend],
                             linewidth=0.8, alpha=0.6)
                ax[0].annotate(f"KV {backend} {_human(n)}", (slots[-1], kv[0]), fontsize=6, color=color)
    ax[0].set(xscale="log", yscale="log", xlabel="memory slots per head (m)", ylabel="decode p50 (ms)",
              title=f"decode latency vs memory size (B={batch})\nthin lines: KV-cache baseline")
    from matplotlib.ticker import NullFormatter

    if slots:
        ax[0].set_xticks(slots, [str(s) for s in slots])
        ax[0].xaxis.set_minor_formatter(NullFormatter())
    ax[0].legend(fontsize=6)

    # (b) latency vs context, Trellis per memory size and the KV baseline
    for backend in backends:
        for si, m in enumerate(slots):
            pts = sorted((c["context"], c["latency"]["p50_ms"]) for c in dec
                         if c["model"] == TRELLIS and c["backend"] == backend and c["n_slots"] == m)
            if pts:
                ax[1].plot(*zip(*pts), styles[backend], marker="o", color=cmap(si / max(len(slots), 1)),
                           label=f"Trellis m={m} {backend}")
        pts = sorted((c["context"], c["latency"]["p50_ms"]) for c in dec
                     if c["model"] == KV and c["backend"] == backend)
        if pts:
            ax[1].plot(*zip(*pts), styles[backend], marker="s", color="crimson", linewidth=2,
                       label=f"KV-cache {backend}")
    ax[1].set(xscale="log", yscale="log", xlabel="context (tokens already in the state)",
              ylabel="decode p50 (ms)", title=f"decode latency vs context (B={batch})")
    ax[1].legend(fontsize=6)

    # (c) state bytes per stream
    models = report["models"]
    xs = contexts or sorted(int(n) for n in (models.get("kv_cache") or {}).get("state_bytes_per_stream", {}))
    for si, t in enumerate(models["trellis"]):
        ax[2].plot(xs, [t["state_bytes_per_stream"]] * len(xs), marker="o",
                   color=cmap(si / max(len(models["trellis"]), 1)), label=f"Trellis m={t['n_slots']}")
    if models.get("kv_cache"):
        sb = models["kv_cache"]["state_bytes_per_stream"]
        pts = sorted((int(n), b) for n, b in sb.items())
        ax[2].plot(*zip(*pts), marker="s", color="crimson", linewidth=2, label="KV-cache")
    ax[2].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="bytes per stream",
              title="state memory per stream")
    ax[2].legend(fontsize=6)
    for a in ax[1:]:
        if xs:
            a.set_xticks(xs, [_human(n) for n in xs])
            a.xaxis.set_minor_formatter(NullFormatter())
    for a in ax:
        a.grid(True, which="both", alpha=0.3)
    cpu = report["machine"].get("cpu_model") or "?"
    fig.suptitle(f"trellis-export bench on {cpu}, threads={report['settings']['threads']} "
                 f"({report['machine']['date_utc']})", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
