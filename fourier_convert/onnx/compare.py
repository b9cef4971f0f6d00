"""Comparing two sets of outputs at the unmasked positions only: max absolute / relative difference,
top-1 agreement, and the pass / fail rule ``|got - ref| <= atol + rtol * |ref|`` for every compared value.

Used twice: the merged PyTorch model against the unmerged adapter (the merge proof), and the ONNX graph in
onnxruntime against PyTorch (validation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fourier_convert.onnx.signature import CACHE, QUERY, Signature

#: Default tolerances per export dtype: ``(atol, rtol)``.
TOLERANCES: dict[str, tuple[float, float]] = {"float32": (1e-4, 1e-3), "float16": (1e-2, 1e-3)}


@dataclass
class OutputDiff:
    """One output at one input shape.

    Attributes:
        name: Output name.
        compared: Number of values compared (unmasked positions only).
        max_abs_diff: Largest ``|got - ref|``.
        max_rel_diff: ``max_abs_diff / max|ref|`` (the difference relative to the output's scale).
        top1_agreement: For ``logits``: share of compared rows whose arg-max agrees; otherwise None.
        passed: Every value within ``atol + rtol * |ref|`` and finite.
    """

    name: str
    compared: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "compared": self.compared,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "max_rel_diff": _json_float(self.max_rel_diff),
            "top1_agreement": self.top1_agreement,
            "passed": self.passed,
        }


@dataclass
class CaseCheck:
    """All outputs at one input shape.

    Attributes:
        case: The shape, e.g. ``batch 3, seq 11, right-padded``.
        shapes: Input name -> shape fed.
        outputs: One check per output.
    """

    case: str
    shapes: dict[str, list[int]]
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def worst(self) -> OutputDiff:
        """The output with the largest absolute difference (failed ones first)."""
        return max(self.outputs, key=lambda o: (not o.passed, o.max_abs_diff))

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "shapes": self.shapes,
            "passed": self.passed,
            "outputs": [o.to_dict() for o in self.outputs],
        }


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def select(kind: str, array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The values of one output at unmasked positions.

    Args:
        kind: :data:`~fourier_convert.onnx.signature.QUERY` ((batch, seq, ...) rows of real current tokens),
            :data:`~fourier_convert.onnx.signature.CACHE` ((batch, heads, past + seq, dim) entries of real
            tokens) or ``rows`` (everything).
        array: The output.
        mask: (batch, past + seq) booleans, True at real tokens.

    Returns:
        The selected values, first axis = selected positions.

    Example:
        >>> a = np.arange(6.0).reshape(2, 3)
        >>> select("query", a, np.array([[True, True, True], [True, False, False]])).tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    if kind == QUERY:
        seq = array.shape[1]
        picked: np.ndarray = array[mask[:, mask.shape[1] - seq :]]
        return picked
    if kind == CACHE:
        picked = np.moveaxis(array, 2, 1)[mask]
        return picked
    return array


def compare_outputs(
    sig: Signature,
    case: str,
    shapes: dict[str, list[int]],
    mask: np.ndarray,
    reference: list[np.ndarray],
    got: list[np.ndarray],
    atol: float,
    rtol: float,
) -> CaseCheck:
    """Compare ``got`` with ``reference`` (one array per output of ``sig``) at unmasked positions.

    Example:
        >>> sig = Signature("text-classification", ("input_ids",), ("logits",), ("input_ids",), ("logits",),
        ...                 selection={"logits": "rows"})
        >>> ref = [np.array([[1.0, 2.0], [3.0, 0.0]])]
        >>> check = compare_outputs(sig, "b2", {}, np.ones((2, 1), bool), ref, [ref[0] + 1e-5], 1e-4, 1e-3)
        >>> check.passed, check.outputs[0].top1_agreement
        (True, 1.0)
    """
    result = CaseCheck(case, shapes)
    for name, ref_full, got_full in zip(sig.outputs, reference, got, strict=True):
        kind = sig.selection.get(name, "rows")
        ref = select(kind, np.asarray(ref_full), mask).astype(np.float64)
        out = select(kind, np.asarray(got_full), mask).astype(np.float64)
        if ref.shape != out.shape:
            result.outputs.append(OutputDiff(name, 0, math.inf, math.inf, None, False))
            continue
        finite = bool(np.isfinite(ref).all() and np.isfinite(out).all())
        diff = np.abs(out - ref)
        max_abs = float(diff.max()) if diff.size and finite else (0.0 if finite else math.inf)
        scale = float(np.abs(ref).max()) if ref.size and finite else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        passed = finite and bool((diff <= atol + rtol * np.abs(ref)).all())
        top1 = None
        if name == "logits" and ref.size:
            r = ref.reshape(-1, ref.shape[-1]).argmax(-1)
            o = out.reshape(-1, out.shape[-1]).argmax(-1)
            top1 = float((r == o).mean())
        result.outputs.append(OutputDiff(name, int(ref.size), max_abs, max_rel, top1, passed))
    return result
