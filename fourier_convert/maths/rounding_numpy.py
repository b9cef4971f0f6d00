"""Rounding float64 to the safetensors float dtypes once, to nearest even, with numpy alone.

numpy has no bfloat16, so a bfloat16 array is its ``uint16`` bit pattern. float64 -> float32 and
float64 -> float16 are single IEEE roundings in numpy (its float16 conversion works from the float64 bits;
checked against an exact reference in tests/test_rounding.py). bfloat16 goes through float32: the float32 value
is rounded to bfloat16 with integer arithmetic (add ``0x7FFF`` plus the lowest kept bit, drop 16 bits), which is
exact unless the float32 value lies exactly on a bfloat16 midpoint; those few elements are redone from float32
rounded **to odd** (Boldo and Melquiond, "When double rounding is odd"), as :mod:`fourier_convert.maths.rounding`
does for torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: numpy dtype holding each safetensors float dtype (bfloat16 as its bits).
STORAGE: dict[str, np.dtype[Any]] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}


def to_float64(stored: np.ndarray, st_dtype: str) -> np.ndarray:
    """Widen stored values (as :data:`STORAGE` holds them) to float64, exactly.

    Example:
        >>> to_float64(np.array([0x3F80, 0xC000], dtype=np.uint16), "BF16").tolist()
        [1.0, -2.0]
    """
    with np.errstate(invalid="ignore"):  # NaNs widen to NaNs
        if st_dtype == "BF16":
            return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
        return stored.astype(np.float64)


def _round_to_odd_float32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd: truncated toward zero, the last bit set when inexact."""
    y = x.astype(np.float32)
    back = y.astype(np.float64)
    inexact = (back != x) & ~np.isnan(x)
    away = inexact & (np.abs(back) > np.abs(x))
    y = np.where(away, np.nextafter(y, np.float32(0)), y)
    bits = y.view(np.uint32)
    return np.where(inexact, bits | np.uint32(1), bits).view(np.float32)


def _bf16_bits(y: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaNs become quiet NaNs of the same sign)."""
    bits = y.view(np.uint32)
    t = bits >> np.uint32(16)
    t &= np.uint32(1)
    t += np.uint32(0x7FFF)
    t += bits
    t >>= np.uint32(16)
    out = t.astype(np.uint16)
    nan = np.isnan(y)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def round_into(x: np.ndarray, out: np.ndarray, st_dtype: str) -> None:
    """Write float64 ``x``, each element rounded once to nearest even, into ``out`` (``st_dtype`` as held by
    :data:`STORAGE`, the same shape).

    Args:
        x: float64 values.
        out: Destination array.
        st_dtype: ``"BF16"``, ``"F16"``, ``"F32"`` or ``"F64"``.

    Raises:
        ValueError: Another dtype, or ``x`` is not float64.

    Example:
        >>> x = np.array([1.0 + 2.0**-8 + 2.0**-30])  # just above a bfloat16 tie: rounds up
        >>> out = np.empty(1, dtype=np.uint16); round_into(x, out, "BF16"); hex(int(out[0]))
        '0x3f81'
    """
    if x.dtype != np.float64:
        raise ValueError(f"expected float64, got {x.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf and NaNs are IEEE results here
        _round_into(x, out, st_dtype)


def _round_into(x: np.ndarray, out: np.ndarray, st_dtype: str) -> None:
    if st_dtype != "BF16":
        if st_dtype not in STORAGE:
            raise ValueError(f"cannot round to {st_dtype}: use one of {', '.join(STORAGE)}")
        np.copyto(out, x, casting="unsafe")  # one IEEE rounding (float16 included: numpy converts from the bits)
        return
    y = x.astype(np.float32)
    bits = _bf16_bits(y)
    suspect = np.flatnonzero((y.view(np.uint32) & np.uint32(0xFFFF)) == np.uint32(0x8000))
    if suspect.size:
        flat_x = x.reshape(-1)
        bits.reshape(-1)[suspect] = _bf16_bits(_round_to_odd_float32(flat_x[suspect]))
    out[...] = bits.reshape(out.shape)


def finite_stored(stored: np.ndarray, st_dtype: str) -> np.ndarray:
    """Boolean mask of the finite elements of stored values.

    Example:
        >>> finite_stored(np.array([0x3F80, 0x7F80, 0x7FC0], dtype=np.uint16), "BF16").tolist()
        [True, False, False]
    """
    if st_dtype == "BF16":
        result: np.ndarray = (stored & np.uint16(0x7F80)) != np.uint16(0x7F80)
    else:
        result = np.isfinite(stored)
    return result
