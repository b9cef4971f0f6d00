"""The merge's core, shared by :func:`fourier_convert.merge` (to a folder) and
:func:`fourier_convert.merge_in_memory`: adapter specs, the device, and the rebuilding, checking and adding of
deltas, handing every finished tensor to a sink (a writer, or a dict).

Deltas are rebuilt batched per shape, spot-checked against the float64 closed form (falling back to slower
backends when a check fails), added to the widened base weight in place and rounded once.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from fourier_convert.errors import UsageError
from fourier_convert.io.dtypes import torch_dtype
from fourier_convert.io.safetensors_file import read_torch
from fourier_convert.maths.closed_form import DeltaCheck
from fourier_convert.maths.delta import check_delta, delta_weights
from fourier_convert.maths.delta_numpy import delta_weights_numpy
from fourier_convert.maths.indices import IndexCache
from fourier_convert.maths.rounding import ROUNDED_DTYPES, round_once
from fourier_convert.merging.ahead import run_ahead
from fourier_convert.merging.cpu import layer_positions, non_finite_error, stored_spectra, verification_error
from fourier_convert.merging.specs import check_precision, layer_stub
from fourier_convert.merging.ties import closed_form_sums, tie_width
from fourier_convert.merging.transfer import PinnedBuffers, upload
from fourier_convert.plan import LayerPlan, MergePlan, OutputTensor
from fourier_convert.report import LayerReport

#: Upper bound on the working set of one batch of equal-shape deltas, per device type. Batching pays on a
#: GPU (fewer, larger kernels); on a CPU it only raises peak memory, so one layer at a time.
BATCH_BYTES = {"cpu": 0, "cuda": 2 * 1024**3}

#: Receives each finished output tensor by name: a checkpoint writer, or a dict of tensors.
TensorSink = Callable[[str, torch.Tensor], None]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; validate explicit devices.

    Raises:
        UsageError: CUDA requested but not available, or an unknown device string.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError("--device", f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device", f"{device} requested but no CUDA GPU is available", "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                "--device", f"{device} requested but only {torch.cuda.device_count()} GPU(s) exist", "pick another"
            )
    elif dev.type != "cpu":
        raise UsageError("--device", f"unsupported device {device!r}", "use auto, cpu, cuda or cuda:N")
    return dev


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype deltas are rebuilt and added in: ``float64`` or ``float32``.

    Raises:
        UsageError: Another precision.

    Example:
        >>> compute_dtype("float64")
        torch.float64
    """
    return torch.float64 if check_precision(precision) == "float64" else torch.float32


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch CPU threads for a merge (default: all cores but one, which background I/O uses), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads if threads else max(1, (os.cpu_count() or 2) - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def converted_value(o: OutputTensor) -> torch.Tensor:
    """The value of an output tensor that is neither merged nor a byte copy: a replacement from an adapter
    or a base tensor, cast to the output dtype."""
    if o.replacement is not None:
        value = o.replacement.load()
    else:
        assert o.base is not None
        value = read_torch(o.base)
    dtype = torch_dtype(o.dtype)
    return round_once(value, dtype) if value.dtype == torch.float64 and dtype in ROUNDED_DTYPES else value.to(dtype)


def merge_layers(
    layers: list[LayerPlan],
    plan: MergePlan,
    put: TensorSink,
    dev: torch.device,
    compute: torch.dtype,
) -> tuple[dict[str, LayerReport], list[str]]:
    """Rebuild, check and add the deltas of ``layers``, and hand each merged weight to ``put`` (in its output
    dtype, on ``dev``).

    Args:
        layers: The layers to merge (all of ``plan.layers``, or those a late orientation flipped).
        plan: The merge plan.
        put: Receives ``(output name, merged tensor)``.
        dev: Where deltas are rebuilt and added.
        compute: ``torch.float32`` or ``torch.float64``.

    Returns:
        Each layer's report by checkpoint key, and the fallbacks used (one line each).

    Raises:
        VerificationError: A delta failed its float64 spot check on every backend.
    """
    cache = layer_positions(layers)
    by_shape: dict[tuple[int, int], list[LayerPlan]] = defaultdict(list)
    for layer in layers:
        by_shape[layer.delta_shape].append(layer)
    chunks: list[list[LayerPlan]] = []
    for (m, n), group in by_shape.items():
        per_batch = max(1, BATCH_BYTES.get(dev.type, 0) // (m * n * 4 * (3 if compute == torch.float32 else 6)))
        chunks += [group[start : start + per_batch] for start in range(0, len(group), per_batch)]
    outputs = {o.name: o for o in plan.outputs}
    reports: dict[str, LayerReport] = {}
    fallbacks: list[str] = []
    rng = np.random.default_rng(0)

    def rebuilt() -> Iterator[tuple[list[LayerPlan], dict[str, list[torch.Tensor]], dict[str, list[Any]]]]:
        for chunk in chunks:
            deltas, checks = _chunk_deltas(chunk, cache, dev, compute, rng, fallbacks)
            yield chunk, deltas, checks

    # Deltas of the next chunk are rebuilt and checked in a worker thread while this thread reads, adds and
    # writes the current one (the FFTs and the I/O release the GIL): on two cores this nearly halves the time.
    # On a GPU the base weights go from their files to the device through two small pinned buffers.
    ring = PinnedBuffers(dev) if dev.type == "cuda" else None
    for chunk, deltas, checks in run_ahead(rebuilt()):
        for layer in chunk:
            o = outputs[layer.key]
            base = upload(layer.weight, ring) if ring is not None else read_torch(layer.weight)
            acc_dtype = torch.float64 if torch.float64 in (compute, base.dtype) else torch.float32
            parts = deltas.pop(layer.key)
            total = parts[0].to(acc_dtype)  # the deltas are summed in place, then the base is added to them:
            for d in parts[1:]:  # no second layer-sized buffer
                total.add_(d)
            del parts
            rep = layer_stub(layer)
            # Figures stay on the device until one transfer at the end of the layer. Squares summed in float64
            # (no norm kernel: on a GPU each kind of kernel costs host memory when CUDA loads it).
            figures = [_squares(total), _squares(base)]
            oriented = total.T if layer.conv1d else total
            oriented.add_(base)
            out_dtype = torch_dtype(o.dtype)
            # float64 sums are rounded once into the output dtype (torch's own cast rounds twice via float32)
            merged = round_once(oriented, out_dtype) if total.dtype == torch.float64 else oriented.to(out_dtype)
            merged = merged.contiguous()  # a Conv1D's float32 cast keeps the transposed strides
            if compute == torch.float64 and out_dtype != torch.float64:
                rep.near_ties = _settle_near_ties(merged, oriented, base, layer, stored_spectra(layer, cache))
            del total, oriented
            finite = [torch.isfinite(t).to(torch.int32) for t in (base, merged)]
            figures.append((finite[0] * (1 - finite[1])).sum(dtype=torch.float64))  # finite in base, not merged
            del finite
            squares_delta, squares_base, broken = torch.stack(figures).tolist()
            rep.delta_norm, rep.base_norm = math.sqrt(squares_delta), math.sqrt(squares_base)
            if broken:  # never publish inf / nan weights the base did not have
                raise non_finite_error(layer, o, int(broken), rep.delta_norm)
            put(o.name, merged)
            worst = max(checks[layer.key], key=lambda pair: pair[1].max_abs_error / max(pair[1].tolerance, 1e-300))
            rep.backend, rep.checked_entries = worst[0], worst[1].entries
            rep.max_abs_error, rep.tolerance = worst[1].max_abs_error, worst[1].tolerance
            reports[layer.key] = rep
        del deltas
    return reports, fallbacks


def _squares(t: torch.Tensor) -> torch.Tensor:
    """The sum of squares of ``t``, in float64, as a 0-d tensor on its device."""
    wide = t if t.dtype == torch.float64 else t.to(torch.float64)
    return (wide * wide).sum()


def _settle_near_ties(
    merged: torch.Tensor,
    exact: torch.Tensor,
    base: torch.Tensor,
    layer: LayerPlan,
    spectra: list[tuple[np.ndarray, np.ndarray, float]],
) -> int:
    """Redo, from the float64 closed form, the merged elements whose rounding changes within the FFT's error
    (the same elements and values as the CPU merge: merging/ties.py). Returns how many."""
    rows, cols = merged.shape
    width = tie_width([(values, scaling) for values, _, scaling in spectra], (rows, cols))
    # the window of merging/ties.near_ties: x +- (width + 2 float64 ulps, bounded by |x| * 2**-51)
    reach = exact.abs().mul_(2.0**-51).add_(width)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[merged.element_size()]
    a, b = round_once(exact - reach, merged.dtype), round_once(exact + reach, merged.dtype)
    del reach
    near = (a.view(bits) != b.view(bits)).reshape(-1).nonzero().reshape(-1).cpu().numpy()
    del a, b
    if near.size:
        base_at = base.reshape(-1)[torch.from_numpy(near).to(base.device)].double().cpu().numpy()
        values = closed_form_sums(base_at, spectra, (rows, cols), near // cols, near % cols)
        fixed = round_once(torch.from_numpy(values), merged.dtype).to(merged.device)
        merged.view(-1)[torch.from_numpy(near).to(merged.device)] = fixed
    return int(near.size)


def _chunk_deltas(
    chunk: list[LayerPlan],
    cache: IndexCache,
    dev: torch.device,
    compute: torch.dtype,
    rng: np.random.Generator,
    fallbacks: list[str],
) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[tuple[str, DeltaCheck]]]]:
    """Rebuild every contribution of a chunk of equal-shape layers, batched per (seed, n, scaling)."""
    m, n = chunk[0].delta_shape
    jobs: dict[tuple[int, int, float], list[tuple[LayerPlan, int]]] = defaultdict(list)
    for layer in chunk:
        for j, c in enumerate(layer.contributions):
            jobs[(c.seed, c.spectrum.n, c.scaling)].append((layer, j))
    deltas: dict[str, list[torch.Tensor]] = {layer.key: [] for layer in chunk}
    checks: dict[str, list[tuple[str, DeltaCheck]]] = {layer.key: [] for layer in chunk}
    backend = f"torch-{dev}" if compute == torch.float32 else f"torch-{dev}-float64"
    for (seed, k, scaling), members in jobs.items():
        idx_np = cache.get(m, n, seed, k)
        idx = torch.from_numpy(idx_np)
        spectra = torch.from_numpy(np.stack([layer.contributions[j].spectrum.values for layer, j in members]))
        batch = delta_weights(spectra, idx, m, n, scaling, dtype=compute, device=dev)
        for b, (layer, j) in enumerate(members):
            values = layer.contributions[j].spectrum.values
            d = batch[b]
            result = check_delta(d, values, idx_np, scaling, rng=rng)
            used = backend
            if not result.passed:
                d, used, result = _fallback(layer, values, idx, m, n, scaling, rng, result)
                fallbacks.append(f"{layer.module}: {backend} failed its check; used {used}")
            deltas[layer.key].append(d)
            checks[layer.key].append((used, result))
    return deltas, checks


def _fallback(
    layer: LayerPlan,
    values: np.ndarray,
    idx: torch.Tensor,
    m: int,
    n: int,
    scaling: float,
    rng: np.random.Generator,
    first: DeltaCheck,
) -> tuple[torch.Tensor, str, DeltaCheck]:
    """Recompute a delta that failed its check: single-threaded torch float64, then numpy float64."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        d = delta_weights(torch.from_numpy(values), idx, m, n, scaling, dtype=torch.float64, device="cpu")
    finally:
        torch.set_num_threads(threads)
    result = check_delta(d, values, idx.numpy(), scaling, rng=rng)
    if result.passed:
        return d, "torch-cpu-float64-1thread", result
    d = torch.from_numpy(delta_weights_numpy(values, idx.numpy(), m, n, scaling))
    result = check_delta(d, values, idx.numpy(), scaling, rng=rng)
    if result.passed:
        return d, "numpy-float64", result
    raise verification_error(layer, first, "torch", torch.__version__)
