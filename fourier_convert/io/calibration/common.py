"""What the calibration readers share: the result type, choosing and splitting samples, opening a file safely, and
the pieces of their messages.

Samples are chosen and split with ``random.Random(seed)``: the same file and seed give the same samples and the
same split.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from fourier_convert.errors import InputFileError, first_line, printable

#: The keys of a text sample.
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


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


# -- choice and split ------------------------------------------------------------------------------------------


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
        notes.append(f"{plural(count, 'sample')}: {len(train)} to fit, {len(held)} held out for the report")
    else:
        notes.append(f"{plural(count, 'sample')}, none held out (--held-out 0): the report has no held-out measure")
    return train, held, notes


def too_few(where: str, n: int, noun: str) -> InputFileError:
    """The error for ``n`` (fewer than 2) usable samples in ``where``; ``noun`` names what to add."""
    return InputFileError(
        where,
        f"holds {plural(n, 'usable sample')}; needs at least 2 samples: one to fit, one to report on",
        f"add more {noun}",
    )


def finish(
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
        raise too_few(show_path(source), n, noun)
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


# -- opening files ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[IO[bytes]]:
    """Open ``path`` for reading without blocking on a FIFO, and refuse anything but a regular file."""
    where = show_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputFileError(
            where, f"cannot be read ({first_line(exc)})", "check the path and its permissions"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(where, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def not_regular(where: str, mode: int) -> InputFileError:
    """The error for a path that is neither a regular file nor a folder (``mode`` from its ``stat``)."""
    return InputFileError(
        where,
        f"is not a regular file or folder (a {_file_type(mode)})",
        "give a file or a folder of calibration data (save a stream to a file first)",
    )


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


# -- messages --------------------------------------------------------------------------------------------------


def show_path(path: Path) -> str:
    """``path`` as messages show it (non-printable characters escaped)."""
    return printable(str(path))


def plural(n: int, noun: str) -> str:
    """``"1 sample"``, ``"2 samples"``: ``n`` and ``noun``, with an ``s`` unless ``n`` is 1."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
