"""Validation: PyTorch reference outputs on the validation inputs, the same inputs through onnxruntime, and
the masked comparison of both (:mod:`.compare`)."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fourier_convert.io.progress import StepProgress
from fourier_convert.onnx.compare import CaseCheck, compare_outputs
from fourier_convert.onnx.inputs import Case, make_inputs, query_mask, validation_cases
from fourier_convert.onnx.runtime import open_session
from fourier_convert.onnx.signature import FlatModel, Signature


@dataclass
class ValidationInputs:
    """The validation shapes and one list of input tensors per shape, for one signature.

    Attributes:
        sig: The signature the tensors follow.
        cases: The shapes (:func:`~fourier_convert.onnx.inputs.validation_cases`).
        tensors: For each case, one tensor per graph input.
    """

    sig: Signature
    cases: list[Case]
    tensors: list[list[torch.Tensor]]


def validation_inputs(sig: Signature) -> ValidationInputs:
    """Deterministic inputs (seed = case number + 1) at every validation shape of ``sig``.

    Example:
        >>> vin = validation_inputs(describe(model, "causal-lm"))  # doctest: +SKIP
        >>> [c.label() for c in vin.cases]  # doctest: +SKIP
        ['batch 1, seq 9', 'batch 3, seq 11, left-padded', 'batch 4, seq 1']
    """
    cases = validation_cases(sig)
    return ValidationInputs(sig, cases, [make_inputs(sig, c, seed=i + 1) for i, c in enumerate(cases)])


def torch_outputs(flat: FlatModel, vin: ValidationInputs, bar: StepProgress | None = None) -> list[list[np.ndarray]]:
    """``flat``'s outputs (no grad) for every case, as numpy arrays in the model's dtype; ``bar`` advances a step per
    case (and is closed at the end)."""
    results = []
    with torch.no_grad():
        for step, (case, tensors) in enumerate(zip(vin.cases, vin.tensors, strict=True), start=1):
            results.append([o.detach().cpu().numpy() for o in flat(*tensors)])
            _advance(bar, step, case, vin)
    if bar is not None:
        bar.close()
    return results


def _advance(bar: StepProgress | None, step: int, case: Case, vin: ValidationInputs) -> None:
    if bar is not None:
        bar.update(step, case.label(bool(vin.sig.past_layers)))


def compare_cases(
    vin: ValidationInputs, reference: list[list[np.ndarray]], got: list[list[np.ndarray]], atol: float, rtol: float
) -> list[CaseCheck]:
    """One :class:`~fourier_convert.onnx.compare.CaseCheck` per case (unmasked positions only)."""
    sig = vin.sig
    checks = []
    for case, tensors, ref, out in zip(vin.cases, vin.tensors, reference, got, strict=True):
        shapes: dict[str, list[int]] = {}
        for name, t in zip(sig.inputs, tensors, strict=True):
            shapes.setdefault("past_key_values.*" if name.startswith("past_key_values.") else name, list(t.shape))
        mask = query_mask(sig, tensors, case).numpy()
        checks.append(compare_outputs(sig, case.label(bool(sig.past_layers)), shapes, mask, ref, out, atol, rtol))
    return checks


def validate_graph(
    model_path: Path,
    device: str,
    vin: ValidationInputs,
    reference: list[list[np.ndarray]],
    atol: float,
    rtol: float,
    bar: StepProgress | None = None,
) -> tuple[list[CaseCheck], list[str], list[str]]:
    """Run ``model_path`` in onnxruntime on every case and compare with ``reference``.

    Args:
        model_path: ``model.onnx``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`~fourier_convert.onnx.runtime.open_session`).
        vin: The inputs.
        reference: PyTorch outputs for each case (:func:`torch_outputs`).
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        bar: Advanced a step per case run (and closed at the end), when given.

    Returns:
        ``(checks, providers actually used, notes)``.

    Raises:
        ExportError: The graph does not load, or CUDA was requested but is not active.

    Example:
        >>> checks, used, notes = validate_graph(Path("o/model.onnx"), "cpu", vin, ref, 1e-4, 1e-3)  # doctest: +SKIP
        >>> all(c.passed for c in checks), used  # doctest: +SKIP
        (True, ['CPUExecutionProvider'])
    """
    info = open_session(model_path, device)
    names = list(vin.sig.outputs)
    got = []
    for step, (case, x) in enumerate(zip(vin.cases, vin.tensors, strict=True), start=1):
        got.append(list(info.session.run(names, {n: t.numpy() for n, t in zip(vin.sig.inputs, x, strict=True)})))
        _advance(bar, step, case, vin)
    if bar is not None:
        bar.close()
    providers, notes = info.providers, info.notes
    del info
    gc.collect()
    return compare_cases(vin, reference, got, atol, rtol), providers, notes
