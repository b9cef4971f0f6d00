"""Export a :class:`~fourier_convert.onnx.signature.FlatModel` with ``torch.onnx.export`` (dynamo exporter).

Dynamic axes are declared with ``torch.export.Dim`` (batch, sequence, past sequence); the attention mask of
the cached decoder spans past + sequence, which ``torch.export`` derives itself (``Dim.DYNAMIC``) and this
module renames in the graph. The graph is refused if it contains Fourier-transform ops (``DFT``,
``STFT``): the input must have been merged. Weights go to one external-data file ``model.onnx.data`` when
they exceed :data:`EXTERNAL_DATA_THRESHOLD` (or when asked).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fourier_convert.errors import ExportError, UsageError
from fourier_convert.onnx.quiet import quiet
from fourier_convert.onnx.signature import BATCH, PAST, SEQUENCE, TOTAL, FlatModel, Signature

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
#: Weights above this many bytes are written to ``model.onnx.data``. Protobuf files cannot exceed 2 GiB, and
#: serialising weights inline holds about three more copies of them in memory for a moment (measured: +2.8 GB
#: for 0.87 GB of weights), so only small models keep them inline.
EXTERNAL_DATA_THRESHOLD = 256 << 20
#: Op types that would mean an unmerged FourierFT model was traced.
FORBIDDEN_OPS = frozenset({"DFT", "STFT"})
#: The opsets measured to export and load in onnxruntime on every fixture (torch 2.13, onnxscript 0.7.2,
#: onnxruntime 1.32); :func:`opset_range` uses a bound from here when the installed packages do not state it.
TESTED_OPSETS = (18, 25)
#: torch's default opset for the dynamo exporter when its constant cannot be read.
DEFAULT_OPSET = 20


@dataclass(frozen=True)
class OpsetRange:
    """The ``--opset`` values this installation can export and onnxruntime can load.

    Attributes:
        low, high: The bounds (both included).
        default: The opset the exporter uses when none is given.
        why: Where the bounds come from, for messages.
    """

    low: int
    high: int
    default: int
    why: str


def opset_range() -> OpsetRange:
    """Derive the usable opsets from the installed packages.

    torch's dynamo exporter builds every graph at its torchlib opset (18 with torch 2.13) and then converts it
    to the requested opset with onnxscript's version converter, which supports a fixed range (18 to 25 with
    onnxscript 0.7.2). Outside that range torch falls back to the ONNX C API converter, which failed on every
    fixture: ``--opset 7`` to ``16`` silently kept opset 18, ``17`` wrote a graph onnxruntime rejects, and ``26``
    and above declared opset 18 yet held opset-23 ``Attention`` nodes. The upper bound is also capped at the
    highest opset onnxruntime's operator schemas know. Bounds a package does not state come from
    :data:`TESTED_OPSETS`.

    Example:
        >>> r = opset_range()
        >>> r.low <= r.default <= r.high
        True
    """
    from fourier_convert.onnx.runtime import onnxruntime_max_opset

    built = _int_constant("torch.onnx._internal.exporter._constants", "TORCHLIB_OPSET")
    conv_low = _int_constant("onnxscript.version_converter._version_converter", "SUPPORTED_MIN_ONNX_OPSET")
    conv_high = _int_constant("onnxscript.version_converter._version_converter", "SUPPORTED_MAX_ONNX_OPSET")
    default = _int_constant("torch.onnx._constants", "ONNX_DEFAULT_OPSET") or DEFAULT_OPSET
    lows = [v for v in (built, conv_low) if v is not None]
    low = max(lows) if lows else TESTED_OPSETS[0]
    high = conv_high if conv_high is not None else TESTED_OPSETS[1]
    why = (
        f"torch {torch.__version__}'s exporter writes opset {low}"
        if lows
        else f"the lowest opset tested with this exporter is {low}"
    )
    why += (
        f", which onnxscript {_version('onnxscript')} converts up to {high}"
        if conv_high is not None
        else f"; the highest tested is {high}"
    )
    loads = onnxruntime_max_opset()
    if loads is not None and loads < high:
        high = loads
        why += f"; onnxruntime {_version('onnxruntime')} loads up to {loads}"
    return OpsetRange(low, high, default, why)


def check_opset(opset: object) -> OpsetRange:
    """Refuse an ``--opset`` this installation cannot export or onnxruntime cannot load (None: the default).

    Raises:
        UsageError: Not an integer, or outside :func:`opset_range`.

    Example:
        >>> check_opset(30)  # doctest: +SKIP
        Traceback (most recent call last):
        fourier_convert.errors.UsageError: --opset: 30 is outside 18 to 25, ...
    """
    usable = opset_range()
    fix = f"pass an --opset from {usable.low} to {usable.high}"
    if usable.low <= usable.default <= usable.high:
        fix += f", or leave it out for the exporter's default ({usable.default})"
    if opset is None:
        return usable
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise UsageError("--opset", f"{opset!r} is not an ONNX opset number", fix)
    if not usable.low <= opset <= usable.high:
        raise UsageError(
            "--opset",
            f"{opset} is outside {usable.low} to {usable.high}, the opsets this installation can export and "
            f"onnxruntime can load ({usable.why})",
            fix,
        )
    return usable


def _int_constant(module: str, name: str) -> int | None:
    """``module.name`` when it is an int (private constants of the installed exporter), else None."""
    try:
        value = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _version(dist: str) -> str:
    try:
        return str(importlib.import_module(dist).__version__)
    except (ImportError, AttributeError):
        return "?"


@dataclass
class GraphInfo:
    """What the exporter wrote.

    Attributes:
        opset: Default-domain opset of the graph.
        op_types: Distinct op types in the graph (functions included).
        weights_bytes: Bytes of all initializers.
        external_data: Whether the weights are in ``model.onnx.data``.
        files: Files written, relative to the folder.
        inputs, outputs: Name -> ``{"dtype": ..., "shape": [...]}`` with symbolic axes by name.
        exporter_log: The exporter's own messages.
    """

    opset: int
    op_types: list[str]
    weights_bytes: int
    external_data: bool
    files: list[str] = field(default_factory=list)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    exporter_log: str = ""


def dynamic_shapes(sig: Signature) -> tuple[tuple[dict[int, Any], ...]]:
    """``dynamic_shapes`` for ``torch.export`` of a :class:`FlatModel` (one tuple: its ``*tensors``)."""
    dims = {
        BATCH: torch.export.Dim(BATCH, min=1),
        SEQUENCE: torch.export.Dim(SEQUENCE, min=1),
        PAST: torch.export.Dim(PAST, min=0),
        TOTAL: torch.export.Dim.DYNAMIC,
    }
    return (tuple({axis: dims[name] for axis, name in sig.axes[inp].items()} for inp in sig.inputs),)


def export_graph(
    flat: FlatModel,
    example: list[torch.Tensor],
    folder: Path,
    *,
    opset: int | None = None,
    external_data: bool | None = None,
) -> GraphInfo:
    """Export ``flat`` at the ``example`` shape to ``folder/model.onnx`` with dynamic axes.

    Args:
        flat: The wrapped model (eval mode).
        example: One tensor per graph input (batch and sequence >= 2).
        folder: Existing folder to write into.
        opset: Target opset; None takes the exporter's default.
        external_data: Force (True) or forbid (False) ``model.onnx.data``; None decides by size.

    Returns:
        What was written.

    Raises:
        ExportError: The exporter failed, or the graph contains Fourier-transform ops.

    Example:
        >>> info = export_graph(FlatModel(model, sig).eval(), make_inputs(sig, export_case(sig)), tmp)  # doctest: +SKIP
        >>> info.files  # doctest: +SKIP
        ['model.onnx']
    """
    import onnx_ir as ir

    sig = flat.signature
    try:
        with quiet("torch.onnx") as log:
            program: Any = torch.onnx.export(
                flat,
                tuple(example),
                dynamo=True,
                input_names=list(sig.inputs),
                output_names=list(sig.outputs),
                dynamic_shapes=dynamic_shapes(sig),
                opset_version=opset,
                optimize=True,
            )
    except Exception as exc:  # the exporter raises many kinds; all mean "this model did not export"
        raise ExportError(
            "torch.onnx.export",
            f"the dynamo exporter failed: {_summary(exc)}",
            "see docs/to-onnx.md (known limits); for a decoder try --task causal-lm; run with --debug for details",
        ) from exc
    graph = program.model.graph
    _name_axes(graph.inputs, sig, ir)
    _name_axes(graph.outputs, sig, ir)
    op_types = sorted({node.op_type for node in ir.traversal.RecursiveGraphIterator(graph)})
    for fn in program.model.functions.values():
        op_types = sorted(set(op_types) | {node.op_type for node in ir.traversal.RecursiveGraphIterator(fn)})
    bad = sorted(FORBIDDEN_OPS.intersection(op_types))
    if bad:
        raise ExportError(
            "model.onnx", f"the graph contains Fourier-transform ops {bad}", "export a merged model, not an adapter"
        )
    weights = sum(int(v.const_value.nbytes) for v in graph.initializers.values() if v.const_value is not None)
    use_external = weights > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    opset_used = int(program.model.opset_imports.get("", 0))
    path = folder / MODEL_FILE
    program.save(str(path), external_data=use_external)
    files = [MODEL_FILE] + ([DATA_FILE] if (folder / DATA_FILE).exists() else [])
    return GraphInfo(
        opset_used, op_types, weights, DATA_FILE in files, files, _io(graph.inputs), _io(graph.outputs), log.getvalue()
    )


def _io(values: Any) -> dict[str, dict[str, Any]]:
    return {
        v.name: {
            "dtype": v.dtype.name.lower() if v.dtype is not None else "?",
            "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])],
        }
        for v in values
    }


def release_weights(module: torch.nn.Module) -> None:
    """Free the weights of an exported model: empty every parameter and buffer of ``module`` in place (it is
    unusable afterwards) and drop the graph onnxscript's rewrite rules keep.

    onnxscript's rewrite rules are module-level objects whose matchers keep the last graph and node they
    matched (a cache the next match replaces); through them the exported weights stay reachable (constant-
    folded transposes are numpy views of the parameters), so deleting the model alone frees nothing.

    Example:
        >>> lin = torch.nn.Linear(4, 4)
        >>> release_weights(lin)
        >>> lin.weight.numel()
        0
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    _forget_matched_graphs()
    gc.collect()
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Give freed heap memory back to the operating system (glibc only; elsewhere nothing to do).

    Weights merged in memory are many separate allocations; glibc serves those below its mmap threshold
    (which grows to 32 MiB as large blocks are freed) from the heap and keeps them resident after they are
    freed: about 0.8 GB of a 1.1B float32 Llama, which onnxruntime's own copy of the weights would stack on.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _forget_matched_graphs() -> None:
    """Reset the caches of onnxscript's pattern matchers (the last graph and node each one matched)."""
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to reset
        return
    for obj in gc.get_objects():
        if issubclass(type(obj), PatternMatcher):  # type(): isinstance() would touch deprecated module proxies
            for attr in ("_graph", "_current_node", "_match", "_tracer"):  # per-call state, set again by match()
                if getattr(obj, attr, None) is not None:
                    setattr(obj, attr, None)


def _name_axes(values: Any, sig: Signature, ir: Any) -> None:
    """Give every declared dynamic axis its symbolic name (the exporter names derived axes like ``s53``)."""
    for value in values:
        axes = sig.axes.get(value.name)
        if not axes or value.shape is None:
            continue
        dims = list(value.shape)
        for axis, name in axes.items():
            if axis < len(dims) and not isinstance(dims[axis], int):
                dims[axis] = ir.SymbolicDim(name)
        value.shape = ir.Shape(dims)


def _summary(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"Exception summary\s*\n\s*\n?(.*?)(\n\n|$)", text, re.S)
    line = match.group(1) if match else text
    line = " ".join(line.split())
    return f"{type(exc).__name__}: {line[:400]}" if line else type(exc).__name__
