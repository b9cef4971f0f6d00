"""The float64 closed form of a FourierFT delta, evaluated at chosen entries, and the spot check built on it.

For an ``(M, N)`` layer with coefficients ``c_k`` at ``(u_k, v_k)`` and scaling ``s``::

    dW[p, q] = s / (M N) * sum_k c_k cos(2 pi (u_k p / M + v_k q / N))

Every reconstruction (torch on any device, numpy) is checked against it at random entries plus whole rows and
columns (through numpy's float64 FFT), because FFT backends can silently return wrong values (docs/pitfalls).
torch-free: :class:`DeltaSample` collects the sampled entries from a delta that is produced row block by row
block and never exists whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Overflow from absurd inputs is not warned about: callers refuse non-finite values in one line.
_QUIET = np.errstate(over="ignore", invalid="ignore")


@_QUIET
def delta_at(
    values: np.ndarray,
    indices: np.ndarray,
    shape: tuple[int, int],
    scaling: float,
    rows: np.ndarray,
    cols: np.ndarray,
) -> np.ndarray:
    """Evaluate ``dW[rows[i], cols[i]]`` from the closed form in float64.

    Phases are reduced modulo M and N in integers before conversion, so large layers lose no precision.

    Args:
        values: The ``n`` coefficients.
        indices: ``(2, n)`` row / column frequencies.
        shape: ``(M, N)``.
        scaling: The delta's scale.
        rows: Row of each wanted entry.
        cols: Column of each wanted entry.

    Returns:
        float64 array, one value per entry.

    Example:
        >>> float(delta_at(np.array([2.0]), np.array([[0], [0]]), (2, 2), 1.0, np.array([1]), np.array([1]))[0])
        0.5
    """
    m, n_cols = shape
    u = indices[0].astype(np.int64)
    v = indices[1].astype(np.int64)
    p = rows.astype(np.int64)[:, None]
    q = cols.astype(np.int64)[:, None]
    phase = ((p * u[None, :]) % m) / m + ((q * v[None, :]) % n_cols) / n_cols
    result: np.ndarray = np.cos(2.0 * np.pi * phase) @ values * (scaling / (m * n_cols))
    return result


@_QUIET
def row_float64(values: np.ndarray, indices: np.ndarray, shape: tuple[int, int], scaling: float, p: int) -> np.ndarray:
    """Row ``p`` of the delta in float64, through numpy's FFT (pass ``indices[::-1]`` and the swapped shape for
    a column).

    Example:
        >>> row_float64(np.array([2.0]), np.array([[0], [0]]), (2, 2), 1.0, 1).tolist()
        [0.5, 0.5]
    """
    m, n_cols = shape
    g = np.zeros(n_cols, dtype=np.complex128)
    np.add.at(g, indices[1], values * np.exp(2j * np.pi * ((indices[0].astype(np.int64) * p) % m) / m))
    result: np.ndarray = np.fft.ifft(g).real * (scaling / m)
    return result


def delta_tolerance(values: np.ndarray, shape: tuple[int, int], scaling: float, eps: float) -> float:
    """The bound a reconstructed delta's entries must stay within:
    ``16 * eps * log2(M N + 1) * |s| * ||c||_2 / (M N)``, with ``eps`` the machine epsilon it was computed in.

    A few hundred times below the typical entry for float32, far above correct rounding, far below the errors a
    broken FFT makes.

    Example:
        >>> delta_tolerance(np.ones(4), (2, 2), 1.0, 2.0**-52) < 1e-14
        True
    """
    m, n_cols = shape
    scale = abs(scaling) * float(np.linalg.norm(values)) / (m * n_cols)
    return 16.0 * eps * math.log2(m * n_cols + 1) * scale


@dataclass(frozen=True)
class DeltaCheck:
    """Result of a float64 spot check of one reconstructed delta.

    Attributes:
        entries: How many entries were compared.
        max_abs_error: Largest absolute difference from the float64 closed form.
        tolerance: The bound it had to stay within.
        passed: ``max_abs_error <= tolerance`` and every checked value finite.
    """

    entries: int
    max_abs_error: float
    tolerance: float
    passed: bool


class DeltaSample:
    """The entries of an ``(M, N)`` delta that a spot check compares, gathered from row blocks as they pass.

    ``points`` random entries, ``lines`` whole rows and ``lines`` whole columns (positions drawn from ``rng``).
    Feed every row block to :meth:`take` (in any order), then call :meth:`check`.

    Example:
        >>> from fourier_convert.maths.indices import spectral_positions
        >>> idx = spectral_positions(8, 6, 5, 777); c = np.arange(1.0, 6.0)
        >>> full = np.stack([row_float64(c, idx, (8, 6), 2.0, p) for p in range(8)])
        >>> sample = DeltaSample((8, 6), np.random.default_rng(0))
        >>> sample.take(0, full[:3]); sample.take(3, full[3:])
        >>> sample.check(c, idx, 2.0, eps=2.0**-52).passed
        True
    """

    def __init__(self, shape: tuple[int, int], rng: np.random.Generator, *, points: int = 128, lines: int = 2):
        m, n_cols = shape
        self.shape = shape
        self.rows = rng.integers(0, m, size=points)
        self.cols = rng.integers(0, n_cols, size=points)
        self.line_rows = rng.integers(0, m, size=lines)
        self.line_cols = rng.integers(0, n_cols, size=lines)
        self.got = np.full(points, np.nan)
        self.got_rows = np.full((lines, n_cols), np.nan)
        self.got_cols = np.full((lines, m), np.nan)
        self.finite = True

    def take(self, start: int, block: np.ndarray) -> None:
        """Record the sampled entries of rows ``start .. start + len(block)`` (and whether all are finite).

        Thread-safe: blocks may be taken concurrently (each writes its own rows; the finiteness flag only
        goes from True to False).
        """
        stop = start + block.shape[0]
        here = (self.rows >= start) & (self.rows < stop)
        self.got[here] = block[self.rows[here] - start, self.cols[here]]
        for i, p in enumerate(self.line_rows):
            if start <= p < stop:
                self.got_rows[i] = block[p - start]
        self.got_cols[:, start:stop] = block[:, self.line_cols].T
        flat = block.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            finite = bool(np.isfinite(np.dot(flat, flat)))  # a NaN or inf anywhere makes the sum non-finite
        if not finite and not np.isfinite(block).all():  # (a finite block can still overflow the sum)
            self.finite = False

    @_QUIET
    def check(self, values: np.ndarray, indices: np.ndarray, scaling: float, *, eps: float) -> DeltaCheck:
        """Compare the recorded entries with the closed form (an entry never taken counts as a failure).

        Args:
            values: float64 coefficients.
            indices: ``(2, n)`` positions.
            scaling: The delta's scale.
            eps: Machine epsilon of the dtype the delta was computed in (sets the tolerance).

        Returns:
            The check's result; it never raises on a mismatch.
        """
        want = delta_at(values, indices, self.shape, scaling, self.rows, self.cols)
        errs = [np.abs(self.got - want)]
        for i, p in enumerate(self.line_rows):
            errs.append(np.abs(self.got_rows[i] - row_float64(values, indices, self.shape, scaling, int(p))))
        swapped, (m, n_cols) = indices[::-1], self.shape
        for i, q in enumerate(self.line_cols):
            errs.append(np.abs(self.got_cols[i] - row_float64(values, swapped, (n_cols, m), scaling, int(q))))
        all_err = np.concatenate(errs)
        finite = self.finite and bool(np.isfinite(all_err).all())
        max_err = float(all_err.max()) if finite else float("inf")
        tol = delta_tolerance(values, self.shape, scaling, eps)
        return DeltaCheck(int(all_err.size), max_err, tol, finite and max_err <= tol)
