"""Activation-aware low-rank approximation: the best rank-r factors where the layer is used.

Plain truncation (:mod:`fourier_convert.maths.svd`) minimises ``||dW - B A||_F``. What a model feels is the
layer's output on its real inputs, ``||(dW - B A) X||_F`` with ``X`` the layer's input activations (one column
per token). With the Gram matrix ``C = X X^T`` (``in x in``, plus a small ridge) and its Cholesky factor
``C = L L^T``, ``||E X||_F^2 = tr(E C E^T) = ||E L||_F^2``, so the minimiser is

    B A = trunc_r(dW L) L^-1

(math.md, "Calibrated conversion"): the rank-r SVD truncation of ``dW L``, mapped back. The singular values
of ``dW L`` are the output-space counterpart of the plain ones: ``sum_{j > r} s_j^2`` is what rank ``r``
leaves of ``||dW X||_F^2``, so rank choices by energy share or parameter budget work on them unchanged
(:mod:`fourier_convert.maths.ranks`). With ``C = I`` everything reduces to the plain SVD.

The same algebra fits a layer against a *target output* rather than a delta (the sequential closed form):
``min ||T - B A X~||_F`` over rank-r ``B A``, given the cross-Gram ``T X~^T`` and ``C~ = X~ X~^T``
(:func:`reduced_rank_fit`).

Pure functions of float64 tensors; they know nothing of models or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: From this size on (the smaller side), decompositions go through a symmetric eigendecomposition of the smaller
#: Gram side instead of an SVD: about 5x faster for float64 on a GPU at 4096 (an SVD of 4096 x 4096 took 2.5 s on
#: an H200), exact to float64 rounding for every component above ``1e-7`` of the largest singular value, which is
#: every component a low-rank factor keeps.
EIGH_FROM = 1024

#: Default ridge, relative to the mean diagonal of the Gram matrix: conditions ``C`` (activations often have a
#: few dominant directions and a rank below ``in`` when calibration is short) while changing the fit on the
#: calibration inputs by about this share.
RIDGE = 1e-6


@dataclass(frozen=True)
class WeightedFactors:
    """A layer's output-space decomposition: ``dW L = U diag(s) V^T`` and the map back.

    Attributes:
        values: Singular values of ``dW L``, descending (float64, ``(k,)``, ``k = min(out, in)``).
        u: Left singular vectors ``(out, k)``.
        back: ``V^T L^-1`` (``(k, in)``): row ``j`` is the input-space direction of component ``j``.
        energy: ``||dW L||_F^2``, i.e. ``||dW X||_F^2`` up to the ridge.
    """

    values: torch.Tensor
    u: torch.Tensor
    back: torch.Tensor
    energy: float

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of rank ``rank`` with ``B A = U_r diag(s_r) V_r^T L^-1``, balanced (per component
        ``||B[:, j]|| = ||A[j]||``, which keeps float32 storage and gradient steps well scaled).

        Args:
            rank: Components to keep (0 .. ``len(values)``).

        Returns:
            ``B`` ``(out, rank)`` and ``A`` ``(rank, in)``, float64.

        Example:
            >>> f = weighted_factors(torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
            >>> b, a = f.factors(2)
            >>> tuple(b.shape), tuple(a.shape)
            ((3, 2), (2, 3))
        """
        b = self.u[:, :rank] * self.values[:rank]
        a = self.back[:rank]
        return balance(b, a)

    def left_out(self, rank: int) -> float:
        """``||(dW - B_r A_r) L||_F^2 / ||dW L||_F^2``: the share of the output-space energy rank ``rank``
        leaves (0 for an exact fit, 1 for rank 0 of a non-zero delta)."""
        if self.energy <= 0:
            return 0.0
        return float(torch.sum(self.values[rank:] ** 2)) / self.energy


