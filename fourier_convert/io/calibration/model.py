"""What the base model folder offers calibration: its ``config.json`` values, its tokenizer, which inputs it takes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

PREPROCESSOR_NAME = "preprocessor_config.json"
#: Files any of which marks a model folder as having a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def model_takes(model_folder: Path, config: Mapping[str, Any]) -> str:
    """``"text"``, ``"images"``, or ``""`` when the model looks like both or neither."""
    text = has_tokenizer(model_folder) or "vocab_size" in config
    images = (model_folder / PREPROCESSOR_NAME).is_file() or any(
        k in config for k in ("num_channels", "image_size", "vision_config")
    )
    if text and not images:
        return "text"
    if images and not text:
        return "images"
    return ""


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]``, else ``config["text_config"][key]``."""
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), Mapping):
        value = config["text_config"].get(key)
    return value


def vocab_size_of(config: Mapping[str, Any]) -> int | None:
    """The config's ``vocab_size`` (see :func:`config_value`) when it is a positive int, else None."""
    value = config_value(config, "vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def has_tokenizer(model_folder: Path) -> bool:
    """Whether ``model_folder`` holds any of the :data:`TOKENIZER_FILES`."""
    return any((model_folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(model_folder: Path) -> Any:
    """The model's own tokenizer (``AutoTokenizer``, local files only); raises what transformers raises."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(model_folder), local_files_only=True)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Only errors from transformers' logging while inside (its verbosity is restored on leaving)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
