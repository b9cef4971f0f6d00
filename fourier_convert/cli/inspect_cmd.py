"""``fourier-convert inspect``."""

from __future__ import annotations

from pathlib import Path

import click

from fourier_convert.cli import options
from fourier_convert.cli.merge_cmd import check_report_path, say, write_report


@click.command("inspect")
@click.argument("adapter")
@click.option("--base", default=None, help="Base model folder or hub id: adds shapes, delta norms and energy.")
@click.option("--adapter-subfolder", "subfolder", default=None, help="Named adapter inside ADAPTER.")
@options.allow_pickle
@options.json_report
@options.quiet("Print nothing (warnings and errors still go to stderr; --json is still written).")
def inspect_cmd(
    adapter: str, base: str | None, subfolder: str | None, allow_pickle: bool, json_path: Path | None, quiet: bool
) -> None:
    """Describe a FourierFT adapter (and, with --base, what it does to the base)."""
    from fourier_convert.inspect import inspect_adapter

    check_report_path(json_path, [adapter, base])
    report = inspect_adapter(adapter, base=base, subfolder=subfolder, allow_pickle=allow_pickle)
    for line in [] if quiet else report.lines():
        say(line)
    for w in report.warnings if quiet else []:
        say(f"warning: {w}", err=True)
    if json_path is not None:
        write_report(json_path, report.to_dict())
