"""Loading the model a task exports with transformers, refusing untrained (randomly initialised) weights.

A model comes from a folder (a checkpoint already in the wanted dtype is mapped, not copied) or from tensors
held in memory (a merge, or a checkpoint converted to the export dtype), which transformers takes as they
are: no second copy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Set
from pathlib import Path
from typing import Any

import torch

from fourier_convert.errors import ExportError
from fourier_convert.io.checkpoint import BaseCheckpoint
from fourier_convert.io.safetensors_file import FLOAT_DTYPES, read_torch
from fourier_convert.onnx.tasks import AUTO_CLASSES

#: torch dtype -> its safetensors name.
_STORED = {torch.float32: "F32", torch.float16: "F16"}


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


def config_from_dict(config: Mapping[str, Any], source: Path) -> Any:
    """A transformers config from ``config.json``'s content (e.g. a merge's changed config); ``source`` names
    the file in errors.

    Raises:
        ExportError: transformers does not know the ``model_type``.

    Example:
        >>> config_from_dict({"model_type": "bert", "hidden_size": 32}, Path("config.json")).hidden_size
        32
    """
    from transformers import CONFIG_MAPPING

    model_type = str(config.get("model_type", ""))
    if not model_type:
        raise ExportError(str(source), "is missing or has no model_type", "export a transformers model folder")
    if model_type not in CONFIG_MAPPING:
        raise ExportError(
            str(source), f"model_type {model_type!r} is not known to this transformers", "upgrade transformers"
        )
    return CONFIG_MAPPING[model_type].from_dict(dict(config))


def load_task_model(
    folder: Path,
    task: str,
    *,
    dtype: torch.dtype = torch.float32,
    config: Any = None,
    provided: Set[str] = frozenset(),
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Any:
    """Load ``folder`` (or ``state_dict``) with the auto class of ``task`` in ``dtype``, eval mode, on the CPU.

    Args:
        folder: A Hugging Face model folder (with ``state_dict``: named in messages only).
        task: The export task.
        dtype: The model's dtype (a checkpoint already in it is mapped, not copied).
        config: A transformers config to use instead of the folder's (required with ``state_dict``).
        provided: Parameter names the caller will set itself (allowed to be missing from the checkpoint).
        state_dict: Checkpoint key -> tensor, used instead of the folder's weights; tensors already in
            ``dtype`` become the model's parameters without a copy.

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
            if state_dict is None:
                model, info = auto.from_pretrained(str(folder), config=config, dtype=dtype, output_loading_info=True)
            else:
                # The auto classes take no state_dict without a folder; the concrete class does (the class is
                # found by building the model on the meta device: no memory, no initialisation).
                with torch.device("meta"):
                    model_class = type(auto.from_config(config))
                model, info = model_class.from_pretrained(
                    None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
                )
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


def stored_in(ckpt: BaseCheckpoint, dtype: torch.dtype) -> bool:
    """Whether every floating tensor of ``ckpt`` is stored in ``dtype`` (then transformers maps the files).

    Example:
        >>> stored_in(open_checkpoint("fixtures/llama/base"), torch.float32)  # doctest: +SKIP
        True
    """
    return all(t.dtype not in FLOAT_DTYPES or t.dtype == _STORED[dtype] for t in ckpt.tensors.values())


def load_checkpoint_model(ckpt: BaseCheckpoint, task: str, dtype: torch.dtype) -> Any:
    """``ckpt``'s model for ``task`` in ``dtype`` (float32 or float16), eval mode, on the CPU.

    A checkpoint stored in ``dtype`` is mapped from its files. Otherwise its tensors are converted here, one
    at a time, and handed to transformers, which would convert them with the whole source mapped beside the
    converted model (a bfloat16 checkpoint loaded as float32: about 1.5x the float32 size).

    Raises:
        ExportError: As :func:`load_task_model`.

    Example:
        >>> model = load_checkpoint_model(open_checkpoint("bf16-model"), "causal-lm", torch.float32)  # doctest: +SKIP
    """
    if stored_in(ckpt, dtype):
        return load_task_model(ckpt.folder, task, dtype=dtype)
    tensors = {}
    for key, info in ckpt.tensors.items():
        value = read_torch(info)
        tensors[key] = value.to(dtype) if info.dtype in FLOAT_DTYPES else value
        del value
    return load_task_model(
        ckpt.folder,
        task,
        dtype=dtype,
        config=config_from_dict(ckpt.config or {}, ckpt.folder / "config.json"),
        state_dict=tensors,
    )
