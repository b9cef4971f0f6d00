"""An exact, independent reference for round-to-nearest-even from float64 (used by the rounding and merge tests)."""

from __future__ import annotations

import torch


def nearest_even(x: torch.Tensor, mantissa: int) -> torch.Tensor:
    """The correctly rounded value of float64 ``x`` in a format with ``mantissa`` stored bits (normal range),
    computed exactly in float64: the two neighbours by clearing low bits, the nearer one, ties to even."""
    drop = 52 - mantissa
    bits = x.view(torch.int64)
    lo_bits = bits & ~((1 << drop) - 1)
    lo = lo_bits.view(torch.float64)
    hi = (lo_bits + (1 << drop)).view(torch.float64)  # the next value away from zero
    below, above = (x - lo).abs(), (hi - x).abs()  # exact (Sterbenz)
    even = ((lo_bits >> drop) & 1) == 0
    return torch.where((below < above) | ((below == above) & even), lo, hi)
