"""FourierFT delta reconstruction and its float64 spot check.

For an ``(M, N)`` layer with coefficients ``c_k`` at ``(u_k, v_k)`` and scaling ``s``::

    dW[p, q] = s / (M N) * sum_k c_k cos(2 pi (u_k p / M + v_k q / N))

which is ``Re(ifft2(S)) * s`` for the dense spectrum ``S`` (PEFT's definition). Because only the real part
is kept, ``Re(ifft2(S)) = irfft2(half of (S + S[-u, -v]) / 2)`` (docs/maths.md): each coefficient puts
``c/2`` at its bin and at the mirrored bin, and only the non-negative column half is transformed. The column
pass of that ``irfft2`` touches only the columns holding coefficients, so :func:`delta_weights` does it as a
sparse inverse DFT with exact twiddles and streams row blocks through the row pass (``irfft``): no dense
spectrum, half the work of a dense ``irfft2``, the same values to rounding. (The CPU merge uses the torch-free
float64 version of the same algorithm in :mod:`fourier_convert.maths.delta_numpy`.)

:func:`check_delta` verifies a reconstructed delta against the float64 closed form
(:mod:`fourier_convert.maths.closed_form`), because FFT backends can silently return wrong values
(docs/pitfalls).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fourier_convert.maths.closed_form import DeltaCheck, DeltaSample

#: Elements per row block of the second pass (bounds the temporaries of :func:`delta_weights`).
_BLOCK_ELEMENTS = 1 << 19


def delta_weights(
    spectra: torch.Tensor,
    indices: torch.Tensor,
    out_features: int,
    in_features: int,
    scaling: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Reconstruct a batch of FourierFT deltas that share one shape and one set of positions.

    Args:
        spectra: ``(B, n)`` or ``(n,)`` coefficients (any float dtype; computed in ``dtype``).
        indices: ``(2, n)`` rows / columns from :func:`~fourier_convert.maths.indices.spectral_indices`.
        out_features: M.
        in_features: N.
        scaling: The adapter's ``scaling``.
        dtype: ``torch.float32`` (default) or ``torch.float64``.
        device: Where to compute.

    Returns:
        ``(B, M, N)`` (or ``(M, N)`` for 1-D input) deltas in ``dtype`` on ``device``, oriented
        ``(out, in)`` as for ``nn.Linear``.

    Example:
        >>> from fourier_convert.maths.indices import spectral_indices
        >>> idx = spectral_indices(6, 4, 3, 777)
        >>> delta_weights(torch.ones(3), idx, 6, 4, 150.0).shape
        torch.Size([6, 4])
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    squeeze = spectra.dim() == 1
    coeffs = spectra.reshape(1, -1) if squeeze else spectra
    m, n_cols = out_features, in_features
    half = n_cols // 2 + 1
    u = indices[0].to(device)
    v = indices[1].to(device)
    u_all = torch.cat([u, (-u) % m])
    v_all = torch.cat([v, (-v) % n_cols])
    keep = v_all < half
    rows_of, cols_of = u_all[keep], v_all[keep]
    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    vals = (coeffs.to(device=device, dtype=dtype) * 0.5).repeat(1, 2)[:, keep].to(complex_dtype)
    # The first (column) pass of irfft2 is a sparse inverse DFT: each output row p gets
    # sum_k vals_k e^{2 pi i u_k p / M} / M in column v_k, with the phase u_k p reduced modulo M in integers
    # and looked up in a table of exact twiddles. Row blocks of it then go through the second pass (irfft along
    # the rows): the dense complex spectrum (as large as the delta itself) never exists.
    t = torch.arange(m, device=device, dtype=torch.float64)
    twiddle = torch.polar(torch.full_like(t, 1.0 / m), t * (2 * math.pi / m)).to(complex_dtype)
    out = torch.empty(coeffs.shape[0], m, n_cols, dtype=dtype, device=device)
    step = max(1, _BLOCK_ELEMENTS // max(half, rows_of.numel(), 1))
    for start in range(0, m, step):
        p = torch.arange(start, min(m, start + step), device=device)
        phase = twiddle[(p[:, None] * rows_of[None, :]) % m]
        block = torch.zeros(coeffs.shape[0], p.numel(), half, dtype=complex_dtype, device=device)
        block.index_add_(2, cols_of, phase.unsqueeze(0) * vals.unsqueeze(1))
        out[:, start : start + p.numel()] = torch.fft.irfft(block, n=n_cols, dim=2)
    out.mul_(scaling)
    return out[0] if squeeze else out


def check_delta(
    delta: torch.Tensor,
    values: np.ndarray,
    indices: np.ndarray,
    scaling: float,
    *,
    rng: np.random.Generator,
    points: int = 128,
    lines: int = 2,
) -> DeltaCheck:
    """Compare a reconstructed ``(M, N)`` delta with the float64 closed form at sampled entries.

    Checks ``points`` random entries (direct cosine sums) plus ``lines`` whole rows and ``lines`` whole
    columns (through numpy's float64 FFT, a backend independent of torch's), and that every entry is
    finite. The tolerance is
    ``16 * eps * log2(M N + 1) * |s| * ||c||_2 / (M N)``: a few hundred times below the typical entry
    size for float32, far above correct rounding, far below the errors a broken FFT makes.

    Args:
        delta: The delta to check (any device, float32 or float64).
        values: float64 coefficients.
        indices: ``(2, n)`` int positions.
        scaling: The adapter's scaling.
        rng: Random generator choosing the entries (pass a seeded one for reproducibility).
        points: Random entries to check.
        lines: Whole rows and whole columns to check.

    Returns:
        The check's result; it never raises on a mismatch.

    Example:
        >>> from fourier_convert.maths.indices import spectral_indices
        >>> idx = spectral_indices(8, 8, 5, 777)
        >>> c = np.arange(1.0, 6.0)
        >>> d = delta_weights(torch.tensor(c), idx, 8, 8, 2.0)
        >>> check_delta(d, c, idx.numpy(), 2.0, rng=np.random.default_rng(0)).passed
        True
    """
    sample = DeltaSample((int(delta.shape[0]), int(delta.shape[1])), rng, points=points, lines=lines)
    sel = torch.stack([torch.as_tensor(sample.rows), torch.as_tensor(sample.cols)]).to(delta.device)
    sample.got = delta[sel[0], sel[1]].double().cpu().numpy()
    sample.got_rows = delta[torch.as_tensor(sample.line_rows).to(delta.device)].double().cpu().numpy()
    sample.got_cols = delta[:, torch.as_tensor(sample.line_cols).to(delta.device)].T.double().cpu().numpy()
    # one reduction instead of a full boolean mask: any NaN / inf entry makes the sum non-finite
    sample.finite = bool(torch.isfinite(delta.sum()))
    return sample.check(values, indices, scaling, eps=float(torch.finfo(delta.dtype).eps))


def delta_sq_norm(values: np.ndarray, indices: np.ndarray, shape: tuple[int, int], scaling: float) -> float:
    """Exact squared Frobenius norm of a FourierFT delta, from the spectrum alone (Parseval).

    ``Re(ifft2(S)) = ifft2((S + S[-u, -v]) / 2)`` and ``||ifft2(X)||^2 = ||X||^2 / (M N)``, so the norm
    needs only the symmetrised coefficients per bin: O(n log n), no dense matrix.

    Example:
        >>> from fourier_convert.maths.indices import spectral_indices
        >>> idx = spectral_indices(6, 5, 7, 777)
        >>> c = np.linspace(1, 2, 7)
        >>> d = delta_weights(torch.tensor(c), idx, 6, 5, 3.0, dtype=torch.float64)
        >>> bool(np.isclose(delta_sq_norm(c, idx.numpy(), (6, 5), 3.0), float((d ** 2).sum())))
        True
    """
    m, n_cols = shape
    u = indices[0].astype(np.int64)
    v = indices[1].astype(np.int64)
    bins = np.concatenate([u * n_cols + v, ((-u) % m) * n_cols + ((-v) % n_cols)])
    vals = np.concatenate([values, values]) * 0.5
    uniq, inv = np.unique(bins, return_inverse=True)
    sums = np.zeros(uniq.shape[0])
    np.add.at(sums, inv, vals)
    with np.errstate(over="ignore"):  # an absurd scaling gives inf, not OverflowError
        return float(np.float64(scaling) ** 2 * np.dot(sums, sums) / (m * n_cols))


def _roots_of_unity(size: int) -> torch.Tensor:
    """``exp(2 pi i j / size)`` for ``j = 0 .. size - 1``, complex128."""
    phase = torch.arange(size, dtype=torch.float64) * (2.0 * math.pi / size)
    return torch.polar(torch.ones_like(phase), phase)


def spectral_basis(indices: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``(E_u, E_v)`` of a FourierFT delta's exact low-rank form (docs/maths.md, fact 3), complex128.

    ``E_u[p, k] = exp(2 pi i u_k p / M)`` is ``(M, n)``, ``E_v[q, k] = exp(2 pi i v_k q / N)`` is ``(N, n)``. They
    depend only on the positions and the shape, so layers that share both (FourierFT draws every layer of a
    shape from one seed) can share one basis in :func:`delta_apply`.

    Example:
        >>> e_u, e_v = spectral_basis(np.array([[1, 2], [0, 3]]), (5, 4))
        >>> tuple(e_u.shape), tuple(e_v.shape), e_v.dtype
        ((5, 2), (4, 2), torch.complex128)
    """
    m, n = shape
    u = torch.from_numpy(np.asarray(indices[0], dtype=np.int64))
    v = torch.from_numpy(np.asarray(indices[1], dtype=np.int64))
    # Phases reduced modulo the size in integers, then looked up among the size's roots of unity (the same
    # values as evaluating exp at each reduced phase, without 2 (M + N) n sines and cosines).
    e_u = _roots_of_unity(m)[(torch.arange(m)[:, None] * u[None, :]) % m]
    e_v = _roots_of_unity(n)[(torch.arange(n)[:, None] * v[None, :]) % n]
    return e_u, e_v


