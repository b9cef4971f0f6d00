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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from fourier_convert.errors import InputFileError, UsageError
from fourier_convert.io.safetensors_file import DTYPE_SIZES, FLOAT_DTYPES

#: At most this many samples are read from one file or folder (the rest is left unread, with a note).
MAX_SAMPLES = 100_000
#: A text or JSON line longer than this (in characters) is refused.
MAX_LINE_CHARS = 1_000_000
#: A safetensors file holding more tensor bytes than this is refused before its tensors are read.
MAX_TENSOR_BYTES = 4 * 1024**3
#: Largest share of the samples ``held_out`` may keep aside.
MAX_HELD_OUT = 0.9

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})
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
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
TENSOR_KEYS = frozenset({*TEXT_KEYS, "pixel_values"})
_INT_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})
_TOKENIZE_CHUNK = 256  # texts per tokenizer call
_TOKENIZE_CHARS = 4_000_000  # characters per tokenizer call (a chunk ends at whichever comes first)
_NO_TOKENIZER_FIX = "copy the tokenizer files of the model into it, or give a safetensors file of input_ids"


@dataclass(frozen=True)
class CalibrationData:
    """Calibration samples, ready to batch.

    Attributes:
        source: The file or folder given.
        kind: ``"text"``, ``"jsonl"``, ``"safetensors"`` or ``"images"``.
        train: One dict per sample, unbatched (``input_ids`` / ``attention_mask`` [/ ``token_type_ids``] of
            shape (L,), or ``pixel_values`` of shape (C, H, W)), in file order.
        held_out: The same, kept aside for the report (empty with ``held_out=0``), in file order.
        truncated: Samples cut to ``max_length`` tokens.
        notes: Things to tell the user (samples cut, skipped or left unread, how they were split).
    """

    source: Path
    kind: str
    train: list[dict[str, torch.Tensor]]
    held_out: list[dict[str, torch.Tensor]]
    truncated: int
    notes: list[str]


# -- public API ------------------------------------------------------------------------------------------------


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
    where = _show_path(source)
    try:
        mode = os.stat(source).st_mode
    except FileNotFoundError:
        raise InputFileError(where, "not found", "check the path given to --calibration") from None
    except OSError as exc:
        raise InputFileError(
            where, f"cannot be read ({_first_line(exc)})", "check the path and its permissions"
        ) from None
    if stat.S_ISDIR(mode):
        return _read_images(source, model_folder, config, samples, held_out, seed)
    if not stat.S_ISREG(mode):
        raise InputFileError(
            where,
            f"is not a regular file or folder (a {_file_type(mode)})",
            "give a file or a folder of calibration data (save a stream to a file first)",
        )
    suffix = source.suffix.lower()
    if suffix == ".safetensors":
        return _read_tensors(source, model_folder, config, samples, max_length, held_out, seed)
    if suffix in (".jsonl", ".json"):
        if not text_field:
            raise UsageError("--text-field", "is empty", "pass the key that holds the text in each JSON line")
        return _read_text(source, "jsonl", model_folder, config, text_field, samples, max_length, held_out, seed)
    return _read_text(source, "text", model_folder, config, text_field, samples, max_length, held_out, seed)


def collate(samples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack samples into one batch; text samples are right-padded with ``pad_token_id`` (attention_mask 0 there).

    1-D tensors (``input_ids``, ``attention_mask``, ``token_type_ids``) are padded on the right to the longest
    sample: ``input_ids`` with ``pad_token_id``, the others with 0. Other tensors (``pixel_values``) are
    stacked and must have one shape.

    Args:
        samples: Samples with the same keys.
        pad_token_id: The id to pad ``input_ids`` with (see :func:`pad_token_id`).

    Returns:
        Key -> batched tensor (a new leading dimension).

    Raises:
        ValueError: No samples, samples with different keys, or tensors that cannot be stacked.

    Example:
        >>> a = {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1])}
        >>> b = {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1])}
        >>> batch = collate([a, b], pad_token_id=0)
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = list(samples[0])
    for i, sample in enumerate(samples):
        if set(sample) != set(keys):
            raise ValueError(f"sample {i} has keys {sorted(sample)}, sample 0 has {sorted(keys)}")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if all(v.dim() == 1 for v in values):
            length = max(int(v.shape[0]) for v in values)
            fill = pad_token_id if key == "input_ids" else 0
            batch = values[0].new_full((len(values), length), fill)
            for i, v in enumerate(values):
                batch[i, : v.shape[0]] = v
            out[key] = batch
        else:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"cannot stack {key!r} of shapes {sorted(shapes)}")
            out[key] = torch.stack(values)
    return out


