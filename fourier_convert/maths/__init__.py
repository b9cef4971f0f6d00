"""The pure maths layer: tensors in, tensors out. Knows no files."""

from typing import TYPE_CHECKING

from fourier_convert._lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__,
    globals(),
    {
        "DeltaCheck": "fourier_convert.maths.closed_form",
        "check_delta": "fourier_convert.maths.delta",
        "delta_apply": "fourier_convert.maths.delta",
        "delta_at": "fourier_convert.maths.closed_form",
        "delta_sq_norm": "fourier_convert.maths.delta",
        "delta_weights": "fourier_convert.maths.delta",
        "delta_weights_numpy": "fourier_convert.maths.delta_numpy",
        "spectral_basis": "fourier_convert.maths.delta",
        "RANDPERM_THRESHOLD": "fourier_convert.maths.indices",
        "IndexCache": "fourier_convert.maths.indices",
        "spectral_indices": "fourier_convert.maths.indices",
        "SpectralSVD": "fourier_convert.maths.svd",
        "spectral_svd": "fourier_convert.maths.svd",
    },
)

if TYPE_CHECKING:
    from fourier_convert.maths.closed_form import DeltaCheck, delta_at
    from fourier_convert.maths.delta import check_delta, delta_apply, delta_sq_norm, delta_weights, spectral_basis
    from fourier_convert.maths.delta_numpy import delta_weights_numpy
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
