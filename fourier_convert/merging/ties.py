"""Settling merged elements that lie next to a rounding midpoint, the same way on every backend.

A float64 delta is exact only to its FFT's rounding (at most the spot check's tolerance, ``tol``). Where
``base + delta`` lies within that distance of a midpoint between two neighbours of the output dtype, two correct
backends (numpy on the CPU, cuFFT on a GPU) can round it to different neighbours: one element in a 12,000-element
float32 fixture did. So every backend finds the elements whose rounding would change anywhere in
``[x - w, x + w]`` (``w`` twice the sum of the contributions' tolerances, widened by two float64 ulps) and
recomputes just those from the float64 closed form (:func:`~fourier_convert.maths.closed_form.delta_at`, the same
numpy code everywhere). A backend that does not flag an element is then at least ``w`` away from the midpoint, on
the same side as the closed form; so the outputs are bit-identical across backends. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fourier_convert.maths.closed_form import delta_at, delta_tolerance
from fourier_convert.maths.rounding_numpy import STORAGE, round_into

_EPS64 = 2.0**-52


def tie_width(spectra: Sequence[tuple[np.ndarray, float]], shape: tuple[int, int]) -> float:
    """The half-width ``w`` of the window around each merged value: twice the summed spot-check tolerances.

    Args:
        spectra: ``(values, scaling)`` of each contribution.
        shape: The delta's shape.

    Returns:
        ``w`` (absolute).

    Example:
        >>> tie_width([(np.ones(4), 1.0)], (2, 2)) > 0
        True
    """
    return 2.0 * sum(delta_tolerance(values, shape, scaling, _EPS64) for values, scaling in spectra)


#: Stored mantissa bits, and the magnitude below which values are subnormal, per rounded output dtype.
_FORMAT = {"BF16": (7, 2.0**-126), "F16": (10, 2.0**-14), "F32": (23, 2.0**-126)}
#: Prefilter half-window, in float64 ulps, is ``2 ** (52 - p - _PREFILTER_BITS)``: a 2 ** -11 share of values.
_PREFILTER_BITS = 12


def near_ties(x: np.ndarray, width: float, st_dtype: str) -> np.ndarray:
    """Flat indices of the float64 values ``x`` whose rounding to ``st_dtype`` changes within
    ``x +- (width + 2 float64 ulps)``.

    A cheap prefilter on the float64 bits keeps the values whose dropped bits lie near the midpoint pattern
    (plus every value too small for that test, or subnormal in ``st_dtype``); only those are rounded at both
    ends of their window.

    Example:
        >>> x = np.array([1.0, 1.0 + 2.0**-8, 1.5])  # the middle one is a bfloat16 midpoint
        >>> near_ties(x, 1e-12, "BF16").tolist()
        [1]
    """
    if st_dtype == "F64":
        return np.empty(0, dtype=np.int64)
    p, subnormal = _FORMAT[st_dtype]
    drop = 52 - p
    half, k0 = 1 << (drop - 1), 1 << (drop - _PREFILTER_BITS)
    flat = x.reshape(-1)
    # |x - midpoint| <= width + 2 ulp64(x) is at most width * 2**53 / |x| + 4 float64 ulps of x: for
    # |x| >= small that is below k0 + 4, so the bit test below finds it; smaller values are all candidates.
    small = max(width * 2.0**53 / k0, subnormal)
    low = (flat.view(np.uint64) & np.uint64((1 << drop) - 1)).view(np.int64)
    low -= half
    candidates = np.abs(low) <= k0 + 8
    candidates |= np.abs(flat) < small
    where = np.flatnonzero(candidates)
    if where.size == 0:
        return where
    values = flat[where]
    reach = width + np.abs(values) * 2.0**-51
    a = np.empty(values.shape, dtype=STORAGE[st_dtype])
    b = np.empty(values.shape, dtype=STORAGE[st_dtype])
    round_into(values - reach, a, st_dtype)
    round_into(values + reach, b, st_dtype)
    bits = f"<u{a.itemsize}"  # compare bit patterns: NaNs and signed zeros too
    result: np.ndarray = where[a.view(bits) != b.view(bits)]
    return result


def closed_form_sums(
    base: np.ndarray,
    spectra: Sequence[tuple[np.ndarray, np.ndarray, float]],
    shape: tuple[int, int],
    rows: np.ndarray,
    cols: np.ndarray,
) -> np.ndarray:
    """``base + sum of deltas`` at the given entries, the deltas from the float64 closed form (in contribution
    order): the canonical value of an element :func:`near_ties` flagged.

    Args:
        base: The base's float64 values at the entries.
        spectra: ``(values, positions, scaling)`` of each contribution, positions in the stored weight's frame.
        shape: The stored weight's shape.
        rows: Row of each entry.
        cols: Column of each entry.

    Returns:
        float64 values, one per entry.

    Example:
        >>> closed_form_sums(np.zeros(1), [(np.array([2.0]), np.array([[0], [0]]), 1.0)], (2, 2),
        ...                  np.array([1]), np.array([1])).tolist()
        [0.5]
    """
    total = np.zeros(rows.shape[0])
    for values, positions, scaling in spectra:
        total += delta_at(values, positions, shape, scaling, rows, cols)
    result: np.ndarray = base + total
    return result