def batches(
    samples: Sequence[Mapping[str, torch.Tensor]], batch_size: int, pad_token_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive batches of at most ``batch_size`` samples, in order (:func:`collate` of each).

    Args:
        samples: The samples (e.g. ``CalibrationData.train``).
        batch_size: Samples per batch (the last batch may be smaller).
        pad_token_id: The id to pad ``input_ids`` with.

    Returns:
        An iterator of batches; nothing for no samples.

    Raises:
        ValueError: ``batch_size`` < 1 (raised on the first ``next``), or as :func:`collate`.

    Example:
        >>> s = [{"input_ids": torch.tensor([1] * n), "attention_mask": torch.tensor([1] * n)} for n in (1, 2, 3)]
        >>> [b["input_ids"].shape[0] for b in batches(s, 2, pad_token_id=0)]
        [2, 1]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}, expected at least 1")
    for start in range(0, len(samples), batch_size):
        yield collate(samples[start : start + batch_size], pad_token_id)


def pad_token_id(model_folder: Path, config: Mapping[str, Any]) -> int:
    """The id to pad with: the tokenizer's pad token, else config pad_token_id, else eos, else 0 (masked out anyway).

    A tokenizer that cannot be loaded is passed over (image models have none). ``eos`` is the tokenizer's, else
    the config's (the first of a list). Config ids are also looked up in ``text_config``.

    Args:
        model_folder: The base model folder.
        config: The base model's ``config.json`` content.

    Returns:
        A non-negative token id.

    Example:
        >>> pad_token_id(Path("fixtures/llama/base"), {"pad_token_id": 3})  # doctest: +SKIP
        3
    """
    tokenizer: Any = None
    if _has_tokenizer(model_folder):
        try:
            tokenizer = _load_tokenizer(model_folder)
        except Exception:  # any failure: fall back to the config
            tokenizer = None
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        _config_value(config, "pad_token_id"),
        getattr(tokenizer, "eos_token_id", None),
        _config_value(config, "eos_token_id"),
    ):
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


# -- options, selection ----------------------------------------------------------------------------------------


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


def _choose(n: int, samples: int | None, held_out: float, seed: int) -> tuple[list[int], list[int], list[str]]:
    """Indices (of ``n`` usable samples) to fit on and to hold out, each in file order, and notes."""
    rng = random.Random(seed)
    notes: list[str] = []
    if samples is not None and n > samples:
        chosen = sorted(rng.sample(range(n), samples))
        notes.append(f"used {samples} of the {n} samples, picked with seed {seed} (--calibration-samples)")
    else:
        chosen = list(range(n))
        if samples is not None and samples > n:
            notes.append(f"--calibration-samples {samples} asks for more samples than the {n} there are; using all {n}")
    count = len(chosen)
    order = list(chosen)
    rng.shuffle(order)
    k = 0 if held_out == 0 else min(max(1, round(held_out * count)), count - 1)
    held, train = sorted(order[:k]), sorted(order[k:])
    if k:
        notes.append(f"{_count(count, 'sample')}: {len(train)} to fit, {len(held)} held out for the report")
    else:
        notes.append(f"{_count(count, 'sample')}, none held out (--held-out 0): the report has no held-out measure")
    return train, held, notes


def _too_few(where: str, n: int, noun: str) -> InputFileError:
    return InputFileError(
        where,
        f"holds {_count(n, 'usable sample')}; needs at least 2 samples: one to fit, one to report on",
        f"add more {noun}",
    )


