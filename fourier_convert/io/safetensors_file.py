"""Reading safetensors files without decoding them.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets"}`` (offsets relative to the end of the header), optional
``__metadata__``, then the raw little-endian tensor bytes. This module parses and validates the header
(truncation, overlapping or out-of-range offsets, unknown dtypes) so that untouched tensors can be copied
as byte ranges and changed ones read with one ``pread`` each.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fourier_convert.errors import InputFileError

if TYPE_CHECKING:
    import numpy as np
    import torch

#: Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

_MAX_HEADER = 100 * 1024 * 1024
#: Most tensors one file may list. Real shards hold thousands; a million zero-size tensors (a 59 MB header) took
#: 33 s and 1.5 GB to merge, so a file is refused above this (about 3 s of work at most).
MAX_TENSORS = 100_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file.

    Attributes:
        name: Tensor key.
        dtype: safetensors dtype string (``"F32"``, ``"BF16"``, ...).
        shape: Tensor shape.
        start: Absolute byte offset of the data in the file.
        nbytes: Length of the data in bytes.
        path: The file holding it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int
    path: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class SafetensorsFile:
    """A parsed safetensors header.

    Attributes:
        path: The file.
        header_bytes: The raw header, length prefix included (reused verbatim when a shard is mirrored).
        tensors: Tensor infos in file order (ascending offsets).
        metadata: The ``__metadata__`` map (string to string), empty when absent.
    """

    path: Path
    header_bytes: bytes
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return len(self.header_bytes)


def read_header(path: str | os.PathLike[str]) -> SafetensorsFile:
    """Parse and validate a safetensors header without reading tensor data.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        The parsed header with absolute offsets.

    Raises:
        InputFileError: The file is missing, truncated, or its header is malformed.

    Example:
        >>> st = read_header("model.safetensors")  # doctest: +SKIP
        >>> st.tensors["lm_head.weight"].shape  # doctest: +SKIP
        (256, 64)
    """
    p = Path(path)
    try:
        found = p.stat()
        if stat.S_ISDIR(found.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(found.st_mode):  # opening a FIFO would block, a device never end
            raise InputFileError(str(p), "is not a regular file (a FIFO or a device)", "pass a .safetensors file")
        size = found.st_size
        with open(p, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputFileError(
                    str(p), f"file is {size} bytes, too short to be safetensors", "re-download or re-save the file"
                )
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise InputFileError(
                    str(p),
                    f"header length {hlen} does not fit in the {size}-byte file (truncated or not safetensors)",
                    "re-download or re-save the file",
                )
            raw = f.read(hlen)
    except FileNotFoundError:
        raise InputFileError(str(p), "file not found", "check the path") from None
    except IsADirectoryError:
        raise InputFileError(str(p), "is a directory, expected a .safetensors file", "check the path") from None
    except PermissionError:
        raise InputFileError(str(p), "permission denied", "make the file readable") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raise InputFileError(
            str(p),
            "safetensors header starts with a UTF-8 byte-order mark, which the safetensors library refuses",
            "re-save the file",
        )
    try:
        header: dict[str, Any] = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputFileError(
            str(p), f"safetensors header is not valid JSON ({exc})", "re-download or re-save the file"
        ) from None
    except RecursionError:
        raise InputFileError(
            str(p), "safetensors header is JSON nested too deeply to read", "re-save the file"
        ) from None
    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        raise InputFileError(
            str(p),
            f"header lists {count:,} tensors, more than the {MAX_TENSORS:,} one file may hold here",
            "re-save the checkpoint in more shards",
        )
    data_start = 8 + hlen
    data_len = size - data_start
    metadata = _metadata(header.pop("__metadata__", None), p)
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(name, entry, p)
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * DTYPE_SIZES[dtype] or begin < 0:
            raise InputFileError(
                str(p),
                f"tensor {name!r} spans bytes {begin}..{end} but {dtype}{list(shape)} needs "
                f"{numel * DTYPE_SIZES[dtype]}",
                "re-save the file",
            )
        if end > data_len:
            raise InputFileError(
                str(p),
                f"truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes",
                "re-download or re-save the file",
            )
        infos.append(TensorInfo(name, dtype, shape, data_start + begin, end - begin, p))
    infos.sort(key=lambda t: t.start)
    for a, b in itertools.pairwise(infos):
        if b.start < a.start + a.nbytes:
            raise InputFileError(str(p), f"tensors {a.name!r} and {b.name!r} overlap in the file", "re-save the file")
    # the safetensors library requires the tensors to fill the data section exactly, in offset order
    position = data_start
    for info in infos:
        if info.start != position:
            raise InputFileError(
                str(p),
                f"tensor {info.name!r} starts at data byte {info.start - data_start}, but the previous tensor ends "
                f"at {position - data_start} (a gap the safetensors library refuses)",
                "re-save the file",
            )
        position += info.nbytes
    if position != size:
        raise InputFileError(
            str(p),
            f"the tensors end at byte {position} but the file has {size} bytes (trailing data the safetensors "
            "library refuses)",
            "re-save the file",
        )
    return SafetensorsFile(
        path=p,
        header_bytes=prefix + raw,
        tensors={t.name: t for t in infos},
        metadata=metadata,
    )


def _metadata(raw: Any, p: Path) -> dict[str, str]:
    """``__metadata__``, which the safetensors library requires to map strings to strings."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputFileError(
            str(p), f"__metadata__ is a JSON {_json_kind(raw)}, expected an object of strings", "re-save the file"
        )
    for key, value in raw.items():
        if not isinstance(value, str):
            raise InputFileError(
                str(p),
                f"__metadata__ entry {key!r} is a JSON {_json_kind(value)}, expected a string",
                "re-save the file",
            )
    return dict(raw)


