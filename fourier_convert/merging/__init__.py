"""Merging FourierFT adapters into a base model: :mod:`.folder` (:func:`~fourier_convert.merge`, streaming to an
atomic output folder), :mod:`.memory` (:func:`~fourier_convert.merge_in_memory`, tensors in memory) and
:mod:`.core` (what both share: adapter specs, devices, and rebuilding, checking, adding and rounding deltas)."""
