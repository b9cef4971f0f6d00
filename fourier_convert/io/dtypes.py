"""Mapping between safetensors dtype strings, torch dtypes and user-facing names."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from fourier_convert.errors import UsageError

if TYPE_CHECKING:
    import torch


@functools.cache
def _tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """safetensors dtype string <-> torch dtype (built on first use: parsing ``--dtype`` needs no torch)."""
    import torch

    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
    return table, {v: k for k, v in table.items()}


#: ``--dtype`` names accepted on the command line, mapped to safetensors dtype strings.
USER_DTYPES = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
}


def torch_dtype(st_dtype: str) -> torch.dtype:
    """Torch dtype for a safetensors dtype string (``"BF16"`` -> ``torch.bfloat16``)."""
    try:
        return _tables()[0][st_dtype]
    except KeyError:
        raise UsageError("dtype", f"{st_dtype!r} cannot be handled by torch here", "re-save the tensor") from None


def st_dtype(dtype: torch.dtype) -> str:
    """safetensors dtype string for a torch dtype."""
    return _tables()[1][dtype]


def st_dtype_or_none(dtype: torch.dtype) -> str | None:
    """safetensors dtype string for a torch dtype, or None for one safetensors cannot hold (complex, say).

    Example:
        >>> import torch
        >>> st_dtype_or_none(torch.bfloat16), st_dtype_or_none(torch.complex64)
        ('BF16', None)
    """
    return _tables()[1].get(dtype)


def parse_user_dtype(name: str) -> str:
    """Map a ``--dtype`` value to a safetensors dtype string.

    Raises:
        UsageError: Unknown name.

    Example:
        >>> parse_user_dtype("bfloat16")
        'BF16'
    """
    try:
        return USER_DTYPES[name.lower()]
    except KeyError:
        raise UsageError(
            "--dtype", f"unknown dtype {name!r}", f"use one of {', '.join(sorted(set(USER_DTYPES)))}"
        ) from None