def gram_factor(gram: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``gram + ridge * mean(diag(gram)) * I``.

    Args:
        gram: ``(n, n)`` symmetric positive semi-definite matrix ``X X^T`` (float64).
        ridge: Relative ridge (> 0 unless ``gram`` is known to be well conditioned).

    Returns:
        ``L`` ``(n, n)``, float64, lower triangular.

    Raises:
        ValueError: Not square, not finite, or not positive definite even with the ridge (e.g. all zero with
            ``ridge`` 0).

    Example:
        >>> gram_factor(torch.eye(2, dtype=torch.float64) * 4, ridge=0.0)
        tensor([[2., 0.],
                [0., 2.]], dtype=torch.float64)
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
    g = gram.to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("the Gram matrix has non-finite entries (inf or nan activations)")
    g = (g + g.T) / 2
    scale = float(torch.diagonal(g).mean()) if g.shape[0] else 0.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    # A ridge too small for the matrix's rounding (activations with a few huge dimensions) is raised tenfold
    # at a time, up to 1e-3 of the mean diagonal.
    shift = ridge * scale if scale > 0 else ridge
    while True:
        factor, info = torch.linalg.cholesky_ex(g + shift * eye if shift > 0 else g)
        if int(info) == 0:
            return torch.as_tensor(factor)
        if shift <= 0 or scale <= 0 or shift >= 1e-3 * scale:
            raise ValueError("the Gram matrix is not positive definite (no calibration input reached this layer?)")
        shift *= 10


def _canonical_signs(u: torch.Tensor, back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each component so that its left vector's largest-magnitude entry is positive: singular vectors have
    arbitrary signs, and without this CPU and GPU (or two LAPACK builds) write different, equally valid factors."""
    pick = torch.argmax(u.abs(), dim=0)
    signs = torch.sign(u.gather(0, pick[None, :]))[0]
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, back * signs[:, None]


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, s, V^T`` of ``m`` (as ``torch.linalg.svd(m, full_matrices=False)``), through ``eigh`` of the smaller
    Gram side (``m m^T`` or ``m^T m``) when the smaller side has at least :data:`EIGH_FROM` entries.

    There, components whose singular value is below ``1e-7`` of the largest (their vectors are not determined
    by the squared matrix to float64 precision) get zero vectors: a factor built from them adds nothing.

    Example:
        >>> m = torch.randn(5, 3, dtype=torch.float64)
        >>> u, s, vt = thin_svd(m)
        >>> torch.allclose(u * s @ vt, m)
        True
    """
    rows, cols = m.shape
    if min(rows, cols) < EIGH_FROM:
        u, s, vt = torch.linalg.svd(m, full_matrices=False)
        return u, s, vt
    wide = rows <= cols
    gram = m @ m.T if wide else m.T @ m
    w, vecs = torch.linalg.eigh((gram + gram.T) / 2)
    w, vecs = w.flip(0), vecs.flip(1)  # descending
    s = torch.sqrt(torch.clamp(w, min=0.0))
    ok = s > 1e-7 * s[0] if len(s) else s > 0
    inv = torch.where(ok, 1.0 / torch.where(ok, s, 1.0), torch.zeros_like(s))
    if wide:  # vecs = U; V^T = diag(1/s) U^T m
        return vecs * ok, s, (vecs.T @ m) * inv[:, None]
    return (m @ vecs) * inv, s, (vecs * ok).T  # vecs = V; U = m V diag(1/s)


def weighted_factors(delta: torch.Tensor, factor: torch.Tensor) -> WeightedFactors:
    """Decompose ``delta`` in the output space that ``factor`` (:func:`gram_factor`) defines.

    Args:
        delta: ``(out, in)`` float64 delta.
        factor: ``(in, in)`` lower Cholesky factor of the layer's input Gram matrix.

    Returns:
        The decomposition; ``.factors(r)`` gives the best rank-r ``(B, A)`` for those inputs.

    Raises:
        ValueError: Shapes that do not fit.

    Example:
        >>> d = torch.randn(6, 4, dtype=torch.float64)
        >>> f = weighted_factors(d, torch.eye(4, dtype=torch.float64))   # X = I: the plain SVD
        >>> torch.allclose(f.values, torch.linalg.svdvals(d))
        True
    """
    if delta.ndim != 2 or factor.shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(f"delta {tuple(delta.shape)} and Gram factor {tuple(factor.shape)} do not fit")
    weighted = delta.to(torch.float64) @ factor
    u, s, vt = thin_svd(weighted)
    # back = V^T L^-1, i.e. the solution of L^T back^T = V
    back = torch.linalg.solve_triangular(factor.T, vt.T, upper=True).T
    u, back = _canonical_signs(u, back)
    return WeightedFactors(s, u, back, float(torch.sum(s**2)))


def reduced_rank_fit(cross: torch.Tensor, factor: torch.Tensor, target_energy: float) -> tuple[WeightedFactors, float]:
    """Best rank-r ``D`` for ``min ||T - D X~||_F`` given only second moments (reduced-rank regression).

    With ``C~ = X~ X~^T = L L^T`` and the cross-Gram ``K = T X~^T``, ``||T - D X~||^2 = ||T||^2 - 2 tr(D K^T)
    + ||D L||^2``, minimised over rank-r ``D`` by ``D L = trunc_r(K L^-T)``. So the decomposition of
    ``K L^-T`` plays the role ``dW L`` plays in :func:`weighted_factors`.

    Args:
        cross: ``K = T X~^T``, ``(out, in)`` float64.
        factor: ``L``, ``(in, in)``, lower Cholesky factor of ``X~ X~^T`` (with ridge).
        target_energy: ``||T||_F^2``.

    Returns:
        The decomposition (``.factors(r)``) and the share of ``||T||^2`` that no rank can remove (the
        residual of the full-rank least-squares fit: what the inputs ``X~`` cannot explain).

    Raises:
        ValueError: Shapes that do not fit.

    Example:
        >>> x = torch.randn(4, 50, dtype=torch.float64); d = torch.randn(3, 4, dtype=torch.float64)
        >>> t = d @ x
        >>> f, floor = reduced_rank_fit(t @ x.T, gram_factor(x @ x.T, 0.0), float((t**2).sum()))
        >>> b, a = f.factors(3)
        >>> torch.allclose(b @ a, d) and floor < 1e-12
        True
    """
    if cross.ndim != 2 or factor.shape != (cross.shape[1], cross.shape[1]):
        raise ValueError(f"cross-Gram {tuple(cross.shape)} and Gram factor {tuple(factor.shape)} do not fit")
    # M = K L^-T, i.e. M L^T = K, i.e. L M^T = K^T
    m = torch.linalg.solve_triangular(factor, cross.to(torch.float64).T, upper=False).T
    u, s, vt = thin_svd(m)
    back = torch.linalg.solve_triangular(factor.T, vt.T, upper=True).T
    u, back = _canonical_signs(u, back)
    explained = float(torch.sum(s**2))
    floor = max(0.0, target_energy - explained) / target_energy if target_energy > 0 else 0.0
    return WeightedFactors(s, u, back, explained), floor


def balance(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-1 component of ``B A`` so that ``||B[:, j]|| = ||A[j]||`` (the product is unchanged).

    Example:
        >>> b, a = balance(torch.tensor([[4.0]]), torch.tensor([[1.0]]))
        >>> float(b), float(a)
        (2.0, 2.0)
    """
    nb = torch.linalg.vector_norm(b, dim=0)
    na = torch.linalg.vector_norm(a, dim=1)
    ok = (nb > 0) & (na > 0)
    c = torch.where(ok, torch.sqrt(torch.where(ok, nb / torch.where(ok, na, 1), 1)), torch.ones_like(nb))
    return b / c, a * c[:, None]
