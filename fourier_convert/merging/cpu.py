"""The CPU merge in float64 with numpy alone: correctly rounded, multi-threaded, and no torch import.

Each layer's delta goes through :func:`~fourier_convert.maths.delta_numpy.column_pass` once, then row blocks
of it are made final (``irfft``), added to the widened base rows, rounded once into the output dtype and
dropped, spread over a thread pool (numpy's FFTs and ufuncs release the GIL). The float64 delta never exists
whole, and the next layer is computed while the current one is written. Every contribution is spot-checked
against the float64 closed form from the blocks as they pass (:class:`~fourier_convert.maths.closed_form.
DeltaSample`); a layer that fails is redone with PEFT's literal algorithm (dense ``ifft2``), and a layer whose
merged weight is not finite where the base was stops the merge.

torch is not imported: on a 2-core machine ``import torch`` alone costs as much as copying a 1B model
(docs/benchmarks.md). The CUDA path and ``--precision float32`` are in :mod:`fourier_convert.merging.core`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from fourier_convert.errors import VerificationError
from fourier_convert.io.safetensors_file import read_bytes
from fourier_convert.maths.closed_form import DeltaCheck, DeltaSample
from fourier_convert.maths.delta_numpy import column_pass, delta_rows, delta_weights_numpy
from fourier_convert.maths.indices import IndexCache
from fourier_convert.maths.rounding_numpy import STORAGE, finite_stored, round_into, to_float64
from fourier_convert.merging.ahead import run_ahead
from fourier_convert.merging.specs import layer_stub
from fourier_convert.merging.ties import closed_form_sums, near_ties, tie_width
from fourier_convert.plan import LayerPlan, MergePlan, OutputTensor
from fourier_convert.report import LayerReport

#: Receives each merged weight by output name, in its stored form (bfloat16 as ``uint16`` bits).
ArraySink = Callable[[str, np.ndarray], None]
#: Elements per row block (a 1 MiB float64 block stays in the core's cache through add and round; 4x smaller
#: blocks were 1.2-2.5x slower per layer on 2 cores).
BLOCK_ELEMENTS = 1 << 17
#: Most worker threads by default. On the 16-core GPU host a 7B merge took 11.0 s with 4 threads, 12.9 s with
#: 8 and 16.0 s with 16 (docs/benchmarks.md): the blocks' Python steps and memory traffic do not scale further.
MAX_DEFAULT_THREADS = 4
#: The backend names a layer's report can carry.
BACKEND, FALLBACK = "numpy-cpu-float64", "numpy-float64"
_EPS64 = 2.0**-52
#: Largest finite value per output dtype: a block within it cannot overflow when rounded.
_MAX_FINITE = {"BF16": 3.3895313892515355e38, "F16": 65504.0, "F32": 3.4028234663852886e38, "F64": np.inf}

RowSource = Callable[[int, int], np.ndarray]


def default_threads() -> int:
    """Worker threads for a CPU merge: the cores the process may use, at most :data:`MAX_DEFAULT_THREADS`.

    Example:
        >>> default_threads() >= 1
        True
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


@dataclass
class _Merged:
    """One layer's merged weight and what its checks found."""

    layer: LayerPlan
    out: np.ndarray
    report: LayerReport
    fallbacks: list[str]


def merge_layers_cpu(
    layers: list[LayerPlan], plan: MergePlan, put: ArraySink, *, threads: int | None = None
) -> tuple[dict[str, LayerReport], list[str]]:
    """Rebuild, check and add the deltas of ``layers`` in float64 on the CPU, and hand each merged weight,
    correctly rounded, to ``put``.

    Args:
        layers: The layers to merge (all of ``plan.layers``, or those a late orientation flipped).
        plan: The merge plan.
        put: Receives ``(output name, merged array)`` in the output dtype's storage form.
        threads: Worker threads (default: :func:`default_threads`).

    Returns:
        Each layer's report by checkpoint key, and the fallbacks used (one line each).

    Raises:
        VerificationError: A delta failed its float64 spot check on every backend, or the merged weight is
            not finite where the base was.

    Example:
        >>> reports, fallbacks = merge_layers_cpu(plan.layers, plan, writer_sink)  # doctest: +SKIP
    """
    cache = layer_positions(layers)
    outputs = {o.name: o for o in plan.outputs}
    rng = np.random.default_rng(0)
    reports: dict[str, LayerReport] = {}
    fallbacks: list[str] = []
    # The pool is the parallelism: BLAS (the checks' small products, the norms) runs one thread per caller.
    # Left multi-threaded, OpenBLAS's spinning threads took 1 s of the 2 cores' CPU in a 1.1B merge.
    with (
        threadpool_limits(limits=1, user_api="blas"),
        ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="fc-merge") as pool,
    ):

        def merged() -> Iterator[_Merged]:
            for layer in layers:
                yield _merge_layer(layer, outputs[layer.key], cache, pool, rng)

        # the next layer is computed (by the pool, driven from run_ahead's thread) while this one is written
        for done in run_ahead(merged()):
            put(outputs[done.layer.key].name, done.out)
            reports[done.layer.key] = done.report
            fallbacks += done.fallbacks
    return reports, fallbacks


