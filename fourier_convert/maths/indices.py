"""Frequency positions of a FourierFT layer, rebuilt exactly as PEFT builds them.

PEFT draws ``torch.randperm(out * in, generator=torch.Generator().manual_seed(seed))`` on the CPU and keeps
the first ``n`` entries; position ``p`` is row ``p // in``, column ``p % in`` of the ``(out, in)`` spectrum.
Layers of the same ``(out, in, seed)`` share one permutation, and a smaller ``n`` is a prefix of it, so an
:class:`IndexCache` draws each permutation once.

Drawing the whole permutation costs O(out * in) time and 8 bytes per position (a 8192 x 28672 layer: seconds
and ~2 GB) although only ``n`` entries are kept. Below :data:`RANDPERM_THRESHOLD` positions torch's CPU
``randperm`` is a forward Fisher-Yates shuffle driven by the generator's raw 32-bit Mersenne Twister outputs:
step ``i`` swaps position ``i`` with ``i + r_i % (total - i)`` and never touches positions ``< i`` again. So
the first ``n`` entries follow from the first ``n`` raw outputs alone, replaying ``n`` swaps on a sparse map
(:func:`randperm_prefix`): O(n) time and memory, bit-identical to torch. numpy's ``MT19937`` with the legacy
(``init_genrand``) seeding produces the same raw stream as torch's generator, whose seed is taken modulo 2**32.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: From early-2025 releases on, torch.randperm on the CPU uses another algorithm for n >= 2**32 / 20;
#: layers above this size get torch-version-dependent positions (see docs/maths.md).
RANDPERM_THRESHOLD = (2**32) // 20
#: Above this many kept positions the O(n) Python replay is slower than drawing the whole permutation.
_PREFIX_MAX_N = 1 << 16


def _mt19937_raw(seed: int, count: int) -> np.ndarray:
    """The first ``count`` raw 32-bit outputs of torch's CPU generator after ``manual_seed(seed)``."""
    legacy = np.random.RandomState(seed & 0xFFFFFFFF)  # init_genrand(seed mod 2**32), as at::mt19937
    state = legacy.get_state(legacy=False)
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": state["state"]}
    raw: np.ndarray = bits.random_raw(count)
    return raw


def randperm_prefix(total: int, n: int, seed: int) -> np.ndarray:
    """The first ``n`` entries of ``torch.randperm(total, generator=torch.Generator().manual_seed(seed))``.

    Exact (bit-identical) for ``total < RANDPERM_THRESHOLD``, where torch uses the forward Fisher-Yates
    shuffle; O(n) time and memory instead of O(total).

    Args:
        total: Length of the permutation, ``1 <= total < RANDPERM_THRESHOLD``.
        n: How many leading entries, ``1 <= n <= total``.
        seed: The generator's seed (any int torch accepts; only ``seed mod 2**32`` matters).

    Returns:
        int64 array of length ``n``.

    Raises:
        ValueError: ``total`` or ``n`` is out of range.

    Example:
        >>> import torch
        >>> full = torch.randperm(10, generator=torch.Generator().manual_seed(777))
        >>> randperm_prefix(10, 4, 777).tolist() == full[:4].tolist()
        True
    """
    if not 1 <= total < RANDPERM_THRESHOLD:
        raise ValueError(f"total={total} must be in [1, {RANDPERM_THRESHOLD})")
    if not 1 <= n <= total:
        raise ValueError(f"n={n} must be in [1, {total}]")
    steps = np.arange(n, dtype=np.uint64)
    targets = (_mt19937_raw(seed, n) % (np.uint64(total) - steps) + steps).tolist()
    moved: dict[int, int] = {}  # position -> value, only where a swap changed it
    out = np.empty(n, dtype=np.int64)
    for i, j in enumerate(targets):
        here = moved.pop(i, i)
        out[i] = moved.get(j, j) if j != i else here
        if j != i:
            moved[j] = here
    return out


