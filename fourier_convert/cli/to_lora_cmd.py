"""``fourier-convert to-lora``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fourier_convert.cli.merge_cmd import check_report_path
from fourier_convert.errors import UsageError
from fourier_convert.io.writer import check_output_target
from fourier_convert.lora import to_lora


def parse_rank(text: str) -> float:
    """``8`` -> 8 (fixed rank); ``0.9`` -> 0.9 (energy share).

    Raises:
        UsageError: Neither.
    """
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            "--rank", f"cannot read {text!r}", "use an integer rank (8) or an energy share (0.9)"
        ) from None


@click.command("to-lora")
@click.option("--adapter", required=True, help="FourierFT adapter folder, PATH:NAME or hub id.")
@click.option(
    "--base", default=None, help="Base model (headers and config only); default: the adapter's base_model_name_or_path."
)
@click.option(
    "--rank", "rank_text", default="8", show_default=True, help="Integer rank, or an energy share in (0, 1] per layer."
)
@click.option("--max-rank", type=int, default=None, help="Cap on every layer's rank.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output LoRA adapter folder.")
@click.option("--adapter-subfolder", "subfolder", default=None, help="Named adapter inside --adapter.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--allow-pickle", is_flag=True, help="Load adapter_model.bin through torch's weights-only loader.")
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the report as JSON here."
)
@click.option("--quiet", "-q", is_flag=True, help="No table (warnings still go to stderr).")
def to_lora_cmd(
    adapter: str,
    base: str | None,
    rank_text: str,
    max_rank: int | None,
    out: Path,
    subfolder: str | None,
    overwrite: bool,
    allow_pickle: bool,
    json_path: Path | None,
    quiet: bool,
) -> None:
    """Approximate a FourierFT adapter by a PEFT LoRA adapter (exact spectral SVD, best rank-r per layer)."""
    check_report_path(json_path)
    check_output_target(out, overwrite)
    lora, report = to_lora(
        adapter,
        base=base,
        rank=parse_rank(rank_text),
        max_rank=max_rank,
        subfolder=subfolder,
        allow_pickle=allow_pickle,
    )
    lora.save(out, overwrite=overwrite)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        click.echo(report.table())
        click.echo(f"wrote {out}")
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
