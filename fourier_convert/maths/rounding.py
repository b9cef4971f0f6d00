"""Rounding float64 values once, to nearest even, into a narrower float dtype.

torch converts float64 to bfloat16 and float16 through float32, which rounds twice: a value just above a
bfloat16 rounding boundary can first round down onto float32's value *at* the boundary, then tie-break to even
in the wrong direction. (Among 10 million standard normals, 72 come out different from a single rounding.)
:func:`round_once` rounds float64 to float32 **to odd** first (truncate, and set the last bit when anything was
cut off): float32 keeps at least two more bits than bfloat16 and float16, so the odd bit stands in for everything
below it, and the float32 -> target step is then exactly the single round-to-nearest-even of the float64 value
(Boldo and Melquiond, "When double rounding is odd", 2005). Works the same on every device.
"""

from __future__ import annotations

import torch

#: Output dtypes :func:`round_once` supports.
ROUNDED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def round_to_odd_float32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, rounded to odd: truncated toward zero, with the last mantissa bit set when the
    conversion was inexact (infinities, NaNs and exact values unchanged).

    Example:
        >>> x = torch.tensor([1.0, 1.0 + 2.0**-30, -(1.0 + 2.0**-30)], dtype=torch.float64)
        >>> [float(v) for v in round_to_odd_float32(x)] == [1.0, 1.0 + 2.0**-23, -(1.0 + 2.0**-23)]
        True
    """
    if x.dtype != torch.float64:
        raise ValueError(f"expected float64, got {x.dtype}")
    # Integer arithmetic on the float32 bits, with no where / nextafter / bitwise kernels: on a GPU each kind of
    # kernel first used costs host memory when CUDA loads it (tens of MB), and these are the merge's only users.
    y = x.to(torch.float32)
    back = y.to(torch.float64)
    inexact = (back != x).to(torch.int32) * (x == x).to(torch.int32)  # NaNs stay as they are
    # round-to-nearest went away from zero (back - x has x's sign): one step back toward zero truncates
    away = ((back - x) * x > 0).to(torch.int32)
    bits = y.view(torch.int32) - away  # the bits of a finite float32 count up with its magnitude, either sign
    bits += inexact * (1 - bits % 2)  # set the last bit (two's complement: bits % 2 is that bit)
    return bits.view(torch.float32)


#: Per target dtype: (mask of the float32 bits dropped when rounding to it, the pattern of an exact midpoint,
#: smallest normal magnitude). A float32 value whose dropped bits are exactly a midpoint may be a double-rounding
#: tie; below the smallest normal the dropped bits are more, so those values are suspects too.
_TIES = {torch.bfloat16: (0xFFFF, 0x8000, 0.0), torch.float16: (0x1FFF, 0x1000, 2.0**-14)}


def round_once(
    x: torch.Tensor, dtype: torch.dtype, *, chunk: int = 1 << 20, elementwise: bool | None = None
) -> torch.Tensor:
    """Round float64 ``x`` to ``dtype`` once, to nearest even (the correctly rounded value).

    On the CPU: torch's float64 -> float32 -> ``dtype`` conversion, which is already correct unless the
    float32 value lies exactly on a midpoint of ``dtype`` (or below its normal range); those few elements
    are redone through :func:`round_to_odd_float32`. On a GPU every element goes through
    :func:`round_to_odd_float32` (elementwise, without stopping the host to find the few).

    Args:
        x: float64 values (any device).
        dtype: float64, float32, bfloat16 or float16.
        chunk: Elements converted at a time (bounds the temporaries).
        elementwise: Send every element through :func:`round_to_odd_float32` instead of finding the few that
            need it; None (default) does so on a GPU only. Both give the same values.

    Returns:
        ``x`` in ``dtype``, each element the representable value nearest to it (ties to even).

    Raises:
        ValueError: ``x`` is not float64, or ``dtype`` is not a supported float dtype.

    Example:
        >>> x = torch.tensor([1.0 + 2.0**-8 + 2.0**-30], dtype=torch.float64)  # just above a bf16 tie
        >>> x.to(torch.bfloat16).item(), round_once(x, torch.bfloat16).item()  # torch rounds twice
        (1.0, 1.0078125)
    """
    if x.dtype != torch.float64:
        raise ValueError(f"expected float64, got {x.dtype}")
    if dtype == torch.float64:
        return x
    if dtype == torch.float32:
        return x.to(torch.float32)  # one IEEE rounding
    if dtype not in _TIES:
        raise ValueError(f"cannot round to {dtype}: use one of {', '.join(str(d) for d in ROUNDED_DTYPES)}")
    mask, tie, smallest = _TIES[dtype]
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    flat_in, flat_out = x.reshape(-1), out.view(-1)
    if x.device.type != "cpu" if elementwise is None else elementwise:
        # a few elementwise kernels, and no wait for the device (finding the suspects with nonzero() would stop
        # the host at every chunk)
        for start in range(0, flat_in.numel(), chunk):
            flat_out[start : start + chunk] = round_to_odd_float32(flat_in[start : start + chunk]).to(dtype)
        return out
    for start in range(0, flat_in.numel(), chunk):
        part = flat_in[start : start + chunk]
        y = part.to(torch.float32)
        flat_out[start : start + chunk] = y.to(dtype)
        suspect = (y.view(torch.int32) & mask) == tie
        if smallest:
            suspect |= (y.abs() < smallest) & (y != 0)
        where = suspect.nonzero().reshape(-1)
        if where.numel():
            flat_out[start + where] = round_to_odd_float32(part[where]).to(dtype)
    return out
