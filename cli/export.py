"""``trellis-export export [CKPT] -o model.onnx``: the streaming step as ONNX with the
``trellis::TrellisMemory`` custom op (one node per layer) and its standard-ops function body."""

from __future__ import annotations

import click


def _size(path: str, external: bool) -> int:
    import os

    total = os.path.getsize(path)
    data = path + ".data"
    return total + (os.path.getsize(data) if external and os.path.exists(data) else 0)


@click.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Output .onnx file (its directory must exist; written as binary protobuf whatever "
                   "the suffix).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Activation dtype; memories are float32 either way.")
@click.option("--external-data", is_flag=True,
              help="Store the weights in <output>.data (automatic above 1.5 GiB).")
@click.option("--tensorrt-view", "trt_view", type=click.Path(path_type=str), default=None,
              help="Also write the graph without the local function (what TensorRT parses with the plugin).")
def export(checkpoint: str | None, output: str, dtype: str, external_data: bool,
           trt_view: str | None) -> None:
    """Export a checkpoint (default: the bundled one) to ONNX."""
    import time

    import onnx

    from trellis_export.checkpoint import default_checkpoint_path, load_checkpoint
    from trellis_export.export.onnx_export import (
        describe,
        export_model_proto,
        save_model_atomic,
        save_tensorrt_view,
        wants_external_data,
    )
    from trellis_export.outputs import OutputSpec, claim_outputs

    source = checkpoint if checkpoint is not None else default_checkpoint_path()
    # every output checked before the 10-20 s of export; the .data companions claimed as well
    specs = [OutputSpec(output, "-o", companions=(output + ".data",))]
    if trt_view is not None:
        specs.append(OutputSpec(trt_view, "--tensorrt-view", companions=(trt_view + ".data",)))
    claim_outputs(specs, inputs=[source])
    model = load_checkpoint(checkpoint)
    ext = wants_external_data(model, dtype, True if external_data else None)
    click.echo(f"exporting {model.checkpoint_path} ({model.num_parameters():,} parameters, {dtype}) with "
               "torch.onnx.export (dynamo); this takes 10-30 s ...", err=True)
    t0 = time.perf_counter()
    proto = export_model_proto(model, dtype=dtype)
    click.echo(f"  traced in {time.perf_counter() - t0:.1f} s; checking and writing ...", err=True)
    path = save_model_atomic(proto, output, external_data=ext)
    del proto
    proto = onnx.load(str(path), format="protobuf", load_external_data=False)
    info = describe(proto)
    click.echo(f"wrote        {path}" + (f" (+ {path.name}.data)" if ext else ""))
    click.echo(f"nodes        {info['nodes']} ({info['custom_nodes']} trellis::TrellisMemory, "
               f"function {', '.join(info['functions']) or 'none'})")
    click.echo(f"dtype        {dtype} activations, float32 memories")
    click.echo(f"size         {_size(str(path), ext):,} bytes")
    click.echo(f"fingerprint  {info['fingerprint']}")
    if trt_view is not None:
        full = onnx.load(str(path), format="protobuf")
        view = save_tensorrt_view(full, trt_view, external_data=ext)
        click.echo(f"tensorrt     {view} (no local functions; needs the trellis::TrellisMemory plugin)")