def _finish(
    source: Path,
    kind: str,
    n: int,
    noun: str,
    samples: int | None,
    held_out: float,
    seed: int,
    load: Callable[[list[int]], tuple[list[dict[str, torch.Tensor]], int, list[str]]],
    notes: list[str],
) -> CalibrationData:
    """Choose and split ``n`` usable samples, load the chosen ones with ``load`` (indices in file order ->
    samples, truncated count, notes) and build the result."""
    if n < 2:
        raise _too_few(_show_path(source), n, noun)
    train_idx, held_idx, choose_notes = _choose(n, samples, held_out, seed)
    wanted = sorted(train_idx + held_idx)
    loaded, truncated, load_notes = load(wanted)
    by_index = dict(zip(wanted, loaded, strict=True))
    return CalibrationData(
        source=source,
        kind=kind,
        train=[by_index[i] for i in train_idx],
        held_out=[by_index[i] for i in held_idx],
        truncated=truncated,
        notes=[*notes, *load_notes, *choose_notes],
    )


# -- text and JSON lines ---------------------------------------------------------------------------------------


def _read_text(
    source: Path,
    kind: str,
    model_folder: Path,
    config: Mapping[str, Any],
    text_field: str,
    samples: int | None,
    max_length: int,
    held_out: float,
    seed: int,
) -> CalibrationData:
    tokenizer = _text_tokenizer(source, model_folder, config)
    special = int(tokenizer.num_special_tokens_to_add())
    if max_length <= special:
        raise UsageError(
            "--max-length",
            f"is {max_length}, but the tokenizer adds {_count(special, 'special token')} to every sample",
            f"raise --max-length above {special}",
        )
    with _open_regular(source) as f:
        lines, notes = _scan_lines(f, source, kind, text_field)

        def load(wanted: list[int]) -> tuple[list[dict[str, torch.Tensor]], int, list[str]]:
            def texts() -> Iterator[tuple[int, str]]:  # read lazily: memory holds one chunk of text at a time
                for i in wanted:
                    number, offset = lines[i]
                    f.seek(offset)
                    text = _decode_line(f.readline(), source, number)
                    yield number, _sample_text(text, source, number, kind, text_field) or ""

            out, truncated = _tokenize(tokenizer, texts(), source, max_length, _vocab_size(config), model_folder)
            note = []
            if truncated:
                cut = f"{truncated} of {_count(len(wanted), 'line')} were cut to {max_length} tokens (--max-length)"
                note.append(cut)
            return out, truncated, note

        data = _finish(source, kind, len(lines), "lines", samples, held_out, seed, load, notes)
    return data


def _scan_lines(f: IO[bytes], source: Path, kind: str, text_field: str) -> tuple[list[tuple[int, int]], list[str]]:
    """First pass: check every line up to :data:`MAX_SAMPLES` samples; return (line number, byte offset) of each
    usable line, and notes."""
    usable: list[tuple[int, int]] = []
    notes: list[str] = []
    empty = 0
    number = 0
    offset = 0
    limit = 4 * MAX_LINE_CHARS + 2  # UTF-8 takes at most 4 bytes a character, plus "\r\n"
    while len(usable) < MAX_SAMPLES:
        raw = f.readline(limit + 1)
        if not raw:
            break
        number += 1
        start, offset = offset, offset + len(raw)
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise _too_long(source, number)
        text = _decode_line(raw, source, number)
        if len(text) > MAX_LINE_CHARS:
            raise _too_long(source, number)
        if not text.strip():
            continue
        value = _sample_text(text, source, number, kind, text_field)
        if value is None:
            empty += 1
            continue
        usable.append((number, start))
    if len(usable) >= MAX_SAMPLES and _more_content(f):
        notes.append(
            f"the file holds more than {MAX_SAMPLES} samples; used the first {MAX_SAMPLES} "
            f"(up to line {number}), the rest was not read"
        )
    if empty:
        notes.append(f"{_count(empty, 'line')} with an empty {_show(text_field)} skipped")
    return usable, notes


def _more_content(f: IO[bytes]) -> bool:
    """Whether the rest of ``f`` holds anything but whitespace (read in bounded chunks)."""
    while chunk := f.read(1 << 20):
        if chunk.strip():
            return True
    return False


def _too_long(source: Path, number: int) -> InputFileError:
    return InputFileError(
        _show_line(source, number),
        f"is longer than {MAX_LINE_CHARS:,} characters",
        "split it into shorter samples (each sample is cut to --max-length tokens anyway)",
    )


