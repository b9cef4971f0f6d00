"""The pure maths layer: tensors in, tensors out. Knows no files."""

from fourier_convert.maths.delta import (
    DeltaCheck,
    check_delta,
    delta_apply,
    delta_at,
    delta_sq_norm,
    delta_weights,
    delta_weights_numpy,
    spectral_basis,
)
from fourier_convert.maths.indices import RANDPERM_THRESHOLD, IndexCache, spectral_indices
from fourier_convert.maths.svd import SpectralSVD, spectral_svd

__all__ = [
    "RANDPERM_THRESHOLD",
    "DeltaCheck",
    "IndexCache",
    "SpectralSVD",
    "check_delta",
    "delta_apply",
    "delta_at",
    "delta_sq_norm",
    "delta_weights",
    "delta_weights_numpy",
    "spectral_basis",
    "spectral_indices",
    "spectral_svd",
]
