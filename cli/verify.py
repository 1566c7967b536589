"""``trellis-export verify [CKPT] MODEL.onnx``: stream an exported model against the float64 reference."""

from __future__ import annotations

import sys

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


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="[CKPT] MODEL.onnx")
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
@click.option("--resync", is_flag=True,
              help="After each check, continue the ONNX model from the reference state: every interval "
                   "is judged on its own (for models whose recurrence amplifies float32 rounding).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Intra-op threads of onnxruntime and torch (0: library defaults).")
@click.option("--quiet", is_flag=True, help="Only the PASSED / FAILED line.")
def verify(paths: tuple[str, ...], tokens: int, json_path: str | None, batch: int, seed: int,
           piece_sizes: list[int] | None, tolerance: float | None, interval: int | None,
           text_path: str | None, providers: str | None, resync: bool, threads: int,
           quiet: bool) -> None:
    """Compare MODEL.onnx (onnxruntime) with the float64 PyTorch reference of CKPT (default: the bundled
    checkpoint) on streamed random and text tokens. Exit code 0 when PASSED, 1 when FAILED."""
    from trellis_export.verify import DEFAULT_PIECES, format_report, write_report
    from trellis_export.verify import verify as run_verify

    if len(paths) == 1:
        ckpt, model = None, paths[0]
    elif len(paths) == 2:
        ckpt, model = paths
    else:
        raise click.UsageError(f"expected [CKPT] MODEL.onnx, got {len(paths)} paths")
    pieces = piece_sizes or list(DEFAULT_PIECES)
    total = tokens * 2
    with click.progressbar(length=total, label="verify", file=sys.stderr,
                           show_pos=True, show_eta=True, hidden=not sys.stderr.isatty()) as bar:
        report = run_verify(ckpt, model, tokens=tokens, batch=batch, seed=seed, piece_sizes=pieces,
                            tolerance=tolerance, interval=interval, text=text_path,
                            providers=[p for p in providers.split(",") if p] if providers else None,
                            resync=resync, threads=threads or None, progress=bar.update)
    if json_path:
        write_report(report, json_path)
    lines = format_report(report)
    for line in (lines[-1:] if quiet else lines):
        click.echo(line)
    if report["status"] != "PASSED":
        sys.exit(1)
