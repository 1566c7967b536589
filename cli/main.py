"""``trellis-export``: the Click entry point. Each command lives in its own module of this package."""

from __future__ import annotations

import sys
from typing import Any

import click

from trellis_export import __version__
from trellis_export.errors import TrellisExportError


class _Group(click.Group):
    """One exit-code convention for every command (docs/files_and_errors.md):

    * 0: success; 1: an error (bad input file, state or value, a failed write, a FAILED verify, a bench
      cell that errored): one ``error: ...`` line on stderr, no traceback;
    * 2: a usage error (unknown flag, bad flag value, missing argument): one ``error: ...`` line naming
      the flag, plus where to find the help;
    * 130 / 143: interrupted by SIGINT / SIGTERM; temporary files are removed, outputs keep their
      previous content.
    """

    def invoke(self, ctx: click.Context) -> Any:
        from trellis_export.outputs import signals_raise

        try:
            with signals_raise():
                return super().invoke(ctx)
        except TrellisExportError as exc:
            _fail(str(exc), 1)
        except OSError as exc:     # a write or read the command did not wrap: still one line
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}", 1)

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        from trellis_export.outputs import Terminated, remove_temporaries

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx is not None else "trellis-export"
            hint = f" (see '{cmd} --help')"
            _fail(exc.format_message().replace("\n", " ") + hint, exc.exit_code)
        except click.exceptions.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except (KeyboardInterrupt, click.exceptions.Abort):
            remove_temporaries()
            _fail("interrupted (SIGINT); temporary files removed, existing outputs unchanged", 130)
        except Terminated as exc:
            remove_temporaries()
            _fail(f"terminated ({exc.signame}); temporary files removed, existing outputs unchanged",
                  128 + exc.signum)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


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
    from . import engine
    main.add_command(engine.engine)
    from . import bundle
    main.add_command(bundle.bundle)
    from . import serve
    main.add_command(serve.triton_repo)
    main.add_command(serve.serve)
    main.add_command(serve.stream)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
