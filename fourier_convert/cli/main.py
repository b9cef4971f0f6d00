"""Entry point of ``fourier-convert``: the command group and the one table of exit codes.

Library errors become one line on stderr (``error: <where>: <what>; <fix>``) and an exit code from
:data:`EXIT_CODES`; tracebacks appear only with ``--debug`` (or ``FOURIER_CONVERT_DEBUG=1``).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from typing import Any

import click

from fourier_convert import __version__
from fourier_convert.cli.entry import INTERRUPTED_LINE
from fourier_convert.errors import (
    AdapterError,
    BaseMismatchError,
    ExportError,
    FourierConvertError,
    InputFileError,
    OutputError,
    ResourceError,
    UsageError,
    VerificationError,
    printable,
)

#: Library exception -> exit code. The first matching class wins (subclasses first).
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (UsageError, 2),
    (InputFileError, 1),
    (AdapterError, 1),
    (BaseMismatchError, 1),
    (VerificationError, 1),
    (ExportError, 1),
    (OutputError, 1),
    (ResourceError, 1),
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
    """Runs subcommands under the error table, and prints click's own usage errors as one line."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # no command at all: the help, as click prints it
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            click.echo(f"error: {usage_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {printable(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(INTERRUPTED_LINE, err=True)
            sys.exit(INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)

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
            click.echo(INTERRUPTED_LINE, err=True)
            ctx.exit(INTERRUPTED)
        except BrokenPipeError:
            # the reader went away (`| head`): stop quietly, like other Unix tools
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(141)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if out_of_memory(exc):
                click.echo(f"error: {out_of_memory_line(first)}", err=True)
                ctx.exit(1)
            click.echo(
                f"error: unexpected {type(exc).__name__}: {first} (run again with --debug for the traceback "
                "and report it)",
                err=True,
            )
            ctx.exit(1)


def usage_line(exc: click.UsageError) -> str:
    """click's usage error as the one line the CLI prints after ``error: ``, with where to look for help.

    Example:
        >>> usage_line(click.UsageError("Missing option '--out'."))
        "Missing option '--out'; see 'fourier-convert --help'"
    """
    command = exc.ctx.command_path if exc.ctx is not None else "fourier-convert"
    return f"{printable(exc.format_message()).rstrip('.')}; see '{command} --help'"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: Python's or numpy's ``MemoryError``, or torch's allocator error on
    the CPU (``can't allocate memory``) or a GPU (``out of memory``)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def out_of_memory_line(first: str) -> str:
    """The one line for an allocation failure whose message starts with ``first``: the size asked for, when the
    message gives it, and what to do.

    Example:
        >>> out_of_memory_line("can't allocate memory: you tried to allocate 7200000000 bytes.")[:48]
        'out of memory: an allocation of 7.2 GB failed; n'
    """
    from fourier_convert.host import fmt_bytes  # here: the host module needs numpy, which start-up avoids

    size = re.search(r"allocate (\d+) bytes", first)
    asked = re.search(r"allocate ([\d.]+ ?[KMGTP]i?B)", first)
    if size is not None:
        what = f"an allocation of {fmt_bytes(int(size.group(1)))} failed"
    elif asked is not None:
        what = f"an allocation of {asked.group(1)} failed"
    else:
        what = printable(first[:200]) or "an allocation failed"
    fix = "free memory or use a machine with more (run again with --debug to see where)"
    return f"out of memory: {what}; nothing was published; {fix}"


@click.group("fourier-convert", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fourier-convert")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Merge and convert PEFT FourierFT adapters."""


def _register() -> None:
    from fourier_convert.cli.from_lora_cmd import from_lora_cmd
    from fourier_convert.cli.inspect_cmd import inspect_cmd
    from fourier_convert.cli.merge_cmd import merge_cmd
    from fourier_convert.cli.to_lora_cmd import to_lora_cmd
    from fourier_convert.cli.to_onnx_cmd import to_onnx_cmd

    cli.add_command(merge_cmd)
    cli.add_command(inspect_cmd)
    cli.add_command(to_lora_cmd)
    cli.add_command(to_onnx_cmd)
    cli.add_command(from_lora_cmd)


_register()


def _keep_freed_memory() -> None:
    """Ask glibc to serve large blocks from the heap and keep freed memory.

    The merge allocates and frees tensors of the same few sizes for every layer; by default glibc hands
    each large block back to the kernel, so every new tensor pays page faults for all its pages (measured
    here: 2-7x slower elementwise ops on 16 MB tensors). Done only in the CLI process, never on import.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP take the Ctrl-C path: clean up, publish nothing


def debug_first(args: list[str]) -> list[str]:
    """Accept ``--debug`` anywhere on the command line: it belongs to the command group, so it is moved first.

    Example:
        >>> debug_first(["merge", "--out", "x", "--debug"])
        ['--debug', 'merge', '--out', 'x']
    """
    if "--debug" in args[1:]:
        args = ["--debug", *(a for a in args if a != "--debug")]
    return args


def main() -> None:
    """Console-script entry point."""
    _keep_freed_memory()
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup it stays ignored
        signal.signal(signal.SIGHUP, _terminate)  # the terminal closed: clean up as for Ctrl-C
    # Shells start background jobs with SIGINT ignored and Python then keeps it ignored; a merge must still
    # clean up on an interrupt, so take it explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            cli(args=debug_first(sys.argv[1:]), prog_name="fourier-convert")
        except KeyboardInterrupt:  # outside a command (while parsing the command line): nothing was started
            print(INTERRUPTED_LINE, file=sys.stderr, flush=True)
            raise SystemExit(INTERRUPTED) from None
    except SystemExit as exc:
        if threading.active_count() > 1 or _cuda_started():
            # After an error or an interrupt, a background thread (skeleton import, permutation draws) may still
            # be inside torch; letting the interpreter finalise under it aborts the process. And tearing down a
            # CUDA context and torch took 0.5 s on the H200 host, after the output was published. Output is
            # already published or cleaned up by then, so leave at once with the intended code.
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