def _decode_line(raw: bytes, source: Path, number: int) -> str:
    """A raw line without its terminator (and without a UTF-8 byte order mark on line 1), decoded."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            _show_line(source, number),
            f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)",
            "save the file as UTF-8 (or give a .safetensors file of input_ids)",
        ) from None


def _sample_text(text: str, source: Path, number: int, kind: str, text_field: str) -> str | None:
    """The sample a non-blank line holds: the line itself, or its JSON field; None for an empty JSON field."""
    if kind == "text":
        return text
    where = _show_line(source, number)
    hint = " (a .json file is read as JSON lines)" if source.suffix.lower() == ".json" else ""
    one_per_line = f'write one JSON object per line, e.g. {{{_json_key(text_field)}: "..."}}{hint}'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(where, f"is not valid JSON ({exc.msg} at column {exc.colno})", one_per_line) from None
    except (ValueError, RecursionError) as exc:  # integers too long to convert, nesting too deep
        raise InputFileError(where, f"is not valid JSON ({_first_line(exc)})", one_per_line) from None
    if not isinstance(data, dict):
        raise InputFileError(where, f"is a JSON {_json_type(data)}, expected an object", one_per_line)
    if text_field not in data:
        keys = ", ".join(_show(k, 30) for k in list(data)[:5]) + (", ..." if len(data) > 5 else "")
        raise InputFileError(
            where,
            f"has no {_show(text_field)} field (its keys: {keys or 'none'})",
            "pass --text-field with the key that holds the text",
        )
    value = data[text_field]
    if not isinstance(value, str):
        raise InputFileError(
            where,
            f"field {_show(text_field)} is a JSON {_json_type(value)}, expected a string",
            "pass --text-field with the key that holds the text, or store the text as a string",
        )
    return value if value.strip() else None


def _tokenize(
    tokenizer: Any,
    texts: Iterable[tuple[int, str]],
    source: Path,
    max_length: int,
    vocab_size: int | None,
    model_folder: Path,
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Tokenise (line number, text) pairs in bounded chunks; return the samples and how many were cut."""
    out: list[dict[str, torch.Tensor]] = []
    truncated = 0
    chunk: list[tuple[int, str]] = []
    chars = 0

    def flush() -> None:
        nonlocal truncated
        # One more than max_length: a sample that reaches it was longer than max_length and is tokenised again
        # with the tokenizer's own truncation (which keeps its special tokens at the end).
        encoded = _call_tokenizer(tokenizer, chunk, source, max_length + 1)
        for (number, text), enc in zip(chunk, encoded, strict=True):
            if len(enc["input_ids"]) > max_length:
                enc = _call_tokenizer(tokenizer, [(number, text)], source, max_length)[0]
                truncated += 1
            out.append(_to_sample(enc, source, number, max_length, vocab_size, model_folder))
        chunk.clear()

    for number, text in texts:
        chunk.append((number, text))
        chars += len(text)
        if len(chunk) >= _TOKENIZE_CHUNK or chars >= _TOKENIZE_CHARS:
            flush()
            chars = 0
    if chunk:
        flush()
    return out, truncated


def _call_tokenizer(
    tokenizer: Any, chunk: list[tuple[int, str]], source: Path, max_length: int
) -> list[dict[str, list[int]]]:
    try:
        with _quiet_transformers():
            enc = tokenizer([t for _, t in chunk], truncation=True, max_length=max_length)
    except Exception as exc:  # tokenizers raise many types; find the line it fails on
        if len(chunk) > 1:
            return [r for item in chunk for r in _call_tokenizer(tokenizer, [item], source, max_length)]
        raise InputFileError(
            _show_line(source, chunk[0][0]),
            f"the tokenizer fails on it ({_first_line(exc)})",
            "fix or remove the line",
        ) from None
    keys = [k for k in TEXT_KEYS if k in enc]
    return [{k: list(enc[k][i]) for k in keys} for i in range(len(chunk))]


