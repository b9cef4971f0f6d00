"""The report of ``export_onnx`` / ``fourier-convert to-onnx`` (also written as ``onnx_export.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fourier_convert.onnx.compare import CaseCheck

REPORT_FILE = "onnx_export.json"


@dataclass
class OnnxReport:
    """What ``export_onnx`` did and what it proved.

    Attributes:
        out: Published folder (None when nothing was published).
        task: The task exported.
        task_reason: How it was chosen (``given`` or the architecture it was inferred from).
        source: ``base + adapter`` (merged here) or ``merged model``.
        base, adapters, model: The inputs as given.
        dtype: ``float32`` or ``float16``.
        opset: Default-domain opset of the graph.
        device: The device asked for validation.
        providers: Execution providers the validation session actually used.
        external_data: Whether the weights are in ``model.onnx.data``.
        files: Files in the output folder.
        weights_bytes: Bytes of the graph's weights.
        inputs, outputs: Graph input / output name -> ``{"dtype", "shape"}`` (symbolic axes by name).
        export_shape: The example shape given to the exporter.
        tolerances: ``{"atol", "rtol"}`` of the validation.
        merge: Summary of the merge (layers, tensors, worst spot-check error), empty for a merged input.
        merge_proof: Merged PyTorch model vs the unmerged adapter, per input shape (float32).
        validation: onnxruntime vs PyTorch, per input shape.
        validated: Whether validation ran.
        optimized: The ``--optimize`` line, or None.
        notes, warnings: Informational lines; things to look at.
        timings: Seconds per phase.
        seconds: Wall time.
        kept_failed: Where a failed export was kept (``--keep-failed``), else None.
        load_error: Why onnxruntime could not load the exported graph (nothing was published), else None.
        versions: torch, transformers, onnx, onnxscript, onnxruntime versions used.
    """

    out: str | None
    task: str
    task_reason: str
    source: str
    base: str | None = None
    adapters: list[str] = field(default_factory=list)
    model: str | None = None
    dtype: str = "float32"
    opset: int = 0
    device: str = "auto"
    providers: list[str] = field(default_factory=list)
    external_data: bool = False
    files: list[str] = field(default_factory=list)
    weights_bytes: int = 0
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    export_shape: str = ""
    tolerances: dict[str, float] = field(default_factory=dict)
    merge: dict[str, Any] = field(default_factory=dict)
    merge_proof: list[CaseCheck] = field(default_factory=list)
    validation: list[CaseCheck] = field(default_factory=list)
    validated: bool = False
    optimized: str | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    kept_failed: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    load_error: str | None = None

    @property
    def proof_passed(self) -> bool:
        return all(c.passed for c in self.merge_proof)

    @property
    def validation_passed(self) -> bool:
        return all(c.passed for c in self.validation)

    @property
    def passed(self) -> bool:
        """The merge proof (if any) and the validation (if run) passed, and onnxruntime loaded the graph."""
        return self.proof_passed and self.validation_passed and self.load_error is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (``--json`` and ``onnx_export.json``)."""
        doc: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key in ("merge_proof", "validation"):
                doc[key] = [c.to_dict() for c in value]
            else:
                doc[key] = value
        doc["passed"] = self.passed
        return doc

    def summary(self) -> list[str]:
        """The lines the CLI prints."""
        lines = [f"task: {self.task} ({self.task_reason})"]
        if self.merge:
            lines.append(
                f"merged {', '.join(self.adapters)} into {self.base}: {self.merge.get('layers', 0)} layer(s), "
                "tensors: " + ", ".join(f"{v} {k}" for k, v in sorted(self.merge.get("tensors", {}).items()))
            )
        if self.merge_proof:
            verdict = "passed" if self.proof_passed else "FAILED"
            equal = self.merge.get("tensors_equal_to_base")
            lines.append(
                f"merge proof (merged PyTorch model vs base + unmerged adapter, float32, {len(self.merge_proof)} "
                f"shape(s){f'; {equal} other tensors equal to the base' if equal is not None else ''}): {verdict}"
            )
            lines += [f"  {line}" for c in self.merge_proof for line in _case_lines(c)]
        size = f"{self.weights_bytes / 1e6:.1f} MB of weights" + (" in model.onnx.data" if self.external_data else "")
        lines.append(f"exported: opset {self.opset}, {self.dtype}, {size}, example shape {self.export_shape}")
        if self.optimized:
            lines.append(self.optimized)
        if self.validated:
            tol = f"atol {self.tolerances.get('atol', 0):g}, rtol {self.tolerances.get('rtol', 0):g}"
            verdict = "passed" if self.validation_passed else "FAILED"
            lines.append(
                f"validation in onnxruntime on {', '.join(self.providers)} vs PyTorch ({tol}, unmasked positions): "
                f"{verdict}"
            )
            lines += [f"  {line}" for c in self.validation for line in _case_lines(c)]
        else:
            lines.append("validation: skipped (--no-validate)")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.out:
            lines.append(f"published {self.out} ({', '.join(self.files)}) in {self.seconds:.1f} s")
        elif self.kept_failed:
            lines.append(f"nothing published; the failed export is kept at {self.kept_failed}")
        else:
            lines.append("nothing published")
        return lines


def _case_lines(check: CaseCheck) -> list[str]:
    """One line per shape: each output (present key / values folded into one entry)."""
    parts: list[str] = []
    present = [o for o in check.outputs if o.name.startswith("present.")]
    for o in check.outputs:
        if o.name.startswith("present."):
            continue
        top1 = f", top-1 {o.top1_agreement:.0%}" if o.top1_agreement is not None else ""
        parts.append(f"{o.name} max abs {o.max_abs_diff:.2e} rel {o.max_rel_diff:.2e}{top1}")
    if present:
        worst = max(present, key=lambda o: o.max_abs_diff)
        parts.append(f"present.* ({len(present)}) max abs {worst.max_abs_diff:.2e} rel {worst.max_rel_diff:.2e}")
    failed = [o.name for o in check.outputs if not o.passed]
    verdict = "ok" if not failed else f"FAILED ({', '.join(failed[:4])}{' ...' if len(failed) > 4 else ''})"
    return [f"{check.case}: {'; '.join(parts)}: {verdict}"]
