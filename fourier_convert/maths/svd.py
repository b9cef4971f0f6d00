"""Exact SVD of a FourierFT delta from its spectrum, without forming the dense matrix.

With ``a = 2 pi u p / M`` and ``b = 2 pi v q / N``, ``cos(a + b) = cos a cos b - sin a sin b``. The cosine and
sine columns of distinct *canonical* frequencies (``u`` and ``M - u`` give the same columns up to the sign
of the sine) are orthogonal, so in the orthonormal bases

    phi_c[u](p) = cos(2 pi u p / M) / ||.||,   phi_s[u](p) = sin(2 pi u p / M) / ||.||   (u = 0 .. M // 2)

the delta is ``Phi_M K Phi_N^T`` with a sparse core ``K`` that never couples cosines with sines:
``K = blockdiag(K_cc, K_ss)``. Each coefficient adds one entry to ``K_cc`` and (unless a frequency is 0 or
a Nyquist one) one to ``K_ss``. The SVD of ``K`` splits over the connected components of the bipartite
graph "row frequency - column frequency"; each component is a small dense SVD. The singular values are
those of ``dW`` exactly (math.md facts 3 and 4); the dense SVD is only the test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpectralSVD:
    """Singular triplets of a FourierFT delta, sorted by decreasing singular value.

    Attributes:
        shape: ``(M, N)`` of the delta.
        values: Singular values (float64, descending, zeros dropped).
        left: For each triplet, ``(kinds, freqs, weights)`` describing the left vector as a combination of
            orthonormal cosine (kind 0) / sine (kind 1) columns of the given frequencies.
        right: The same for the right vectors.
    """

    shape: tuple[int, int]
    values: np.ndarray
    left: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    right: list[tuple[np.ndarray, np.ndarray, np.ndarray]]

    @property
    def energy(self) -> float:
        """Squared Frobenius norm of the delta (sum of squared singular values)."""
        return float(np.sum(self.values**2))

    def vectors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``rank`` left and right singular vectors, ``(M, rank)`` and ``(N, rank)``, float64."""
        m, n = self.shape
        rank = min(rank, len(self.values))
        u = np.zeros((m, rank))
        v = np.zeros((n, rank))
        for j in range(rank):
            u[:, j] = _evaluate(self.left[j], m)
            v[:, j] = _evaluate(self.right[j], n)
        return u, v


def _evaluate(combo: tuple[np.ndarray, np.ndarray, np.ndarray], size: int) -> np.ndarray:
    """The vector ``sum_i w_i phi_{kind_i}[freq_i]`` of length ``size`` (orthonormal cos / sin columns)."""
    # cos(t) = Re(e^{it}) and sin(t) = Re(-i e^{it}): one inverse FFT evaluates the whole combination
    kinds, freqs, weights = combo
    _, _, cos_norm, sin_norm = _canonical(freqs.astype(np.int64), size)
    coef = np.where(
        kinds == 0, weights / np.where(kinds == 0, cos_norm, 1.0), -1j * weights / np.where(kinds == 1, sin_norm, 1.0)
    )
    g = np.zeros(size, dtype=np.complex128)
    np.add.at(g, freqs.astype(np.int64), coef)
    out: np.ndarray = np.fft.ifft(g).real * size
    return out


