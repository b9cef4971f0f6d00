"""Frequency positions of a FourierFT layer, rebuilt exactly as PEFT builds them.

PEFT draws ``torch.randperm(out * in, generator=torch.Generator().manual_seed(seed))`` on the CPU and keeps
the first ``n`` entries; position ``p`` is row ``p // in``, column ``p % in`` of the ``(out, in)`` spectrum.
Layers of the same ``(out, in, seed)`` share one permutation, and a smaller ``n`` is a prefix of it, so an
:class:`IndexCache` draws each permutation once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

#: From early-2025 releases on, torch.randperm on the CPU uses another algorithm for n >= 2**32 / 20;
#: layers above this size get torch-version-dependent positions (see docs/maths.md).
RANDPERM_THRESHOLD = (2**32) // 20


def spectral_indices(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """The ``(2, n)`` row / column indices PEFT uses for a layer.

    Args:
        out_features: Rows of the delta (M).
        in_features: Columns of the delta (N).
        n: Number of coefficients, ``1 <= n <= M * N``.
        seed: ``random_loc_seed``.

    Returns:
        int64 tensor ``[[rows...], [cols...]]`` on the CPU.

    Raises:
        ValueError: ``n`` is out of range.

    Example:
        >>> spectral_indices(4, 3, 2, 777).shape
        torch.Size([2, 2])
    """
    total = out_features * in_features
    if not 1 <= n <= total:
        raise ValueError(f"n={n} must be in [1, {total}] for a {out_features}x{in_features} layer")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([perm // in_features, perm % in_features])


@dataclass
class IndexCache:
    """Computes each ``(out, in, seed)`` permutation once and serves prefixes of it.

    Call :meth:`reserve` for every layer first so that one draw covers the largest ``n``; :meth:`get`
    redraws (still exactly) only if a larger ``n`` is asked for later.

    Example:
        >>> cache = IndexCache()
        >>> cache.reserve(8, 8, 777, 5); cache.reserve(8, 8, 777, 3)
        >>> bool((cache.get(8, 8, 777, 3) == cache.get(8, 8, 777, 5)[:, :3]).all())
        True
        >>> cache.draws
        1
    """

    _wanted: dict[tuple[int, int, int], int] = field(default_factory=dict)
    _cache: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    _ready: dict[tuple[int, int, int], threading.Event] = field(default_factory=dict)
    draws: int = 0

    def prefetch(self) -> None:
        """Draw every reserved permutation in a background thread, in reservation order.

        ``torch.randperm`` releases the GIL, so the draws overlap with work on the first layers;
        :meth:`get` waits for a permutation that is still being drawn.
        """
        keys = [k for k in self._wanted if k not in self._cache and k not in self._ready]
        for key in keys:
            self._ready[key] = threading.Event()

        def run() -> None:
            for key in keys:
                try:
                    self._cache[key] = spectral_indices(key[0], key[1], self._wanted[key], key[2])
                    self.draws += 1
                finally:
                    self._ready[key].set()

        threading.Thread(target=run, name="fourier-convert-indices", daemon=True).start()

    def reserve(self, out_features: int, in_features: int, seed: int, n: int) -> None:
        key = (out_features, in_features, seed)
        self._wanted[key] = max(n, self._wanted.get(key, 0))

    def get(self, out_features: int, in_features: int, seed: int, n: int) -> torch.Tensor:
        key = (out_features, in_features, seed)
        ready = self._ready.get(key)
        if ready is not None:
            ready.wait()
        have = self._cache.get(key)
        if have is None or have.shape[1] < n:
            want = max(n, self._wanted.get(key, 0))
            have = spectral_indices(out_features, in_features, want, seed)
            self._cache[key] = have
            self.draws += 1
        return have[:, :n]
