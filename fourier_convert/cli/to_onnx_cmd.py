"""``fourier-convert to-onnx``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fourier_convert.cli import options
from fourier_convert.cli.merge_cmd import check_report_path, say, specs_from_options, write_report
from fourier_convert.errors import OnnxValidationError
from fourier_convert.onnx.tasks import TASKS

if TYPE_CHECKING:
    from fourier_convert.onnx.report import OnnxReport


def _write_json(path: Path | None, report: OnnxReport) -> None:
    if path is not None:
        write_report(path, report.to_dict())


@click.command("to-onnx")
@click.option("--base", default=None, help="Base model folder or hub id (with --adapter).")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="FourierFT adapter folder, PATH:NAME or hub id; merged into --base first. Repeat to apply several.",
)
@click.option("--weight", "weights", multiple=True, type=float, help="Multiplier of each adapter's delta.")
@click.option("--model", default=None, help="An already merged model folder or hub id (instead of --base/--adapter).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (published atomically).")
@click.option(
    "--task",
    type=click.Choice(["auto", *TASKS]),
    default="auto",
    show_default=True,
    help="What to export; auto infers it from config.json's architectures and says what it chose.",
)
@click.option("--dtype", default="float32", show_default=True, help="float32 or float16 (bfloat16 is refused).")
@click.option(
    "--opset",
    type=int,
    default=None,
    help="ONNX opset, within what the installed exporter writes and onnxruntime loads (18 to 25 with torch 2.13) "
    "[default: the exporter's, 20].",
)
@click.option("--optimize", is_flag=True, help="Run onnxruntime's transformer optimiser; validation covers its output.")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="onnxruntime device for validation: auto (CUDA if it really works, else CPU), cpu, cuda, cuda:N.",
)
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime validation (the merge proof still runs).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance [default: 1e-4 float32, 1e-2 float16].")
@click.option("--rtol", type=float, default=None, help="Relative tolerance [default: 1e-3].")
@click.option("--keep-failed", is_flag=True, help="Keep a failed export at <out>.failed for inspection.")
@options.overwrite("Replace a non-empty --out once the new export has passed.")
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Weights in model.onnx.data [default: when they exceed 256 MiB].",
)
@options.allow_pickle
@click.option("--revision", default=None, help="Hub revision of --base / --model.")
@options.json_report
@options.quiet("No progress and no summary (warnings and failures still go to stderr).")
def to_onnx_cmd(
    base: str | None,
    adapters: tuple[str, ...],
    weights: tuple[float, ...],
    model: str | None,
    out: Path,
    task: str,
    dtype: str,
    opset: int | None,
    optimize: bool,
    device: str,
    no_validate: bool,
    atol: float | None,
    rtol: float | None,
    keep_failed: bool,
    overwrite: bool,
    external_data: bool | None,
    allow_pickle: bool,
    revision: str | None,
    json_path: Path | None,
    quiet: bool,
) -> None:
    """Export a merged model (or base + FourierFT adapter, merged first) to ONNX, proven equal in onnxruntime."""
    check_report_path(json_path, [base, *adapters, model], out)  # usage errors before the heavy imports below
    from fourier_convert.onnx.pipeline import export_onnx
    from fourier_convert.onnx.report import OnnxReport

    specs = specs_from_options(adapters, (), weights)
    try:
        report = export_onnx(
            out,
            base=base,
            adapter=specs or None,
            model=model,
            task=task,
            dtype=dtype,
            opset=opset,
            optimize=optimize,
            device=device,
            validate=not no_validate,
            atol=atol,
            rtol=rtol,
            keep_failed=keep_failed,
            overwrite=overwrite,
            external_data=external_data,
            allow_pickle=allow_pickle,
            revision=revision,
            progress=sys.stderr.isatty() and not quiet,
        )
    except OnnxValidationError as exc:
        # The report goes where a passing one goes (stdout, none with --quiet; its warnings among its lines);
        # stderr holds only the error line.
        if isinstance(exc.report, OnnxReport):
            if not quiet:
                for line in exc.report.summary():
                    say(line)
            _write_json(json_path, exc.report)
        raise
    for w in report.warnings:
        say(f"warning: {w}", err=True)
    if not quiet:
        for line in report.summary():
            if not line.startswith("warning: "):
                say(line)
    _write_json(json_path, report)