def spectral_positions(out_features: int, in_features: int, n: int, seed: int) -> np.ndarray:
    """The ``(2, n)`` row / column positions PEFT uses for a layer, as a numpy array.

    torch is imported only for the permutations :func:`randperm_prefix` cannot replay (more than 65,536 kept
    positions, or a layer of ``RANDPERM_THRESHOLD`` positions or more).

    Args:
        out_features: Rows of the delta (M).
        in_features: Columns of the delta (N).
        n: Number of coefficients, ``1 <= n <= M * N``.
        seed: ``random_loc_seed``.

    Returns:
        int64 array ``[[rows...], [cols...]]``.

    Raises:
        ValueError: ``n`` is out of range.

    Example:
        >>> spectral_positions(4, 3, 2, 777).shape
        (2, 2)
    """
    total = out_features * in_features
    if not 1 <= n <= total:
        raise ValueError(f"n={n} must be in [1, {total}] for a {out_features}x{in_features} layer")
    if total < RANDPERM_THRESHOLD and n <= _PREFIX_MAX_N:
        perm = randperm_prefix(total, n, seed)
    else:
        import torch  # imported where used: the common case needs no torch

        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].numpy()
    return np.stack([perm // in_features, perm % in_features])


def draw_bytes(out_features: int, in_features: int, n: int) -> int:
    """Bytes :func:`spectral_positions` allocates at its peak for a layer: the whole int64 permutation when torch
    draws it, a few arrays of ``n`` entries when the prefix is replayed.

    Args:
        out_features: Rows of the delta (M).
        in_features: Columns of the delta (N).
        n: Number of coefficients.

    Returns:
        The peak allocation in bytes (an estimate within a few ``n``-sized arrays).

    Example:
        >>> draw_bytes(4096, 4096, 1000)  # replayed: O(n)
        48000
        >>> draw_bytes(100_000, 100_000, 1000)  # above the threshold: the whole permutation
        80000000000
    """
    total = out_features * in_features
    if total < RANDPERM_THRESHOLD and n <= _PREFIX_MAX_N:
        return 48 * n  # raw outputs, the sparse map's keys and values, the kept prefix
    return 8 * total


def spectral_indices(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """The ``(2, n)`` row / column indices PEFT uses for a layer, as a torch tensor
    (:func:`spectral_positions`).

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
    import torch

    return torch.from_numpy(spectral_positions(out_features, in_features, n, seed))


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
    _cache: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)
    _ready: dict[tuple[int, int, int], threading.Event] = field(default_factory=dict)
    draws: int = 0

    def prefetch(self) -> None:
        """Draw every reserved permutation in a background thread, in reservation order.

        Whole permutations (``torch.randperm``) release the GIL and overlap with work on the first layers; the
        O(n) prefix replays are short. :meth:`get` waits for a permutation that is still being drawn.
        """
        keys = [k for k in self._wanted if k not in self._cache and k not in self._ready]
        for key in keys:
            self._ready[key] = threading.Event()

        def run() -> None:
            for key in keys:
                try:
                    self._cache[key] = spectral_positions(key[0], key[1], self._wanted[key], key[2])
                    self.draws += 1
                finally:
                    self._ready[key].set()

        threading.Thread(target=run, name="fourier-convert-indices", daemon=True).start()

    def reserve(self, out_features: int, in_features: int, seed: int, n: int) -> None:
        key = (out_features, in_features, seed)
        self._wanted[key] = max(n, self._wanted.get(key, 0))

    def get(self, out_features: int, in_features: int, seed: int, n: int) -> np.ndarray:
        """The ``(2, n)`` positions of a layer (:func:`spectral_positions`), drawn once per shape and seed."""
        key = (out_features, in_features, seed)
        ready = self._ready.get(key)
        if ready is not None:
            ready.wait()
        have = self._cache.get(key)
        if have is None or have.shape[1] < n:
            want = max(n, self._wanted.get(key, 0))
            have = spectral_positions(out_features, in_features, want, seed)
            self._cache[key] = have
            self.draws += 1
        return have[:, :n]