def _entry(name: str, entry: Any, p: Path) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor's ``dtype``, ``shape`` and ``data_offsets``, held to what the safetensors library accepts:
    a known dtype string, non-negative JSON integers, two offsets in order."""

    def count(v: Any) -> bool:
        return type(v) is int and v >= 0

    if not isinstance(entry, dict):
        raise InputFileError(str(p), f"tensor {name!r}: header entry is a JSON {_json_kind(entry)}", "re-save the file")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise InputFileError(str(p), f"tensor {name!r}: header entry has no {missing[0]!r}", "re-save the file")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputFileError(str(p), f"tensor {name!r} has unsupported dtype {dtype!r}", "re-save the file")
    if not isinstance(shape, list) or not all(count(d) for d in shape):
        raise InputFileError(
            str(p), f"tensor {name!r} has shape {shape!r}, expected non-negative integers", "re-save the file"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(count(o) for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise InputFileError(
            str(p),
            f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end] with 0 <= begin <= end",
            "re-save the file",
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def read_bytes(info: TensorInfo) -> bytearray:
    """Read one tensor's raw bytes with a single positioned read.

    Raises:
        InputFileError: The file ends inside the tensor.
    """
    out = bytearray(info.nbytes)
    read_into(info, memoryview(out))
    return out


def read_into(info: TensorInfo, view: memoryview, start: int = 0) -> None:
    """Fill ``view`` with the tensor's bytes from byte ``start`` of its data on (a part of a large tensor,
    e.g. into a pinned transfer buffer).

    Args:
        info: The tensor.
        view: Writable bytes; ``len(view)`` bytes are read.
        start: Offset inside the tensor's data.

    Raises:
        InputFileError: The file ends inside the tensor.
        ValueError: The range runs past the tensor.

    Example:
        >>> buf = bytearray(2)
        >>> read_into(info, memoryview(buf), start=2)  # doctest: +SKIP
    """
    if start < 0 or start + len(view) > info.nbytes:
        raise ValueError(f"bytes {start}..{start + len(view)} are outside tensor {info.name!r} ({info.nbytes} bytes)")
    fd = os.open(info.path, os.O_RDONLY)
    try:
        got = 0
        while got < len(view):
            k = os.preadv(fd, [view[got:]], info.start + start + got)
            if k == 0:
                raise InputFileError(
                    str(info.path), f"truncated while reading tensor {info.name!r}", "re-download the file"
                )
            got += k
    finally:
        os.close(fd)


def read_numpy_float64(info: TensorInfo) -> np.ndarray:
    """Read a floating tensor as a float64 numpy array (bf16 decoded exactly by bit shifting).

    Raises:
        InputFileError: The tensor is not a floating dtype.
    """
    return _float64(info, read_bytes(info)).reshape(info.shape)


def float_norm(info: TensorInfo, block_bytes: int = 1 << 24) -> float:
    """The Frobenius norm of a floating tensor, summed in float64 from blocks of about ``block_bytes`` read in
    turn (memory stays at one block, not a float64 copy of the tensor).

    Raises:
        InputFileError: The tensor is not a floating dtype, or its file ends inside it.

    Example:
        >>> float_norm(open_checkpoint("fixtures/llama/base").tensors["model.norm.weight"])  # doctest: +SKIP
        8.0
    """
    import numpy as np

    size = DTYPE_SIZES[info.dtype]
    step = max(size, block_bytes // size * size)
    buffer = bytearray(min(step, info.nbytes))
    total = 0.0
    for start in range(0, info.nbytes, step):
        part = memoryview(buffer)[: min(step, info.nbytes - start)]
        read_into(info, part, start)
        values = _float64(info, part)
        total += float(np.dot(values, values))
    return math.sqrt(total)


def _float64(info: TensorInfo, raw: bytes | bytearray | memoryview) -> np.ndarray:
    """Stored little-endian floats of ``info``'s dtype, decoded exactly to a flat float64 array."""
    import numpy as np

    if info.dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        arr = bits.view(np.float32)
    elif info.dtype == "F16":
        arr = np.frombuffer(raw, dtype="<f2")
    elif info.dtype == "F32":
        arr = np.frombuffer(raw, dtype="<f4")
    elif info.dtype == "F64":
        arr = np.frombuffer(raw, dtype="<f8")
    else:
        raise InputFileError(
            str(info.path), f"tensor {info.name!r} has dtype {info.dtype}, expected a float dtype", "re-save it"
        )
    return arr.astype(np.float64)


def read_torch(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into a CPU torch tensor of its stored dtype."""
    import torch

    from fourier_convert.io.dtypes import torch_dtype

    raw = read_bytes(info)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).reshape(info.shape)


def map_torch(info: TensorInfo) -> torch.Tensor:
    """A CPU tensor that views ``info``'s bytes in a map of its file: no read, no copy.

    The map covers this tensor only and is private (copy-on-write: writing to the tensor never changes the
    file); it is unmapped when the tensor is freed, so pages it touched stop counting as the process's memory.

    Example:
        >>> w = map_torch(open_checkpoint("fixtures/llama/base").tensors["model.norm.weight"])  # doctest: +SKIP
    """
    import torch

    from fourier_convert.io.dtypes import torch_dtype

    dtype = torch_dtype(info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    first = info.start - info.start % mmap.ALLOCATIONGRANULARITY  # maps start at a granularity boundary
    with open(info.path, "rb") as f:
        view = mmap.mmap(f.fileno(), info.start + info.nbytes - first, access=mmap.ACCESS_COPY, offset=first)
    return torch.frombuffer(view, dtype=dtype, count=info.numel, offset=info.start - first).reshape(info.shape)
