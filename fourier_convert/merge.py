"""``merge``: stream a base checkpoint into a new folder with FourierFT deltas added.

Order of work: read and validate the adapters and the base headers, build and validate the plan (no byte
written before it passes), then open the atomic writer, queue byte copies of every untouched tensor (they
run in a background thread), build the model skeleton for Linear / Conv1D orientation while they run,
rebuild each delta (batched per shape), spot-check it against float64, add it in float32 (or float64) and
round once, and publish the folder only when every tensor is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from fourier_convert import __version__
from fourier_convert.errors import UsageError, VerificationError
from fourier_convert.io.adapter import FourierFTAdapter, read_adapter
from fourier_convert.io.checkpoint import BaseCheckpoint, open_checkpoint
from fourier_convert.io.dtypes import parse_user_dtype, torch_dtype
from fourier_convert.io.progress import ByteProgress
from fourier_convert.io.safetensors_file import read_torch
from fourier_convert.io.writer import (
    CheckpointWriter,
    RangeCopy,
    ShardLayout,
    TensorSpec,
    check_output_target,
    coalesce,
    layout_shards,
    plan_groups,
    refuse_input_as_output,
)
from fourier_convert.maths.delta import DeltaCheck, check_delta, delta_weights, delta_weights_numpy
from fourier_convert.maths.indices import IndexCache
from fourier_convert.plan import (
    LayerPlan,
    MergePlan,
    OutputTensor,
    build_plan,
    guess_orientation,
    resolve_names,
    set_orientation,
)
from fourier_convert.report import LayerReport, MergeReport
from fourier_convert.skeleton import Skeleton, SkeletonJob, build_skeleton, scan_linear_only

PROVENANCE_NAME = "fourier_convert.json"
#: Upper bound on the working set of one batch of equal-shape deltas, per device type. Batching pays on a
#: GPU (fewer, larger kernels); on a CPU it only raises peak memory, so one layer at a time.
BATCH_BYTES = {"cpu": 0, "cuda": 2 * 1024**3}


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to merge: where it is, which named sub-adapter, and the weight of its delta."""

    path: str
    subfolder: str | None = None
    weight: float = 1.0


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


def parse_size(text: str) -> int:
    """Parse ``"2GB"``, ``"500MB"``, ``"1.5GiB"`` or a byte count.

    Raises:
        UsageError: Not a size.

    Example:
        >>> parse_size("5GB"), parse_size("1KiB")
        (5000000000, 1024)
    """
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not math.isfinite(value) or value * units[unit] < 1:
        raise UsageError("--max-shard-size", f"cannot read size {text!r}", "write it like 2GB, 500MB or 1GiB")
    return int(value * units[unit])


