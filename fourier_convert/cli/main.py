"""Entry point of ``fourier-convert``: the command group and the one table of exit codes.

Library errors become one line on stderr (``error: <where>: <what>; <fix>``) and an exit code from
:data:`EXIT_CODES`; tracebacks appear only with ``--debug`` (or ``FOURIER_CONVERT_DEBUG=1``).
"""

from __future__ import annotations

import os
from typing import Any

import click

from fourier_convert import __version__
from fourier_convert.errors import (
    AdapterError,
    BaseMismatchError,
    FourierConvertError,
    InputFileError,
    OutputError,
    UsageError,
    VerificationError,
)

#: Library exception -> exit code. The first matching class wins (subclasses first).
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (UsageError, 2),
    (InputFileError, 1),
    (AdapterError, 1),
    (BaseMismatchError, 1),
    (VerificationError, 1),
    (OutputError, 1),
    (FourierConvertError, 1),
]
INTERRUPTED = 130


def exit_code_for(exc: BaseException) -> int:
    """Exit code for a library exception (1 when none matches)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


class _Group(click.Group):
    """Runs subcommands under the error table."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("FOURIER_CONVERT_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except FourierConvertError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exit_code_for(exc))
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted: nothing was published and the inputs were not touched", err=True)
            ctx.exit(INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(
                f"error: unexpected {type(exc).__name__}: {first} (run again with --debug for the traceback "
                "and report it)",
                err=True,
            )
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fourier-convert")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Merge and convert PEFT FourierFT adapters."""


def _register() -> None:
    from fourier_convert.cli.inspect_cmd import inspect_cmd
    from fourier_convert.cli.merge_cmd import merge_cmd

    cli.add_command(merge_cmd)
    cli.add_command(inspect_cmd)


_register()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fourier-convert")


if __name__ == "__main__":  # pragma: no cover
    main()