def layer_positions(layers: list[LayerPlan]) -> IndexCache:
    """An index cache with every layer's positions reserved and being drawn in the background (shared by the
    CPU and torch merges).

    Example:
        >>> cache = layer_positions(plan.layers)  # doctest: +SKIP
    """
    cache = IndexCache()
    for layer in layers:
        m, n = layer.delta_shape
        for c in layer.contributions:
            cache.reserve(m, n, c.seed, c.spectrum.n)
    cache.prefetch()
    return cache


def stored_spectra(layer: LayerPlan, cache: IndexCache) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Each contribution's ``(values, positions, scaling)``, positions in the frame of the stored weight
    (swapped for a Conv1D, whose weight holds the transposed delta: the transpose of a FourierFT delta is the
    delta of the transposed spectrum).

    Example:
        >>> [idx.shape for _, idx, _ in stored_spectra(layer, cache)]  # doctest: +SKIP
        [(2, 1000)]
    """
    m, n = layer.delta_shape
    found = []
    for c in layer.contributions:
        idx = cache.get(m, n, c.seed, c.spectrum.n)
        found.append((c.spectrum.values, idx[::-1] if layer.conv1d else idx, c.scaling))
    return found


def _merge_layer(
    layer: LayerPlan, o: OutputTensor, cache: IndexCache, pool: ThreadPoolExecutor, rng: np.random.Generator
) -> _Merged:
    shape = (int(layer.weight.shape[0]), int(layer.weight.shape[1]))  # stored orientation
    spectra = stored_spectra(layer, cache)
    sources: list[RowSource] = []
    for values, idx, scaling in spectra:
        cp = column_pass(values, idx, shape, scaling, map_fn=pool.map)
        sources.append(functools.partial(delta_rows, cp))
    used = [BACKEND] * len(sources)
    out, samples, norms, broken, settled = _blocks(layer, o, sources, spectra, pool, rng)
    checks = _checks(samples, spectra)
    notes: list[str] = []
    if not all(ch.passed for ch in checks):
        first = next(ch for ch in checks if not ch.passed)
        notes.append(f"{layer.module}: {BACKEND} failed its check; used {FALLBACK}")
        sources = [_dense_source(values, idx, shape, scaling) for values, idx, scaling in spectra]
        used = [FALLBACK] * len(sources)
        out, samples, norms, broken, settled = _blocks(layer, o, sources, spectra, pool, rng)
        checks = _checks(samples, spectra)
        if not all(ch.passed for ch in checks):
            raise verification_error(layer, first, "numpy", np.__version__)
    rep = layer_stub(layer)
    rep.delta_norm, rep.base_norm = norms
    rep.near_ties = settled
    if broken:
        raise non_finite_error(layer, o, broken, rep.delta_norm)
    worst = max(range(len(checks)), key=lambda i: checks[i].max_abs_error / max(checks[i].tolerance, 1e-300))
    rep.backend, rep.checked_entries = used[worst], checks[worst].entries
    rep.max_abs_error, rep.tolerance = checks[worst].max_abs_error, checks[worst].tolerance
    return _Merged(layer, out, rep, notes)


def _checks(samples: list[DeltaSample], spectra: list[tuple[np.ndarray, np.ndarray, float]]) -> list[DeltaCheck]:
    return [
        s.check(values, idx, scaling, eps=_EPS64) for s, (values, idx, scaling) in zip(samples, spectra, strict=True)
    ]


def _dense_source(values: np.ndarray, idx: np.ndarray, shape: tuple[int, int], scaling: float) -> RowSource:
    full = delta_weights_numpy(values, idx, shape[0], shape[1], scaling)
    return lambda a, b: full[a:b]


def _blocks(
    layer: LayerPlan,
    o: OutputTensor,
    sources: list[RowSource],
    spectra: list[tuple[np.ndarray, np.ndarray, float]],
    pool: ThreadPoolExecutor,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[DeltaSample], tuple[float, float], int, int]:
    """Merge a layer block by block: returns the output, each contribution's sample, the Frobenius norms of the
    summed delta and of the base weight, how many elements became non-finite and how many were settled next to
    a midpoint."""
    info = layer.weight
    rows, cols = int(info.shape[0]), int(info.shape[1])
    base = np.frombuffer(read_bytes(info), dtype=STORAGE[info.dtype]).reshape(rows, cols)
    out = np.empty((rows, cols), dtype=STORAGE[o.dtype])
    samples = [DeltaSample((rows, cols), rng) for _ in sources]
    limit = _MAX_FINITE[o.dtype]
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    width = tie_width([(values, scaling) for values, _, scaling in spectra], (rows, cols))

    def block(start: int) -> tuple[float, float, float, int, int]:
        stop = min(rows, start + step)
        total = None
        for source, sample in zip(sources, samples, strict=True):
            d = source(start, stop)
            sample.take(start, d)
            if total is None:
                total = d.copy() if len(sources) > 1 else d
            else:
                total += d
        assert total is not None
        scale, sq = _sum_of_squares(total.reshape(-1))
        x = to_float64(base[start:stop], info.dtype)
        flat_base = x.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            base_sq = float(np.dot(flat_base, flat_base))
        x += total
        round_into(x, out[start:stop], o.dtype)  # overflow to inf is counted below, and refused
        near = near_ties(x, width, o.dtype)
        if near.size:  # settled from the closed form, as every backend does (merging/ties.py)
            exact = closed_form_sums(to_float64(base[start:stop].reshape(-1)[near], info.dtype), spectra,
                                     (rows, cols), start + near // cols, near % cols)  # fmt: skip
            fixed = np.empty(near.size, dtype=out.dtype)
            round_into(exact, fixed, o.dtype)
            out[start:stop].reshape(-1)[near] = fixed
        lo, hi = x.min(), x.max()
        if np.isfinite(lo) and np.isfinite(hi) and max(-lo, hi) <= limit:
            return scale, sq, base_sq, 0, near.size
        bad = ~finite_stored(out[start:stop], o.dtype) & finite_stored(base[start:stop], info.dtype)
        return scale, sq, base_sq, int(bad.sum()), near.size

    results = list(pool.map(block, range(0, rows, step)))
    top = max(r[0] for r in results)
    norm = top * float(np.sqrt(sum(r[1] * (r[0] / top) ** 2 for r in results)))
    base_norm = float(np.sqrt(sum(r[2] for r in results)))
    return out, samples, (norm, base_norm), sum(r[3] for r in results), sum(r[4] for r in results)


def _sum_of_squares(flat: np.ndarray) -> tuple[float, float]:
    """``(scale, s)`` with ``sum(flat ** 2) == scale ** 2 * s``, without overflow for huge finite values."""
    with np.errstate(over="ignore", invalid="ignore"):
        sq = float(np.dot(flat, flat))
    if np.isfinite(sq) or not np.isfinite(flat).all():
        return 1.0, sq
    scale = float(np.abs(flat).max())
    scaled = flat / scale
    return scale, float(np.dot(scaled, scaled))


def verification_error(layer: LayerPlan, first: DeltaCheck, library: str, version: str) -> VerificationError:
    """The error for a delta that failed its check on every backend.

    Example:
        >>> str(verification_error(layer, DeltaCheck(1, 1.0, 1e-6, False), "numpy", "2.4.6"))  # doctest: +SKIP
    """
    if not (math.isfinite(first.tolerance) and math.isfinite(first.max_abs_error)):  # overflow, not a bug
        scales = ", ".join(f"{c.scaling:g}" for c in layer.contributions)
        return VerificationError(
            layer.key,
            f"the delta overflows even float64 (scaling x --weight: {scales}); nothing was written",
            "check the adapter's scaling and spectrum, and --weight",
        )
    return VerificationError(
        layer.key,
        f"reconstructed delta differs from the float64 closed form by {first.max_abs_error:.3e} "
        f"(tolerance {first.tolerance:.3e}) on every backend; nothing was written",
        f"report this with the layer shape and your {library} version ({version})",
    )


def non_finite_error(layer: LayerPlan, o: OutputTensor, broken: int, delta_norm: float) -> VerificationError:
    """The error for a merged weight with inf / nan values the base did not have (never published).

    Example:
        >>> str(non_finite_error(layer, output, 3, 1e300))  # doctest: +SKIP
    """
    scalings = ", ".join(f"{c.scaling:g}" for c in layer.contributions)
    return VerificationError(
        layer.key,
        f"merging gives {broken} non-finite value(s) in {o.dtype} (delta norm {delta_norm:.3g}, "
        f"scaling {scalings}); nothing was written",
        "check the adapter's scaling and spectrum",
    )
