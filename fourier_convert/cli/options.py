"""Options shared by several commands, declared once (same flag, same meaning everywhere)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

_F = TypeVar("_F", bound=Callable[..., Any])

#: ``--json FILE``: the command's report as JSON (its library report's ``to_dict()``).
json_report: Callable[[_F], _F] = click.option(
    "--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the report as JSON here."
)
#: ``--allow-pickle``: accept ``adapter_model.bin`` through torch's weights-only loader.
allow_pickle: Callable[[_F], _F] = click.option(
    "--allow-pickle", is_flag=True, help="Load adapter_model.bin through torch's weights-only loader."
)


def overwrite(help_text: str = "Replace a non-empty --out.") -> Callable[[_F], _F]:
    """``--overwrite``, with the command's own wording of when the old output is replaced."""
    return click.option("--overwrite", is_flag=True, help=help_text)


def quiet(help_text: str = "No table (warnings still go to stderr).") -> Callable[[_F], _F]:
    """``--quiet`` / ``-q``, with the command's own wording of what it silences."""
    return click.option("--quiet", "-q", is_flag=True, help=help_text)


def calibration_data(fitted: str) -> Callable[[_F], _F]:
    """The calibration options ``to-lora`` and ``from-lora`` share (``--calibration``, ``--text-field``,
    ``--calibration-samples``, ``--max-length``, ``--held-out``, ``--device``, ``--task``, ``--batch-size``);
    ``fitted`` says in ``--calibration``'s help what is fitted on which model's layer inputs."""
    decorators = [
        click.option(
            "--calibration",
            type=click.Path(path_type=Path),
            default=None,
            help=f"Fit {fitted}: a text file (a sample a line), JSON Lines, a .safetensors file of input_ids / "
            "pixel_values, or a folder of images (needs the base's weights and tokenizer / image processor).",
        ),
        click.option("--text-field", default="text", show_default=True, help="JSON Lines field holding the text."),
        click.option("--calibration-samples", type=int, default=None, help="Samples to use in all [default: all]."),
        click.option("--max-length", type=int, default=512, show_default=True, help="Tokens per calibration sample."),
        click.option(
            "--held-out",
            type=float,
            default=0.2,
            show_default=True,
            help="Share of the calibration samples kept aside for the report (never fitted on).",
        ),
        click.option("--device", default=None, help="Where calibration runs: auto, cpu, cuda, cuda:N [default: auto]."),
        click.option("--task", default="auto", show_default=True, help="Model class for calibration (as for to-onnx)."),
        click.option(
            "--batch-size", type=int, default=16, show_default=True, help="Calibration samples per forward pass."
        ),
    ]

    def apply(f: _F) -> _F:
        for decorate in reversed(decorators):
            f = decorate(f)
        return f

    return apply
