"""``fourier-convert merge``."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fourier_convert.cli import options
from fourier_convert.errors import OutputError, UsageError, printable
from fourier_convert.report import MergeReport

if TYPE_CHECKING:  # the command modules import torch-heavy code only when a command runs (fast --help)
    from fourier_convert.merging.specs import AdapterSpec


def specs_from_options(
    adapters: tuple[str, ...], subfolders: tuple[str, ...], weights: tuple[float, ...]
) -> list[AdapterSpec]:
    """``--adapter`` / ``--adapter-subfolder`` / ``--weight`` as adapter specs (counts checked)."""
    from fourier_convert.merging.specs import AdapterSpec

    n = len(adapters)
    if len(subfolders) not in (0, 1, n):
        raise UsageError(
            "--adapter-subfolder",
            f"given {len(subfolders)} time(s) for {n} adapter(s)",
            "give it once or once per --adapter",
        )
    if len(weights) not in (0, n):
        raise UsageError(
            "--weight", f"given {len(weights)} time(s) for {n} adapter(s)", "give one --weight per --adapter"
        )
    specs = []
    for i, path in enumerate(adapters):
        sub = subfolders[0] if len(subfolders) == 1 else (subfolders[i] if subfolders else None)
        specs.append(AdapterSpec(path, sub, weights[i] if weights else 1.0))
    return specs


def check_report_path(path: Path | None, inputs: Sequence[str | Path | None] = (), out: Path | None = None) -> None:
    """Refuse, before any work is done, a --json path the report could not be written to after success: its
    folder missing or not taking new files (``/proc``), a folder, a FIFO or device, a link loop, or a path that is
    or lies in one of the command's local inputs (it would overwrite an input file) or in ``out`` (the output folder
    is published whole).

    Raises:
        UsageError: Any of these.
    """
    if path is None:
        return
    if not path.parent.is_dir():
        raise UsageError(
            "--json",
            f"cannot write {path}: folder {path.parent} does not exist",
            "create it or choose another --json path",
        )
    try:
        target = path.resolve()
    except (RuntimeError, OSError):  # RuntimeError from Python 3.11's resolve() on a loop
        raise UsageError("--json", f"{path} is a symbolic link loop", "choose another --json path") from None
    if target.is_dir():
        raise UsageError("--json", f"{path} is a folder", f"give a file path, such as {path / 'report.json'}")
    if target.exists() and not target.is_file():
        raise UsageError("--json", f"{path} is not a regular file (a FIFO or a device)", "give a file path")
    if out is not None and (target == out.resolve() or target.is_relative_to(out.resolve())):
        raise UsageError("--json", f"{path} lies in --out {out}", "write the report outside the output folder")
    try:  # the report is written beside its target and renamed over it: that folder must take a new file
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=target.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            "--json",
            f"cannot write {path}: no new file can be made in {target.parent} ({exc.strerror})",
            "choose another --json path",
        ) from None
    for spec in inputs:
        if not spec:
            continue
        local = Path(str(spec))
        if not local.exists() and ":" in str(spec):  # PATH:NAME
            local = Path(str(spec).rsplit(":", 1)[0])
        if local.exists() and (target == local.resolve() or target.is_relative_to(local.resolve())):
            raise UsageError("--json", f"{path} lies in the input {spec}", "write the report outside the inputs")


def print_conversion(
    out: Path, warnings: list[str], lines: list[str], doc: dict[str, Any], *, quiet: bool, json_path: Path | None
) -> None:
    """What the adapter conversions print: warnings on stderr, the report's lines, where it was written, and
    the JSON report when asked for."""
    for w in warnings:
        say(f"warning: {w}", err=True)
    if not quiet:
        for block in lines:
            for line in block.split("\n"):  # tables come joined; their cells are escaped where they are built
                say(line)
        say(f"wrote {out}")
    if json_path is not None:
        write_report(json_path, doc)


def write_report(path: Path, doc: dict[str, Any]) -> None:
    """Write a command's JSON report (the path was checked by :func:`check_report_path` before any work).

    Raises:
        OutputError: It cannot be written (the command's output is already published; the message says so).
    """
    data = (json.dumps(doc, indent=2, default=str) + "\n").encode()
    temp = None
    try:  # a new file beside the target, renamed over it: never a half-written report, never a write into a FIFO
        target = path.resolve()
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temp, target)
    except OSError as exc:
        if temp is not None and os.path.lexists(temp):
            os.unlink(temp)
        raise OutputError(
            "--json",
            f"cannot write the report to {path} ({exc.strerror}); the output itself was published",
            "give a writable --json path next time (a merge's output also holds its report, in fourier_convert.json)",
        ) from None


def say(line: str, *, err: bool = False) -> None:
    """Print one line, control characters escaped: names from files (a newline, a terminal escape) can neither
    split it nor reach the terminal.

    Example:
        >>> say("warning: model.layers.0.q\\nproj")
        warning: model.layers.0.q\\nproj
    """
    click.echo(printable(line), err=err)


def print_report(report: MergeReport, quiet: bool) -> None:
    for w in report.warnings:
        say(f"warning: {w}", err=True)
    for f in report.fallbacks:
        say(f"warning: {f}", err=True)
    if quiet:
        return
    if report.dry_run:
        say("dry run: nothing written; tensors that would change:")
        for row in report.changes:
            shape = "x".join(str(d) for d in row["shape"])
            size = f"{row['bytes']:,} B"
            say(f"  {row['action']:<8} {row['name']:<56} {row['dtype']:>5} {shape:>11} {size:>14}  {row['how']}")
    for line in report.notes:
        say(f"note: {line}")
    for line in report.summary():
        say(line)


@click.command("merge")
@click.option("--base", required=True, help="Base model folder or hub id (safetensors weights).")
@click.option(
    "--adapter",
    "adapters",
    required=True,
    multiple=True,
    help="FourierFT adapter folder, PATH:NAME for a named adapter, or hub id. Repeat to apply several in order.",
)
@click.option(
    "--adapter-subfolder",
    "subfolders",
    multiple=True,
    help="Named adapter inside --adapter (once, or once per --adapter).",
)
@click.option(
    "--weight", "weights", multiple=True, type=float, help="Multiplier of each adapter's delta (one per --adapter)."
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (published atomically).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for the deltas (default: up to 4 for the CPU merge, all cores but one with torch).",
)
@click.option(
    "--precision",
    type=click.Choice(["float32", "float64"]),
    default="float64",
    show_default=True,
    help="Precision of delta reconstruction and addition: float64 rounds every merged element correctly; float32 "
    "is faster on some CPUs but can misround where base and delta nearly cancel.",
)
@click.option(
    "--dtype",
    default=None,
    help="Cast all floating tensors to float32, float16, bfloat16 or float64 (default: keep each).",
)
@click.option(
    "--max-shard-size", default=None, help="Re-shard the output (e.g. 2GB); default mirrors the base's shards."
)
@options.overwrite("Replace a non-empty --out once the new output is complete.")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; write nothing.")
@options.allow_pickle
@click.option("--revision", default=None, help="Hub revision of the base.")
@options.json_report
@options.quiet("No progress bar and no summary (warnings still go to stderr).")
def merge_cmd(
    base: str,
    adapters: tuple[str, ...],
    subfolders: tuple[str, ...],
    weights: tuple[float, ...],
    out: Path,
    device: str,
    threads: int | None,
    precision: str,
    dtype: str | None,
    max_shard_size: str | None,
    overwrite: bool,
    dry_run: bool,
    allow_pickle: bool,
    revision: str | None,
    json_path: Path | None,
    quiet: bool,
) -> None:
    """Merge FourierFT adapter(s) into a base model and write a Hugging Face model folder."""
    check_report_path(json_path, [base, *adapters], out)  # usage errors before the heavy imports below
    from fourier_convert.merging.folder import merge

    report = merge(
        base,
        specs_from_options(adapters, subfolders, weights),
        out,
        device=device,
        threads=threads,
        precision=precision,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        progress=sys.stderr.isatty() and not quiet,
        revision=revision,
    )
    print_report(report, quiet)
    if json_path is not None:
        write_report(json_path, report.to_dict())
