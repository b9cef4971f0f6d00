"""Loading the model a task exports with transformers, refusing untrained (randomly initialised) weights."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Set
from pathlib import Path
from typing import Any

import torch

from fourier_convert.errors import ExportError
from fourier_convert.onnx.tasks import AUTO_CLASSES


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def load_task_model(
    folder: Path,
    task: str,
    *,
    dtype: torch.dtype = torch.float32,
    config: Any = None,
    provided: Set[str] = frozenset(),
) -> Any:
    """Load ``folder`` with the auto class of ``task`` in ``dtype``, eval mode, on the CPU.

    Args:
        folder: A Hugging Face model folder.
        task: The export task.
        dtype: The model's dtype (a checkpoint already in it is mapped, not copied).
        config: A transformers config to use instead of the folder's.
        provided: Parameter names the caller will set itself (allowed to be missing from the checkpoint).

    Returns:
        The model.

    Raises:
        ExportError: transformers cannot build this model for the task, or the checkpoint lacks weights the
            task needs (a classification head that would be random).

    Example:
        >>> model = load_task_model(Path("fixtures/roberta/base"), "text-classification")  # doctest: +SKIP
    """
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(str(folder), config=config, dtype=dtype, output_loading_info=True)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            str(folder),
            f"transformers cannot load it as {AUTO_CLASSES[task]} for task {task} ({first})",
            "choose the --task the model was trained for",
        ) from None
    missing = sorted(k for k in info.get("missing_keys", []) if k not in provided)
    if missing:
        raise ExportError(
            str(folder),
            f"{type(model).__name__} needs weights the checkpoint lacks: {missing[:3]}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}; they would be random",
            f"choose the --task the model was trained for (task {task} loads {type(model).__name__})",
        )
    return model.eval()
