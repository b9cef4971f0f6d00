"""``fourier-convert to-lora``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fourier_convert.cli import options
from fourier_convert.cli.merge_cmd import check_report_path, print_conversion
from fourier_convert.errors import UsageError
from fourier_convert.io.progress import phase
from fourier_convert.serving import LORA_TARGETS


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
    "--base",
    default=None,
    help="Base model; default: the adapter's base_model_name_or_path. Only headers and config are read, unless "
    "--calibration or --check reads its weights.",
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
    type=click.Choice(LORA_TARGETS),
    default="peft",
    show_default=True,
    help="peft: biases and heads too; vllm: lora_A / lora_B only, prints the --max-lora-rank to serve with; "
    "llama.cpp: lora_A / lora_B only, one lora_alpha, plus adapter_model.gguf for llama.cpp / ollama.",
)
@click.option(
    "--uniform-rank",
    is_flag=True,
    help="Zero-pad every layer to one rank (vllm: a rank vLLM allows), for stacks that need one; default: each "
    "layer keeps its own rank.",
)
@click.option("--drop-extras", is_flag=True, help="vllm / llama.cpp: leave out trained biases and heads (reported).")
@click.option(
    "--check",
    is_flag=True,
    help="Also compare base + LoRA with base + FourierFT layer by layer: on the held-out calibration samples' real "
    "layer inputs with --calibration, else on random inputs (reads base weights).",
)
@options.calibration_data("the LoRA where the model is used (on the FourierFT model's layer inputs)")
@click.option(
    "--distill",
    "distill_steps",
    type=int,
    default=0,
    show_default=True,
    help="After the closed form, train the LoRA factors this many steps to match the FourierFT model.",
)
@click.option(
    "--sequential", is_flag=True, help="Fit layer by layer in model order on the converted model's own inputs."
)
@click.option("--lr", type=float, default=0.02, show_default=True, help="Distillation learning rate (relative).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sample choice, split and distillation.")
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
    uniform_rank: bool,
    drop_extras: bool,
    check: bool,
    calibration: Path | None,
    text_field: str,
    calibration_samples: int | None,
    max_length: int,
    held_out: float,
    distill_steps: int,
    sequential: bool,
    device: str | None,
    task: str,
    batch_size: int,
    lr: float,
    seed: int,
    out: Path,
    subfolder: str | None,
    overwrite: bool,
    allow_pickle: bool,
    json_path: Path | None,
    quiet: bool,
) -> None:
    """Approximate a FourierFT adapter by a LoRA adapter: exact spectral SVD (best rank-r per layer in weight
    space) or, with --calibration, fitted to the layers' real inputs (and distilled with --distill)."""
    check_report_path(json_path, [adapter, base, calibration], out)  # usage errors before the heavy imports below
    from fourier_convert.calibrate.pipeline import CalibrationOptions
    from fourier_convert.check import check_from_calibration, check_lora_outputs
    from fourier_convert.io.writer import check_output_target
    from fourier_convert.lora import to_lora

    check_output_target(out, overwrite)
    options = None
    if calibration is not None:
        options = CalibrationOptions(
            path=calibration,
            text_field=text_field,
            samples=calibration_samples,
            max_length=max_length,
            held_out=held_out,
            seed=seed,
            distill_steps=distill_steps,
            sequential=sequential,
            device=device or "auto",
            task=task,
            batch_size=batch_size,
            lr=lr,
        )
    lora, report = to_lora(
        adapter,
        base=base,
        rank=parse_rank(rank_text) if rank_text is not None else None,
        max_rank=max_rank,
        param_budget=param_budget,
        target=target,
        uniform_rank=uniform_rank,
        drop_extras=drop_extras,
        subfolder=subfolder,
        allow_pickle=allow_pickle,
        calibration=options,
        distill_steps=None if options is not None else distill_steps or None,
        sequential=None if options is not None else sequential or None,
        device=None if options is not None else device,
        progress=sys.stderr.isatty() and not quiet,
    )
    checked = None
    if check:
        phase(
            sys.stderr.isatty() and not quiet and options is None,
            "to-lora",
            "checking the LoRA against the FourierFT adapter on held-out inputs (PEFT, both models)",
        )
        checked = (
            check_from_calibration(report)
            if options is not None
            else check_lora_outputs(lora, adapter, base=base, subfolder=subfolder, allow_pickle=allow_pickle)
        )
    phase(sys.stderr.isatty() and not quiet, "to-lora", f"writing {out}")
    lora.save(out, overwrite=overwrite)
    doc = report.to_dict()
    if checked is not None:
        doc["check"] = checked.to_dict()
    lines = [report.table(), *(checked.lines() if checked is not None else [])]
    print_conversion(out, report.warnings, lines, doc, quiet=quiet, json_path=json_path)