def merge(
    base: str | Path,
    adapter: str | Path | AdapterSpec | Sequence[str | Path | AdapterSpec],
    out: str | Path,
    *,
    device: str = "auto",
    precision: str = "float32",
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
    revision: str | None = None,
    threads: int | None = None,
    durable: bool = True,
) -> MergeReport:
    """Merge one or more FourierFT adapters into a base model and write a Hugging Face model folder.

    Args:
        base: Base model folder or hub id (safetensors weights).
        adapter: Adapter folder / hub id / ``PATH:NAME`` / :class:`AdapterSpec`, or a list of them, applied
            in order.
        out: Output folder (published atomically).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``: where deltas are rebuilt and added.
        precision: ``float32`` (default) or ``float64`` reconstruction and addition.
        dtype: Output dtype for all floating tensors (``float16``, ``bfloat16``, ``float32``); None keeps each.
        max_shard_size: Re-shard the output (``"2GB"``); None mirrors the base's shard layout.
        overwrite: Replace a non-empty ``out``.
        dry_run: Validate and plan only; write nothing.
        allow_pickle: Accept ``adapter_model.bin`` through torch's weights-only loader.
        progress: Draw a byte progress bar on stderr.
        revision: Hub revision of the base.
        threads: torch CPU threads while merging (default: all cores but one, which the background byte
            copy uses; the previous setting is restored afterwards).
        durable: fsync the output before publishing it (default). False skips the fsync, for scratch
            outputs that are read back at once (``export_onnx`` uses it); the publish stays atomic.

    Returns:
        A :class:`~fourier_convert.report.MergeReport`.

    Raises:
        FourierConvertError: Any invalid input or output problem (subclasses name the kind); nothing is
            published when one is raised.

    Example:
        >>> import fourier_convert as fc
        >>> report = fc.merge("fixtures/llama/base", "fixtures/llama/adapter", "merged")  # doctest: +SKIP
        >>> report.tensors  # doctest: +SKIP
        {'copy': 13, 'merge': 4}
    """
    t0 = time.perf_counter()
    if precision not in ("float32", "float64"):
        raise UsageError("--precision", f"unknown precision {precision!r}", "use float32 or float64")
    compute = torch.float32 if precision == "float32" else torch.float64
    out_dtype = parse_user_dtype(dtype) if dtype else None
    shard_bytes = parse_size(str(max_shard_size)) if max_shard_size is not None else None
    dev = resolve_device(device)
    warm: threading.Thread | None = None
    if dev.type == "cuda":  # create the CUDA context while the inputs are read and validated
        warm = threading.Thread(target=torch.zeros, args=(1,), kwargs={"device": dev}, daemon=True)
        warm.start()
    check_output_target(Path(out), overwrite)
    specs = _adapter_specs(adapter)
    for s in specs:
        if not math.isfinite(s.weight):
            raise UsageError("--weight", f"{s.weight} is not a finite number", "pass a multiplier such as 1.0 or 0.5")
    adapters = [read_adapter(s.path, subfolder=s.subfolder, allow_pickle=allow_pickle) for s in specs]
    ckpt = open_checkpoint(base, revision=revision)
    refuse_input_as_output(Path(out), [ckpt.folder] + [a.folder for a in adapters])

    names, missing = resolve_names(ckpt, adapters)
    skeleton, why = None, "the base has no config.json"
    job: SkeletonJob | None = None
    if ckpt.config is not None and missing:  # transformers' key renaming is needed to plan
        skeleton, why = build_skeleton(ckpt.config, ckpt.tensors)
        names, missing = resolve_names(ckpt, adapters, skeleton)
    plan = build_plan(ckpt, adapters, names, weights=[s.weight for s in specs], out_dtype=out_dtype)
    if skeleton is None and ckpt.config is not None:
        # Needed only for orientation. A scan of the modeling source settles most models at once; otherwise
        # the skeleton is built while the copies and deltas run. Started after build_plan, which may import
        # transformers itself: two threads importing transformers at once can fail.
        skeleton = scan_linear_only(ckpt.config)
        if skeleton is None:
            job = SkeletonJob(ckpt.config, ckpt.tensors)
    layouts = _layouts(ckpt, plan, shard_bytes)
    report = MergeReport(
        out=None if dry_run else str(out),
        dry_run=dry_run,
        device=str(dev),
        precision=precision,
        tensors=plan.counts(),
        bytes_total=plan.bytes_total,
        bytes_changed=sum(o.nbytes for o in plan.outputs if o.raw_source is None),
        shards=[lay.filename for lay in layouts],
        warnings=plan.warnings,
        notes=plan.notes,
        adapters=[a.label for a in adapters],
        base=str(base),
    )
    if dry_run:
        if job is not None:
            skeleton, why = job.result()
        set_orientation(plan, skeleton, adapters, why)
        report.changes = [_change_row(o, adapters) for o in plan.outputs if o.kind != "copy"]
        report.layers = [_layer_stub(layer) for layer in plan.layers]
        report.seconds = time.perf_counter() - t0
        return report

    _warn_leftovers(Path(out), report)
    if warm is not None:
        warm.join()
    report.timings["validate_and_plan"] = time.perf_counter() - t0
    bar = ByteProgress(plan.bytes_total, "merge", enabled=progress)
    with (
        CheckpointWriter(Path(out), overwrite=overwrite, progress=bar, durable=durable) as writer,
        _torch_threads(threads),
    ):
        _write_output(writer, report, ckpt, adapters, plan, layouts, (skeleton, why, job), dev, compute, t0)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def _warn_leftovers(out: Path, report: MergeReport) -> None:
    stale = sorted(out.parent.glob(f".{out.name}.partial-*"))
    if stale:
        report.warnings.append(
            f"{len(stale)} unfinished output folder(s) from an interrupted run lie beside --out "
            f"(first: {stale[0]}); delete them if no other merge is writing there"
        )


