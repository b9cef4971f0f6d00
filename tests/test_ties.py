"""fourier_convert.merging.ties: elements next to a rounding midpoint are settled from the closed form, so two
backends whose float64 deltas differ within the FFT's error write the same bits."""

from __future__ import annotations

import numpy as np
import pytest

from fourier_convert.maths.closed_form import delta_tolerance
from fourier_convert.maths.delta_numpy import delta_float64
from fourier_convert.maths.indices import spectral_positions
from fourier_convert.maths.rounding_numpy import STORAGE, round_into, to_float64
from fourier_convert.merging.ties import closed_form_sums, near_ties, tie_width


def test_near_ties_finds_midpoints_and_only_them() -> None:
    one_ulp = {"BF16": 2.0**-7, "F16": 2.0**-10, "F32": 2.0**-23}
    for st, ulp in one_ulp.items():
        mid = 1.0 + ulp / 2
        x = np.array([1.0, mid, mid + 1e-13, mid - 1e-13, mid + 1e-9, -mid, 1.0 + ulp])
        assert near_ties(x, 1e-12, st).tolist() == [1, 2, 3, 5], st
    assert near_ties(np.array([1.0 + 2.0**-8]), 1.0, "F64").size == 0
    assert near_ties(np.array([0.0]), 1e-30, "BF16").tolist() == [0]  # -0 and +0 are different bits


@pytest.mark.parametrize("st", ["BF16", "F16", "F32"])
def test_two_backends_within_the_error_write_the_same_bits(st: str) -> None:
    """A float64 base (merged into a narrower dtype) planted so that base + delta is within a float64 ulp of a
    midpoint at a third of the entries. A second delta off by up to the spot check's tolerance (what another FFT
    may give) rounds many of those the other way; after settling, both outputs are identical."""
    shape, rng = (64, 48), np.random.default_rng(7)
    idx = spectral_positions(*shape, 300, 777)
    c = rng.standard_normal(300)
    delta = delta_float64(c, idx, shape, 150.0)
    tol = delta_tolerance(c, shape, 150.0, 2.0**-52)
    width = tie_width([(c, 150.0)], shape)
    grid = np.empty(shape, dtype=STORAGE[st])
    round_into(rng.uniform(0.5, 1.0, shape), grid, st)
    ulp = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24}[st]  # the spacing in [0.5, 1)
    midpoints = to_float64(grid, st) + ulp / 2
    base = rng.standard_normal(shape)
    base[::3] = midpoints[::3] - delta[::3]
    plain, settled = [], []
    for noise in (np.zeros(shape), rng.uniform(-tol, tol, shape)):
        x = base + (delta + noise)
        out = np.empty(shape, dtype=STORAGE[st])
        round_into(x, out, st)
        plain.append(out.view(f"u{out.itemsize}").copy())
        near = near_ties(x, width, st)
        exact = closed_form_sums(base.reshape(-1)[near], [(c, idx, 150.0)], shape, near // shape[1], near % shape[1])
        fixed = np.empty(near.size, dtype=out.dtype)
        round_into(exact, fixed, st)
        out.reshape(-1)[near] = fixed
        settled.append(out.view(f"u{out.itemsize}"))
    assert (plain[0] != plain[1]).sum() > 50  # the planted midpoints do split the two backends
    assert np.array_equal(settled[0], settled[1])


@pytest.mark.parametrize("st", ["BF16", "F16", "F32"])
def test_the_prefilter_misses_nothing(st: str) -> None:
    """near_ties equals rounding both ends of every value's window (no prefilter), on values at all magnitudes
    with a tenth of them planted within the window of a midpoint."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(200_000) * np.exp(rng.uniform(-30, 5, 200_000))
    stored = np.empty(x.shape, dtype=STORAGE[st])
    round_into(x, stored, st)
    grid = to_float64(stored, st)
    ulp = np.abs(np.nextafter(stored[::10], np.inf).astype(np.float64) - grid[::10]) if st != "BF16" else None
    if ulp is None:
        ulp = np.abs(to_float64(stored[::10] + 1, st) - grid[::10])
    width = 1e-12
    x[::10] = grid[::10] + np.sign(grid[::10]) * ulp / 2 + rng.uniform(-width, width, ulp.shape)
    reach = width + np.abs(x) * 2.0**-51
    a = np.empty(x.shape, dtype=STORAGE[st])
    b = np.empty(x.shape, dtype=STORAGE[st])
    round_into(x - reach, a, st)
    round_into(x + reach, b, st)
    bits = f"<u{a.itemsize}"
    want = np.flatnonzero(a.view(bits) != b.view(bits))
    got = near_ties(x, width, st)
    assert want.size > 1000 and np.array_equal(got, want)