def _to_sample(
    enc: dict[str, list[int]],
    source: Path,
    number: int,
    max_length: int,
    vocab_size: int | None,
    model_folder: Path,
) -> dict[str, torch.Tensor]:
    ids = enc["input_ids"]
    where = _show_line(source, number)
    if not ids:
        raise InputFileError(where, "gives no tokens", "remove the line")
    if len(ids) > max_length:  # a tokenizer that ignores truncation
        raise InputFileError(
            where,
            f"gives {len(ids)} tokens although the tokenizer was asked to cut it to {max_length}",
            "give a .safetensors file of input_ids instead",
        )
    top = max(ids)
    if min(ids) < 0 or (vocab_size is not None and top >= vocab_size):
        raise InputFileError(
            where,
            f"tokenizes to id {top if min(ids) >= 0 else min(ids)}, outside the model's vocab_size {vocab_size}",
            f"put the tokenizer that belongs to the model into {_show_path(model_folder)}",
        )
    sample = {"input_ids": torch.tensor(ids, dtype=torch.long)}
    mask = enc.get("attention_mask")
    sample["attention_mask"] = (
        torch.tensor(mask, dtype=torch.long) if mask is not None else torch.ones(len(ids), dtype=torch.long)
    )
    if "token_type_ids" in enc:
        sample["token_type_ids"] = torch.tensor(enc["token_type_ids"], dtype=torch.long)
    return sample


def _text_tokenizer(source: Path, model_folder: Path, config: Mapping[str, Any]) -> Any:
    folder = _show_path(model_folder)
    if not _has_tokenizer(model_folder):
        if _model_takes(model_folder, config) == "images":
            raise InputFileError(
                _show_path(source),
                f"is read as text, but the model in {folder} takes images (it has {PREPROCESSOR_NAME}, no tokenizer)",
                "give a folder of images or a .safetensors file of pixel_values",
            )
        raise InputFileError(
            folder, "has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)", _NO_TOKENIZER_FIX
        )
    try:
        return _load_tokenizer(model_folder)
    except Exception as exc:  # transformers raises many types for broken or partial tokenizer files
        raise InputFileError(
            folder, f"its tokenizer cannot be loaded ({_first_line(exc)})", _NO_TOKENIZER_FIX
        ) from None


def _load_tokenizer(model_folder: Path) -> Any:
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(str(model_folder), local_files_only=True)


def _has_tokenizer(model_folder: Path) -> bool:
    return any((model_folder / name).is_file() for name in TOKENIZER_FILES)


# -- safetensors -----------------------------------------------------------------------------------------------


def _read_tensors(
    source: Path,
    model_folder: Path,
    config: Mapping[str, Any],
    samples: int | None,
    max_length: int,
    held_out: float,
    seed: int,
) -> CalibrationData:
    where = _show_path(source)
    header = _tensor_header(source)
    unknown = sorted(set(header) - TENSOR_KEYS)
    if unknown:
        names = ", ".join(_show(k, 40) for k in unknown[:5])
        if len(unknown) > 5:
            names += f" and {len(unknown) - 5} more"
        raise InputFileError(
            where,
            f"holds tensors calibration does not use: {names}",
            "keep only input_ids (with attention_mask, token_type_ids) or pixel_values",
        )
    total = sum(DTYPE_SIZES.get(dtype, 8) * math.prod(shape) for dtype, shape in header.values())
    if total > MAX_TENSOR_BYTES:
        raise InputFileError(
            where,
            f"holds {_size(total)} of tensors, more than the {_size(MAX_TENSOR_BYTES)} limit",
            "use fewer samples (a few hundred are enough)",
        )
    main = _check_tensor_header(header, where, model_folder, config, max_length)
    rows = header[main][1][0]
    notes: list[str] = []
    n = min(rows, MAX_SAMPLES)
    if rows > MAX_SAMPLES:
        notes.append(f"the file holds {rows} samples; used the first {MAX_SAMPLES}, the rest was not read")
    if n < 2:
        raise _too_few(where, n, "rows")
    tensors = _load_tensors(source, list(header), n)
    _check_tensor_values(tensors, where, config, unsigned64={k for k, (dtype, _) in header.items() if dtype == "U64"})

    def load(wanted: list[int]) -> tuple[list[dict[str, torch.Tensor]], int, list[str]]:
        out = []
        for i in wanted:
            sample = {k: t[i].clone() for k, t in tensors.items()}
            if main == "input_ids" and "attention_mask" not in sample:
                sample["attention_mask"] = torch.ones_like(sample["input_ids"])
            out.append({k: sample[k] for k in (*TEXT_KEYS, "pixel_values") if k in sample})
        return out, 0, []

    return _finish(source, "safetensors", n, "rows", samples, held_out, seed, load, notes)


