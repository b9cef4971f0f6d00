"""Reading calibration data: the inputs a calibrated FourierFT -> LoRA conversion runs the model on.

The format is chosen by what the path is:

* a folder: images (``.png .jpg .jpeg .bmp .webp .gif``, sorted by name), prepared with the model's
  image processor (``preprocessor_config.json``);
* ``*.safetensors``: ready-made ``input_ids`` (with optional ``attention_mask`` / ``token_type_ids``) or
  ``pixel_values``, one row per sample;
* ``*.jsonl`` / ``*.json``: JSON lines, the text of each sample in one field (``--text-field``);
* anything else: UTF-8 text, one sample per line.

Text is tokenised with the model's own tokenizer. Every read is bounded: FIFOs and devices are refused before
they are opened, a line may hold at most :data:`MAX_LINE_CHARS` characters, at most :data:`MAX_SAMPLES`
samples are read, and a safetensors file may hold at most :data:`MAX_TENSOR_BYTES` of tensors. A text file is
read twice (once to find and check its samples, once to tokenise the chosen ones), so memory holds the
chosen samples' tokens, never the whole file.

Samples are chosen and split with ``random.Random(seed)``: the same file and seed give the same samples and
the same split.

This package is the public API (:func:`read_calibration`, :func:`collate`, :func:`batches`,
:func:`pad_token_id`); its modules, one job each: :mod:`.text` (text and JSON lines), :mod:`.tensors`
(safetensors), :mod:`.images` (image folders), :mod:`.batching` (batches and padding), :mod:`.model` (what
the model folder offers), :mod:`.common` (the result type, sample choice and split, safe opening, messages).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fourier_convert.errors import InputFileError, UsageError, first_line
from fourier_convert.io.calibration.batching import batches, collate, pad_token_id
from fourier_convert.io.calibration.common import CalibrationData, not_regular, show_path
from fourier_convert.io.calibration.images import IMAGE_SUFFIXES, read_images
from fourier_convert.io.calibration.tensors import read_tensors
from fourier_convert.io.calibration.text import read_text

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_HELD_OUT",
    "MAX_LINE_CHARS",
    "MAX_SAMPLES",
    "MAX_TENSOR_BYTES",
    "CalibrationData",
    "batches",
    "collate",
    "pad_token_id",
    "read_calibration",
]

# The limits are read each time read_calibration is called and handed to the readers: setting them here takes effect.
#: At most this many samples are read from one file or folder (the rest is left unread, with a note).
MAX_SAMPLES = 100_000
#: A text or JSON line longer than this (in characters) is refused.
MAX_LINE_CHARS = 1_000_000
#: A safetensors file holding more tensor bytes than this is refused before its tensors are read.
MAX_TENSOR_BYTES = 4 * 1024**3
#: Largest share of the samples ``held_out`` may keep aside.
MAX_HELD_OUT = 0.9


def read_calibration(
    path: str | Path,
    model_folder: Path,
    config: Mapping[str, Any],
    *,
    text_field: str = "text",
    samples: int | None = None,
    max_length: int = 512,
    held_out: float = 0.2,
    seed: int = 0,
) -> CalibrationData:
    """Read calibration data, choose ``samples`` of its samples and split them into train and held out.

    Args:
        path: A folder of images, a ``.safetensors`` file, a ``.jsonl`` / ``.json`` file, or a text file.
        model_folder: The base model folder (tokenizer or image processor, ``config.json``).
        config: The base model's ``config.json`` content (``vocab_size``, ``num_channels`` are checked).
        text_field: The key holding the text in a JSON lines file.
        samples: How many samples to use in all (train + held out); None: all there are, up to
            :data:`MAX_SAMPLES`. Chosen at random with ``seed``, kept in file order.
        max_length: Longest sample in tokens: longer text is cut (counted in ``truncated``), longer
            ``input_ids`` rows are refused.
        held_out: Share of the samples kept aside for the report, 0 to 0.9 (0: none); at least one sample on
            each side when above 0.
        seed: Seed of the choice and of the split.

    Returns:
        The samples, split.

    Raises:
        UsageError: ``samples`` < 2, ``held_out`` outside [0, 0.9], ``max_length`` < 1 or not above the
            tokenizer's special tokens, an empty ``text_field``.
        InputFileError: The path is missing, not a regular file or folder, or its content is invalid (the
            message names the file, the line or tensor, and the fix); the model lacks the tokenizer or image
            processor the data needs; fewer than 2 usable samples.

    Example:
        >>> config = json.loads(Path("fixtures/llama/base/config.json").read_text())  # doctest: +SKIP
        >>> data = read_calibration("calib.txt", Path("fixtures/llama/base"), config, samples=64)  # doctest: +SKIP
        >>> len(data.train), len(data.held_out)  # doctest: +SKIP
        (51, 13)
    """
    _check_options(samples, max_length, held_out)
    source = Path(path)
    where = show_path(source)
    try:
        mode = os.stat(source).st_mode
    except FileNotFoundError:
        raise InputFileError(where, "not found", "check the path given to --calibration") from None
    except OSError as exc:
        raise InputFileError(
            where, f"cannot be read ({first_line(exc)})", "check the path and its permissions"
        ) from None
    if stat.S_ISDIR(mode):
        return read_images(source, model_folder, config, samples, held_out, seed, max_samples=MAX_SAMPLES)
    if not stat.S_ISREG(mode):
        raise not_regular(where, mode)
    suffix = source.suffix.lower()
    if suffix == ".safetensors":
        return read_tensors(
            source,
            model_folder,
            config,
            samples,
            max_length,
            held_out,
            seed,
            max_samples=MAX_SAMPLES,
            max_tensor_bytes=MAX_TENSOR_BYTES,
        )
    kind = "jsonl" if suffix in (".jsonl", ".json") else "text"
    if kind == "jsonl" and not text_field:
        raise UsageError("--text-field", "is empty", "pass the key that holds the text in each JSON line")
    return read_text(
        source,
        kind,
        model_folder,
        config,
        text_field,
        samples,
        max_length,
        held_out,
        seed,
        max_samples=MAX_SAMPLES,
        max_line_chars=MAX_LINE_CHARS,
    )


def _check_options(samples: int | None, max_length: int, held_out: float) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 2):
        raise UsageError(
            "--calibration-samples",
            f"is {samples!r}, needs at least 2 samples: one to fit, one to report on",
            "raise it, or leave it out to use every sample",
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise UsageError("--max-length", f"is {max_length!r}, expected at least 1 token", "pass e.g. --max-length 512")
    if (
        isinstance(held_out, bool)
        or not isinstance(held_out, (int, float))
        or not (0 <= held_out <= MAX_HELD_OUT)  # also refuses NaN
    ):
        raise UsageError(
            "--held-out",
            f"is {held_out!r}, expected a share from 0 to {MAX_HELD_OUT}",
            "pass e.g. --held-out 0.2 (0: no held-out samples)",
        )
