"""``trellis-export verify [CKPT] MODEL.onnx``: stream an exported model against the float64 reference."""

from __future__ import annotations

import sys
import time
from typing import Any

import click


def _pieces(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        pieces = [int(p) for p in value.replace(" ", "").split(",") if p]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,7,13,300; "
                                 f"got {value!r}") from None
    if not pieces or min(pieces) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    return pieces


class _Progress:
    """A progress bar that starts when streaming starts (not while the sessions load) and shows an ETA
    only once 2 % of the tokens and 2 s have passed (a first estimate from one warm-up call said hours)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.bar: Any = None
        self.done = 0
        self.t0 = 0.0

    def __enter__(self) -> _Progress:
        return self

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.t0 = time.perf_counter()
            self.bar = click.progressbar(length=self.total, label="verify", file=sys.stderr, show_pos=True,
                                         show_eta=False)
            self.bar.__enter__()
        self.done += n
        if not self.bar.show_eta and self.done >= 0.02 * self.total and time.perf_counter() - self.t0 > 2:
            self.bar.show_eta = True
            self.bar.avg = []      # estimate from here on, not from the warm-up calls
        self.bar.update(n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="[CKPT] MODEL.onnx|MODEL.engine")
@click.option("--tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens per stream.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str),
              help="Write the full JSON report here (atomically).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows per stream (different tokens per row).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random-token stream.")
@click.option("--piece-sizes", callback=_pieces, default=None,
              help="Comma-separated sizes of the calls the streams are cut into, cycled "
                   "[default: 1,7,13,300,2,64].")
@click.option("--tolerance", type=float, default=None,
              help="Relative-RMS tolerance for every check (default: TRELLIS_SPEC.md section 8: 1e-5 up "
                   "to position 64, 1e-4 beyond, 5e-3 for float16 models).")
@click.option("--interval", type=click.IntRange(min=1), default=None,
              help="Compare every state tensor every N tokens [default: max(256, tokens/16)].")
@click.option("--text", "text_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Text file for the text stream (bytes mod vocab) [default: generated corpus].")
@click.option("--providers", default=None,
              help="Comma-separated onnxruntime execution providers [default: CUDA if present, CPU].")
@click.option("--allow-fallback", is_flag=True,
              help="Run on the available providers when a requested one is missing (default: error).")
@click.option("--resync", is_flag=True,
              help="After each check, continue the ONNX model from the reference state: every interval "
                   "is judged on its own (for models whose recurrence amplifies float32 rounding).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Intra-op threads of onnxruntime and torch (0: library defaults).")
@click.option("--quiet", is_flag=True, help="Only the PASSED / FAILED line.")
def verify(paths: tuple[str, ...], tokens: int, json_path: str | None, batch: int, seed: int,
           piece_sizes: list[int] | None, tolerance: float | None, interval: int | None,
           text_path: str | None, providers: str | None, allow_fallback: bool, resync: bool, threads: int,
           quiet: bool) -> None:
    """Compare MODEL.onnx (onnxruntime) or MODEL.engine (TensorRT, GPU) with the float64 PyTorch
    reference of CKPT (default: the bundled checkpoint) on streamed random and text tokens. Exit code 0
    when PASSED, 1 when FAILED."""
    from trellis_export.verify import DEFAULT_PIECES, format_report, write_report
    from trellis_export.verify import verify as run_verify

    if len(paths) == 1:
        ckpt, model = None, paths[0]
    elif len(paths) == 2:
        ckpt, model = paths
    else:
        raise click.UsageError(f"expected [CKPT] MODEL.onnx, got {len(paths)} paths")
    from trellis_export.checkpoint import default_checkpoint_path
    from trellis_export.outputs import OutputSpec, claim_outputs

    if json_path:   # checked before minutes of streaming; never one of the inputs
        claim_outputs([OutputSpec(json_path, "--json", parents=True)],
                      inputs=[ckpt if ckpt is not None else default_checkpoint_path(), model,
                              model + ".data", text_path])
    pieces = piece_sizes or list(DEFAULT_PIECES)
    with _Progress(tokens * 2, enabled=sys.stderr.isatty() and not quiet) as progress:
        report = run_verify(ckpt, model, tokens=tokens, batch=batch, seed=seed, piece_sizes=pieces,
                            tolerance=tolerance, interval=interval, text=text_path,
                            providers=[p for p in providers.split(",") if p] if providers else None,
                            allow_fallback=allow_fallback, resync=resync, threads=threads or None,
                            progress=progress.update)
    if json_path:
        write_report(report, json_path)
    lines = format_report(report)
    for line in (lines[-1:] if quiet else lines):
        click.echo(line)
    if report["status"] != "PASSED":
        sys.exit(1)
