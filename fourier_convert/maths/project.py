"""Least-squares FourierFT coefficients for a low-rank delta, from the factors alone.

A FourierFT layer with positions ``(u_k, v_k)`` and scaling ``s`` can only produce
``s * sum_k c_k Phi_k`` with ``Phi_k[p, q] = cos(2 pi (u_k p / M + v_k q / N)) / (M N)``. These basis
matrices are orthogonal (distinct bins, or a bin and its mirror ``(-u, -v)``, which give the same matrix),
so the coefficients closest to a target ``dW`` in Frobenius norm are read off its unnormalised 2-D DFT
(math.md fact 6), with ``T = dW / s``:

* an ordinary bin: ``c_k = 2 Re F(T)[u_k, v_k]``;
* a self-conjugate bin (``u`` in ``{0, M/2}`` and ``v`` in ``{0, N/2}``): ``c_k = Re F(T)[u_k, v_k]``;
* a bin whose mirror is also in the support: only the pair's sum matters; it is split evenly
  (the minimum-norm solution), ``c_k = Re F(T)[u_k, v_k]`` each.

For ``dW = scale * B @ A`` (``B``: ``(M, r)``, ``A``: ``(r, N)``), ``F(B A)[u, v] = sum_j F_M(B)[u, j]
F_N(A)[j, v]``: two batches of 1-D FFTs of the factors and ``n r`` products, never the dense ``M x N`` delta.
The energies that tell a user what was kept (the target's, the fit's, and the centro-symmetric ceiling that
no FourierFT adapter can pass, fact 1) come from ``r x r`` Gram matrices, again without the dense delta.

With calibration data the fit that matters is the layer's output on its real inputs: :func:`project_lowrank_weighted`
minimises ``||(dW - fit) X||_F`` given only the Gram matrix ``C = X X^T`` (math.md, "Calibrated conversion"),
from the factors, the row-side inner products of the DFT basis (exact integer conditions) and the column-side
quadratic forms through ``C``; with ``C`` a multiple of the identity it is :func:`project_lowrank`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fourier_convert.maths.calibrated import RIDGE, gram_factor


@dataclass(frozen=True)
class Projection:
    """The least-squares FourierFT fit of one low-rank delta.

    Attributes:
        values: ``(n,)`` float64 coefficients, in the order of the given positions.
        energy: ``||dW||_F^2`` of the target.
        kept_energy: ``||fit||_F^2`` (the fit is an orthogonal projection, so the error's energy is
            ``energy - kept_energy``).
        ceiling_energy: ``||even part of dW||_F^2``: the most any FourierFT delta of this shape can hold.
    """

    values: np.ndarray
    energy: float
    kept_energy: float
    ceiling_energy: float

    @property
    def retained(self) -> float:
        """``kept_energy / energy`` (1 for a zero target)."""
        return self.kept_energy / self.energy if self.energy > 0 else 1.0

    @property
    def relative_error(self) -> float:
        """``||dW - fit||_F / ||dW||_F``."""
        return float(np.sqrt(max(0.0, 1.0 - self.retained)))

    @property
    def ceiling(self) -> float:
        """``ceiling_energy / energy``: the retained share with every frequency of the layer."""
        return self.ceiling_energy / self.energy if self.energy > 0 else 1.0


def _mirror(size: int) -> np.ndarray:
    return (-np.arange(size)) % size


def lowrank_energy(b: np.ndarray, a: np.ndarray) -> float:
    """``||B @ A||_F^2`` from the ``r x r`` Gram matrices.

    Example:
        >>> b, a = np.ones((3, 1)), np.ones((1, 2))
        >>> lowrank_energy(b, a)
        6.0
    """
    return float(np.sum((b.T @ b) * (a @ a.T)))


def even_part_energy(b: np.ndarray, a: np.ndarray) -> float:
    """``||E||_F^2`` of the centro-symmetric part ``E = (D + D[-p, -q]) / 2`` of ``D = B @ A``.

    ``||E||^2 = (||D||^2 + <D, D[-p, -q]>) / 2`` and the flipped matrix is ``B[-p] @ A[:, -q]``.

    Example:
        >>> b = np.array([[0.0], [1.0], [0.0]]); a = np.array([[1.0]])
        >>> even_part_energy(b, a)  # row 1 and row 2 mirror each other: half the energy is odd
        0.5
    """
    m, n = b.shape[0], a.shape[1]
    flip_b = b[_mirror(m)]
    flip_a = a[:, _mirror(n)]
    cross = float(np.sum((b.T @ flip_b) * (a @ flip_a.T)))
    return 0.5 * (lowrank_energy(b, a) + cross)


def project_lowrank(b: np.ndarray, a: np.ndarray, scale: float, indices: np.ndarray, scaling: float) -> Projection:
    """Least-squares FourierFT coefficients on the given positions for ``dW = scale * B @ A``.

    Args:
        b: ``(M, r)`` float factor (LoRA's ``lora_B``; for PEFT's Conv1D layers too, the delta is ``(out, in)``).
        a: ``(r, N)`` float factor (``lora_A``).
        scale: The LoRA scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        indices: ``(2, n)`` row / column positions (:func:`~fourier_convert.maths.indices.spectral_indices`).
        scaling: The FourierFT ``scaling`` the coefficients will be used with (non-zero).

    Returns:
        The coefficients and the energies of the target, the fit and the centro-symmetric ceiling.

    Raises:
        ValueError: Shapes that do not fit together, or a zero ``scaling``.

    Example:
        >>> from fourier_convert.maths.indices import spectral_indices
        >>> rng = np.random.default_rng(0)
        >>> b, a = rng.normal(size=(8, 2)), rng.normal(size=(2, 6))
        >>> full = spectral_indices(8, 6, 48, 777).numpy()  # every position: only the odd part is lost
        >>> p = project_lowrank(b, a, 1.0, full, 10.0)
        >>> bool(np.isclose(p.kept_energy, p.ceiling_energy))
        True
    """
    m, r = b.shape
    r2, n_cols = a.shape
    if r != r2:
        raise ValueError(f"lora_B is {b.shape} and lora_A is {a.shape}: their ranks differ")
    if scaling == 0.0:
        raise ValueError("scaling must be non-zero")
    u = indices[0].astype(np.int64)
    v = indices[1].astype(np.int64)
    b64 = np.asarray(b, dtype=np.float64)
    a64 = np.asarray(a, dtype=np.float64)
    fb = np.fft.fft(b64, axis=0)  # (M, r)
    fa = np.fft.fft(a64, axis=1)  # (r, N)
    re_f = np.einsum("kj,jk->k", fb[u], fa[:, v]).real * (scale / scaling)  # Re F(T)[u_k, v_k]
    mu, mv = (-u) % m, (-v) % n_cols
    self_conj = (mu == u) & (mv == v)
    flat = u * n_cols + v
    mirrored = np.isin(mu * n_cols + mv, flat) & ~self_conj
    values = np.where(self_conj | mirrored, re_f, 2.0 * re_f)
    energy = scale**2 * lowrank_energy(b64, a64)
    ceiling = scale**2 * even_part_energy(b64, a64)
    # ||fit||^2 by Parseval, one term per distinct basis matrix: c^2 s^2 ||Phi||^2 with ||Phi||^2 = 1/(2MN)
    # (1/(MN) when self-conjugate); a mirrored pair is one matrix with coefficient c_k + c_l = 2 c_k.
    weight = np.where(self_conj, 1.0, 0.5) / (m * n_cols)
    pair_first = mirrored & (flat < mu * n_cols + mv)
    single = ~mirrored
    kept = scaling**2 * (
        np.sum(weight[single] * values[single] ** 2) + np.sum(weight[pair_first] * (2 * values[pair_first]) ** 2)
    )
    return Projection(values, float(energy), float(kept), float(ceiling))


@dataclass(frozen=True)
class WeightedProjection:
    """The FourierFT fit of one low-rank delta that is closest on given layer inputs.

    The norm is ``||E||_C^2 = tr(E C E^T) = ||E L||_F^2`` with ``C`` the inputs' Gram matrix ``X X^T`` plus the
    ridge and ``L`` its Cholesky factor: ``||E X||_F^2`` up to the ridge.

    Attributes:
        values: ``(n,)`` float64 coefficients, in the order of the given positions.
        energy: ``||dW L||_F^2 = tr(dW C dW^T)`` of the target.
        kept_energy: ``energy - ||(dW - fit) L||_F^2``: the fit's share of the target in that norm (the fit is the
            ``C``-orthogonal projection onto the span of the basis matrices).
        baseline_kept_energy: The same for the ``baseline`` coefficients given (e.g. the plain fit), else None.
    """

    values: np.ndarray
    energy: float
    kept_energy: float
    baseline_kept_energy: float | None = None

    @property
    def retained(self) -> float:
        """``kept_energy / energy`` (1 for a zero target)."""
        return self.kept_energy / self.energy if self.energy > 0 else 1.0

    @property
    def relative_error(self) -> float:
        """``||(dW - fit) L||_F / ||dW L||_F``."""
        return float(np.sqrt(max(0.0, 1.0 - self.retained)))

    @property
    def baseline_retained(self) -> float | None:
        """``baseline_kept_energy / energy`` (None without a baseline; may be negative for a poor baseline)."""
        if self.baseline_kept_energy is None:
            return None
        return self.baseline_kept_energy / self.energy if self.energy > 0 else 1.0


def project_lowrank_weighted(
    b: np.ndarray,
    a: np.ndarray,
    scale: float,
    indices: np.ndarray,
    scaling: float,
    gram: torch.Tensor | np.ndarray,
    ridge: float = RIDGE,
    *,
    factor: torch.Tensor | None = None,
    baseline: np.ndarray | None = None,
) -> WeightedProjection:
    """FourierFT coefficients on the given positions minimising ``||(dW - dW_fourier(c)) X||_F`` for
    ``dW = scale * B @ A``, given only the Gram matrix ``C = X X^T`` of the layer's inputs.

    ``dW_fourier(c) = s sum_k c_k Phi_k`` with ``Phi_k = (cu_k cv_k^T - su_k sv_k^T) / (M N)``,
    ``cu_k[p] = cos(2 pi u_k p / M)``, ``su_k[p] = sin(2 pi u_k p / M)`` (``cv``, ``sv`` likewise over ``N``):
    exactly the delta PEFT builds (:func:`project_lowrank`, :mod:`~fourier_convert.maths.delta`). The normal
    equations ``H c = g`` need, on the row side, only the inner products of the ``cu`` / ``su`` vectors, which
    are exact integer conditions (``cu_k . cu_l = M/2 ([u_k = u_l] + [u_k = -u_l])``, ``su_k . su_l = M/2
    ([u_k = u_l] - [u_k = -u_l])``, ``cu_k . su_l = 0``, all mod ``M``), and on the column side the quadratic
    forms of ``V = [cv, sv]`` through ``C``: with ``P = L^T V`` (``N x 2n``),

        H_kl = s^2 / (M N)^2 (cu_k.cu_l  Pc_k.Pc_l + su_k.su_l  Ps_k.Ps_l)
        g_k  = s / (M N) scale (B^T cu_k . (A L) Pc_k - B^T su_k . (A L) Ps_k)

    where ``B^T cu_k`` and ``B^T su_k`` are the real and minus the imaginary part of the factor's 1-D FFT at
    ``u_k``: the dense ``M x N`` target is never formed. A bin and its mirror ``(-u, -v)`` give the same matrix
    (``H`` is singular there): the pair is solved as one unknown and split evenly, as :func:`project_lowrank`
    does. The remaining system is positive definite with the ridge; it is solved by Cholesky after a diagonal
    rescaling, with a minimum-norm eigen-solve as the fallback.

    Cost: ``O(N^3 / 3)`` for the Cholesky factor of ``C`` (once per Gram matrix: pass ``factor`` to share it
    between layers that read the same input), then ``O(N^2 n + N n^2 + n^3 + r N^2 + r M log M)`` per layer,
    in float64 on ``gram``'s (or ``factor``'s) device. With ``C`` a multiple of the identity the result is
    :func:`project_lowrank`'s.

    Args:
        b: ``(M, r)`` float factor (``lora_B``; the delta is ``(out, in)``).
        a: ``(r, N)`` float factor (``lora_A``).
        scale: The LoRA scale.
        indices: ``(2, n)`` row / column positions (:func:`~fourier_convert.maths.indices.spectral_indices`).
        scaling: The FourierFT ``scaling`` the coefficients will be used with (non-zero).
        gram: ``(N, N)`` Gram matrix ``X X^T`` of the layer's inputs (symmetric positive semi-definite).
        ridge: Relative ridge added to ``C`` (times its mean diagonal), as
            :func:`~fourier_convert.maths.calibrated.gram_factor` adds it.
        factor: ``gram_factor(gram, ridge)`` when the caller already has it (``gram`` is then not read).
        baseline: Other coefficients to score in the same norm (``baseline_kept_energy``), e.g. the plain fit's.

    Returns:
        The coefficients and the energies of the target and of the fit (and of the baseline) in the ``C`` norm.

    Raises:
        ValueError: Shapes that do not fit together, a zero ``scaling``, or a Gram matrix that is not finite or
            not positive definite even with the ridge.

    Example:
        >>> from fourier_convert.maths.indices import spectral_indices
        >>> rng = np.random.default_rng(0)
        >>> b, a = rng.normal(size=(8, 2)), rng.normal(size=(2, 6))
        >>> idx = spectral_indices(8, 6, 10, 777).numpy()
        >>> x = rng.normal(size=(6, 40)) * np.array([[5.0], [1], [1], [0.1], [1], [1]])
        >>> plain = project_lowrank(b, a, 1.0, idx, 10.0).values
        >>> w = project_lowrank_weighted(b, a, 1.0, idx, 10.0, x @ x.T, baseline=plain)
        >>> bool(w.kept_energy >= w.baseline_kept_energy)
        True
    """
    m, r = b.shape
    r2, n_cols = a.shape
    if r != r2:
        raise ValueError(f"lora_B is {b.shape} and lora_A is {a.shape}: their ranks differ")
    if scaling == 0.0:
        raise ValueError("scaling must be non-zero")
    if factor is None:
        g_in = torch.as_tensor(gram).to(torch.float64)
        if tuple(g_in.shape) != (n_cols, n_cols):
            raise ValueError(f"the Gram matrix is {tuple(g_in.shape)}, expected ({n_cols}, {n_cols}) for lora_A")
        factor = gram_factor(g_in, ridge)
    if tuple(factor.shape) != (n_cols, n_cols):
        raise ValueError(f"the Gram factor is {tuple(factor.shape)}, expected ({n_cols}, {n_cols}) for lora_A")
    lower = factor.to(torch.float64)
    dev = lower.device
    u = np.asarray(indices[0], dtype=np.int64)
    v = np.asarray(indices[1], dtype=np.int64)
    b64 = np.asarray(b, dtype=np.float64)
    a64 = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(dev)

    # row side: exact inner products of the cosine / sine columns (integer conditions mod M)
    same = ((u[:, None] - u[None, :]) % m) == 0
    opposite = ((u[:, None] + u[None, :]) % m) == 0
    row_cc = torch.from_numpy(0.5 * m * (same.astype(np.float64) + opposite)).to(dev)
    row_ss = torch.from_numpy(0.5 * m * (same.astype(np.float64) - opposite)).to(dev)
    # column side: V = [cos, sin] of the column phases (reduced mod N in integers), P = L^T V
    q = np.arange(n_cols, dtype=np.int64)
    phase = torch.from_numpy(((q[:, None] * v[None, :]) % n_cols) * (2.0 * np.pi / n_cols)).to(dev)
    p_c = lower.T @ torch.cos(phase)  # (N, n)
    p_s = lower.T @ torch.sin(phase)
    hess = row_cc * (p_c.T @ p_c) + row_ss * (p_s.T @ p_s)  # H * (M N / s)^2
    # g * (M N / s): B^T cu_k = Re FFT(B)[u_k], B^T su_k = -Im FFT(B)[u_k]
    fb = np.fft.fft(b64, axis=0)[u]  # (n, r)
    b_cos = torch.from_numpy(np.ascontiguousarray(fb.real.T)).to(dev)  # (r, n)
    b_sin = torch.from_numpy(np.ascontiguousarray(-fb.imag.T)).to(dev)
    al = a64 @ lower  # (r, N)
    grad = scale * ((b_cos * (al @ p_c)).sum(0) - (b_sin * (al @ p_s)).sum(0))  # (n,)
    b_t = torch.from_numpy(b64).to(dev)
    energy = scale**2 * float(torch.sum((b_t.T @ b_t) * (al @ al.T)))

    # a bin and its mirror give the same basis matrix: one unknown per distinct matrix, split evenly
    flat = u * n_cols + v
    mirror = ((-u) % m) * n_cols + (-v) % n_cols
    _, first, inverse, counts = np.unique(
        np.minimum(flat, mirror), return_index=True, return_inverse=True, return_counts=True
    )
    keep = torch.from_numpy(first).to(dev)
    reduced = _solve_spd(hess[keep][:, keep], grad[keep])
    y = reduced[torch.from_numpy(inverse.reshape(-1)).to(dev)] / torch.from_numpy(counts[inverse.reshape(-1)]).to(dev)
    kept = float(2.0 * (y @ grad) - y @ (hess @ y))
    values = y.cpu().numpy() * (m * n_cols / scaling)
    base_kept = None
    if baseline is not None:
        yb = torch.from_numpy(np.asarray(baseline, dtype=np.float64) * (scaling / (m * n_cols))).to(dev)
        base_kept = float(2.0 * (yb @ grad) - yb @ (hess @ yb))
    return WeightedProjection(values, energy, kept, base_kept)


def _solve_spd(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``h^-1 g`` for a symmetric positive semi-definite ``h``: Cholesky after scaling to a unit diagonal, else the
    minimum-norm solution through the eigen-decomposition."""
    diag = torch.diagonal(h).clamp_min(0)
    d = torch.where(diag > 0, torch.sqrt(diag), torch.ones_like(diag))
    hn = h / d[:, None] / d[None, :]
    hn = (hn + hn.T) / 2
    gn = g / d
    chol, info = torch.linalg.cholesky_ex(hn)
    if int(info) == 0:
        return torch.cholesky_solve(gn[:, None], chol)[:, 0] / d
    w, vec = torch.linalg.eigh(hn)
    cut = float(w.max()) * max(hn.shape[0], 1) * float(torch.finfo(hn.dtype).eps) if w.numel() else 0.0
    inv = torch.where(w > cut, 1.0 / torch.where(w > cut, w, torch.ones_like(w)), torch.zeros_like(w))
    result: torch.Tensor = (vec @ (inv * (vec.T @ gn))) / d
    return result
