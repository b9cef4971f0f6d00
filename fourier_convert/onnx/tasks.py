"""Export tasks: which model class each task loads, and inferring the task from ``config.architectures``.

Pure look-up logic: no files, no torch. The graph's inputs and outputs per task are described by
:mod:`fourier_convert.onnx.signature`, built from the loaded model.
"""

from __future__ import annotations

from typing import Any

from fourier_convert.errors import UsageError

FEATURE_EXTRACTION = "feature-extraction"
TEXT_CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
IMAGE_CLASSIFICATION = "image-classification"
CAUSAL_LM = "causal-lm"
CAUSAL_LM_WITH_PAST = "causal-lm-with-past"

#: Every task ``to-onnx`` exports, in the order the docs list them.
TASKS: tuple[str, ...] = (
    FEATURE_EXTRACTION,
    TEXT_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    IMAGE_CLASSIFICATION,
    CAUSAL_LM,
    CAUSAL_LM_WITH_PAST,
)

#: Task -> the transformers auto class that loads its model.
AUTO_CLASSES: dict[str, str] = {
    FEATURE_EXTRACTION: "AutoModel",
    TEXT_CLASSIFICATION: "AutoModelForSequenceClassification",
    TOKEN_CLASSIFICATION: "AutoModelForTokenClassification",
    IMAGE_CLASSIFICATION: "AutoModelForImageClassification",
    CAUSAL_LM: "AutoModelForCausalLM",
    CAUSAL_LM_WITH_PAST: "AutoModelForCausalLM",
}

# Architecture-name suffix -> task, first match wins (checked against config.architectures[0]).
_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", CAUSAL_LM_WITH_PAST),
    ("LMHeadModel", CAUSAL_LM_WITH_PAST),
    ("ForSequenceClassification", TEXT_CLASSIFICATION),
    ("ForTokenClassification", TOKEN_CLASSIFICATION),
    ("ForImageClassification", IMAGE_CLASSIFICATION),
    ("ForImageClassificationWithTeacher", IMAGE_CLASSIFICATION),
)


def check_task(task: str) -> str:
    """Return ``task`` if it is known (or ``auto``).

    Raises:
        UsageError: An unknown task name.

    Example:
        >>> check_task("causal-lm")
        'causal-lm'
    """
    if task != "auto" and task not in TASKS:
        raise UsageError("--task", f"unknown task {task!r}", f"use auto or one of {', '.join(TASKS)}")
    return task


def infer_task(config: dict[str, Any]) -> tuple[str, str]:
    """Choose the task from ``config.json``'s ``architectures``.

    Causal language models get ``causal-lm-with-past`` (the graph a generation loop needs); a bare
    ``...Model`` class gets ``feature-extraction``.

    Args:
        config: The model's ``config.json``.

    Returns:
        ``(task, reason)``; the reason is the sentence the CLI prints.

    Raises:
        UsageError: No architecture is named, or it maps to no supported task.

    Example:
        >>> infer_task({"architectures": ["LlamaForCausalLM"]})
        ('causal-lm-with-past', 'architectures[0] is LlamaForCausalLM')
        >>> infer_task({"architectures": ["BertModel"]})[0]
        'feature-extraction'
    """
    archs = config.get("architectures") or []
    if not archs:
        raise UsageError(
            "config.json", "names no architectures, so the task cannot be inferred", f"pass --task ({', '.join(TASKS)})"
        )
    arch = str(archs[0])
    reason = f"architectures[0] is {arch}"
    for suffix, task in _SUFFIXES:
        if arch.endswith(suffix):
            return task, reason
    if arch.endswith("Model") and "For" not in arch:
        return FEATURE_EXTRACTION, reason
    raise UsageError(
        "config.json",
        f"architecture {arch} maps to no supported task",
        f"pass --task explicitly ({', '.join(TASKS)}) if the model fits one of them",
    )
