"""``merge``: stream a base checkpoint into a new folder with FourierFT deltas added.

Order of work: read and validate the adapters and the base headers, build and validate the plan (no byte
written before it passes), then open the atomic writer, queue byte copies of every untouched tensor (they
run in a background thread), build the model skeleton for Linear / Conv1D orientation while they run,
rebuild each delta (batched per shape), spot-check it against float64, add it in float32 (or float64) and
round once, and publish the folder only when every tensor is in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fourier_convert import __version__
from fourier_convert.errors import UsageError
from fourier_convert.io.adapter import FourierFTAdapter, read_adapter
from fourier_convert.io.checkpoint import BaseCheckpoint, open_checkpoint
from fourier_convert.io.dtypes import parse_user_dtype
from fourier_convert.io.fit_cache import fit_key, known_fit, remember_fit
from fourier_convert.io.progress import ByteProgress
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
from fourier_convert.merging.specs import (
    AdapterSpec,
    adapter_specs,
    change_row,
    check_precision,
    config_json,
    large_delta_warnings,
    layer_stub,
    plan_report,
)
from fourier_convert.plan import LayerPlan, MergePlan, build_plan, guess_orientation, resolve_names, set_orientation
from fourier_convert.report import LayerReport, MergeReport
from fourier_convert.skeleton import BaseModelJob, Skeleton, build_skeleton_bounded, scan_linear_only

if TYPE_CHECKING:  # torch is imported once the byte copies run (see merge)
    import torch

    from fourier_convert.merging.transfer import PinnedBuffers

    #: Receives each finished output tensor by name: a torch tensor, or the CPU merge's numpy array.
    Sink = Callable[[str, torch.Tensor | np.ndarray], None]

__all__ = ["PROVENANCE_NAME", "AdapterSpec", "merge", "parse_size"]

PROVENANCE_NAME = "fourier_convert.json"
#: Why ``--device auto`` merges on the CPU.
AUTO_DEVICE_NOTE = (
    "device auto: merging on the CPU; a merge is bound by disk I/O, and the GPU path (about 4 s of CUDA start) "
    "measured even with it at 7B and slower on smaller models (docs/benchmarks.md); --device cuda uses the GPU"
)


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
    precision: str = "float64",
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
        device: ``auto`` (the CPU: a merge is bound by disk I/O; see :data:`AUTO_DEVICE_NOTE`), ``cpu``, ``cuda`` or
            ``cuda:N``: where deltas are rebuilt and added.
        precision: ``float64`` (default: every merged element is correctly rounded) or ``float32`` (faster on
            some CPUs; not correctly rounded where base and delta nearly cancel) reconstruction and addition.
        dtype: Output dtype for all floating tensors (``float16``, ``bfloat16``, ``float32``); None keeps each.
        max_shard_size: Re-shard the output (``"2GB"``); None mirrors the base's shard layout.
        overwrite: Replace a non-empty ``out``.
        dry_run: Validate and plan only; write nothing.
        allow_pickle: Accept ``adapter_model.bin`` through torch's weights-only loader.
        progress: Draw a byte progress bar on stderr.
        revision: Hub revision of the base.
        threads: CPU threads for the deltas: the CPU merge's worker threads (default: the cores, at most 4), or torch's
            threads on the torch path (default: all cores but one; the previous setting is restored afterwards).
        durable: fsync the output before publishing it (default). False skips the fsync, for scratch
            outputs that are read back at once; the publish stays atomic.

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
    check_precision(precision)
    out_dtype = parse_user_dtype(dtype) if dtype else None
    shard_bytes = parse_size(str(max_shard_size)) if max_shard_size is not None else None
    dev_name = _merge_device(device)
    check_output_target(Path(out), overwrite)
    specs = adapter_specs(adapter)
    adapters = [read_adapter(s.path, subfolder=s.subfolder, allow_pickle=allow_pickle) for s in specs]
    ckpt = open_checkpoint(base, revision=revision)
    refuse_input_as_output(Path(out), [ckpt.folder] + [a.folder for a in adapters])

    names, missing = resolve_names(ckpt, adapters)
    skeleton, why = None, "the base has no config.json"
    if ckpt.config is not None and missing:  # transformers' key renaming is needed to plan
        skeleton, why = build_skeleton_bounded(ckpt.config, ckpt.tensors)
        names, missing = resolve_names(ckpt, adapters, skeleton)
    plan = build_plan(ckpt, adapters, names, weights=[s.weight for s in specs], out_dtype=out_dtype)
    job: BaseModelJob | None = None
    if ckpt.config is not None:
        # Orientation: a scan of the modeling source settles most models at once; otherwise the skeleton is built
        # while the copies and deltas run, and so is the check that the published config.json fits the weights.
        # Started after build_plan, which may import transformers itself: two threads importing it at once can fail.
        build = False
        if skeleton is None:
            skeleton = scan_linear_only(ckpt.config)
            build = skeleton is None
        published = plan.config if plan.config is not None else ckpt.config  # the config.json the output holds
        shapes = {o.name: o.shape for o in plan.outputs}
        key = fit_key(published, shapes)
        fit = None if known_fit(key) else (published, shapes, ckpt.folder / "config.json")  # passed before: skipped
        if build or fit is not None:
            job = BaseModelJob(ckpt.config, ckpt.tensors, build=build, fit=fit, on_fit=lambda: remember_fit(key))
    try:
        layouts = _layouts(ckpt, plan, shard_bytes)
        report = plan_report(
            plan,
            adapters,
            str(base),
            dev_name,
            precision,
            out=None if dry_run else str(out),
            dry_run=dry_run,
            shards=[lay.filename for lay in layouts],
        )
        if dry_run:
            if job is not None:
                built, built_why, unchecked = job.result()
                if job.build:
                    skeleton, why = built, built_why
                _note_unchecked(report, unchecked)
            set_orientation(plan, skeleton, adapters, why)
            report.changes = [change_row(o, adapters) for o in plan.outputs if o.kind != "copy"]
            report.layers = [layer_stub(layer) for layer in plan.layers]
            report.seconds = time.perf_counter() - t0
            return report

        if device == "auto" and _gpu_driver_present():
            report.notes.append(AUTO_DEVICE_NOTE)
        _warn_leftovers(Path(out), report)
        report.timings["validate_and_plan"] = time.perf_counter() - t0
        bar = ByteProgress(plan.bytes_total, "merge", enabled=progress)
        with CheckpointWriter(Path(out), overwrite=overwrite, progress=bar, durable=durable) as writer:
            orientation = (skeleton, why, job)
            _write_output(writer, report, ckpt, adapters, plan, layouts, orientation, dev_name, threads, t0)
        bar.close()
        report.seconds = time.perf_counter() - t0
        return report
    finally:
        if job is not None:
            job.cancel()  # a failed or interrupted merge leaves no check running


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
    orientation: tuple[Skeleton | None, str, BaseModelJob | None],
    device: str,
    threads: int | None,
    t0: float,
) -> None:
    """Everything between opening the atomic writer and publishing: byte copies, deltas, small files."""
    writer.begin(layouts, extra_bytes=sum(p.stat().st_size for p in ckpt.aux_files))
    where = {spec.name: lay for lay in layouts for spec in lay.specs}
    writer.copy(_raw_copies(plan, where))
    sink = _sink(writer, where)
    if device == "cpu" and report.precision == "float64":
        # the default: numpy alone, no torch import (about a second of CPU, as long as the copies on 2 cores)
        from fourier_convert.merging.cpu import merge_layers_cpu

        def on_cpu(layers: list[LayerPlan]) -> tuple[dict[str, LayerReport], list[str]]:
            return merge_layers_cpu(layers, plan, sink, threads=threads)

        _merge_tensors(writer, report, ckpt, adapters, plan, sink, orientation, on_cpu, t0)
        return
    # torch (about a second to import) only now, while the copies run in the writer's thread
    import torch

    from fourier_convert.merging.core import compute_dtype, merge_layers, resolve_device, torch_threads

    # a CUDA device is fully checked (and its context created) here, while the copies run; an error still
    # publishes nothing
    dev = resolve_device(device) if device != "cpu" else torch.device("cpu")
    compute = compute_dtype(report.precision)

    def with_torch(layers: list[LayerPlan]) -> tuple[dict[str, LayerReport], list[str]]:
        return merge_layers(layers, plan, sink, dev, compute)

    with torch_threads(threads):
        _merge_tensors(writer, report, ckpt, adapters, plan, sink, orientation, with_torch, t0)


def _merge_tensors(
    writer: CheckpointWriter,
    report: MergeReport,
    ckpt: BaseCheckpoint,
    adapters: list[FourierFTAdapter],
    plan: MergePlan,
    sink: Sink,
    orientation: tuple[Skeleton | None, str, BaseModelJob | None],
    merge_fn: Callable[[list[LayerPlan]], tuple[dict[str, LayerReport], list[str]]],
    t0: float,
) -> None:
    skeleton, why, job = orientation
    if job is None or not job.build:
        set_orientation(plan, skeleton, adapters, why)
    else:
        guess_orientation(plan, adapters)
    t1 = time.perf_counter()
    done, report.fallbacks = merge_fn(plan.layers)
    report.timings["deltas_and_merge"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    if job is not None:
        built, built_why, unchecked = job.result()  # raises when config.json does not fit the weights
        _note_unchecked(report, unchecked)
    if job is not None and job.build:
        # The skeleton decides; layers it flips are recomputed and rewritten before anything is published.
        flipped = set_orientation(plan, built, adapters, built_why)
        if flipped:
            redone, more = merge_fn(flipped)
            done.update(redone)
            report.fallbacks += more
        for layer in plan.layers:
            done[layer.key].orientation = layer.orientation_source
    report.timings["skeleton_wait"] = time.perf_counter() - t1
    report.layers = [done[layer.key] for layer in plan.layers]
    report.warnings += large_delta_warnings(report.layers)
    report.changes = [change_row(o, adapters) for o in plan.outputs if o.kind != "copy"]
    converted = [o for o in plan.outputs if o.raw_source is None and o.kind != "merge"]
    if converted:  # replacements and dtype casts (torch casts them)
        from fourier_convert.merging.core import converted_value

        for o in converted:
            sink(o.name, converted_value(o))
    _write_small_files(writer, ckpt, plan)
    t1 = time.perf_counter()
    writer.wait()
    report.timings["copy_wait"] = time.perf_counter() - t1
    report.seconds = time.perf_counter() - t0
    writer.write_file(PROVENANCE_NAME, _provenance(report, adapters, ckpt, plan))
    t1 = time.perf_counter()
    writer.commit(index_metadata=ckpt.index_metadata)
    report.timings["fsync_and_publish"] = time.perf_counter() - t1


def _note_unchecked(report: MergeReport, unchecked: str) -> None:
    if unchecked:
        report.notes.append(f"config.json was not checked against the weights: {unchecked}")


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


def _gpu_driver_present() -> bool:
    """Whether ``--device auto`` has a GPU to ask torch about: without an NVIDIA or AMD driver there is none, and
    torch need not be imported before the copies start."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/kfd"))


