"""``trellis-export``: the Click entry point. Each command lives in its own module of this package."""

from __future__ import annotations

import sys

import click

from trellis_export import __version__
from trellis_export.errors import TrellisExportError


class _Group(click.Group):
    """Turns project errors into one 'error: ...' line and exit code 1 (no traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except TrellisExportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trellis-export")
def main() -> None:
    """Export Trellis models (fixed-size learned KV memory) to ONNX / Triton / TensorRT and
    run them as stateful streams.

    Every command that takes a checkpoint uses the bundled default checkpoint when none is named.
    """


def _register() -> None:
    # One import per command module; each module defines a click command named like the module.
    from . import info
    main.add_command(info.info)
    from . import export
    main.add_command(export.export)
    from . import verify
    main.add_command(verify.verify)
    from . import train
    main.add_command(train.train)
    from . import bench
    main.add_command(bench.bench)
    from . import serve
    main.add_command(serve.triton_repo)
    main.add_command(serve.serve)
    main.add_command(serve.stream)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
