"""FourierFT deltas in float64 with numpy alone, row block by row block (the CPU merge's backend).

The algorithm of :func:`fourier_convert.maths.delta.delta_weights`: ``Re(ifft2(S)) * s`` is the ``irfft2`` of
the half spectrum holding ``c / 2`` at each coefficient's bin and at its mirror (docs/maths.md). Its first pass
runs only over the columns that hold coefficients (:func:`column_pass`, one complex FFT per such column); its
second pass (:func:`delta_rows`) turns any block of rows into final values with ``irfft``. So a caller can
produce, use and drop the delta a block at a time, spread the blocks over threads (numpy's FFTs release the
GIL), and never hold the float64 delta whole. No torch: the CPU merge runs without importing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

#: Complex elements per row block of the column pass's FFTs (bounds the temporaries of :func:`column_pass`).
_CHUNK_ELEMENTS = 1 << 18


#: Overflow to inf or NaN from absurd inputs (a scaling of 1e308) is not warned about: callers refuse non-finite
#: deltas in one line, and numpy's warnings would break it. A decorator, so that worker threads get it too.
_QUIET = np.errstate(over="ignore", invalid="ignore")


@dataclass(frozen=True)
class ColumnPass:
    """A delta after the first pass of its ``irfft2``: every row of the half-spectrum columns that hold
    coefficients.

    Attributes:
        shape: ``(M, N)`` of the delta.
        columns: ``(U,)`` half-spectrum column indices (``< N // 2 + 1``) that hold coefficients, ascending.
        values: ``(U, M)`` complex128: column ``columns[j]`` of the half spectrum after the inverse DFT along
            the rows, scaling and both ``1 / M`` and the halving already applied.
    """

    shape: tuple[int, int]
    columns: np.ndarray
    values: np.ndarray


@_QUIET
def column_pass(
    values: np.ndarray,
    indices: np.ndarray,
    shape: tuple[int, int],
    scaling: float,
    *,
    map_fn: Callable[[Callable[[slice], None], Iterable[slice]], Iterable[None]] = map,
) -> ColumnPass:
    """The first pass of a delta's ``irfft2``, in float64.

    Args:
        values: The ``n`` coefficients (any float dtype; computed in float64).
        indices: ``(2, n)`` row / column frequencies
            (:func:`~fourier_convert.maths.indices.spectral_positions`).
        shape: ``(M, N)``.
        scaling: The delta's scale.
        map_fn: Runs the column chunks' FFTs: the builtin ``map`` (default), or an executor's ``map`` to
            spread them over threads.

    Returns:
        A :class:`ColumnPass`; its memory is ``16 * U * M`` bytes with ``U <= min(2 n, N // 2 + 1)``.

    Example:
        >>> cp = column_pass(np.array([2.0]), np.array([[1], [1]]), (4, 4), 1.0)
        >>> cp.columns.tolist(), cp.values.shape
        ([1], (1, 4))
    """
    m, n_cols = shape
    half = n_cols // 2 + 1
    u = np.asarray(indices[0], dtype=np.int64)
    v = np.asarray(indices[1], dtype=np.int64)
    u_all = np.concatenate([u, (-u) % m])
    v_all = np.concatenate([v, (-v) % n_cols])
    keep = v_all < half
    coeffs = np.asarray(values, dtype=np.float64) * (0.5 * scaling)
    vals = np.concatenate([coeffs, coeffs])[keep]
    columns, which = np.unique(v_all[keep], return_inverse=True)
    spectrum = np.zeros((columns.shape[0], m), dtype=np.complex128)
    np.add.at(spectrum, (which, u_all[keep]), vals)
    step = max(1, _CHUNK_ELEMENTS // max(m, 1))

    @_QUIET
    def transform(part: slice) -> None:
        spectrum[part] = np.fft.ifft(spectrum[part], axis=1)

    for _ in map_fn(transform, [slice(a, a + step) for a in range(0, columns.shape[0], step)]):
        pass
    return ColumnPass((m, n_cols), columns, spectrum)


@_QUIET
def delta_rows(cp: ColumnPass, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start .. stop`` of the delta (the second pass of its ``irfft2``), in float64.

    Args:
        cp: The delta's :func:`column_pass`.
        start: First row.
        stop: One past the last row.
        out: Optional ``(stop - start, N)`` float64 array to write into.

    Returns:
        ``(stop - start, N)`` float64.

    Example:
        >>> cp = column_pass(np.array([2.0]), np.array([[0], [0]]), (2, 2), 4.0)
        >>> delta_rows(cp, 0, 2).tolist()
        [[2.0, 2.0], [2.0, 2.0]]
    """
    n_cols = cp.shape[1]
    block = np.zeros((stop - start, n_cols // 2 + 1), dtype=np.complex128)
    block[:, cp.columns] = cp.values[:, start:stop].T
    result: np.ndarray = np.fft.irfft(block, n=n_cols, axis=1)
    if out is None:
        return result
    out[...] = result  # numpy < 2.0 has no out= on its FFTs
    return out


def delta_float64(values: np.ndarray, indices: np.ndarray, shape: tuple[int, int], scaling: float) -> np.ndarray:
    """The whole ``(M, N)`` delta in float64 (:func:`column_pass` then :func:`delta_rows`).

    Args:
        values: The ``n`` coefficients.
        indices: ``(2, n)`` row / column frequencies.
        shape: ``(M, N)``.
        scaling: The delta's scale.

    Returns:
        ``(M, N)`` float64, oriented ``(out, in)`` as for ``nn.Linear``.

    Example:
        >>> idx = np.array([[1, 2, 0], [0, 3, 1]]); c = np.array([1.0, -2.0, 0.5])
        >>> bool(np.allclose(delta_float64(c, idx, (5, 4), 7.0), delta_weights_numpy(c, idx, 5, 4, 7.0)))
        True
    """
    return delta_rows(column_pass(values, indices, shape, scaling), 0, shape[0])


@_QUIET
def delta_weights_numpy(
    values: np.ndarray, indices: np.ndarray, out_features: int, in_features: int, scaling: float
) -> np.ndarray:
    """PEFT's literal algorithm in float64 numpy (dense complex spectrum, ``ifft2``, real part).

    The independent fallback backend when a merge's FFT fails its spot check.

    Example:
        >>> delta_weights_numpy(np.ones(1), np.array([[0], [0]]), 2, 2, 4.0)
        array([[1., 1.],
               [1., 1.]])
    """
    dense = np.zeros((out_features, in_features), dtype=np.complex128)
    np.add.at(dense, (indices[0], indices[1]), values)
    return np.fft.ifft2(dense).real * scaling
