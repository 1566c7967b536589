"""``trellis-export engine [CKPT | MODEL.onnx] -o model.engine``: a TensorRT engine of a Trellis model,
with its sidecar (``model.engine.json``: fingerprint, config, state spec, profiles, build report)."""

from __future__ import annotations

import click


@click.command()
@click.argument("source", required=False, type=click.Path(path_type=str), metavar="[CKPT | MODEL.onnx]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Engine file to write (its sidecar <output>.json lands beside it).")
@click.option("--runtime", type=click.Choice(["tensorrt-rtx", "tensorrt"]), default=None,
              help="TensorRT flavour [default: tensorrt-rtx when importable (builds without a GPU), "
                   "else tensorrt].")
@click.option("--plugin/--no-plugin", default=False, show_default=True,
              help="Each TrellisMemory as the trellis::TrellisMemory plugin layer (Triton kernels compiled "
                   "ahead of time into the engine), or expanded from its standard-ops function body.")
@click.option("--batch", default="1..8", show_default=True, help="Batch range MIN..MAX or MIN..OPT..MAX.")
@click.option("--tokens", default="1..256", show_default=True,
              help="Tokens per call, MIN..MAX or MIN..OPT..MAX (the prefill profile; opt defaults to max).")
@click.option("--decode-profile/--no-decode-profile", default=True, show_default=True,
              help="Add a T = 1 profile (profile 0) for decode steps.")
@click.option("--compute-capability", "ccs", default=None,
              help="TensorRT-RTX targets, e.g. 8.0,8.6,8.9,12.0 [default: those four].")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="Activation dtype (memories and gates stay float32) [default: the model's; float32 "
                   "for a checkpoint].")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None,
              help="Builder optimization level (TensorRT's default when omitted).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Also write the build report as JSON here.")
def engine(source: str | None, output: str, runtime: str | None, plugin: bool, batch: str, tokens: str,
           decode_profile: bool, ccs: str | None, dtype: str | None, opt_level: int | None,
           json_path: str | None) -> None:
    """Build a TensorRT engine from a checkpoint (default: the bundled one) or an exported ONNX file."""
    from trellis_export.plugins_trt.engine import (
        EngineSettings,
        Range,
        build_engine,
        format_report,
        onnx_for_engine,
        parse_targets,
        resolve_targets,
        sidecar_path,
        write_engine,
    )
    from trellis_export.plugins_trt.runtimes import load_tensorrt

    from trellis_export.outputs import OutputSpec, claim_outputs

    settings = EngineSettings(runtime=runtime, plugin=plugin, batch=Range.parse(batch, "--batch"),
                              tokens=Range.parse(tokens, "--tokens", default_opt="max"),
                              decode_profile=decode_profile, compute_capabilities=parse_targets(ccs),
                              builder_optimization_level=opt_level)
    specs = [OutputSpec(output, "-o/--output", companions=(sidecar_path(output),))]
    if json_path:
        specs.append(OutputSpec(json_path, "--json", parents=True))
    claim_outputs(specs, [source])
    rt = load_tensorrt(runtime)
    resolve_targets(rt, settings)
    click.echo(f"building     {rt.name} {rt.version} engine "
               f"({'plugin' if plugin else 'function body'}) ...", err=True)
    src_model = onnx_for_engine(source, plugin=plugin, dtype=dtype)
    data, report = build_engine(src_model, settings, rt)
    write_engine(output, data, report, src_model, json_path)
    for line in format_report(report, output):
        click.echo(line)
    if json_path:
        click.echo(f"report       {json_path}")
