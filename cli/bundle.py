"""``trellis-export bundle [CKPT] -o DIR --target orin|thor|rtx|datacenter``: a deployment bundle, the one
directory a device needs to build the engine, check it against the float64 reference and stream."""

from __future__ import annotations

import click

from trellis_export.bundle.targets import TARGETS


@click.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=str), metavar="[CKPT]")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Bundle directory to write (replaced whole; written atomically).")
@click.option("--target", required=True, type=click.Choice(list(TARGETS)),
              help="Device: orin (Jetson Orin, sm_87), thor (Jetson Thor, sm_110), rtx (TensorRT for RTX), "
                   "datacenter (A100 / H100, enterprise TensorRT).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Activation dtype of the engine (memories and gates stay float32).")
@click.option("--batch", default="1..2..8", show_default=True, help="Engine batch range MIN..OPT..MAX.")
@click.option("--tokens", default="1..256", show_default=True,
              help="Tokens per call, MIN..MAX (the prefill profile; a T = 1 decode profile is added).")
@click.option("--stream-tokens", type=int, default=2048, show_default=True,
              help="Length of the reference stream the device check runs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the reference stream.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the bundle's check with ONNX Runtime here (and a TensorRT-RTX build of its ONNX when "
                   "TensorRT-RTX is installed); results go into manifest.json.")
@click.option("--force", is_flag=True, help="Replace an output directory trellis-export did not write.")
def bundle(checkpoint: str | None, output: str, target: str, dtype: str, batch: str, tokens: str,
           stream_tokens: int, seed: int, check: bool, force: bool) -> None:
    """Write a deployment bundle for a device (default checkpoint: the bundled one)."""
    from trellis_export.bundle.build import build_bundle

    manifest = build_bundle(checkpoint, output, target=target, dtype=dtype, batch=batch, tokens=tokens,
                            stream_tokens=stream_tokens, seed=seed, check=check, force=force,
                            echo=lambda m: click.echo(m, err=True))
    click.echo(f"wrote        {output} ({len(manifest['files']) + 1} files) for "
               f"{manifest['target']['description']}")
    for t in manifest["tested"]:
        click.echo(f"tested       {t['check']}: {t['result']}")
    click.echo(f"on device    ./build_engine.sh && python3 verify_engine.py && python3 run_stream.py "
               f"(see {output}/README.md)")
