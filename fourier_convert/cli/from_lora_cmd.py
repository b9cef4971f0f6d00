"""``fourier-convert from-lora``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fourier_convert.cli import options
from fourier_convert.cli.merge_cmd import check_report_path, print_conversion


@click.command("from-lora")
@click.option("--adapter", required=True, help="PEFT LoRA adapter folder, PATH:NAME or hub id.")
@click.option(
    "--base",
    default=None,
    help="Base model to validate against (headers and config only); default: the adapter's base_model_name_or_path.",
)
@click.option("--n-frequency", type=int, default=1000, show_default=True, help="FourierFT coefficients per layer.")
@click.option(
    "--n-frequency-pattern",
    "patterns",
    multiple=True,
    help="NAME=N: n for modules whose name ends with NAME (a regex, as PEFT matches it). Repeatable.",
)
@click.option("--scaling", type=float, default=150.0, show_default=True, help="FourierFT scaling of the output.")
@click.option("--seed", type=int, default=777, show_default=True, help="random_loc_seed of the output.")
@options.calibration_data("the coefficients where the model is used (on the LoRA model's layer inputs)")
@click.option(
    "--calibration-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the calibration sample choice and split.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output FourierFT adapter folder.")
@click.option("--adapter-subfolder", "subfolder", default=None, help="Named adapter inside --adapter.")
@options.overwrite()
@options.allow_pickle
@options.json_report
@options.quiet()
def from_lora_cmd(
    adapter: str,
    base: str | None,
    n_frequency: int,
    patterns: tuple[str, ...],
    scaling: float,
    seed: int,
    calibration: Path | None,
    text_field: str,
    calibration_samples: int | None,
    max_length: int,
    held_out: float,
    calibration_seed: int,
    device: str | None,
    task: str,
    batch_size: int,
    out: Path,
    subfolder: str | None,
    overwrite: bool,
    allow_pickle: bool,
    json_path: Path | None,
    quiet: bool,
) -> None:
    """Convert a PEFT LoRA adapter to the closest FourierFT adapter (least squares on PEFT's frequencies; with
    --calibration, least squares on the layers' real inputs)."""
    check_report_path(json_path, [adapter, base, calibration], out)  # usage errors before the heavy imports below
    from fourier_convert.calibrate.pipeline import CalibrationOptions
    from fourier_convert.io.writer import check_output_target
    from fourier_convert.lora_to_fourierft import from_lora, parse_pattern

    check_output_target(out, overwrite)
    calibration_options = None
    if calibration is not None:
        calibration_options = CalibrationOptions(
            path=calibration,
            text_field=text_field,
            samples=calibration_samples,
            max_length=max_length,
            held_out=held_out,
            seed=calibration_seed,
            device=device or "auto",
            task=task,
            batch_size=batch_size,
        )
    fft, report = from_lora(
        adapter,
        base=base,
        n_frequency=n_frequency,
        n_frequency_pattern=parse_pattern(patterns),
        scaling=scaling,
        seed=seed,
        subfolder=subfolder,
        allow_pickle=allow_pickle,
        calibration=calibration_options,
        device=None if calibration_options is not None else device,
        progress=sys.stderr.isatty() and not quiet,
    )
    fft.save(out, overwrite=overwrite)
    print_conversion(out, report.warnings, [report.table()], report.to_dict(), quiet=quiet, json_path=json_path)