def delta_apply(
    x: torch.Tensor,
    values: np.ndarray,
    indices: np.ndarray,
    shape: tuple[int, int],
    scaling: float,
    basis: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x @ dW^T`` for a FourierFT delta ``dW`` of shape ``(M, N) = shape``, without forming ``dW``, in float64.

    Through the exact low-rank factorisation (docs/maths.md fact 3): ``dW = Re(E_u diag(c) E_v^T) * s / (M N)``
    with ``E_u[p, k] = exp(2 pi i u_k p / M)``, so ``x @ dW^T`` costs O(batch (M + N) n) and shares no code with
    the FFT reconstruction (an independent route, used to prove merges).

    Args:
        x: ``(..., N)`` inputs.
        values: The ``n`` coefficients.
        indices: ``(2, n)`` row / column frequencies.
        shape: ``(M, N)``.
        scaling: The delta's scale.
        basis: :func:`spectral_basis` of ``indices`` and ``shape``, when the caller keeps it for several calls;
            None computes it.

    Returns:
        ``(..., M)`` float64.

    Example:
        >>> idx = np.array([[1, 2], [0, 3]]); c = np.array([1.0, -2.0]); x = torch.randn(3, 4, dtype=torch.float64)
        >>> from fourier_convert.maths.delta_numpy import delta_weights_numpy
        >>> dense = torch.from_numpy(delta_weights_numpy(c, idx, 5, 4, 7.0))
        >>> torch.allclose(delta_apply(x, c, idx, (5, 4), 7.0), x @ dense.T)
        True
    """
    m, n = shape
    e_u, e_v = spectral_basis(indices, shape) if basis is None else basis
    flat = x.reshape(-1, n).to(torch.complex128)
    coeffs = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(torch.complex128)
    y = ((flat @ e_v) * coeffs) @ e_u.T
    return (y.real * (scaling / (m * n))).reshape(*x.shape[:-1], m)
