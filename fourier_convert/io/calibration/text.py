"""Reading calibration text: UTF-8 text (one sample per line) or JSON lines (the text in one field), tokenised
with the model's own tokenizer.

A file is read twice (once to find and check its samples, once to tokenise the chosen ones), so memory holds the
chosen samples' tokens, never the whole file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from fourier_convert.errors import InputFileError, UsageError, first_line, short_repr
from fourier_convert.io.calibration.common import TEXT_KEYS, CalibrationData, finish, open_regular, plural, show_path
from fourier_convert.io.calibration.model import (
    PREPROCESSOR_NAME,
    has_tokenizer,
    load_tokenizer,
    model_takes,
    quiet_transformers,
    vocab_size_of,
)

_TOKENIZE_CHUNK = 256  # texts per tokenizer call
_TOKENIZE_CHARS = 4_000_000  # characters per tokenizer call (a chunk ends at whichever comes first)
_NO_TOKENIZER_FIX = "copy the tokenizer files of the model into it, or give a safetensors file of input_ids"


def read_text(
    source: Path,
    kind: str,
    model_folder: Path,
    config: Mapping[str, Any],
    text_field: str,
    samples: int | None,
    max_length: int,
    held_out: float,
    seed: int,
    *,
    max_samples: int,
    max_line_chars: int,
) -> CalibrationData:
    """Read a text (``kind`` ``"text"``) or JSON lines (``"jsonl"``) file as :func:`.read_calibration` does, reading
    at most ``max_samples`` samples and refusing lines over ``max_line_chars`` characters."""
    tokenizer = _text_tokenizer(source, model_folder, config)
    special = int(tokenizer.num_special_tokens_to_add())
    if max_length <= special:
        raise UsageError(
            "--max-length",
            f"is {max_length}, but the tokenizer adds {plural(special, 'special token')} to every sample",
            f"raise --max-length above {special}",
        )
    with open_regular(source) as f:
        lines, notes = _scan_lines(f, source, kind, text_field, max_samples, max_line_chars)

        def load(wanted: list[int]) -> tuple[list[dict[str, torch.Tensor]], int, list[str]]:
            def texts() -> Iterator[tuple[int, str]]:  # read lazily: memory holds one chunk of text at a time
                for i in wanted:
                    number, offset = lines[i]
                    f.seek(offset)
                    text = _decode_line(f.readline(), source, number)
                    yield number, _sample_text(text, source, number, kind, text_field) or ""

            out, truncated = _tokenize(tokenizer, texts(), source, max_length, vocab_size_of(config), model_folder)
            note = []
            if truncated:
                cut = f"{truncated} of {plural(len(wanted), 'line')} were cut to {max_length} tokens (--max-length)"
                note.append(cut)
            return out, truncated, note

        data = finish(source, kind, len(lines), "lines", samples, held_out, seed, load, notes)
    return data


def _scan_lines(
    f: IO[bytes], source: Path, kind: str, text_field: str, max_samples: int, max_line_chars: int
) -> tuple[list[tuple[int, int]], list[str]]:
    """First pass: check every line up to ``max_samples`` samples; return (line number, byte offset) of each
    usable line, and notes."""
    usable: list[tuple[int, int]] = []
    notes: list[str] = []
    empty = 0
    number = 0
    offset = 0
    limit = 4 * max_line_chars + 2  # UTF-8 takes at most 4 bytes a character, plus "\r\n"
    while len(usable) < max_samples:
        raw = f.readline(limit + 1)
        if not raw:
            break
        number += 1
        start, offset = offset, offset + len(raw)
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise _too_long(source, number, max_line_chars)
        text = _decode_line(raw, source, number)
        if len(text) > max_line_chars:
            raise _too_long(source, number, max_line_chars)
        if not text.strip():
            continue
        value = _sample_text(text, source, number, kind, text_field)
        if value is None:
            empty += 1
            continue
        usable.append((number, start))
    if len(usable) >= max_samples and _more_content(f):
        notes.append(
            f"the file holds more than {max_samples} samples; used the first {max_samples} "
            f"(up to line {number}), the rest was not read"
        )
    if empty:
        notes.append(f"{plural(empty, 'line')} with an empty {short_repr(text_field)} skipped")
    return usable, notes


def _more_content(f: IO[bytes]) -> bool:
    """Whether the rest of ``f`` holds anything but whitespace (read in bounded chunks)."""
    while chunk := f.read(1 << 20):
        if chunk.strip():
            return True
    return False


def _too_long(source: Path, number: int, max_line_chars: int) -> InputFileError:
    return InputFileError(
        _show_line(source, number),
        f"is longer than {max_line_chars:,} characters",
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
        raise InputFileError(where, f"is not valid JSON ({first_line(exc)})", one_per_line) from None
    if not isinstance(data, dict):
        raise InputFileError(where, f"is a JSON {_json_type(data)}, expected an object", one_per_line)
    if text_field not in data:
        keys = ", ".join(short_repr(k, 30) for k in list(data)[:5]) + (", ..." if len(data) > 5 else "")
        raise InputFileError(
            where,
            f"has no {short_repr(text_field)} field (its keys: {keys or 'none'})",
            "pass --text-field with the key that holds the text",
        )
    value = data[text_field]
    if not isinstance(value, str):
        raise InputFileError(
            where,
            f"field {short_repr(text_field)} is a JSON {_json_type(value)}, expected a string",
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
        with quiet_transformers():
            enc = tokenizer([t for _, t in chunk], truncation=True, max_length=max_length)
    except Exception as exc:  # tokenizers raise many types; find the line it fails on
        if len(chunk) > 1:
            return [r for item in chunk for r in _call_tokenizer(tokenizer, [item], source, max_length)]
        raise InputFileError(
            _show_line(source, chunk[0][0]),
            f"the tokenizer fails on it ({first_line(exc)})",
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
            f"put the tokenizer that belongs to the model into {show_path(model_folder)}",
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
    folder = show_path(model_folder)
    if not has_tokenizer(model_folder):
        if model_takes(model_folder, config) == "images":
            raise InputFileError(
                show_path(source),
                f"is read as text, but the model in {folder} takes images (it has {PREPROCESSOR_NAME}, no tokenizer)",
                "give a folder of images or a .safetensors file of pixel_values",
            )
        raise InputFileError(
            folder, "has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)", _NO_TOKENIZER_FIX
        )
    try:
        return load_tokenizer(model_folder)
    except Exception as exc:  # transformers raises many types for broken or partial tokenizer files
        raise InputFileError(folder, f"its tokenizer cannot be loaded ({first_line(exc)})", _NO_TOKENIZER_FIX) from None


# -- messages --------------------------------------------------------------------------------------------------


def _show_line(path: Path, number: int) -> str:
    return f"{show_path(path)}, line {number}"


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
