"""``merge_in_memory``: the merge core with a dict of tensors as its sink.

For callers that use the merged model at once (``export_onnx``, a pipeline that loads it into transformers):
no checkpoint is written and read back. The tensors are the ones :func:`fourier_convert.merge` would write,
bit for bit (same plan, same delta rebuilding, checks and rounding).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fourier_convert.io.adapter import FourierFTAdapter, read_adapter
from fourier_convert.io.checkpoint import BaseCheckpoint, open_checkpoint
from fourier_convert.io.dtypes import parse_user_dtype
from fourier_convert.merging.core import compute_dtype, converted_value, merge_layers, resolve_device, torch_threads
from fourier_convert.merging.cpu import merge_layers_cpu
from fourier_convert.merging.specs import AdapterSpec, adapter_specs, change_row, large_delta_warnings, plan_report
from fourier_convert.plan import plan_with_orientation
from fourier_convert.report import MergeReport


@dataclass
class MergedState:
    """A merged checkpoint held in memory.

    Attributes:
        tensors: Checkpoint key -> merged tensor (CPU, contiguous), in the base's order, new tensors last.
        config: The merged ``config.json`` content (the base's, or changed for a head the adapter adds);
            None when the base has none.
        config_changed: Whether ``config`` differs from the base's (write it with
            :func:`~fourier_convert.merging.core.config_json`; else copy the base's file).
        files: The base's small files (config, tokenizer, generation and preprocessor configs).
        report: What was done, as :func:`fourier_convert.merge` reports it (``out`` is None).
    """

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    config_changed: bool
    files: list[Path]
    report: MergeReport


def stored_to_torch(stored: np.ndarray) -> torch.Tensor:
    """A CPU merge's array as a torch tensor sharing its memory (``uint16`` holds bfloat16 bits).

    Example:
        >>> stored_to_torch(np.array([0x3F80], dtype=np.uint16))
        tensor([1.], dtype=torch.bfloat16)
    """
    if stored.dtype == np.uint16:
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(stored)


def merge_in_memory(
    base: str | Path,
    adapter: str | Path | AdapterSpec | Sequence[str | Path | AdapterSpec],
    *,
    device: str = "auto",
    precision: str = "float64",
    dtype: str | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    threads: int | None = None,
) -> MergedState:
    """Merge FourierFT adapter(s) into a base model and return the merged tensors instead of writing them.

    Needs memory for the whole merged model (in ``dtype``); nothing is written to disk.

    Args:
        base: Base model folder or hub id (safetensors weights).
        adapter: Adapter folder / hub id / ``PATH:NAME`` / :class:`AdapterSpec`, or a list, applied in order.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``: where deltas are rebuilt and added (results come
            back to the CPU).
        precision: ``float64`` (default, correctly rounded) or ``float32`` reconstruction and addition.
        dtype: Dtype of every floating tensor (``float16``, ``bfloat16``, ``float32``); None keeps each.
        allow_pickle: Accept ``adapter_model.bin`` through torch's weights-only loader.
        revision: Hub revision of the base.
        threads: CPU threads for the deltas (as for :func:`fourier_convert.merge`).

    Returns:
        A :class:`MergedState`.

    Raises:
        FourierConvertError: Any invalid input (the same checks as :func:`fourier_convert.merge`).

    Example:
        >>> import fourier_convert as fc
        >>> state = fc.merge_in_memory("fixtures/llama/base", "fixtures/llama/adapter", dtype="float32")
        >>> state.tensors["model.layers.0.self_attn.q_proj.weight"].dtype
        torch.float32
    """
    specs = adapter_specs(adapter)
    adapters = [read_adapter(s.path, subfolder=s.subfolder, allow_pickle=allow_pickle) for s in specs]
    ckpt = open_checkpoint(base, revision=revision)
    return merge_opened(
        ckpt, adapters, [s.weight for s in specs], device=device, precision=precision, dtype=dtype, threads=threads
    )


def merge_opened(
    ckpt: BaseCheckpoint,
    adapters: Sequence[FourierFTAdapter],
    weights: Sequence[float],
    *,
    device: str = "auto",
    precision: str = "float64",
    dtype: str | None = None,
    threads: int | None = None,
) -> MergedState:
    """:func:`merge_in_memory` for a base and adapters the caller has already opened and read.

    Args:
        ckpt: The base checkpoint (:func:`~fourier_convert.io.checkpoint.open_checkpoint`).
        adapters: The adapters (:func:`~fourier_convert.io.adapter.read_adapter`), in order.
        weights: Each adapter's multiplier.
        device, precision, dtype, threads: As for :func:`merge_in_memory`.

    Returns:
        A :class:`MergedState`.

    Raises:
        FourierConvertError: Any invalid input (the same checks as :func:`fourier_convert.merge`).

    Example:
        >>> state = merge_opened(open_checkpoint("fixtures/llama/base"), [read_adapter("fixtures/llama/adapter")],
        ...                      [1.0])  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    compute = compute_dtype(precision)
    out_dtype = parse_user_dtype(dtype) if dtype else None
    dev = resolve_device(device)
    plan = plan_with_orientation(ckpt, adapters, weights=weights, out_dtype=out_dtype)
    report = plan_report(plan, adapters, str(ckpt.folder), str(dev), precision)
    report.timings["validate_and_plan"] = time.perf_counter() - t0
    tensors: dict[str, torch.Tensor] = {}

    def put(name: str, value: torch.Tensor) -> None:
        tensors[name] = value.to("cpu").contiguous()

    t1 = time.perf_counter()
    if dev.type == "cpu" and compute == torch.float64:  # the same numpy path as merge(): bit-identical output
        done, report.fallbacks = merge_layers_cpu(plan.layers, plan, lambda k, v: put(k, stored_to_torch(v)),
                                                  threads=threads)  # fmt: skip
    else:
        with torch_threads(threads):
            done, report.fallbacks = merge_layers(plan.layers, plan, put, dev, compute)
    report.timings["deltas_and_merge"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    for o in plan.outputs:
        if o.kind != "merge":
            put(o.name, converted_value(o))
    report.timings["read_and_cast"] = time.perf_counter() - t1
    report.layers = [done[layer.key] for layer in plan.layers]
    report.warnings += large_delta_warnings(report.layers)
    report.changes = [change_row(o, adapters) for o in plan.outputs if o.kind != "copy"]
    report.seconds = time.perf_counter() - t0
    ordered = {o.name: tensors[o.name] for o in plan.outputs}
    return MergedState(ordered, plan.config, plan.config_changed, list(ckpt.aux_files), report)