def _canonical(freq: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Canonical frequency, sine sign, and the norms of the cosine and sine columns."""
    canon: np.ndarray = np.asarray(np.minimum(freq, size - freq)) % size
    sign: np.ndarray = 1.0 - 2.0 * (freq != canon)  # sin(2 pi (M - u) p / M) = -sin(2 pi u p / M)
    special: np.ndarray = (canon == 0) | (2 * canon == size)
    cos_norm: np.ndarray = np.sqrt(size / 2.0) * (1.0 + (np.sqrt(2.0) - 1.0) * special)
    sin_norm: np.ndarray = np.sqrt(size / 2.0) * (1.0 - special)
    return canon, sign, cos_norm, sin_norm


def spectral_svd(values: np.ndarray, indices: np.ndarray, shape: tuple[int, int], scaling: float) -> SpectralSVD:
    """Exact SVD of the FourierFT delta with coefficients ``values`` at ``indices``.

    Args:
        values: ``(n,)`` float64 coefficients.
        indices: ``(2, n)`` row / column frequencies (as :func:`spectral_indices` returns them).
        shape: ``(M, N)`` of the delta (out, in).
        scaling: The adapter's scaling.

    Returns:
        The singular triplets, exact to float64 rounding.

    Example:
        >>> from fourier_convert.maths import delta_weights, spectral_indices
        >>> import torch
        >>> idx = spectral_indices(12, 10, 7, 777)
        >>> c = np.linspace(-1.0, 2.0, 7)
        >>> svd = spectral_svd(c, idx.numpy(), (12, 10), 150.0)
        >>> dense = delta_weights(torch.tensor(c), idx, 12, 10, 150.0, dtype=torch.float64).numpy()
        >>> bool(np.allclose(svd.values, np.linalg.svd(dense, compute_uv=False)[: len(svd.values)]))
        True
    """
    m, n = shape
    u = indices[0].astype(np.int64)
    v = indices[1].astype(np.int64)
    cu, su, ncu, nsu = _canonical(u, m)
    cv, sv, ncv, nsv = _canonical(v, n)
    base = scaling / (m * n) * values
    # entries of K: (row kind, row freq, col kind, col freq) -> value; cos-cos and sin-sin blocks only
    cc = base * ncu * ncv
    ss = -base * su * sv * nsu * nsv
    rows = np.concatenate([np.stack([np.zeros_like(cu), cu], 1), np.stack([np.ones_like(cu), cu], 1)])
    cols = np.concatenate([np.stack([np.zeros_like(cv), cv], 1), np.stack([np.ones_like(cv), cv], 1)])
    vals = np.concatenate([cc, ss])
    keep = vals != 0.0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    # sum duplicates, index the nodes of both sides
    row_key = rows[:, 0] * (m + 1) + rows[:, 1]
    col_key = cols[:, 0] * (n + 1) + cols[:, 1]
    row_ids, row_inv = np.unique(row_key, return_inverse=True)
    col_ids, col_inv = np.unique(col_key, return_inverse=True)
    n_rows = len(row_ids)
    parent = list(range(n_rows + len(col_ids)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(row_inv.tolist(), col_inv.tolist(), strict=True):
        ra, rb = find(a), find(n_rows + b)
        if ra != rb:
            parent[ra] = rb
    comp_of_entry = np.array([find(a) for a in row_inv.tolist()], dtype=np.int64)
    sigmas: list[float] = []
    lefts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    rights: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    order = np.argsort(comp_of_entry, kind="stable")
    bounds = np.flatnonzero(np.diff(comp_of_entry[order])) + 1
    for group in np.split(order, bounds):
        if group.size == 0:
            continue
        r_local, r_inv = np.unique(row_inv[group], return_inverse=True)
        c_local, c_inv = np.unique(col_inv[group], return_inverse=True)
        block = np.zeros((len(r_local), len(c_local)))
        np.add.at(block, (r_inv, c_inv), vals[group])
        if block.shape[0] == 1 or block.shape[1] == 1:  # most components: one row or one column, no SVD needed
            sigma1 = float(np.linalg.norm(block))
            if block.shape[1] == 1:
                uu, vt = block / sigma1, np.ones((1, 1))
            else:
                uu, vt = np.ones((1, 1)), block / sigma1
            ss_ = np.array([sigma1])
        else:
            uu, ss_, vt = np.linalg.svd(block, full_matrices=False)
        r_kind, r_freq = np.divmod(row_ids[r_local], m + 1)
        c_kind, c_freq = np.divmod(col_ids[c_local], n + 1)
        for j, sigma in enumerate(ss_):
            if sigma <= 0.0:
                continue
            sigmas.append(float(sigma))
            lefts.append((r_kind, r_freq, uu[:, j]))
            rights.append((c_kind, c_freq, vt[j]))
    # singular values at rounding level (rank-deficient blocks) are zeros: drop them so the rank is exact
    floor = 1e-12 * max(sigmas, default=0.0)
    keep_s = [i for i, sigma in enumerate(sigmas) if sigma > floor]
    sigmas = [sigmas[i] for i in keep_s]
    lefts = [lefts[i] for i in keep_s]
    rights = [rights[i] for i in keep_s]
    order_s = np.argsort(-np.asarray(sigmas), kind="stable")
    return SpectralSVD(
        shape=(m, n),
        values=np.asarray(sigmas)[order_s] if sigmas else np.zeros(0),
        left=[lefts[i] for i in order_s],
        right=[rights[i] for i in order_s],
    )
