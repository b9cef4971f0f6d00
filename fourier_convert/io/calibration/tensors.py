"""Reading calibration tensors: a safetensors file of ready-made ``input_ids`` (with optional ``attention_mask`` /
``token_type_ids``) or ``pixel_values``, one row per sample, checked against the model before and after reading."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fourier_convert.errors import InputFileError, first_line, short_repr
from fourier_convert.io.calibration.common import TEXT_KEYS, CalibrationData, finish, plural, show_path, too_few
from fourier_convert.io.calibration.model import config_value, model_takes, vocab_size_of
from fourier_convert.io.safetensors_file import DTYPE_SIZES, FLOAT_DTYPES

TENSOR_KEYS = frozenset({*TEXT_KEYS, "pixel_values"})
_INT_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})


def read_tensors(
    source: Path,
    model_folder: Path,
    config: Mapping[str, Any],
    samples: int | None,
    max_length: int,
    held_out: float,
    seed: int,
    *,
    max_samples: int,
    max_tensor_bytes: int,
) -> CalibrationData:
    """Read a safetensors file as :func:`.read_calibration` does, refusing more than ``max_tensor_bytes`` of tensors
    before reading them and reading at most ``max_samples`` rows."""
    where = show_path(source)
    header = _tensor_header(source)
    unknown = sorted(set(header) - TENSOR_KEYS)
    if unknown:
        names = ", ".join(short_repr(k, 40) for k in unknown[:5])
        if len(unknown) > 5:
            names += f" and {len(unknown) - 5} more"
        raise InputFileError(
            where,
            f"holds tensors calibration does not use: {names}",
            "keep only input_ids (with attention_mask, token_type_ids) or pixel_values",
        )
    total = sum(DTYPE_SIZES.get(dtype, 8) * math.prod(shape) for dtype, shape in header.values())
    if total > max_tensor_bytes:
        raise InputFileError(
            where,
            f"holds {_size(total)} of tensors, more than the {_size(max_tensor_bytes)} limit",
            "use fewer samples (a few hundred are enough)",
        )
    main = _check_tensor_header(header, where, model_folder, config, max_length)
    rows = header[main][1][0]
    notes: list[str] = []
    n = min(rows, max_samples)
    if rows > max_samples:
        notes.append(f"the file holds {rows} samples; used the first {max_samples}, the rest was not read")
    if n < 2:
        raise too_few(where, n, "rows")
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

    return finish(source, "safetensors", n, "rows", samples, held_out, seed, load, notes)


def _tensor_header(source: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (dtype, shape), from the header only."""
    from safetensors import safe_open

    with _unreadable_as_input_error(source), safe_open(str(source), framework="pt") as f:  # type: ignore[no-untyped-call]
        out = {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            piece = f.get_slice(key)
            out[key] = (str(piece.get_dtype()), tuple(int(d) for d in piece.get_shape()))
        return out


def _load_tensors(source: Path, keys: list[str], rows: int) -> dict[str, torch.Tensor]:
    """The first ``rows`` rows of each tensor, ids and masks as int64, pixel values as float32."""
    from safetensors import safe_open

    with _unreadable_as_input_error(source), safe_open(str(source), framework="pt") as f:  # type: ignore[no-untyped-call]
        out = {}
        for key in keys:
            t = f.get_slice(key)[:rows]
            out[key] = t.to(torch.float32) if key == "pixel_values" else t.to(torch.int64)
        return out


@contextlib.contextmanager
def _unreadable_as_input_error(source: Path) -> Iterator[None]:
    """Any error the safetensors reader raises inside the block becomes the one-line InputFileError."""
    try:
        yield
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
        raise InputFileError(
            show_path(source),
            f"is not a readable safetensors file ({first_line(exc)})",
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
    takes = model_takes(model_folder, config)
    folder = show_path(model_folder)
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
        channels = config_value(config, "num_channels")
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
    vocab_size = vocab_size_of(config)
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
        limit = config_value(config, "type_vocab_size")
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


# -- messages --------------------------------------------------------------------------------------------------


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return plural(nbytes, "byte")