def _merge_device(device: str) -> str:
    """``--device`` for a merge, checked without importing torch: ``auto`` is the CPU (:data:`AUTO_DEVICE_NOTE`);
    ``cuda`` / ``cuda:N`` need a GPU driver (torch checks the rest once the byte copies run).

    Raises:
        UsageError: An unknown device, or CUDA on a machine without a GPU driver.
    """
    if device in ("auto", "cpu"):
        return "cpu"
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not _gpu_driver_present():
            raise UsageError("--device", f"{device} requested but no CUDA GPU is available", "use --device cpu")
        return device
    raise UsageError("--device", f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N")


def _tensor_bytes(t: torch.Tensor | np.ndarray) -> memoryview:
    if isinstance(t, np.ndarray):  # the CPU merge's arrays, in the output dtype's storage form
        return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8).data)
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy().data)


def _sink(writer: CheckpointWriter, where: dict[str, ShardLayout]) -> Sink:
    rings: dict[object, PinnedBuffers] = {}  # per GPU, made for its first tensor (torch and CUDA are up by then)

    def put(name: str, value: torch.Tensor | np.ndarray) -> None:
        filename = where[name].filename
        if isinstance(value, np.ndarray) or value.device.type != "cuda":
            writer.write_tensor(filename, name, _tensor_bytes(value))
            return
        from fourier_convert.merging.transfer import PinnedBuffers, download

        ring = rings.get(value.device)
        if ring is None:
            ring = rings[value.device] = PinnedBuffers(value.device)
        download(value, ring, lambda part, at: writer.write_tensor(filename, name, part, at=at))

    return put


def _write_small_files(writer: CheckpointWriter, ckpt: BaseCheckpoint, plan: MergePlan) -> None:
    for path in ckpt.aux_files:
        if path.name == "config.json" and plan.config_changed and plan.config is not None:
            continue
        writer.copy_file(path)
    if plan.config_changed and plan.config is not None:
        writer.write_file("config.json", config_json(plan.config))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _provenance(report: MergeReport, adapters: list[FourierFTAdapter], ckpt: BaseCheckpoint, plan: MergePlan) -> bytes:
    torch = sys.modules.get("torch")  # None when the merge ran without it (the CPU path is numpy alone)
    doc = {
        "tool": "fourier-convert",
        "version": __version__,
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
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
