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

    Each singular vector is a combination of orthonormal cosine (kind 0) / sine (kind 1) columns of a few
    frequencies; the combinations of all triplets are stored flat (CSR-like): triplet ``j``'s left vector is
    ``sum_i left_weight[i] phi_{left_kind[i]}[left_freq[i]]`` over ``i in left_ptr[j] : left_ptr[j + 1]``.

    Attributes:
        shape: ``(M, N)`` of the delta.
        values: Singular values (float64, descending, zeros dropped).
        left_ptr, left_kind, left_freq, left_weight: The left vectors' combinations.
        right_ptr, right_kind, right_freq, right_weight: The right vectors' combinations.
    """

    shape: tuple[int, int]
    values: np.ndarray
    left_ptr: np.ndarray
    left_kind: np.ndarray
    left_freq: np.ndarray
    left_weight: np.ndarray
    right_ptr: np.ndarray
    right_kind: np.ndarray
    right_freq: np.ndarray
    right_weight: np.ndarray

    @property
    def energy(self) -> float:
        """Squared Frobenius norm of the delta (sum of squared singular values)."""
        return float(np.sum(self.values**2))

    def vectors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``rank`` left and right singular vectors, ``(M, rank)`` and ``(N, rank)``, float64."""
        m, n = self.shape
        rank = min(rank, len(self.values))
        u = _evaluate(self.left_ptr, self.left_kind, self.left_freq, self.left_weight, rank, m)
        v = _evaluate(self.right_ptr, self.right_kind, self.right_freq, self.right_weight, rank, n)
        return u, v


def _evaluate(
    ptr: np.ndarray, kind: np.ndarray, freq: np.ndarray, weight: np.ndarray, rank: int, size: int
) -> np.ndarray:
    """Columns ``j < rank``: ``sum_i w_i phi_{kind_i}[freq_i]`` of length ``size``, one batched inverse FFT."""
    # cos(t) = Re(e^{it}) and sin(t) = Re(-i e^{it}): an inverse FFT evaluates a whole combination
    stop = int(ptr[rank])
    k, f, w = kind[:stop], freq[:stop].astype(np.int64), weight[:stop]
    col = np.repeat(np.arange(rank), np.diff(ptr[: rank + 1]))
    _, _, cos_norm, sin_norm = _canonical(f, size)
    coef = np.where(k == 0, w / np.where(k == 0, cos_norm, 1.0), -1j * w / np.where(k == 1, sin_norm, 1.0))
    g = np.zeros((size, rank), dtype=np.complex128)
    np.add.at(g, (f, col), coef)
    out: np.ndarray = np.fft.ifft(g, axis=0).real * size
    return out


