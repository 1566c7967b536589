"""``trellis-export export [CKPT] -o model.onnx``: the streaming step as ONNX with the
``trellis::TrellisMemory`` custom op (one node per layer) and its standard-ops function body."""

from __future__ import annotations

import click


def _size(path: str) -> int:
    import os

    total = os.path.getsize(path)
    data = path + ".data"
    return total + (os.path.getsize(data) if os.path.exists(data) else 0)


@click.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Output .onnx file (its directory must exist).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Activation dtype; memories are float32 either way.")
@click.option("--external-data", is_flag=True,
              help="Store the weights in <output>.data (automatic above 1.5 GiB).")
@click.option("--tensorrt-view", "trt_view", type=click.Path(path_type=str), default=None,
              help="Also write the graph without the local function (what TensorRT parses with the plugin).")
def export(checkpoint: str | None, output: str, dtype: str, external_data: bool,
           trt_view: str | None) -> None:
    """Export a checkpoint (default: the bundled one) to ONNX."""
    import onnx

    from trellis_export.checkpoint import load_checkpoint
    from trellis_export.export.onnx_export import (
        check_output_path,
        describe,
        export_onnx,
        save_tensorrt_view,
    )

    check_output_path(output)
    if trt_view is not None:
        check_output_path(trt_view)
    model = load_checkpoint(checkpoint)
    path = export_onnx(model, output, dtype=dtype, external_data=True if external_data else None)
    proto = onnx.load(str(path))
    info = describe(proto)
    ext = (path.parent / (path.name + ".data")).exists()
    click.echo(f"wrote        {path}" + (f" (+ {path.name}.data)" if ext else ""))
    click.echo(f"nodes        {info['nodes']} ({info['custom_nodes']} trellis::TrellisMemory, "
               f"function {', '.join(info['functions']) or 'none'})")
    click.echo(f"dtype        {dtype} activations, float32 memories")
    click.echo(f"size         {_size(str(path)):,} bytes")
    click.echo(f"fingerprint  {info['fingerprint']}")
    if trt_view is not None:
        view = save_tensorrt_view(proto, trt_view, external_data=ext)
        click.echo(f"tensorrt     {view} (no local functions; needs the trellis::TrellisMemory plugin)")
