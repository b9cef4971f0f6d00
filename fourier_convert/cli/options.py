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