def _write_output(
    writer: CheckpointWriter,
    report: MergeReport,
    ckpt: BaseCheckpoint,
    adapters: list[FourierFTAdapter],
    plan: MergePlan,
    layouts: list[ShardLayout],
    orientation: tuple[Skeleton | None, str, SkeletonJob | None],
    dev: torch.device,
    compute: torch.dtype,
    t0: float,
) -> None:
    """Everything between opening the atomic writer and publishing: byte copies, deltas, small files."""
    skeleton, why, job = orientation
    writer.begin(layouts, extra_bytes=sum(p.stat().st_size for p in ckpt.aux_files))
    where = {spec.name: lay for lay in layouts for spec in lay.specs}
    writer.copy(_raw_copies(plan, where))
    if job is None:
        set_orientation(plan, skeleton, adapters, why)
    else:
        guess_orientation(plan, adapters)
    t1 = time.perf_counter()
    done, report.fallbacks = _merge_layers(plan.layers, plan, writer, where, dev, compute)
    report.timings["deltas_and_merge"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    if job is not None:
        # The skeleton decides; layers it flips are recomputed and rewritten before anything is published.
        skeleton, why = job.result()
        flipped = set_orientation(plan, skeleton, adapters, why)
        if flipped:
            redone, more = _merge_layers(flipped, plan, writer, where, dev, compute)
            done.update(redone)
            report.fallbacks += more
        for layer in plan.layers:
            done[layer.key].orientation = layer.orientation_source
    report.timings["skeleton_wait"] = time.perf_counter() - t1
    report.layers = [done[layer.key] for layer in plan.layers]
    report.changes = [_change_row(o, adapters) for o in plan.outputs if o.kind != "copy"]
    for o in plan.outputs:
        if o.raw_source is None and o.kind != "merge":
            _write_converted(o, writer, where)
    _write_small_files(writer, ckpt, plan)
    t1 = time.perf_counter()
    writer.wait()
    report.timings["copy_wait"] = time.perf_counter() - t1
    report.seconds = time.perf_counter() - t0
    writer.write_file(PROVENANCE_NAME, _provenance(report, adapters, ckpt, plan))
    t1 = time.perf_counter()
    writer.commit(index_metadata=ckpt.index_metadata)
    report.timings["fsync_and_publish"] = time.perf_counter() - t1


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads if threads else max(1, (os.cpu_count() or 2) - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _adapter_specs(adapter: Any) -> list[AdapterSpec]:
    items = adapter if isinstance(adapter, (list, tuple)) else [adapter]
    if not items:
        raise UsageError("--adapter", "no adapter given", "pass at least one --adapter")
    return [a if isinstance(a, AdapterSpec) else AdapterSpec(str(a)) for a in items]


def _layouts(ckpt: BaseCheckpoint, plan: MergePlan, shard_bytes: int | None) -> list[ShardLayout]:
    specs = {o.name: TensorSpec(o.name, o.dtype, o.shape) for o in plan.outputs}
    if shard_bytes is not None:
        return layout_shards(plan_groups(list(specs.values()), shard_bytes))
    groups = [[specs[name] for name in shard.tensors] for shard in ckpt.shards]
    groups[-1] += [specs[o.name] for o in plan.outputs if o.base is None]
    return layout_shards(groups, mirror=ckpt.shards, names=[s.path.name for s in ckpt.shards])


def _raw_copies(plan: MergePlan, where: dict[str, ShardLayout]) -> list[RangeCopy]:
    copies = []
    for o in plan.outputs:
        src = o.raw_source
        if src is not None:
            lay = where[o.name]
            copies.append(RangeCopy(src.path, src.start, lay.filename, lay.offsets[o.name], src.nbytes, (o.name,)))
    return coalesce(copies)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy().data)


def _write_converted(o: OutputTensor, writer: CheckpointWriter, where: dict[str, ShardLayout]) -> None:
    if o.replacement is not None:
        value = o.replacement.load()
    else:
        assert o.base is not None
        value = read_torch(o.base)
    writer.write_tensor(where[o.name].filename, o.name, _tensor_bytes(value.to(torch_dtype(o.dtype))))


def _change_row(o: OutputTensor, adapters: list[FourierFTAdapter]) -> dict[str, Any]:
    if o.layer is not None:
        parts = [
            f"{'delta^T (Conv1D)' if o.layer.conv1d else 'delta'} of {adapters[c.adapter_index].label} "
            f"(n={c.spectrum.n}, scaling={c.scaling:g})"
            for c in o.layer.contributions
        ]
        how = "base + " + " + ".join(parts)
    elif o.replacement is not None:
        how = f"{o.replacement.key} ({o.replacement.dtype})"
    else:
        how = f"cast from {o.base.dtype if o.base else '?'}"
    return {"name": o.name, "action": o.kind, "dtype": o.dtype, "shape": list(o.shape), "bytes": o.nbytes, "how": how}


def _layer_stub(layer: LayerPlan) -> LayerReport:
    return LayerReport(
        layer.module,
        layer.key,
        layer.delta_shape,
        layer.conv1d,
        layer.orientation_source,
        [c.spectrum.n for c in layer.contributions],
    )


def _merge_layers(
    layers: list[LayerPlan],
    plan: MergePlan,
    writer: CheckpointWriter,
    where: dict[str, ShardLayout],
    dev: torch.device,
    compute: torch.dtype,
) -> tuple[dict[str, LayerReport], list[str]]:
    """Rebuild, check, add and write ``layers``; returns each layer's report by key, and fallbacks used."""
    cache = IndexCache()
    for layer in layers:
        m, n = layer.delta_shape
        for c in layer.contributions:
            cache.reserve(m, n, c.seed, c.spectrum.n)
    cache.prefetch()
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
    for chunk, deltas, checks in _ahead(rebuilt()):
        for layer in chunk:
            o = outputs[layer.key]
            base = read_torch(layer.weight)
            acc_dtype = torch.float64 if torch.float64 in (compute, base.dtype) else torch.float32
            total = base.to(device=dev, dtype=acc_dtype)  # widen once, then add every delta in place
            for d in deltas[layer.key]:
                total.add_(d.T if layer.conv1d else d)
            writer.write_tensor(where[o.name].filename, o.name, _tensor_bytes(total.to(torch_dtype(o.dtype))))
            worst = max(checks[layer.key], key=lambda pair: pair[1].max_abs_error / max(pair[1].tolerance, 1e-300))
            rep = _layer_stub(layer)
            rep.backend, rep.checked_entries = worst[0], worst[1].entries
            rep.max_abs_error, rep.tolerance = worst[1].max_abs_error, worst[1].tolerance
            parts = deltas[layer.key]
            summed = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            rep.delta_norm = float(torch.linalg.vector_norm(summed).item())
            reports[layer.key] = rep
        del deltas
    return reports, fallbacks


_T = TypeVar("_T")


def _ahead(items: Iterator[_T]) -> Iterator[_T]:
    """Run ``items`` one element ahead in a daemon thread; errors (and their types) reach the consumer."""
    slot: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slot.put((True, item))
            slot.put((False, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            slot.put((False, exc))

    worker = threading.Thread(target=run, name="fourier-convert-deltas", daemon=True)
    worker.start()
    try:
        while True:
            ok, value = slot.get()
            if not ok:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            slot.get_nowait()  # let a worker blocked on a full slot see the stop flag


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
        idx = cache.get(m, n, seed, k)
        idx_np = idx.numpy()
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
    raise VerificationError(
        layer.key,
        f"reconstructed delta differs from the float64 closed form by {first.max_abs_error:.3e} "
        f"(tolerance {first.tolerance:.3e}) on every backend; nothing was written",
        "report this with the layer shape and your torch version",
    )


def _write_small_files(writer: CheckpointWriter, ckpt: BaseCheckpoint, plan: MergePlan) -> None:
    for path in ckpt.aux_files:
        if path.name == "config.json" and plan.config_changed and plan.config is not None:
            continue
        writer.copy_file(path)
    if plan.config_changed and plan.config is not None:
        writer.write_file("config.json", (json.dumps(plan.config, indent=2, sort_keys=True) + "\n").encode())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _provenance(report: MergeReport, adapters: list[FourierFTAdapter], ckpt: BaseCheckpoint, plan: MergePlan) -> bytes:
    doc = {
        "tool": "fourier-convert",
        "version": __version__,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {
            "path": report.base,
            "config_sha256": _sha256(ckpt.folder / "config.json") if ckpt.config is not None else None,
            "shards": [
                {
                    "file": s.path.name,
                    "bytes": s.path.stat().st_size,
                    "header_sha256": hashlib.sha256(s.header_bytes).hexdigest(),
                }
                for s in ckpt.shards
            ],
        },
        "adapters": [
            {
                "path": a.label,
                "files": {p.name: _sha256(p) for p in a.files},
                "config": a.settings.raw,
            }
            for a in adapters
        ],
        "report": report.to_dict(),
        "dtypes": sorted({o.dtype for o in plan.outputs}),
    }
    return (json.dumps(doc, indent=2, default=str) + "\n").encode()
