"""``export_onnx``: merge (when given an adapter), prove the merge, export with the dynamo exporter, validate
in onnxruntime, and publish atomically.

Order of work, chosen so that peak memory stays near one copy of the weights:

1. Check every argument, the packages, the output folder and free disk space (nothing written yet).
2. Base + adapter: merge in memory with the merge core (:func:`fourier_convert.merge_in_memory`, float32);
   transformers takes the merged tensors as the model's parameters (no copy, nothing written to disk).
3. Reference outputs in PyTorch (eval mode) on the validation inputs.
4. Merge proof: the same model turned, in place, into base + unmerged adapter (:mod:`.proof`, no PEFT, no
   FFT) runs one validation shape and is compared with the references; then it is the merged model again.
5. float16: the merged tensors are converted and loaded again in float16, and the references recomputed.
6. Export into the atomic writer's temporary folder; free the PyTorch model; ``--optimize``.
7. Validate in onnxruntime at >= 3 shapes unlike the export shape; publish only if every output of every
   shape is within tolerance. On failure nothing appears at ``out`` (``keep_failed`` moves the attempt aside).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fourier_convert.errors import (
    DiskSpaceError,
    ExportError,
    FourierConvertError,
    OnnxValidationError,
    OutputError,
    UsageError,
)
from fourier_convert.io.adapter import FourierFTAdapter, read_adapter
from fourier_convert.io.checkpoint import BaseCheckpoint, open_checkpoint
from fourier_convert.io.progress import StepProgress, phase
from fourier_convert.io.safetensors_file import DTYPE_SIZES, FLOAT_DTYPES
from fourier_convert.io.writer import CheckpointWriter, check_output_target, refuse_input_as_output
from fourier_convert.merging.folder import PROVENANCE_NAME
from fourier_convert.merging.memory import MergedState, merge_opened
from fourier_convert.merging.specs import AdapterSpec, adapter_specs, config_json
from fourier_convert.model_config import config_from_dict
from fourier_convert.onnx.compare import TOLERANCES
from fourier_convert.onnx.exporter import MODEL_FILE, OpsetRange, check_opset, export_graph, release_weights
from fourier_convert.onnx.inputs import export_case, make_inputs
from fourier_convert.onnx.models import check_config_fits, load_checkpoint_model, load_task_model
from fourier_convert.onnx.proof import apply_unmerged
from fourier_convert.onnx.report import REPORT_FILE, OnnxReport
from fourier_convert.onnx.runtime import (
    GraphLoadError,
    check_device,
    check_loads,
    check_providers,
    optimize_graph,
    require_packages,
)
from fourier_convert.onnx.signature import FlatModel, describe
from fourier_convert.onnx.tasks import check_task, infer_task
from fourier_convert.onnx.validate import (
    ValidationInputs,
    compare_cases,
    torch_outputs,
    validate_graph,
    validation_inputs,
)

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16"}
_BYTES = {"float32": 4, "float16": 2}


def export_onnx(
    out: str | Path,
    *,
    base: str | Path | None = None,
    adapter: str | Path | AdapterSpec | Sequence[str | Path | AdapterSpec] | None = None,
    model: str | Path | None = None,
    task: str = "auto",
    dtype: str = "float32",
    opset: int | None = None,
    optimize: bool = False,
    device: str = "auto",
    validate: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    keep_failed: bool = False,
    overwrite: bool = False,
    external_data: bool | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    progress: bool = False,
) -> OnnxReport:
    """Export a FourierFT-adapted model (merged first) or a merged model to ONNX, proven equal in onnxruntime.

    Args:
        out: Output folder (published atomically: ``model.onnx`` [+ ``model.onnx.data``], config, tokenizer /
            preprocessor files, ``onnx_export.json``).
        base: Base model folder or hub id (with ``adapter``).
        adapter: FourierFT adapter(s), as for :func:`fourier_convert.merge`.
        model: An already merged model folder or hub id (instead of ``base`` + ``adapter``).
        task: ``auto`` (from ``config.architectures``) or one of :data:`~fourier_convert.onnx.tasks.TASKS`.
        dtype: ``float32`` or ``float16`` (``bfloat16`` is refused: onnxruntime lacks most bfloat16 kernels).
        opset: ONNX opset; None takes the exporter's default. Only the opsets the installed exporter can write
            and onnxruntime can load are accepted (18 to 25 with torch 2.13, onnxscript 0.7.2, onnxruntime 1.32).
        optimize: Run onnxruntime's transformer optimiser; validation then covers the optimised graph.
        device: onnxruntime device for validation: ``auto`` (CUDA when it really works, else CPU with a
            note), ``cpu``, ``cuda``, ``cuda:N`` (CUDA or an error).
        validate: Compare onnxruntime with PyTorch (default True). Without it onnxruntime still loads the graph
            once before it is published.
        atol: Absolute tolerance (default 1e-4 for float32, 1e-2 for float16).
        rtol: Relative tolerance (default 1e-3).
        keep_failed: On a failed validation (or a graph onnxruntime cannot load), keep the attempt at
            ``<out>.failed`` instead of deleting it.
        overwrite: Replace a non-empty ``out`` (only once the new export has passed).
        external_data: Force or forbid ``model.onnx.data``; None: when the weights exceed 256 MiB.
        allow_pickle: Accept an ``adapter_model.bin`` adapter.
        revision: Hub revision of ``base`` / ``model``.
        progress: Print each phase (merge, proof, export, optimisation, validation) on stderr as it starts, and a bar
            over the input cases while PyTorch and onnxruntime run them.

    Returns:
        An :class:`~fourier_convert.onnx.report.OnnxReport`.

    Raises:
        UsageError: Bad arguments (both or neither input kinds, bfloat16, unknown task / device, tolerances,
            an opset outside the usable range).
        ExportError: A package is missing, the exporter failed, onnxruntime cannot load the graph, the model does
            not fit the task, or CUDA was requested but is not active.
        OnnxValidationError: The merge proof or the validation failed (``.report`` holds the details);
            nothing was published.
        FourierConvertError: Any input or output problem the merge reports.

    Example:
        >>> import fourier_convert as fc
        >>> report = fc.export_onnx(base="fixtures/llama/base", adapter="fixtures/llama/adapter",
        ...                         out="onnx-llama", task="auto")  # doctest: +SKIP
        >>> report.task, report.passed  # doctest: +SKIP
        ('causal-lm-with-past', True)
    """
    t0 = time.perf_counter()
    out = Path(out)
    export_dtype, tol, opsets = _check_args(task, dtype, device, opset, atol, rtol, base, adapter, model)
    versions = require_packages()
    if validate:
        check_providers(device)
    check_output_target(out, overwrite)
    specs = adapter_specs(adapter) if model is None else []
    adapters = [read_adapter(s.path, subfolder=s.subfolder, allow_pickle=allow_pickle) for s in specs]
    ckpt = open_checkpoint(model if model is not None else str(base), revision=revision)
    refuse_input_as_output(out, [ckpt.folder] + [a.folder for a in adapters])
    check_config_fits(ckpt, _known_task(task, ckpt.config))  # before the merge: a config unlike the weights
    onnx_bytes = _onnx_bytes(ckpt, export_dtype)
    aux_bytes = sum(p.stat().st_size for p in ckpt.aux_files if _is_aux(p.name))
    _check_disk(out, onnx_bytes * (2 if optimize else 1) + aux_bytes)  # the merge and dtype changes are in memory
    versions.update(torch=torch.__version__, transformers=_version("transformers"))
    report = OnnxReport(
        out=None,
        task=task,
        task_reason="given with --task",
        source="base + adapter (merged here)" if specs else "merged model",
        base=str(base) if specs else None,
        adapters=[a.label for a in adapters],
        model=str(model) if model is not None else None,
        dtype=export_dtype,
        device=device,
        tolerances={"atol": tol[0], "rtol": tol[1]},
        versions=versions,
    )
    options = _Options(opset, opsets, optimize, device, validate, tol, keep_failed, overwrite, external_data, progress)
    model_obj, refs, inputs, aux = _merge_and_prove(report, ckpt, specs, adapters, progress)
    _refuse_non_finite_reference(refs, inputs, report.dtype, ckpt.folder)
    _export_and_publish(report, out, model_obj, refs, inputs, aux, options, (onnx_bytes, t0))
    report.out = str(out)
    report.seconds = time.perf_counter() - t0
    return report


def _refuse_non_finite_reference(
    refs: list[list[np.ndarray]], inputs: ValidationInputs, dtype: str, folder: Path
) -> None:
    """Refuse, before the export, a model whose own PyTorch outputs hold inf or NaN where they are compared: no
    export of it can be validated, and the failure would otherwise be blamed on onnxruntime.

    Raises:
        ExportError: A reference output is not finite at an unmasked position (the weights hold non-finite values,
            or the model overflows ``dtype``).
    """
    for check in compare_cases(inputs, refs, refs, 0.0, 0.0):  # against itself: fails only where not finite
        bad = next((o for o in check.outputs if not o.passed), None)
        if bad is not None:
            fix = "check the model's weights for inf / NaN values"
            if dtype == "float16":
                fix += ", or export with --dtype float32 (the model may overflow float16)"
            raise ExportError(
                str(folder),
                f"PyTorch's own {dtype} outputs hold inf or NaN ({bad.name} at {check.case}), so no export of this "
                "model can be validated; nothing was exported",
                fix,
            )


@dataclass(frozen=True)
class _Options:
    """The export options that matter after the inputs are read."""

    opset: int | None
    opsets: OpsetRange
    optimize: bool
    device: str
    validate: bool
    tol: tuple[float, float]
    keep_failed: bool
    overwrite: bool
    external_data: bool | None
    progress: bool


def _merge_and_prove(
    report: OnnxReport,
    ckpt: BaseCheckpoint,
    specs: list[AdapterSpec],
    adapters: list[FourierFTAdapter],
    progress: bool,
) -> tuple[Any, list[list[np.ndarray]], ValidationInputs, dict[str, Path | bytes]]:
    """Merge in memory (with adapters), choose the task, prove the merge, and return the model to export, its
    reference outputs, the validation inputs and the files to carry: each input file's path (copied when the
    output is written, never read whole into memory), or the bytes of a rewritten ``config.json``."""
    merged: MergedState | None = None
    config_dict = ckpt.config or {}
    aux: dict[str, Path | bytes] = {p.name: p for p in ckpt.aux_files if _is_aux(p.name)}
    if specs:
        t = time.perf_counter()
        phase(progress, "to-onnx", f"merging {len(adapters)} adapter(s) into {ckpt.folder} in memory")
        merged = merge_opened(  # the base and adapters read once, above
            ckpt,
            adapters,
            [s.weight for s in specs],
            device="cpu" if report.device == "cpu" else "auto",
            dtype="float32",
        )
        report.timings["merge"] = time.perf_counter() - t
        report.merge = {
            "layers": len(merged.report.layers),
            "tensors": merged.report.tensors,
            "worst_spot_check": max((r.max_abs_error for r in merged.report.layers), default=0.0),
            "seconds": merged.report.seconds,
            "device": merged.report.device,
        }
        report.warnings += merged.report.warnings
        if merged.config is not None:
            config_dict = merged.config
            if merged.config_changed:
                aux["config.json"] = config_json(merged.config)
    if report.task == "auto":
        report.task, why = infer_task(config_dict)
        report.task_reason = f"inferred from config.json: {why}"
    if merged is None:
        phase(progress, "to-onnx", f"loading {ckpt.folder} ({report.task}) and computing reference outputs")
        return (*_reference(report, ckpt, progress), aux)
    phase(progress, "to-onnx", f"loading the merged model ({report.task}), its reference outputs and the merge proof")
    model, refs, inputs = _prove(report, ckpt, merged, adapters, [s.weight for s in specs], progress)
    return model, refs, inputs, aux


def _export_and_publish(
    report: OnnxReport,
    out: Path,
    model: Any,
    refs: list[list[np.ndarray]],
    inputs: ValidationInputs,
    aux: dict[str, Path | bytes],
    options: _Options,
    sizes: tuple[int, float],
) -> None:
    """Export into the atomic writer's temporary folder, optimise, validate, and publish or keep aside.

    ``sizes`` is the ONNX weights' byte count and the start time of the whole run.
    """
    onnx_bytes, started = sizes
    t0 = time.perf_counter()
    sig = inputs.sig
    example = make_inputs(sig, export_case(sig), seed=0)
    report.export_shape = export_case(sig).label(bool(sig.past_layers))
    hf_config = model.config
    need = onnx_bytes * (2 if options.optimize else 1) + sum(_size(a) for a in aux.values())
    with CheckpointWriter(out, overwrite=options.overwrite) as writer:
        writer.begin([], extra_bytes=need)
        temp = writer.temp
        assert temp is not None
        flat = FlatModel(model, sig).eval()
        phase(options.progress, "to-onnx", f"exporting the graph ({report.export_shape})")
        info = export_graph(flat, example, temp, opset=options.opset, external_data=options.external_data)
        release_weights(model)
        del flat, model, example
        gc.collect()
        report.timings["export"] = time.perf_counter() - t0
        report.opset, report.external_data, report.weights_bytes = info.opset, info.external_data, info.weights_bytes
        report.inputs, report.outputs = info.inputs, info.outputs
        if options.optimize:
            t = time.perf_counter()
            phase(options.progress, "to-onnx", "optimising the graph with onnxruntime's transformer optimiser")
            report.optimized = optimize_graph(
                temp, hf_config, use_gpu=options.device.startswith("cuda"), external_data=info.external_data
            )
            report.timings["optimize"] = time.perf_counter() - t
        for name, data in aux.items():
            if isinstance(data, bytes):
                writer.write_file(name, data)
            else:  # streamed by the file system: a large extra file is never held in memory
                writer.copy_file(data, name)
        try:
            if options.validate:
                t = time.perf_counter()
                phase(
                    options.progress, "to-onnx", f"validating in onnxruntime against PyTorch ({len(refs)} input cases)"
                )
                report.validation, report.providers, notes = validate_graph(
                    temp / MODEL_FILE,
                    options.device,
                    inputs,
                    refs,
                    *options.tol,
                    _case_bar(inputs, "validate", options.progress),
                )
                report.notes += notes
                report.validated = True
                report.timings["validate"] = time.perf_counter() - t
            else:
                phase(options.progress, "to-onnx", "checking that onnxruntime loads the graph (--no-validate)")
                check_loads(temp / MODEL_FILE)
        except GraphLoadError as exc:
            raise _load_error(report, exc, options, temp, out) from exc
        report.files = sorted([p.name for p in temp.iterdir() if p.is_file()] + [REPORT_FILE])
        report.seconds = time.perf_counter() - started
        if not report.passed:
            if options.keep_failed:
                report.kept_failed = str(_keep_aside(temp, out, report))
            raise _validation_error(report)
        writer.write_file(REPORT_FILE, _json(report, out))
        writer.commit()


def _check_args(
    task: str,
    dtype: str,
    device: str,
    opset: int | None,
    atol: float | None,
    rtol: float | None,
    base: Any,
    adapter: Any,
    model: Any,
) -> tuple[str, tuple[float, float], OpsetRange]:
    check_task(task)
    check_device(device)
    name = dtype.lower()
    if name in ("bfloat16", "bf16"):
        raise UsageError(
            "--dtype",
            "bfloat16 is not offered: onnxruntime has bfloat16 kernels for few ops (CPU and CUDA), so "
            "the graph could neither be validated nor run reliably",
            "use --dtype float16 or float32",
        )
    if name not in _DTYPES:
        raise UsageError("--dtype", f"unknown dtype {dtype!r}", "use float32 or float16")
    export_dtype = _DTYPES[name]
    opsets = check_opset(opset)
    default_atol, default_rtol = TOLERANCES[export_dtype]
    tol = (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
    for label, value in zip(("--atol", "--rtol"), tol, strict=True):
        if not math.isfinite(value) or value < 0:
            raise UsageError(label, f"{value} is not a finite non-negative number", "pass e.g. 1e-4")
    if model is not None and (base is not None or adapter is not None):
        raise UsageError(
            "--model", "given together with --base / --adapter", "pass either a merged --model or --base with --adapter"
        )
    if model is None and (base is None or adapter is None):
        raise UsageError(
            "--base",
            "an export needs --base with --adapter, or a merged --model",
            "pass --base and --adapter, or --model",
        )
    return export_dtype, tol, opsets


def _onnx_bytes(ckpt: BaseCheckpoint, dtype: str) -> int:
    """Bytes of the weights in ``dtype`` (floating tensors converted, others as stored)."""
    total = 0
    for t in ckpt.tensors.values():
        numel = math.prod(t.shape)
        total += numel * _BYTES[dtype] if t.dtype in FLOAT_DTYPES else numel * DTYPE_SIZES[t.dtype]
    return total


def _check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(_existing_ancestor(out)).free
    if need > free:
        raise DiskSpaceError(
            str(out),
            f"needs about {need / 1e9:.2f} GB of free disk space, {free / 1e9:.2f} GB available",
            "free some space or write --out to another disk",
        )


def _known_task(task: str, config: dict[str, Any] | None) -> str | None:
    """``task``, or the one ``config`` implies for ``auto``; None when there is none yet (the merged config may
    still name one, and its own error comes later)."""
    if task != "auto":
        return task
    try:
        return infer_task(config or {})[0]
    except FourierConvertError:
        return None


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".data")


def _is_aux(name: str) -> bool:
    """Files carried to the output: configs, tokenizer and preprocessor files (no weights, no index)."""
    return (
        not name.endswith(_WEIGHT_SUFFIXES)
        and not name.endswith(".index.json")
        and name
        not in (
            PROVENANCE_NAME,
            REPORT_FILE,
        )
        and not name.startswith(".")
    )


def _reference(
    report: OnnxReport, ckpt: BaseCheckpoint, progress: bool
) -> tuple[Any, list[list[np.ndarray]], ValidationInputs]:
    """An already merged model in the export dtype, its validation inputs and reference outputs."""
    t = time.perf_counter()
    model = load_checkpoint_model(ckpt, report.task, _torch_dtype(report.dtype))
    inputs = validation_inputs(describe(model, report.task))
    outputs = torch_outputs(FlatModel(model, inputs.sig).eval(), inputs, _case_bar(inputs, "reference", progress))
    report.timings["reference"] = time.perf_counter() - t
    return model, outputs, inputs


def _prove(
    report: OnnxReport,
    ckpt: BaseCheckpoint,
    merged: MergedState,
    adapters: list[FourierFTAdapter],
    weights: list[float],
    progress: bool,
) -> tuple[Any, list[list[np.ndarray]], ValidationInputs]:
    """Reference outputs of the merged model (float32), the merge proof on the same model, then the model to
    export in the export dtype with its references.

    One model is in memory at a time: transformers takes the merged tensors as its parameters, the proof
    swaps base weights in and back out, and a float16 export converts the tensors one at a time.
    """
    t = time.perf_counter()
    config = config_from_dict(merged.config or {}, ckpt.folder / "config.json")
    model = load_task_model(ckpt.folder, report.task, dtype=torch.float32, config=config, state_dict=merged.tensors)
    inputs = validation_inputs(describe(model, report.task))
    flat = FlatModel(model, inputs.sig).eval()
    outputs = torch_outputs(flat, inputs, _case_bar(inputs, "reference", progress))
    report.timings["reference"] = time.perf_counter() - t
    t = time.perf_counter()
    layers = [(r.module, r.key) for r in merged.report.layers]
    unmerged = apply_unmerged(model, ckpt, layers, adapters, weights)
    if unmerged.skipped:
        report.notes.append(
            f"adapter tensors with no place in the {report.task} model were left out: {unmerged.skipped[:4]}"
        )
    if unmerged.unchecked:
        report.notes.append(
            f"merge proof: {len(unmerged.unchecked)} base tensor(s) have no 1:1 tensor in the model and were not "
            f"compared: {unmerged.unchecked[:3]}"
        )
    report.merge["tensors_equal_to_base"] = unmerged.checked
    if unmerged.mismatched:
        err = OnnxValidationError(
            "merge proof",
            f"{len(unmerged.mismatched)} tensor(s) the merge should have copied differ from the base: "
            f"{unmerged.mismatched[:3]}; nothing was published",
            "report this with the base's config.json",
        )
        err.report = report  # the CLI prints it and writes --json, as for any failed proof
        raise err
    # One validation shape through the hooked model: padded, with a past if any, the most tokens.
    cases = inputs.cases
    pick = max(
        range(len(cases)), key=lambda i: (cases[i].padding is not None, cases[i].past, cases[i].batch * cases[i].seq)
    )
    one = ValidationInputs(inputs.sig, [inputs.cases[pick]], [inputs.tensors[pick]])
    unmerged_out = torch_outputs(flat, one)
    unmerged.restore()  # the merged model again, bit for bit
    report.merge_proof = compare_cases(one, [outputs[pick]], unmerged_out, *TOLERANCES["float32"])
    if not report.proof_passed:
        raise _validation_error(report)
    report.timings["prove"] = time.perf_counter() - t
    if report.dtype == "float32":
        merged.tensors.clear()  # the model holds them; freeing the model frees them
        return model, outputs, inputs
    t = time.perf_counter()
    del flat
    release_weights(model)
    del model
    gc.collect()
    export_dtype = _torch_dtype(report.dtype)
    for key, value in merged.tensors.items():  # one float32 tensor freed per float16 one made
        if value.is_floating_point():
            merged.tensors[key] = value.to(export_dtype)
        del value
    model = load_task_model(ckpt.folder, report.task, dtype=export_dtype, config=config, state_dict=merged.tensors)
    merged.tensors.clear()
    inputs = validation_inputs(describe(model, report.task))
    bar = _case_bar(inputs, f"reference ({report.dtype})", progress)
    outputs = torch_outputs(FlatModel(model, inputs.sig).eval(), inputs, bar)
    report.timings["reload"] = time.perf_counter() - t
    return model, outputs, inputs


def _case_bar(inputs: ValidationInputs, label: str, progress: bool) -> StepProgress | None:
    """A bar over the validation cases, on a terminal (None otherwise)."""
    return StepProgress(len(inputs.cases), label) if progress else None


def _torch_dtype(name: str) -> torch.dtype:
    return torch.float32 if name == "float32" else torch.float16


def _existing_ancestor(out: Path) -> Path:
    probe = out.parent if str(out.parent) else Path(".")
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _size(data: Path | bytes) -> int:
    return len(data) if isinstance(data, bytes) else data.stat().st_size


def _load_error(report: OnnxReport, exc: GraphLoadError, options: _Options, temp: Path, out: Path) -> ExportError:
    """onnxruntime cannot load the exported graph: nothing is published (``--keep-failed`` keeps it aside)."""
    import onnxruntime

    graph = f"opset {report.opset}" + (", optimised" if options.optimize else "")
    found = (
        f"onnxruntime {onnxruntime.__version__} cannot load the exported graph ({graph}): {exc.cause}; "
        "nothing was published"
    )
    report.load_error = exc.cause
    usable = options.opsets
    fix = f"export with another --opset from {usable.low} to {usable.high}"
    fix += " or without --optimize" if options.optimize else ""
    fix += ", or update onnxruntime; see docs/to-onnx.md (opsets)"
    if options.keep_failed:
        report.files = sorted([p.name for p in temp.iterdir() if p.is_file()] + [REPORT_FILE])
        fix = f"the failed export is kept at {_keep_aside(temp, out, report)}; {fix}"
    return ExportError(MODEL_FILE, found, fix)


def _validation_error(report: OnnxReport) -> OnnxValidationError:
    proof = not report.proof_passed
    checks = report.merge_proof if proof else report.validation
    bad = next(c for c in checks if not c.passed)
    worst = bad.worst()
    what = "merge proof" if proof else "validation"
    who = "the merged PyTorch model differs from the unmerged adapter" if proof else "onnxruntime differs from PyTorch"
    found = (
        f"{who} at {bad.case}: {worst.name} max abs diff {worst.max_abs_diff:.3e} "
        f"(atol {report.tolerances['atol']:g}, rtol {report.tolerances['rtol']:g}); nothing was published"
    )
    if report.kept_failed:
        fix = f"the failed export is kept at {report.kept_failed}"
    elif proof:
        fix = "report this with the adapter config and your torch / transformers versions"
    else:
        fix = "pass --keep-failed to keep the attempt for inspection; see docs/to-onnx.md (what a failure means)"
    err = OnnxValidationError(what, found, fix)
    err.report = report
    return err


def _keep_aside(temp: Path, out: Path, report: OnnxReport) -> Path:
    kept = out.parent / f"{out.name}.failed"
    if kept.exists():
        kept = out.parent / f"{out.name}.failed-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(temp, kept)
    except OSError as exc:
        raise OutputError(str(kept), f"cannot keep the failed export ({exc.strerror})", "check permissions") from None
    report.kept_failed = str(kept)
    (kept / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return kept


def _json(report: OnnxReport, out: Path) -> bytes:
    doc = report.to_dict()
    doc["out"] = str(out)
    return (json.dumps(doc, indent=2, default=str) + "\n").encode()
