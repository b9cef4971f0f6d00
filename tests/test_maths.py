"""The maths layer against PEFT itself and an independent float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fourier_convert.maths import (
    IndexCache,
    check_delta,
    delta_at,
    delta_sq_norm,
    delta_weights,
    delta_weights_numpy,
    spectral_indices,
)
from fourier_convert.maths.indices import RANDPERM_THRESHOLD, randperm_prefix
from tests.reference import peft_indices, reference_delta


def test_indices_equal_peft_layer() -> None:
    from peft import FourierFTConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(24, 40)  # (out, in) = (40, 24)
            self.b = torch.nn.Linear(40, 24)

    model = get_peft_model(Net(), FourierFTConfig(n_frequency=77, target_modules=["a", "b"], random_loc_seed=4242))
    for name, (m, n) in {"a": (40, 24), "b": (24, 40)}.items():
        layer = getattr(model.base_model.model, name)
        assert torch.equal(layer.indices["default"], spectral_indices(m, n, 77, 4242))


def test_randperm_prefix_is_bit_identical_to_torch() -> None:
    rng = np.random.default_rng(7)
    cases = [(1, 1, 777), (2, 2, 0), (12, 12, 777), (5000, 4999, -3), (4096 * 4096, 1000, 777), (17, 5, 2**40 + 9)]
    for t in rng.integers(1, 3000, 60):
        cases.append((int(t), int(rng.integers(1, t + 1)), int(rng.integers(-(2**62), 2**62))))
    for total, n, seed in cases:
        want = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].numpy()
        np.testing.assert_array_equal(randperm_prefix(total, n, seed), want, err_msg=f"{(total, n, seed)}")


def test_randperm_prefix_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"n=0 must be in \[1, 4\]"):
        randperm_prefix(4, 0, 777)
    with pytest.raises(ValueError, match="total="):
        randperm_prefix(RANDPERM_THRESHOLD, 1, 777)


@pytest.mark.parametrize("n", [1, 70_000])  # the O(n) replay and, above its limit, torch's full draw
def test_spectral_indices_paths_agree_with_peft_draw(n: int) -> None:
    assert np.array_equal(spectral_indices(300, 257, n, 99).numpy(), peft_indices(300, 257, n, 99))


def test_index_cache_draws_once_per_shape_and_serves_prefixes() -> None:
    cache = IndexCache()
    for n in (5, 50, 17):
        cache.reserve(30, 20, 777, n)
    full = cache.get(30, 20, 777, 50)
    assert np.array_equal(cache.get(30, 20, 777, 17), full[:, :17])
    assert np.array_equal(cache.get(30, 20, 777, 5), spectral_indices(30, 20, 5, 777).numpy())
    assert cache.draws == 1
    cache.get(30, 20, 777, 60)  # larger than reserved: redrawn, still exact
    assert np.array_equal(cache.get(30, 20, 777, 60), spectral_indices(30, 20, 60, 777).numpy())


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (8, 6), (9, 9), (16, 33), (64, 48), (48, 64)]
)
def test_delta_equals_reference_for_every_n(shape: tuple[int, int]) -> None:
    m, n_cols = shape
    total = m * n_cols
    rng = np.random.default_rng(m * 100 + n_cols)
    for n in sorted({min(2, total), 1, total // 3 or 1, total // 2 or 1, total - 1 or 1, total}):
        values = rng.standard_normal(n)
        want = reference_delta(values, m, n_cols, 150.0, 777)
        idx = spectral_indices(m, n_cols, n, 777)
        got32 = delta_weights(torch.tensor(values, dtype=torch.float32), idx, m, n_cols, 150.0)
        got64 = delta_weights(torch.tensor(values), idx, m, n_cols, 150.0, dtype=torch.float64)
        scale = 150.0 * np.linalg.norm(values) / total
        assert np.abs(got64.numpy() - want).max() <= 1e-12 * max(scale, 1e-300) * 100
        assert np.abs(got32.numpy() - want).max() <= 1e-5 * scale
        assert check_delta(got32, values, idx.numpy(), 150.0, rng=rng).passed


@pytest.mark.parametrize(("m", "n_cols", "n"), [(1024, 1024, 300), (1023, 769, 500), (5, 1, 3), (1, 6, 4), (2, 2, 4)])
def test_sparse_column_pass_equals_dense_irfft2(m: int, n_cols: int, n: int) -> None:
    """The sparse inverse DFT of the columns, streamed in row blocks (two blocks at 1024 x 1024), equals torch's
    dense irfft2 of the half spectrum (the direct formulation) to float64 rounding."""
    idx = spectral_indices(m, n_cols, n, 777)
    values = torch.randn(2, n, generator=torch.Generator().manual_seed(m + n_cols), dtype=torch.float64)
    half = n_cols // 2 + 1
    u, v = idx[0], idx[1]
    u_all, v_all = torch.cat([u, (-u) % m]), torch.cat([v, (-v) % n_cols])
    keep = v_all < half
    spec = torch.zeros(2, m * half, dtype=torch.complex128)
    torch.view_as_real(spec)[..., 0].index_add_(1, (u_all * half + v_all)[keep], (values * 0.5).repeat(1, 2)[:, keep])
    want = torch.fft.irfft2(spec.view(2, m, half), s=(m, n_cols)) * 2.5
    got = delta_weights(values, idx, m, n_cols, 2.5, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14 * float(want.abs().max()))


def test_batched_equals_single() -> None:
    idx = spectral_indices(32, 20, 100, 777)
    spectra = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    batch = delta_weights(spectra, idx, 32, 20, 3.0)
    eps = torch.finfo(torch.float32).eps
    for b in range(5):
        single = delta_weights(spectra[b], idx, 32, 20, 3.0)
        # bit-equal on some CPUs; a batched FFT may take other SIMD paths (seen on a 16-core GPU host), so the
        # claim is agreement to float32 rounding of an FFT of this size
        torch.testing.assert_close(batch[b], single, rtol=0, atol=16 * eps * np.log2(640) * float(single.abs().max()))


# Widths of real models (BERT/RoBERTa 768/3072, 1024/4096, TinyLlama 2048/5632, 3072, Llama-7B 4096/11008).
REAL_SHAPES = [
    (768, 768),
    (3072, 768),
    (768, 3072),
    (1024, 1024),
    (4096, 1024),
    (2048, 2048),
    (256, 2048),
    (5632, 2048),
    (2048, 5632),
    (3072, 3072),
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
]


@pytest.mark.slow
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_real_model_widths_against_closed_form(shape: tuple[int, int]) -> None:
    m, n_cols = shape
    n = 1000
    rng = np.random.default_rng(m + n_cols)
    values = rng.standard_normal(n)
    idx = spectral_indices(m, n_cols, n, 777)
    assert np.array_equal(idx.numpy(), peft_indices(m, n_cols, n, 777))
    got = delta_weights(torch.tensor(values, dtype=torch.float32), idx, m, n_cols, 150.0)
    # independent reference: the float64 cosine sum at 2000 random entries plus two whole rows
    rows = np.concatenate([rng.integers(0, m, 2000), np.full(n_cols, m // 3), np.full(n_cols, m - 1)])
    cols = np.concatenate([rng.integers(0, n_cols, 2000), np.arange(n_cols), np.arange(n_cols)])
    want = delta_at(values, idx.numpy(), (m, n_cols), 150.0, rows, cols)
    scale = 150.0 * np.linalg.norm(values) / (m * n_cols)
    err = np.abs(got[torch.as_tensor(rows), torch.as_tensor(cols)].double().numpy() - want)
    assert err.max() <= 1e-5 * scale
    assert check_delta(got, values, idx.numpy(), 150.0, rng=rng).passed


def test_check_delta_catches_a_wrong_fft() -> None:
    idx = spectral_indices(256, 128, 300, 777)
    values = np.random.default_rng(0).standard_normal(300)
    good = delta_weights(torch.tensor(values, dtype=torch.float32), idx, 256, 128, 150.0)
    assert check_delta(good, values, idx.numpy(), 150.0, rng=np.random.default_rng(1)).passed
    for corrupt in (
        lambda d: d.roll(1, 0),  # off by one row
        lambda d: d.T.contiguous().reshape(256, 128),  # scrambled layout
        lambda d: torch.where(torch.arange(128) == 77, torch.zeros(()), d),  # one bad column
    ):
        bad = corrupt(good.clone())
        result = check_delta(bad, values, idx.numpy(), 150.0, rng=np.random.default_rng(1))
        assert not result.passed and result.max_abs_error > 100 * result.tolerance
    nan = good.clone()
    nan[3, 4] = float("nan")  # a single non-finite entry anywhere fails the check
    assert not check_delta(nan, values, idx.numpy(), 150.0, rng=np.random.default_rng(1)).passed


def test_numpy_backend_equals_reference() -> None:
    values = np.random.default_rng(0).standard_normal(40)
    idx = peft_indices(12, 10, 40, 777)
    assert np.allclose(
        delta_weights_numpy(values, idx, 12, 10, 2.5), reference_delta(values, 12, 10, 2.5, 777), atol=1e-13
    )


@pytest.mark.parametrize("shape", [(6, 5), (8, 8), (7, 12), (1, 9)])
def test_delta_norm_from_spectrum_is_exact(shape: tuple[int, int]) -> None:
    m, n_cols = shape
    for n in (1, m * n_cols // 2 or 1, m * n_cols):
        values = np.random.default_rng(n).standard_normal(n)
        want = float((reference_delta(values, m, n_cols, 7.0, 777) ** 2).sum())
        assert delta_sq_norm(values, peft_indices(m, n_cols, n, 777), shape, 7.0) == pytest.approx(want, rel=1e-10)


def test_index_cache_prefetch_gives_the_same_positions() -> None:
    cache = IndexCache()
    shapes = [(40, 24, 777, 30), (24, 40, 777, 10), (40, 24, 5, 7)]
    for m, n, seed, k in shapes:
        cache.reserve(m, n, seed, k)
    cache.prefetch()
    for m, n, seed, k in reversed(shapes):
        assert np.array_equal(cache.get(m, n, seed, k), spectral_indices(m, n, k, seed).numpy())
    assert cache.draws == 3


# -- the numpy float64 backend of the CPU merge ---------------------------------------------------
@pytest.mark.parametrize(("m", "n_cols", "k"), [(64, 64, 50), (33, 17, 200), (17, 33, 561), (1, 8, 3), (48, 1, 20)])
def test_numpy_delta_equals_the_torch_float64_delta(m: int, n_cols: int, k: int) -> None:
    """Even and odd sizes, every position taken (561 = 17 * 33), vectors: the same values as torch's float64
    reconstruction and the dense ifft2, to float64 rounding."""
    from fourier_convert.maths.delta_numpy import delta_float64, delta_weights_numpy

    idx = spectral_indices(m, n_cols, k, 777)
    c = torch.randn(k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    got = delta_float64(c.numpy(), idx.numpy(), (m, n_cols), 150.0)
    want = delta_weights(c, idx, m, n_cols, 150.0, dtype=torch.float64).numpy()
    dense = delta_weights_numpy(c.numpy(), idx.numpy(), m, n_cols, 150.0)
    scale = np.abs(dense).max()
    assert np.abs(got - want).max() <= 1e-14 * scale and np.abs(got - dense).max() <= 1e-14 * scale


def test_numpy_delta_row_blocks_and_threads_give_the_same_bits() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fourier_convert.maths.delta_numpy import column_pass, delta_rows

    idx = spectral_indices(300, 200, 900, 5).numpy()
    c = np.random.default_rng(0).standard_normal(900)
    whole = delta_rows(column_pass(c, idx, (300, 200), 2.0), 0, 300)
    with ThreadPoolExecutor(4) as pool:
        cp = column_pass(c, idx, (300, 200), 2.0, map_fn=pool.map)
    blocks = np.concatenate([delta_rows(cp, a, min(300, a + 7)) for a in range(0, 300, 7)])
    assert np.array_equal(whole, blocks)


def test_delta_sample_checks_blocks_in_any_order_and_catches_a_wrong_entry() -> None:
    from fourier_convert.maths.closed_form import DeltaSample
    from fourier_convert.maths.delta_numpy import delta_float64

    idx = spectral_indices(40, 30, 60, 9).numpy()
    c = np.random.default_rng(1).standard_normal(60)
    full = delta_float64(c, idx, (40, 30), 3.0)
    sample = DeltaSample((40, 30), np.random.default_rng(2))
    for start in (30, 0, 10, 20):
        sample.take(start, full[start : start + 10])
    result = sample.check(c, idx, 3.0, eps=2.0**-52)
    assert result.passed and result.entries == 128 + 2 * 30 + 2 * 40
    broken = full.copy()
    broken[:, sample.line_cols[0]] += 1e-6  # a wrong column: the column check sees it
    again = DeltaSample((40, 30), np.random.default_rng(2))
    again.take(0, broken)
    assert not again.check(c, idx, 3.0, eps=2.0**-52).passed
    missing = DeltaSample((40, 30), np.random.default_rng(2))
    missing.take(0, full[:20])  # rows never taken count as failures
    assert not missing.check(c, idx, 3.0, eps=2.0**-52).passed