def _tensor_header(source: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (dtype, shape), from the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt") as f:  # type: ignore[no-untyped-call]
            out = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                piece = f.get_slice(key)
                out[key] = (str(piece.get_dtype()), tuple(int(d) for d in piece.get_shape()))
            return out
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
        raise InputFileError(
            _show_path(source),
            f"is not a readable safetensors file ({_first_line(exc)})",
            "re-save it with safetensors.torch.save_file",
        ) from None


def _load_tensors(source: Path, keys: list[str], rows: int) -> dict[str, torch.Tensor]:
    """The first ``rows`` rows of each tensor, ids and masks as int64, pixel values as float32."""
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt") as f:  # type: ignore[no-untyped-call]
            out = {}
            for key in keys:
                t = f.get_slice(key)[:rows]
                out[key] = t.to(torch.float32) if key == "pixel_values" else t.to(torch.int64)
            return out
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
        raise InputFileError(
            _show_path(source),
            f"is not a readable safetensors file ({_first_line(exc)})",
            "re-save it with safetensors.torch.save_file",
        ) from None


def _check_tensor_header(
    header: dict[str, tuple[str, tuple[int, ...]]],
    where: str,
    model_folder: Path,
    config: Mapping[str, Any],
    max_length: int,
) -> str:
    """Check dtypes and shapes before reading; return the main key (``input_ids`` or ``pixel_values``)."""
    has_ids, has_pixels = "input_ids" in header, "pixel_values" in header
    takes = _model_takes(model_folder, config)
    folder = _show_path(model_folder)
    if has_ids and has_pixels:
        raise InputFileError(where, "holds both input_ids and pixel_values", "keep one kind of input per file")
    if not has_ids and not has_pixels:
        found = ", ".join(sorted(header)) or "no tensors"
        raise InputFileError(
            where,
            f"holds no input_ids or pixel_values tensor (found: {found})",
            "save input_ids (samples x tokens) or pixel_values (samples x channels x height x width)",
        )
    if has_pixels:
        if takes == "text":
            raise InputFileError(
                where, f"holds pixel_values, but the model in {folder} takes text", "give input_ids or text"
            )
        extra = sorted(k for k in header if k != "pixel_values")
        if extra:
            raise InputFileError(
                where, f"holds {', '.join(extra)} beside pixel_values", "keep only pixel_values for an image model"
            )
        dtype, shape = header["pixel_values"]
        if dtype not in FLOAT_DTYPES:
            raise InputFileError(where, f"pixel_values has dtype {dtype}, expected a float dtype", "save it as float32")
        if len(shape) != 4 or 0 in shape[1:]:
            raise InputFileError(
                where,
                f"pixel_values has shape {list(shape)}, expected (samples, channels, height, width)",
                "save one image per row, as the image processor gives them",
            )
        channels = _config_value(config, "num_channels")
        if isinstance(channels, int) and not isinstance(channels, bool) and shape[1] != channels:
            raise InputFileError(
                where,
                f"pixel_values has {shape[1]} channels, but the model takes {channels} (config.json num_channels)",
                "prepare the images with the model's image processor",
            )
        return "pixel_values"
    if takes == "images":
        raise InputFileError(
            where, f"holds input_ids, but the model in {folder} takes images", "give pixel_values or a folder of images"
        )
    dtype, shape = header["input_ids"]
    if dtype not in _INT_DTYPES:
        raise InputFileError(where, f"input_ids has dtype {dtype}, expected an integer dtype", "save it as int64")
    if len(shape) != 2 or shape[1] == 0:
        raise InputFileError(
            where,
            f"input_ids has shape {list(shape)}, expected (samples, tokens)",
            "save one sample per row (pad rows to one length and mark padding in attention_mask)",
        )
    if shape[1] > max_length:
        raise InputFileError(
            where,
            f"input_ids rows are {shape[1]} tokens long: too long for --max-length {max_length}",
            f"re-make the file with sequences of at most {max_length} tokens, or raise --max-length to {shape[1]}",
        )
    for key in ("attention_mask", "token_type_ids"):
        if key not in header:
            continue
        kdtype, kshape = header[key]
        allowed = _INT_DTYPES | {"BOOL"} if key == "attention_mask" else _INT_DTYPES
        if kdtype not in allowed:
            raise InputFileError(where, f"{key} has dtype {kdtype}, expected an integer dtype", "save it as int64")
        if kshape != shape:
            raise InputFileError(
                where,
                f"{key} has shape {list(kshape)}, but input_ids has {list(shape)}",
                f"save one {key} row per input_ids row, of the same length",
            )
    return "input_ids"


def _check_tensor_values(
    tensors: dict[str, torch.Tensor], where: str, config: Mapping[str, Any], unsigned64: set[str]
) -> None:
    """Check values; ``unsigned64`` names the tensors stored as U64 (values above 2**63 - 1 read as negative)."""
    if "pixel_values" in tensors:
        bad = ~torch.isfinite(tensors["pixel_values"])
        if bool(bad.any()):
            row = int(bad.flatten(1).any(1).nonzero()[0, 0])
            raise InputFileError(
                where, f"pixel_values holds non-finite values (first in row {row})", "re-make the file"
            )
        return
    ids = tensors["input_ids"]
    vocab_size = _vocab_size(config)
    negative = ids < 0
    if bool(negative.any()):
        r, c = (int(x) for x in negative.nonzero()[0])
        if "input_ids" in unsigned64:
            raise InputFileError(
                where,
                f"input_ids holds id {int(ids[r, c]) + 2**64} at row {r}, column {c}, too large for any vocabulary",
                "tokenise with the model's own tokenizer",
            )
        raise InputFileError(
            where, f"input_ids holds negative ids (first at row {r}, column {c}: {int(ids[r, c])})", "re-tokenise"
        )
    if vocab_size is not None:
        over = ids >= vocab_size
        if bool(over.any()):
            r, c = (int(x) for x in over.nonzero()[0])
            raise InputFileError(
                where,
                f"input_ids holds id {int(ids[r, c])} at row {r}, column {c}, "
                f"but the model's vocab_size is {vocab_size}",
                "tokenise with the model's own tokenizer",
            )
    if "attention_mask" in tensors:
        mask = tensors["attention_mask"]
        not_binary = (mask != 0) & (mask != 1)
        if bool(not_binary.any()):
            r, c = (int(x) for x in not_binary.nonzero()[0])
            raise InputFileError(
                where,
                f"attention_mask holds {int(mask[r, c])} at row {r}, column {c}, expected only 0 and 1",
                "mark tokens with 1 and padding with 0",
            )
        empty = (mask.sum(1) == 0).nonzero()
        if len(empty):
            raise InputFileError(
                where,
                f"attention_mask row {int(empty[0, 0])} is all 0 (a sample without tokens)",
                "remove the row or mark its tokens with 1",
            )
    if "token_type_ids" in tensors:
        types = tensors["token_type_ids"]
        limit = _config_value(config, "type_vocab_size")
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
        bad = (types < 0) | (types >= limit) if limit is not None else types < 0
        if bool(bad.any()):
            r, c = (int(x) for x in bad.nonzero()[0])
            raise InputFileError(
                where,
                f"token_type_ids holds {int(types[r, c])} at row {r}, column {c}, expected 0 to "
                f"{limit - 1 if limit is not None else 'the type_vocab_size'}",
                "re-tokenise with the model's own tokenizer",
            )


# -- images ----------------------------------------------------------------------------------------------------


def _read_images(
    source: Path,
    model_folder: Path,
    config: Mapping[str, Any],
    samples: int | None,
    held_out: float,
    seed: int,
) -> CalibrationData:
    where = _show_path(source)
    folder = _show_path(model_folder)
    if _model_takes(model_folder, config) == "text":
        raise InputFileError(
            where,
            f"is a folder (read as images), but the model in {folder} takes text",
            "give a .txt or .jsonl file of text, or a .safetensors file of input_ids",
        )
    if not (model_folder / PREPROCESSOR_NAME).is_file():
        raise InputFileError(
            folder,
            f"has no {PREPROCESSOR_NAME}, needed to prepare images",
            f"copy the model's {PREPROCESSOR_NAME} into it, or give a .safetensors file of pixel_values",
        )
    images, others = _list_images(source)
    notes: list[str] = []
    if not images:
        raise InputFileError(
            where,
            f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            + (f"; {_count(others, 'other file')}" if others else ""),
            "put the calibration images in it, or give a text, .jsonl or .safetensors file",
        )
    if others:
        notes.append(f"{_count(others, 'file')} in {where} ignored (not an image)")
    if len(images) > MAX_SAMPLES:
        notes.append(f"the folder holds {len(images)} images; used the first {MAX_SAMPLES} by name")
        images = images[:MAX_SAMPLES]

    def load(wanted: list[int]) -> tuple[list[dict[str, torch.Tensor]], int, list[str]]:
        processor = _load_processor(model_folder)
        channels = _config_value(config, "num_channels")
        mode = "L" if channels == 1 else "RGB"
        return [_process_image(processor, images[i], mode) for i in wanted], 0, []

    return _finish(source, "images", len(images), "images", samples, held_out, seed, load, notes)


def _list_images(folder: Path) -> tuple[list[Path], int]:
    """The images in ``folder`` sorted by name (hidden files and anything but regular files left out), and how
    many other files there are."""
    images: list[Path] = []
    others = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    regular = entry.is_file()  # follows links; False for FIFOs, devices, folders
                except OSError:
                    regular = False
                if regular and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    images.append(Path(entry.path))
                elif regular:
                    others += 1
    except OSError as exc:
        raise InputFileError(
            _show_path(folder), f"cannot be listed ({_first_line(exc)})", "check its permissions"
        ) from None
    return sorted(images, key=lambda p: p.name), others


def _load_processor(model_folder: Path) -> Any:
    try:
        from transformers import AutoImageProcessor

        with _quiet_transformers():
            return AutoImageProcessor.from_pretrained(str(model_folder), local_files_only=True)  # type: ignore[no-untyped-call]
    except Exception as exc:  # transformers raises many types for a broken config or a missing package
        raise InputFileError(
            _show_path(model_folder),
            f"its image processor cannot be loaded ({_first_line(exc)})",
            f"check {PREPROCESSOR_NAME}, or give a .safetensors file of pixel_values",
        ) from None


def _process_image(processor: Any, path: Path, mode: str) -> dict[str, torch.Tensor]:
    where = _show_path(path)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        raise InputFileError(where, "reading images needs the Pillow package", "pip install pillow") from None
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert(mode)
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise InputFileError(
            where, f"cannot be read as an image ({_first_line(exc)})", "replace or remove the file"
        ) from None
    try:
        with _quiet_transformers():
            pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    except Exception as exc:  # processors raise many types for odd sizes or modes
        raise InputFileError(
            where, f"the image processor fails on it ({_first_line(exc)})", "replace or remove the file"
        ) from None
    pixels = torch.as_tensor(pixels)
    if pixels.dim() != 4 or pixels.shape[0] != 1 or not pixels.is_floating_point():
        raise InputFileError(
            where,
            f"the image processor gives pixel_values of shape {list(pixels.shape)} ({pixels.dtype}) for it",
            "give a .safetensors file of pixel_values",
        )
    return {"pixel_values": pixels[0].to(torch.float32).contiguous()}


# -- helpers ---------------------------------------------------------------------------------------------------


def _model_takes(model_folder: Path, config: Mapping[str, Any]) -> str:
    """``"text"``, ``"images"``, or ``""`` when the model looks like both or neither."""
    text = _has_tokenizer(model_folder) or "vocab_size" in config
    images = (model_folder / PREPROCESSOR_NAME).is_file() or any(
        k in config for k in ("num_channels", "image_size", "vision_config")
    )
    if text and not images:
        return "text"
    if images and not text:
        return "images"
    return ""


def _config_value(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]``, else ``config["text_config"][key]``."""
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), Mapping):
        value = config["text_config"].get(key)
    return value


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    value = _config_value(config, "vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[IO[bytes]]:
    """Open ``path`` for reading without blocking on a FIFO, and refuse anything but a regular file."""
    where = _show_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputFileError(
            where, f"cannot be read ({_first_line(exc)})", "check the path and its permissions"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputFileError(
                where,
                f"is not a regular file or folder (a {_file_type(mode)})",
                "give a file or a folder of calibration data (save a stream to a file first)",
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def _file_type(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _printable(text: str) -> str:
    """``text`` with every non-printable character escaped as Python's repr does (no raw control characters)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show_path(path: Path) -> str:
    return _printable(str(path))


def _show_line(path: Path, number: int) -> str:
    return f"{_show_path(path)}, line {number}"


def _show(value: str, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_key(value: str) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return _printable(first[:200])


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return _count(nbytes, "byte")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
