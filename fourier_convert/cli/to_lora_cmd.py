"""``fourier-convert to-lora``."""

from __future__ import annotations

from pathlib import Path

import click

from fourier_convert.check import check_lora_outputs
from fourier_convert.cli import options
from fourier_convert.cli.merge_cmd import check_report_path, print_conversion
from fourier_convert.errors import UsageError
from fourier_convert.io.writer import check_output_target
from fourier_convert.lora import TARGETS, to_lora


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
    "--rank",
    "rank_text",
    default=None,
    help="Integer rank, or an energy share in (0, 1] per layer [default: 8 unless --param-budget].",
)
@click.option("--max-rank", type=int, default=None, help="Cap on every layer's rank.")
@click.option(
    "--param-budget",
    type=int,
    default=None,
    help="Per-layer ranks keeping the most energy for at most this many LoRA parameters.",
)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="peft",
    show_default=True,
    help="peft: per-layer ranks, biases and heads; vllm / llama.cpp: uniform rank, lora_A / lora_B only.",
)
@click.option("--drop-extras", is_flag=True, help="vllm / llama.cpp: leave out trained biases and heads (reported).")
@click.option(
    "--check",
    is_flag=True,
    help="Also run base + LoRA against base + FourierFT on random inputs, layer by layer (reads base weights).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output LoRA adapter folder.")
@click.option("--adapter-subfolder", "subfolder", default=None, help="Named adapter inside --adapter.")
@options.overwrite()
@options.allow_pickle
@options.json_report
@options.quiet()
def to_lora_cmd(
    adapter: str,
    base: str | None,
    rank_text: str | None,
    max_rank: int | None,
    param_budget: int | None,
    target: str,
    drop_extras: bool,
    check: bool,
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
        rank=parse_rank(rank_text) if rank_text is not None else None,
        max_rank=max_rank,
        param_budget=param_budget,
        target=target,
        drop_extras=drop_extras,
        subfolder=subfolder,
        allow_pickle=allow_pickle,
    )
    checked = (
        check_lora_outputs(lora, adapter, base=base, subfolder=subfolder, allow_pickle=allow_pickle) if check else None
    )
    lora.save(out, overwrite=overwrite)
    doc = report.to_dict()
    if checked is not None:
        doc["check"] = checked.to_dict()
    lines = [report.table(), *(checked.lines() if checked is not None else [])]
    print_conversion(out, report.warnings, lines, doc, quiet=quiet, json_path=json_path)