def _canonical(freq: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Canonical frequency, sine sign, and the norms of the cosine and sine columns."""
    canon: np.ndarray = np.asarray(np.minimum(freq, size - freq)) % size
    sign: np.ndarray = 1.0 - 2.0 * (freq != canon)  # sin(2 pi (M - u) p / M) = -sin(2 pi u p / M)
    special: np.ndarray = (canon == 0) | (2 * canon == size)
    cos_norm: np.ndarray = np.sqrt(size / 2.0) * (1.0 + (np.sqrt(2.0) - 1.0) * special)
    sin_norm: np.ndarray = np.sqrt(size / 2.0) * (1.0 - special)
    return canon, sign, cos_norm, sin_norm


def _components(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """Connected component (smallest row node id reachable) of every edge of a bipartite graph."""
    row_label = np.arange(n_rows)
    while True:  # label propagation: converges in (component diameter) rounds, each O(edges)
        col_label = np.full(n_cols, n_rows, dtype=np.int64)
        np.minimum.at(col_label, cols, row_label[rows])
        new = row_label.copy()
        np.minimum.at(new, rows, col_label[cols])
        new = new[new]  # pointer jumping shortens long chains
        if np.array_equal(new, row_label):
            labels: np.ndarray = row_label[rows]
            return labels
        row_label = new


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
    vals = np.concatenate([base * ncu * ncv, -base * su * sv * nsu * nsv])
    row_key = np.concatenate([cu, (m + 1) + cu])  # node id: kind * (size + 1) + canonical frequency
    col_key = np.concatenate([cv, (n + 1) + cv])
    keep = vals != 0.0
    row_key, col_key, vals = row_key[keep], col_key[keep], vals[keep]
    row_ids, row_inv = np.unique(row_key, return_inverse=True)
    col_ids, col_inv = np.unique(col_key, return_inverse=True)
    # sum coefficients that land on the same (row node, column node)
    pair, pair_inv = np.unique(row_inv * len(col_ids) + col_inv, return_inverse=True)
    vals = np.bincount(pair_inv, weights=vals, minlength=len(pair))
    rows, cols = pair // max(len(col_ids), 1), pair % max(len(col_ids), 1)
    comp = _components(rows, cols, len(row_ids), len(col_ids))
    order = np.lexsort((cols, rows, comp))
    rows, cols, vals, comp = rows[order], cols[order], vals[order], comp[order]
    starts = np.flatnonzero(np.r_[True, comp[1:] != comp[:-1]]) if len(comp) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(comp)]
    one_row = np.minimum.reduceat(rows, starts) == np.maximum.reduceat(rows, starts) if len(comp) else starts > 0
    one_col = np.minimum.reduceat(cols, starts) == np.maximum.reduceat(cols, starts) if len(comp) else starts > 0
    triplets = _Triplets(row_ids, col_ids, m, n)
    if not len(comp):
        return triplets.result()
    # a component with one row or one column node is a rank-1 block: sigma is its norm, no SVD needed
    sigma = np.sqrt(np.add.reduceat(vals**2, starts))
    simple = (one_row | one_col) & (sigma > 0.0)
    _add_rank_one(triplets, rows, cols, vals, starts[simple], ends[simple], sigma[simple], one_row[simple])
    # the others: local row / column positions inside each component, then small blocks SVD'd in batches
    # of equal shape and large ones one by one
    blocks = ~(one_row | one_col)
    member = np.repeat(np.arange(len(starts)), ends - starts)
    local_row = _local_index(member, rows)
    local_col = _local_index(member, cols)
    n_r = np.maximum.reduceat(local_row, starts) + 1
    n_c = np.maximum.reduceat(local_col, starts) + 1
    # zero rows / columns change no singular value (zero ones are dropped), so small blocks are padded to
    # power-of-two shapes and decomposed a few batched calls for all of them
    pad_r, pad_c = _pow2(n_r), _pow2(n_c)
    small = blocks & (pad_r <= _SMALL_SIDE) & (pad_c <= _SMALL_SIDE)
    for shape_rc in sorted(set(zip(pad_r[small].tolist(), pad_c[small].tolist(), strict=True))):
        group = np.flatnonzero(small & (pad_r == shape_rc[0]) & (pad_c == shape_rc[1]))
        _add_small_blocks(triplets, group, shape_rc, starts, ends, rows, cols, vals, local_row, local_col)
    for s0, e0 in zip(starts[blocks & ~small], ends[blocks & ~small], strict=True):
        _add_block(triplets, rows[s0:e0], cols[s0:e0], vals[s0:e0])
    return triplets.result()


#: Blocks with at most this many rows and columns (after padding to powers of two) are decomposed in batches.
_SMALL_SIDE = 32


def _pow2(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1 << np.ceil(np.log2(np.maximum(x, 1))).astype(np.int64)
    return out


def _local_index(member: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Rank of each entry's node among the distinct nodes of its component (0, 1, ...)."""
    order = np.lexsort((nodes, member))
    m_sorted, n_sorted = member[order], nodes[order]
    new_node = np.r_[True, (m_sorted[1:] != m_sorted[:-1]) | (n_sorted[1:] != n_sorted[:-1])]
    new_comp = np.r_[True, m_sorted[1:] != m_sorted[:-1]]
    count = np.cumsum(new_node)
    first = np.maximum.accumulate(np.where(new_comp, count, 0))
    out = np.empty(len(nodes), dtype=np.int64)
    out[order] = count - first
    return out


def _add_small_blocks(
    triplets: _Triplets,
    group: np.ndarray,
    shape_rc: tuple[int, int],
    starts: np.ndarray,
    ends: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    local_row: np.ndarray,
    local_col: np.ndarray,
) -> None:
    """SVD of every component in ``group`` (all of shape ``shape_rc``) in one batched call."""
    n_rows, n_cols = shape_rc
    lengths = ends[group] - starts[group]
    slot = np.repeat(np.arange(len(group)), lengths)
    at = np.repeat(starts[group], lengths) + (
        np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    dense = np.zeros((len(group), n_rows, n_cols))
    dense[slot, local_row[at], local_col[at]] = vals[at]
    row_nodes = np.zeros((len(group), n_rows), dtype=np.int64)
    col_nodes = np.zeros((len(group), n_cols), dtype=np.int64)
    row_nodes[slot, local_row[at]] = rows[at]
    col_nodes[slot, local_col[at]] = cols[at]
    uu, ss_, vt = np.linalg.svd(dense, full_matrices=False)  # (G, R, k), (G, k), (G, k, C)
    real_rows = np.zeros((len(group), n_rows), dtype=bool)
    real_cols = np.zeros((len(group), n_cols), dtype=bool)
    real_rows[slot, local_row[at]] = True
    real_cols[slot, local_col[at]] = True
    uu *= real_rows[:, :, None]  # padding rows / columns carry exactly nothing
    vt *= real_cols[:, None, :]
    k = ss_.shape[1]
    triplets.add_batch(
        ss_.reshape(-1),
        np.full(len(group) * k, n_rows),
        np.repeat(row_nodes, k, axis=0).reshape(-1),
        np.transpose(uu, (0, 2, 1)).reshape(-1),
        np.full(len(group) * k, n_cols),
        np.repeat(col_nodes, k, axis=0).reshape(-1),
        vt.reshape(-1),
    )


def _add_rank_one(
    triplets: _Triplets,
    rows: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    sigma: np.ndarray,
    one_row: np.ndarray,
) -> None:
    """All one-row / one-column components at once: the single node gets weight 1, the others ``v / sigma``."""
    lengths = ends - starts
    members = np.repeat(np.arange(len(starts)), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    at = starts[members] + within  # entry index of every member
    spread = vals[at] / sigma[members]
    sides = []
    for nodes, single_side in ((rows, one_row), (cols, ~one_row)):
        # this side is one node (weight 1) where ``single_side``, else every entry's node (weight v / sigma)
        seg_len = np.where(single_side, 1, lengths)
        offset = np.cumsum(seg_len) - seg_len
        out_nodes = np.empty(int(seg_len.sum()), dtype=np.int64)
        out_w = np.empty(int(seg_len.sum()))
        many = ~single_side[members]
        out_nodes[offset[members[many]] + within[many]] = nodes[at[many]]
        out_w[offset[members[many]] + within[many]] = spread[many]
        out_nodes[offset[single_side]] = nodes[starts[single_side]]
        out_w[offset[single_side]] = 1.0
        sides.append((seg_len, out_nodes, out_w))
    triplets.add_batch(sigma, *sides[0], *sides[1])


def _add_block(triplets: _Triplets, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
    """SVD of one connected block. Columns with a single entry are first merged per row (an orthogonal change
    of basis on the right: singular values and left vectors unchanged), which shrinks the dense SVD."""
    r_local, r_inv = np.unique(rows, return_inverse=True)
    c_local, c_inv = np.unique(cols, return_inverse=True)
    per_col = np.bincount(c_inv, minlength=len(c_local))
    single = per_col[c_inv] == 1  # entries that are alone in their column
    multi_cols = np.flatnonzero(per_col > 1)
    col_pos = np.full(len(c_local), -1, dtype=np.int64)
    col_pos[multi_cols] = np.arange(len(multi_cols))
    merged_rows, merged_inv = np.unique(r_inv[single], return_inverse=True)
    norms = np.sqrt(np.bincount(merged_inv, weights=vals[single] ** 2, minlength=len(merged_rows)))
    block = np.zeros((len(r_local), len(multi_cols) + len(merged_rows)))
    block[r_inv[~single], col_pos[c_inv[~single]]] = vals[~single]
    block[merged_rows, len(multi_cols) + np.arange(len(merged_rows))] = norms
    uu, ss_, vt = np.linalg.svd(block, full_matrices=False)
    keep = ss_ > 0.0
    uu, ss_, vt = uu[:, keep], ss_[keep], vt[keep]
    # right vectors back in the original columns: a merged column's weight spreads as v_c / ||v_row||
    right = np.zeros((len(ss_), len(c_local)))
    right[:, multi_cols] = vt[:, : len(multi_cols)]
    spread = vals[single] / norms[merged_inv]
    right[:, c_inv[single]] = vt[:, len(multi_cols) + merged_inv] * spread
    k = len(ss_)
    triplets.add_batch(
        ss_,
        np.full(k, len(r_local)),
        np.tile(r_local, k),
        uu.T.reshape(-1),
        np.full(k, len(c_local)),
        np.tile(c_local, k),
        right.reshape(-1),
    )


class _Triplets:
    """Collects singular triplets (combinations of node indices) and sorts them into a :class:`SpectralSVD`."""

    def __init__(self, row_ids: np.ndarray, col_ids: np.ndarray, m: int, n: int) -> None:
        self.row_ids, self.col_ids, self.m, self.n = row_ids, col_ids, m, n
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add_batch(
        self,
        sigma: np.ndarray,
        left_len: np.ndarray,
        left_nodes: np.ndarray,
        left_w: np.ndarray,
        right_len: np.ndarray,
        right_nodes: np.ndarray,
        right_w: np.ndarray,
    ) -> None:
        """Triplets whose combinations are stored one after the other (``*_len`` entries each)."""
        self.parts.append(
            (np.asarray(sigma, dtype=np.float64), left_len, left_nodes, left_w, right_len, right_nodes, right_w)
        )

    def result(self) -> SpectralSVD:
        if not self.parts:
            empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0)
            ptr = np.zeros(1, np.int64)
            return SpectralSVD(
                (self.m, self.n), empty_f, ptr, empty_i, empty_i, empty_f, ptr, empty_i, empty_i, empty_f
            )
        sig, l_len, l_nodes, l_w, r_len, r_nodes, r_w = (np.concatenate(x) for x in zip(*self.parts, strict=True))
        # singular values at rounding level (rank-deficient blocks) are zeros: drop them so the rank is exact
        order = np.argsort(-sig, kind="stable")
        order = order[sig[order] > 1e-12 * sig.max()]
        left = self._select(l_len, l_nodes, l_w, order, self.row_ids, self.m)
        right = self._select(r_len, r_nodes, r_w, order, self.col_ids, self.n)
        return SpectralSVD((self.m, self.n), sig[order], *left, *right)

    @staticmethod
    def _select(
        lengths: np.ndarray, nodes: np.ndarray, weights: np.ndarray, order: np.ndarray, ids: np.ndarray, size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Reorder the stored combinations by ``order`` (a gather of whole segments) into flat arrays."""
        lengths = lengths.astype(np.int64)
        offsets = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
        new_len = lengths[order]
        ptr = np.r_[0, np.cumsum(new_len)].astype(np.int64)
        gather = np.repeat(offsets[order] - ptr[:-1], new_len) + np.arange(int(ptr[-1]))
        kind, freq = np.divmod(ids[nodes[gather]], size + 1)
        return ptr, kind, freq, weights[gather]
