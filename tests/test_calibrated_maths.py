"""fourier_convert.maths.calibrated: the activation-aware closed form against independent solutions."""

from __future__ import annotations

import pytest
import torch

from fourier_convert.maths.calibrated import (
    balance,
    gram_factor,
    reduced_rank_fit,
    weighted_factors,
)

F64 = torch.float64


def _objective(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm((delta - b @ a) @ x) ** 2)


def _qr_route(delta: torch.Tensor, x: torch.Tensor, r: int) -> torch.Tensor:
    """The optimum by another road: X^T = Q R (thin), so ||(D - Z) X|| = ||(D - Z) R^T||; no Gram matrix."""
    _, rr = torch.linalg.qr(x.T)
    u, s, vt = torch.linalg.svd(delta @ rr.T)
    z_rt = u[:, :r] * s[:r] @ vt[:r]
    return torch.linalg.solve_triangular(rr, z_rt.T, upper=True).T  # Z = Z_rt R^-T


def _als(delta: torch.Tensor, x: torch.Tensor, r: int, iters: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force alternating weighted least squares from a random start."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(r, delta.shape[1], dtype=F64, generator=gen)
    dx = delta @ x
    for _ in range(iters):
        ax = a @ x
        b = torch.linalg.lstsq(ax.T, dx.T).solution.T  # min ||B (A X) - D X|| over B
        # min over A of ||B A X - D X||: vec form, (X^T kron B) vec(A) = vec(D X)
        kron = torch.kron(x.T.contiguous(), b)
        a = torch.linalg.lstsq(kron, dx.T.reshape(-1, 1)).solution.reshape(x.shape[0], r).T
    return b, a


@pytest.mark.parametrize("shape,r", [((7, 5), 2), ((6, 9), 3), ((8, 8), 1)])
def test_closed_form_is_the_weighted_least_squares_optimum(shape: tuple[int, int], r: int) -> None:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(*shape, dtype=F64, generator=gen)
    # correlated, badly scaled inputs: what real activations look like
    mix = torch.randn(shape[1], shape[1], dtype=F64, generator=gen) * torch.logspace(0, 2, shape[1], dtype=F64)
    x = mix @ torch.randn(shape[1], 40, dtype=F64, generator=gen)
    fit = weighted_factors(delta, gram_factor(x @ x.T, ridge=0.0))
    b, a = fit.factors(r)
    closed = _objective(delta, b, a, x)
    assert torch.allclose(b @ a, _qr_route(delta, x, r), atol=1e-8, rtol=1e-8)
    b_als, a_als = _als(delta, x, r)
    assert closed <= _objective(delta, b_als, a_als, x) * (1 + 1e-9)
    assert closed == pytest.approx(_objective(delta, b_als, a_als, x), rel=1e-6)
    # left_out reports the objective exactly (as a share of ||dW X||^2)
    assert fit.left_out(r) == pytest.approx(closed / float(torch.linalg.matrix_norm(delta @ x) ** 2), rel=1e-9)
    # and it beats the plain truncation on these inputs
    u, s, vt = torch.linalg.svd(delta)
    assert closed < _objective(delta, u[:, :r] * s[:r], vt[:r], x)


def test_identity_inputs_give_the_plain_svd() -> None:
    delta = torch.randn(9, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    fit = weighted_factors(delta, gram_factor(torch.eye(6, dtype=F64), ridge=0.0))
    assert torch.allclose(fit.values, torch.linalg.svdvals(delta))
    u, s, vt = torch.linalg.svd(delta, full_matrices=False)
    for r in (1, 3, 6):
        b, a = fit.factors(r)
        assert torch.allclose(b @ a, u[:, :r] * s[:r] @ vt[:r], atol=1e-12)


def test_inputs_of_rank_below_r_are_fitted_exactly() -> None:
    gen = torch.Generator().manual_seed(4)
    delta = torch.randn(12, 10, dtype=F64, generator=gen)
    x = torch.randn(10, 3, dtype=F64, generator=gen) @ torch.randn(3, 50, dtype=F64, generator=gen)  # rank 3
    fit = weighted_factors(delta, gram_factor(x @ x.T))  # the default ridge: the matrix is singular
    b, a = fit.factors(4)
    rel = torch.linalg.matrix_norm((delta - b @ a) @ x) / torch.linalg.matrix_norm(delta @ x)
    assert float(rel) < 1e-5
    # while in weight space rank 4 of a random 12 x 10 matrix is far from it
    assert float(torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(delta)) > 0.3


def test_reduced_rank_fit_recovers_a_target_and_matches_the_closed_form() -> None:
    gen = torch.Generator().manual_seed(5)
    d = torch.randn(6, 8, dtype=F64, generator=gen)
    x = torch.randn(8, 100, dtype=F64, generator=gen)
    t = d @ x
    fit, floor = reduced_rank_fit(t @ x.T, gram_factor(x @ x.T, 0.0), float((t**2).sum()))
    b, a = fit.factors(6)
    assert torch.allclose(b @ a, d, atol=1e-9)
    assert floor < 1e-12
    # T = dW X with the same inputs: the same answer as weighted_factors at every rank
    same = weighted_factors(d, gram_factor(x @ x.T, 0.0))
    for r in (1, 3):
        assert torch.allclose(fit.factors(r)[0] @ fit.factors(r)[1], same.factors(r)[0] @ same.factors(r)[1])
    # a target the inputs cannot explain leaves a floor
    noise = torch.randn(6, 100, dtype=F64, generator=gen)
    _, floor = reduced_rank_fit((t + noise) @ x.T, gram_factor(x @ x.T, 0.0), float(((t + noise) ** 2).sum()))
    assert 0.01 < floor < 1


def test_gram_factor_raises_the_ridge_for_rounding_and_refuses_bad_matrices() -> None:
    # huge outlier dimension plus rank deficiency: needs more than the default ridge
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    x[0] *= 1e7
    gram = (x @ x.T).float().double()  # float32 rounding makes it indefinite
    factor = gram_factor(gram)
    assert torch.isfinite(factor).all()
    with pytest.raises(ValueError, match="not positive definite"):
        gram_factor(torch.zeros(3, 3, dtype=F64), ridge=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        gram_factor(torch.full((2, 2), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="square"):
        gram_factor(torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="do not fit"):
        weighted_factors(torch.zeros(2, 3, dtype=F64), torch.eye(2, dtype=F64))


def test_balance_keeps_the_product_and_equalises_norms() -> None:
    gen = torch.Generator().manual_seed(7)
    b, a = torch.randn(5, 3, dtype=F64, generator=gen) * 100, torch.randn(3, 4, dtype=F64, generator=gen) / 100
    b2, a2 = balance(b, a)
    assert torch.allclose(b2 @ a2, b @ a)
    assert torch.allclose(torch.linalg.vector_norm(b2, dim=0), torch.linalg.vector_norm(a2, dim=1))
    # a zero component stays zero and finite
    b[:, 1] = 0
    b3, a3 = balance(b, a)
    assert torch.isfinite(b3).all() and torch.isfinite(a3).all() and torch.allclose(b3 @ a3, b @ a)


@pytest.mark.parametrize("shape", [(1100, 1024), (1024, 1300)])
def test_thin_svd_through_eigh_equals_the_svd_for_the_components_kept(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At and above EIGH_FROM the decomposition goes through eigh; every component a factor keeps is the SVD's."""
    from fourier_convert.maths import calibrated
    from fourier_convert.maths.calibrated import thin_svd

    gen = torch.Generator().manual_seed(8)
    k = min(shape)
    # a decaying spectrum over 6 orders of magnitude, as weighted FourierFT deltas have
    u0, _ = torch.linalg.qr(torch.randn(shape[0], k, dtype=F64, generator=gen))
    v0, _ = torch.linalg.qr(torch.randn(shape[1], k, dtype=F64, generator=gen))
    m = u0 * torch.logspace(0, -6, k, dtype=F64) @ v0.T
    u, s, vt = thin_svd(m)
    assert k >= calibrated.EIGH_FROM
    want = torch.linalg.svdvals(m)
    torch.testing.assert_close(s[:64], want[:64], rtol=1e-10, atol=0)
    for r in (1, 8, 64):
        torch.testing.assert_close(u[:, :r] * s[:r] @ vt[:r], u0[:, :r] * want[:r] @ v0[:, :r].T, rtol=0, atol=1e-10)
    torch.testing.assert_close(u * s @ vt, m, rtol=0, atol=1e-9)
    # the plain SVD path below the threshold gives the same factors
    monkeypatch.setattr(calibrated, "EIGH_FROM", 10**9)
    u2, s2, vt2 = thin_svd(m)
    torch.testing.assert_close(u2[:, :8] * s2[:8] @ vt2[:8], u[:, :8] * s[:8] @ vt[:8], rtol=0, atol=1e-10)
