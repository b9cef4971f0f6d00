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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
