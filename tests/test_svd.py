"""Spectral SVD against the dense-SVD oracle (Eckart-Young)."""

from __future__ import annotations

import numpy as np
import pytest

from fourier_convert.maths.svd import spectral_svd
from tests.reference import peft_indices, reference_delta

SHAPES = [
    (1, 1),
    (2, 2),
    (1, 8),
    (8, 1),
    (6, 4),
    (7, 5),
    (16, 16),
    (32, 12),
    (12, 32),
    (33, 17),
    (64, 64),
    (4, 96),
    (96, 5),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_singular_values_and_truncation_error_equal_dense_svd(shape: tuple[int, int]) -> None:
    m, n_cols = shape
    rng = np.random.default_rng(m * 31 + n_cols)
    for n in sorted({1, min(3, m * n_cols), (m * n_cols) // 4 or 1, (m * n_cols) // 2 or 1, m * n_cols}):
        values = rng.standard_normal(n)
        idx = peft_indices(m, n_cols, n, 777)
        dense = reference_delta(values, m, n_cols, 150.0, 777)
        want = np.linalg.svd(dense, compute_uv=False)
        svd = spectral_svd(values, idx, (m, n_cols), 150.0)
        top = want[0] if want.size else 1.0
        got = np.zeros_like(want)
        got[: len(svd.values)] = svd.values[: len(want)]
        assert np.allclose(got, want, rtol=1e-9, atol=1e-12 * top), (shape, n)
        assert np.all(want[len(svd.values) :] <= 1e-9 * top)
        # the rank-r reconstruction from the spectral vectors is the Eckart-Young optimum
        for r in sorted({1, 2, len(svd.values) // 2, len(svd.values)} - {0}):
            u, v = svd.vectors(r)
            approx = (u * svd.values[:r]) @ v.T
            err = np.linalg.norm(dense - approx)
            assert err == pytest.approx(np.sqrt(np.sum(want[r:] ** 2)), rel=1e-7, abs=1e-10 * top), (shape, n, r)


def test_distinct_frequencies_give_paired_singular_values() -> None:
    # coefficients at (1, 1) and (3, 2) on a 16 x 16 grid: distinct, non-special frequencies (fact 4)
    values = np.array([2.0, -0.5])
    idx = np.array([[1, 3], [1, 2]])
    svd = spectral_svd(values, idx, (16, 16), 10.0)
    expected = 10.0 * np.abs(values) / (2 * np.sqrt(16 * 16))
    assert np.allclose(svd.values, np.repeat(np.sort(expected)[::-1], 2))


def test_energy_equals_squared_frobenius_norm() -> None:
    values = np.random.default_rng(0).standard_normal(50)
    idx = peft_indices(24, 20, 50, 777)
    dense = reference_delta(values, 24, 20, 3.0, 777)
    assert spectral_svd(values, idx, (24, 20), 3.0).energy == pytest.approx(float((dense**2).sum()), rel=1e-10)


@pytest.mark.parametrize("shape", [(256, 2048), (2048, 256), (512, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_real_widths_against_dense_svd(shape: tuple[int, int]) -> None:
    # big connected blocks (few row frequencies), many small ones, and the merged single-entry columns
    m, n_cols = shape
    values = np.random.default_rng(m + n_cols).standard_normal(1000)
    idx = peft_indices(m, n_cols, 1000, 777)
    dense = reference_delta(values, m, n_cols, 150.0, 777)
    want = np.linalg.svd(dense, compute_uv=False)
    svd = spectral_svd(values, idx, shape, 150.0)
    got = np.zeros_like(want)
    got[: len(svd.values)] = svd.values
    assert np.allclose(got, want, rtol=1e-9, atol=1e-12 * want[0])
    for r in (8, 64):
        u, v = svd.vectors(r)
        err = np.linalg.norm(dense - (u * svd.values[:r]) @ v.T)
        assert err == pytest.approx(np.sqrt(np.sum(want[r:] ** 2)), rel=1e-9)
