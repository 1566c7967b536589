"""``trellis-export bench [CKPT | MODEL.onnx]``: latency per memory size against a KV-cache Transformer."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click

from trellis_export.bench import BACKENDS as BACKEND_NAMES
from trellis_export.bench import DEFAULT_BACKENDS
from trellis_export.bench.parse import (
    Amount,
    parse_amount,
    parse_seconds,
    parse_size_list,
    split_choices,
)


class SizeListType(click.ParamType):
    """Click type of ``--slots`` / ``--context`` / ``--batch``: a comma list of sizes."""

    name = "LIST"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        try:
            return parse_size_list(value, self.minimum)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class AmountType(click.ParamType):
    """Click type of ``--warmup``: seconds or iterations."""

    name = "SECONDS|Nit"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Amount):
            return value
        try:
            return parse_amount(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SecondsType(click.ParamType):
    """Click type of ``--duration``: seconds."""

    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return parse_seconds(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)



class _RecordArgs(click.Command):
    """Keeps the raw argument list, so the JSON records the exact command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["bench.raw_args"] = list(args)
        return super().parse_args(ctx, args)


def _backends(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    try:
        return split_choices(value or DEFAULT_BACKENDS, BACKEND_NAMES)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command(cls=_RecordArgs)
@click.argument("model", required=False, type=click.Path(exists=True, path_type=str))
@click.option("--backend", "backends", multiple=True, callback=_backends, metavar="NAME[,NAME]",
              help="torch | ort | triton | trt; repeatable or a comma list [default: torch,ort]. "
                   "Backends that cannot run here are reported as unavailable, with the reason.")
@click.option("--slots", type=SizeListType(), default=None, metavar="LIST",
              help="Memory sizes (n_slots) of the random-weight models [default: 16,32,64,128,256]. "
                   "A model file fixes its own n_slots.")
@click.option("--context", "contexts", type=SizeListType(), default="1k,8k,64k", show_default=True,
              metavar="LIST", help="Stream positions the state is at (1k = 1024), built synthetically.")
@click.option("--batch", "batches", type=SizeListType(), default="1,8", show_default=True, metavar="LIST",
              help="Batch sizes (streams per call).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write the full results (cells, machine, settings, crossover, aims) to this JSON file.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write a PNG: decode latency vs memory size and vs context, and state bytes.")
@click.option("--warmup", type=AmountType(), default="0.5", show_default=True,
              help="Warm-up per cell: seconds (0.5, 200ms) or iterations (10it).")
@click.option("--duration", type=SecondsType(), default="2", show_default=True,
              help="Minimum measuring time per cell, seconds.")
@click.option("--iterations", type=click.IntRange(min=1), default=10, show_default=True,
              help="Minimum timed calls per cell (runs until both this and --duration are reached).")
@click.option("--prefill-len", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens per prefill call.")
@click.option("--phase", "phases", type=click.Choice(["decode", "prefill", "both"]), default="both",
              show_default=True, help="Time decode (T = 1), prefill (T = --prefill-len) or both.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch.set_num_threads and ORT intra_op_num_threads (inter-op 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, states and ids.")
@click.option("--max-memory", "max_memory_gb", type=click.FloatRange(min=0, min_open=True), default=8.0,
              show_default=True, help="Skip (and report) baseline cells estimated to need more GiB.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=str),
              default=None, help="Config JSON of the random-weight models (default: the bundled width); "
                                 "--slots replaces its n_slots.")
@click.option("--no-baseline", is_flag=True, help="Time the Trellis models only.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Keep the exported ONNX models here and reuse them (default: a temporary directory). "
                   "Created with a .trellis-export marker; an existing one must hold that marker.")
@click.option("--force", is_flag=True, help="Use a --work-dir that trellis-export did not make.")
@click.pass_context
def bench(ctx: click.Context, model: str | None, backends: list[str], slots: list[int] | None,
          contexts: list[int], batches: list[int], json_out: str | None, plot_out: str | None,
          warmup, duration: float, iterations: int, prefill_len: int, phases: str, threads: int,
          seed: int, max_memory_gb: float, config_path: str | None, no_baseline: bool,
          work_dir: str | None, force: bool) -> None:
    """Decode and prefill latency of Trellis models per memory size against a KV-cache Transformer of
    the same width and depth, at several context lengths.

    Without MODEL it times random-weight models of the bundled checkpoint's config (TrellisConfig()
    defaults while there is none), one per --slots value. States at each context are synthetic
    (random memories / a random KV cache of N tokens, position = N): see the JSON's context_method.

    Exit code 1 when any requested cell (or the interleaved flatness measurement) ended in an error, after
    the table and the files are written; unavailable backends and skipped cells are not errors.
    """
    from trellis_export.bench.report import format_table, plot_report
    from trellis_export.bench.run import BenchSettings, run_bench, write_report
    from trellis_export.outputs import OutputSpec, claim_outputs

    specs = [OutputSpec(p, flag, parents=True)
             for flag, p in (("--json", json_out), ("--plot", plot_out)) if p]
    if work_dir is not None:
        from trellis_export.bench.run import is_work_file
        specs.append(OutputSpec(work_dir, "--work-dir", kind="workdir", owns=is_work_file))
    claim_outputs(specs, inputs=[model, config_path], force=force)   # before minutes of timing
    if plot_out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.BadParameter("matplotlib is not installed (pip install trellis-export[plot])",
                                     ctx=ctx, param_hint="'--plot'") from None
    from trellis_export.config import TrellisConfig

    config = None
    if config_path is not None:
        if model is not None:
            raise click.BadParameter("give either MODEL or --config, not both (a model file has its "
                                     "own config)", ctx=ctx, param_hint="'--config'")
        config = TrellisConfig.load(config_path)
    if slots is None and model is None:
        slots = [16, 32, 64, 128, 256]
    raw = ctx.meta.get("bench.raw_args", [])
    command = " ".join(["trellis-export", "bench", *(shlex.quote(a) for a in raw)])
    settings = BenchSettings(
        source=model, backends=backends, slots=slots, contexts=contexts, batches=batches, warmup=warmup,
        duration=duration, iterations=iterations, prefill_len=prefill_len,
        phases=["decode", "prefill"] if phases == "both" else [phases], threads=threads, seed=seed,
        max_memory_gb=max_memory_gb, work_dir=work_dir, force=force, baseline=not no_baseline,
        command=command,
        config_override=config, config_source=config_path)
    report = run_bench(settings, log=lambda s: click.echo(s, err=True))
    if json_out:
        write_report(report, json_out)
    if plot_out:
        plot_report(report, plot_out)
    click.echo(format_table(report))
    if json_out:
        click.echo(f"\nwrote {json_out}")
    if plot_out:
        click.echo(f"wrote {plot_out}")
    sys.stdout.flush()
    failed = [c for c in report["cells"] if c["status"] == "error"]
    failed_aims = [r for a in report["aims"] for r in a["results"] if "error" in r]
    if failed or failed_aims:
        from trellis_export.errors import TrellisExportError

        first = failed[0]["reason"] if failed else failed_aims[0]["error"]
        raise TrellisExportError(f"{len(failed)} of {len(report['cells'])} cells and {len(failed_aims)} "
                                 f"interleaved measurements failed (first: {first})"
                                 + ("; see the JSON report" if json_out else ""))
