"""``trellis-export info [CKPT]``: config, parameter count, state bytes per stream, fingerprint."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info(checkpoint: str | None, as_json: bool) -> None:
    """Describe a checkpoint (default: the bundled one)."""
    from trellis_export.checkpoint import load_checkpoint
    from trellis_export.state import state_bytes_per_stream, state_spec

    model = load_checkpoint(checkpoint)
    cfg = model.config
    report = {
        "checkpoint": model.checkpoint_path,
        "fingerprint": model.fingerprint,
        "parameters": model.num_parameters(),
        "state_bytes_per_stream": state_bytes_per_stream(cfg),
        "state_tensors": len(state_spec(cfg)),
        "config": cfg.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    click.echo(f"checkpoint   {report['checkpoint']}")
    click.echo(f"fingerprint  {report['fingerprint']}")
    click.echo(f"parameters   {report['parameters']:,}")
    click.echo(f"state/stream {report['state_bytes_per_stream']:,} bytes "
               f"({report['state_tensors']} tensors, constant in context length)")
    click.echo("config")
    for k, v in cfg.to_dict().items():
        click.echo(f"  {k:<15} {v}")
