"""Loading the model a task exports with transformers, refusing untrained (randomly initialised) weights.

A model comes from a folder (a checkpoint already in the wanted dtype is mapped, not copied) or from tensors
held in memory (a merge, or a checkpoint converted to the export dtype), which transformers takes as they
are: no second copy.

A ``config.json`` that disagrees with the weights (0 attention heads, a vocabulary size or head count the
tensors do not have) is refused with one line naming the file, before transformers allocates anything: the
task's model is first built on the meta device and its parameter shapes compared with the checkpoint's
(:mod:`fourier_convert.model_config`).
"""

from __future__ import annotations

from collections.abc import Set
from pathlib import Path
from typing import Any

import torch

from fourier_convert.errors import ExportError, InputFileError
from fourier_convert.io.checkpoint import BaseCheckpoint
from fourier_convert.io.safetensors_file import FLOAT_DTYPES, read_torch
from fourier_convert.model_config import CONFIG_FIX, check_shapes, config_from_dict, quiet_transformers, reported
from fourier_convert.onnx.tasks import AUTO_CLASSES

#: torch dtype -> its safetensors name.
_STORED = {torch.float32: "F32", torch.float16: "F16"}


def _task_error(folder: Path, task: str, exc: BaseException) -> ExportError:
    return ExportError(
        str(folder),
        f"transformers cannot load it as {AUTO_CLASSES[task]} for task {task} ({reported(exc)})",
        "choose the --task the model was trained for",
    )


def build_on_meta(folder: Path, task: str, config: Any) -> Any:
    """The model of ``task`` built from ``config`` on the meta device (no memory, no initialisation).

    Raises:
        ExportError: The task's auto class does not take this kind of model.
        InputFileError: transformers cannot build the model from ``config`` (``folder``'s config.json named).
    """
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        with quiet_transformers(), torch.device("meta"):
            return auto.from_config(config)
    except Exception as exc:  # whatever the modeling code raises on the config's values
        takes = getattr(auto, "_model_mapping", None)  # config class -> model class, of this auto class
        if takes is None or type(config) not in takes:
            raise _task_error(folder, task, exc) from exc
        raise InputFileError(
            str(folder / "config.json"),
            f"transformers cannot build {AUTO_CLASSES[task]} from it ({reported(exc)})",
            CONFIG_FIX,
        ) from exc


def check_config_fits(ckpt: BaseCheckpoint, task: str | None) -> None:
    """Before anything is read or merged: transformers builds ``ckpt``'s config, and the ``task`` model it
    describes (on the meta device) has the weights' shapes.

    Nothing is checked without a config.json or a model_type transformers knows, and the shapes are not checked
    without a task or for a task the model does not take: those are left to the loading steps, whose messages
    they are.

    Raises:
        InputFileError: The config is refused (:func:`config_from_dict`, :func:`build_on_meta`), or the
            weights' shapes differ (:func:`check_shapes`).

    Example:
        >>> check_config_fits(open_checkpoint("fixtures/llama/base"), "causal-lm")  # doctest: +SKIP
    """
    if ckpt.config is None:
        return
    path = ckpt.folder / "config.json"
    try:
        hf_config = config_from_dict(ckpt.config, path)
        model = build_on_meta(ckpt.folder, task, hf_config) if task is not None else None
    except ExportError:
        return
    if model is None:
        return
    check_shapes(model, {k: t.shape for k, t in ckpt.tensors.items()}, path)


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
        InputFileError: With ``state_dict``: the model ``config`` describes does not take these tensors
            (:func:`check_shapes`), or transformers fails to build or load it for another reason than the task
            (named as ``folder``'s config.json).

    Example:
        >>> model = load_task_model(Path("fixtures/roberta/base"), "text-classification")  # doctest: +SKIP
    """
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[task])
    model_class = None
    if state_dict is not None:
        # The auto classes take no state_dict without a folder; the concrete class does (the class is found by
        # building the model on the meta device, whose shapes are then compared with the tensors').
        skeleton = build_on_meta(folder, task, config)
        check_shapes(skeleton, {k: tuple(v.shape) for k, v in state_dict.items()}, folder / "config.json")
        model_class = type(skeleton)
        del skeleton
    try:
        with quiet_transformers():
            if model_class is None:
                model, info = auto.from_pretrained(str(folder), config=config, dtype=dtype, output_loading_info=True)
            else:
                model, info = model_class.from_pretrained(
                    None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
                )
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise _task_error(folder, task, exc) from None
    except Exception as exc:  # RuntimeError (sizes transformers found unequal), ArithmeticError...: from config.json
        raise InputFileError(
            str(folder / "config.json"),
            f"transformers cannot load the weights into {AUTO_CLASSES[task]} built from it ({reported(exc)})",
            CONFIG_FIX,
        ) from exc
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
