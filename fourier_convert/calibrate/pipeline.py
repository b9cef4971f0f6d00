"""The calibrated conversion, start to end: load the model and the data, collect Gram matrices, fit each layer
where the model is used (closed form, optionally sequential), distil, and measure every stage on held-out data.

:func:`fourier_convert.lora.to_lora` drives it: :func:`open_session` loads and measures (the output-space
singular values its rank choices use), :meth:`CalibrationSession.fit` produces the factors and the figures.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fourier_convert.calibrate.distill import DistillResult, distill
from fourier_convert.calibrate.evaluate import Factors, StageFigures, compare_stages
from fourier_convert.calibrate.grams import Grams, collect_grams, gram_bytes
from fourier_convert.calibrate.model import CalibModel, calibration_task, load_calib_model
from fourier_convert.calibrate.sequential import sequential_fit
from fourier_convert.errors import UsageError
from fourier_convert.io.adapter import FourierFTAdapter
from fourier_convert.io.calibration import CalibrationData, batches, collate, pad_token_id, read_calibration
from fourier_convert.io.checkpoint import BaseCheckpoint
from fourier_convert.io.progress import StepProgress, phase
from fourier_convert.maths.calibrated import RIDGE, WeightedFactors, gram_factor, weighted_factors
from fourier_convert.merging.core import resolve_device
from fourier_convert.plan import MergePlan

#: Held-out top-1 agreement below this gets a warning.
POOR_AGREEMENT = 0.9


@dataclass
class CalibrationOptions:
    """How to calibrate (the ``to-lora`` options of the same names).

    Attributes:
        path: Calibration data: a text / JSON Lines / safetensors file, or a folder of images.
        text_field: JSON Lines field holding the text.
        samples: Samples to use in all (fit + held out); None: all, up to the reader's limit.
        max_length: Tokens per sample (longer text is cut).
        held_out: Share of the samples kept for the report.
        seed: Seed of the sample choice, the split and the distillation.
        distill_steps: Distillation steps after the closed form (0: none).
        sequential: Fit layer by layer in model order against the converted model's own inputs.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        task: Model class to load (``auto``: the adapter's task_type, else the base's architecture).
        batch_size: Samples per forward pass.
        lr: Distillation learning rate (relative to each factor's scale).
        patience: Distillation stops after this many validations without improvement.
        ridge: Relative ridge of the Gram matrices.
    """

    path: str | Path
    text_field: str = "text"
    samples: int | None = None
    max_length: int = 512
    held_out: float = 0.2
    seed: int = 0
    distill_steps: int = 0
    sequential: bool = False
    device: str = "auto"
    task: str = "auto"
    batch_size: int = 16
    lr: float = 0.02
    patience: int = 4
    ridge: float = RIDGE


@dataclass
class CalibrationReport:
    """What calibration did and how closely each stage's LoRA model follows the FourierFT model.

    Attributes:
        source: The calibration data given.
        kind: ``text``, ``jsonl``, ``safetensors`` or ``images``.
        task: The model class's task.
        device: Where the model ran.
        fit_samples: Samples the fit used (distillation's validation slice included).
        held_out_samples: Samples kept for the stage figures.
        tokens: Input rows (tokens) per Gram matrix.
        gram_groups: Gram matrices kept (layers reading the same input share one).
        gram_bytes: Their memory (float64).
        seed: Seed of the sample choice, split and distillation.
        output_kept: Module -> share of ``||dW X||^2`` on the fit inputs the chosen rank keeps (closed form).
        stages: Held-out figures per stage, in order (``svd``: plain SVD at the same ranks, for comparison).
        distill: Distillation's record, if it ran.
        seconds: Wall time per phase.
        notes: Things to know.
        warnings: Held-out figures that call for action (poor agreement, worse than the plain SVD); the conversion's
            report carries them among its warnings.
    """

    source: str
    kind: str
    task: str
    device: str
    fit_samples: int
    held_out_samples: int
    tokens: int
    gram_groups: int
    gram_bytes: int
    seed: int = 0
    output_kept: dict[str, float] = field(default_factory=dict)
    stages: list[StageFigures] = field(default_factory=list)
    distill: DistillResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def final(self) -> StageFigures | None:
        """The figures of the factors written (the last stage)."""
        return self.stages[-1] if self.stages else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (each stage with its ``agreement`` share)."""
        return with_agreements(asdict(self), self.stages)

    def lines(self) -> list[str]:
        """The lines the CLI prints: the data, one line per stage, and the notes."""
        grams = f"{self.gram_groups} Gram matrices ({self.gram_bytes / 2**20:.1f} MiB)"
        out = [
            data_line(self.source, self.kind, self.fit_samples, self.held_out_samples, self.tokens, grams)
            + f"; {self.task} on {self.device}"
        ]
        labels = {s.stage: _stage_label(s.stage, self.distill) for s in self.stages}
        compared = "LoRA model against the FourierFT model"
        out += stage_lines(self.stages, labels, self.held_out_samples, compared, "stage")
        out.extend(self.notes)
        return out


def _stage_label(stage: str, result: DistillResult | None) -> str:
    labels = {
        "svd": "plain SVD (no calibration)",
        "closed-form": "closed form (calibrated)",
        "sequential": "sequential closed form",
    }
    if stage == "distilled" and result is not None:
        return f"distilled ({result.steps} steps, best {result.best_step})"
    return labels.get(stage, stage)


@dataclass
class CalibrationSession:
    """A loaded model, its data and Gram matrices, ready to fit (from :func:`open_session`).

    Attributes:
        model: The calibration model.
        data: The calibration samples.
        grams: Gram matrices of the FourierFT model's layer inputs on the fit samples.
        decompositions: Module -> the output-space decomposition of its delta.
        exact_ranks: Module -> the delta's exact rank (caps every rank).
        options: The options.
        report: The report, filled by :meth:`fit`.
        head_loss: Whether distillation also matches the outputs (the adapter trains the head).
    """

    model: CalibModel
    data: CalibrationData
    grams: Grams
    decompositions: dict[str, WeightedFactors]
    exact_ranks: dict[str, int]
    options: CalibrationOptions
    report: CalibrationReport
    head_loss: bool
    pad_id: int
    progress: bool

    def output_values(self, module: str) -> Any:
        """Output-space singular values of ``module``'s delta (descending, numpy, at most its exact rank)."""
        return self.decompositions[module].values[: self.exact_ranks[module]].cpu().numpy()

    def fit(self, ranks: Mapping[str, int], svd_factors: Factors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The calibrated factors at ``ranks``, after every stage asked for; fills ``report.stages``.

        Args:
            ranks: Module -> rank (0: left out).
            svd_factors: The plain SVD's factors at the same ranks (the baseline in the figures).

        Returns:
            Module -> ``(B, A)`` float32 of the last stage (modules of rank 0 left out).
        """
        opts, rep, model = self.options, self.report, self.model
        t0 = time.perf_counter()
        closed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, r in ranks.items():
            if r > 0:
                b, a = self.decompositions[module].factors(r)
                closed[module] = (b.float().cpu(), a.float().cpu())
            dec = self.decompositions[module]
            rep.output_kept[module] = 1.0 - dec.left_out(r)
        rep.seconds["closed_form"] = time.perf_counter() - t0
        stages: dict[str, Factors] = {"svd": svd_factors, "closed-form": closed}
        current = closed
        fit, val = self._fit_split()
        if opts.sequential:
            t0 = time.perf_counter()
            current = sequential_fit(
                model, ranks, self._batches(self.data.train), groups=self._groups(), ridge=opts.ridge, start=current
            )
            rep.seconds["sequential"] = time.perf_counter() - t0
            stages["sequential"] = current
        if opts.distill_steps > 0:
            model.set_factors(current)
            bar = StepProgress(opts.distill_steps, "distill", enabled=self.progress)
            rep.distill = distill(
                model,
                fit,
                val,
                lambda s: collate(s, self.pad_id),
                steps=opts.distill_steps,
                lr=opts.lr,
                batch_size=opts.batch_size,
                seed=opts.seed,
                head_loss=self.head_loss,
                patience=opts.patience,
                progress=lambda step, loss: bar.update(step, f"loss {loss:.4g}" if loss is not None else ""),
            )
            bar.close()
            rep.seconds["distill"] = rep.distill.seconds
            current = {m: f for m, f in model.factors().items() if ranks.get(m, 0) > 0}
            stages["distilled"] = current
        if self.data.held_out:
            phase(self.progress, "to-lora", "evaluating every stage on the held-out samples")
            t0 = time.perf_counter()
            rep.stages = compare_stages(model, self._batches(self.data.held_out), stages)
            rep.seconds["evaluate"] = time.perf_counter() - t0
            self._warn()
        else:
            rep.notes.append("no held-out samples (--held-out 0): nothing measured how the LoRA model behaves")
        return current

    def _fit_split(self) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
        """Distillation's training samples and its validation slice (a tenth of the fit samples, at most 64,
        none when there are fewer than 10); the held-out report samples are never in either."""
        train = list(self.data.train)
        if self.options.distill_steps <= 0 or len(train) < 10:
            return train, []
        k = min(64, max(1, len(train) // 10))
        return train[:-k], train[-k:]

    def _groups(self) -> list[list[str]]:
        """Modules grouped by shared input, groups in model order."""
        groups: dict[str, list[str]] = {}
        for layer in self.model.layers:
            groups.setdefault(self.grams.leader[layer.name], []).append(layer.name)
        return list(groups.values())

    def _batches(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return list(batches(samples, self.options.batch_size, self.pad_id))

    def _warn(self) -> None:
        rep = self.report
        final, first = rep.stages[-1], rep.stages[0]
        agreement = final.agreement
        if agreement is not None and agreement < POOR_AGREEMENT:
            rep.warnings.append(
                f"on the held-out samples the LoRA model predicts what the FourierFT model predicts only "
                f"{agreement:.1%} of the time: raise the rank, add --distill, or calibrate on data like the task's "
                "inputs",
            )
        if final.relative_error > first.relative_error:
            rep.warnings.append(
                "the calibrated LoRA follows the FourierFT model less closely than the plain SVD on the held-out "
                "samples: the calibration data is probably unlike them"
            )


def open_session(
    ckpt: BaseCheckpoint,
    fourier: FourierFTAdapter,
    plan: MergePlan,
    options: CalibrationOptions,
    exact_ranks: Mapping[str, int],
    *,
    progress: bool = False,
) -> CalibrationSession:
    """Load the model and the data, and collect the Gram matrices of the FourierFT model's layer inputs.

    Args:
        ckpt: The base checkpoint.
        fourier: The adapter.
        plan: Its plan.
        options: Calibration options.
        exact_ranks: Module -> exact rank of its delta.
        progress: Print phases on stderr.

    Returns:
        The session.

    Raises:
        UsageError: Bad option values.
        InputFileError: Unreadable or unusable calibration data.
        ExportError: The model cannot be loaded for the task.
    """
    _check_options(options)
    run = run_reference(ckpt, fourier, plan, options, command="to-lora", reference="FourierFT", progress=progress)
    t0 = time.perf_counter()
    factors = gram_factors(run.model, run.grams, options.ridge)
    decompositions = {
        layer.name: weighted_factors(layer.delta.double(), factors[run.grams.leader[layer.name]])
        for layer in run.model.layers
    }
    del factors
    run.seconds["decompose"] = time.perf_counter() - t0
    widths = {lead: int(g.shape[0]) for lead, g in run.grams.groups.items()}
    report = CalibrationReport(
        source=str(options.path),
        kind=run.data.kind,
        task=run.model.task,
        device=str(run.model.device),
        fit_samples=len(run.data.train),
        held_out_samples=len(run.data.held_out),
        tokens=min(run.grams.tokens.values()) if run.grams.tokens else 0,
        gram_groups=len(run.grams.groups),
        gram_bytes=gram_bytes(widths.values()),
        seed=options.seed,
        seconds=run.seconds,
        notes=run.notes,
    )
    report.notes.append(
        "these figures are on held-out samples of the calibration data: they say how the LoRA follows the adapter "
        "on inputs like those; data unlike the task's inputs gives a LoRA that follows it only there (docs/to-lora.md)"
    )
    model, data, grams, pad = run.model, run.data, run.grams, run.pad_id
    return CalibrationSession(
        model,
        data,
        grams,
        decompositions,
        dict(exact_ranks),
        options,
        report,
        head_loss=bool(fourier.head_tensors),
        pad_id=pad,
        progress=progress,
    )


@dataclass
class ReferenceRun:
    """A reference model run over the fit samples (from :func:`run_reference`).

    Attributes:
        model: The calibration model (``fourier`` mode: base + the reference deltas).
        data: The calibration samples.
        grams: Gram matrices of the reference model's layer inputs on the fit samples.
        pad_id: The token id batches are padded with.
        seconds: Wall time per phase so far.
        notes: Things to tell the user (the data reader's, and layers that saw few tokens).
    """

    model: CalibModel
    data: CalibrationData
    grams: Grams
    pad_id: int
    seconds: dict[str, float]
    notes: list[str]


def run_reference(
    ckpt: BaseCheckpoint,
    adapter: FourierFTAdapter,
    plan: MergePlan,
    options: CalibrationOptions,
    *,
    command: str,
    reference: str,
    progress: bool,
    deltas: Mapping[str, torch.Tensor] | None = None,
) -> ReferenceRun:
    """Read the calibration data, load the reference model and collect its layers' input Gram matrices.

    Args:
        ckpt: The base checkpoint.
        adapter: The adapter whose plan, biases and heads the model gets.
        plan: Its plan against ``ckpt``.
        options: Calibration options.
        command: The command's name, for the phase lines.
        reference: What the reference model is (``FourierFT``, ``LoRA``), for the phase lines.
        progress: Print phases on stderr.
        deltas: The reference deltas, if not the adapter's FourierFT deltas (see
            :func:`~fourier_convert.calibrate.model.load_calib_model`).

    Returns:
        The :class:`ReferenceRun`.

    Raises:
        InputFileError: Unreadable or unusable calibration data.
        ExportError: The model cannot be loaded for the task.
        UsageError: A bad task.

    Example:
        >>> run = run_reference(ckpt, adapter, plan, CalibrationOptions("calib.txt"), command="to-lora",
        ...                     reference="FourierFT", progress=False)  # doctest: +SKIP
    """
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(options.device)
    task = calibration_task(adapter, ckpt.config, options.task)
    folder = Path(ckpt.folder)
    data = read_calibration(
        options.path,
        folder,
        ckpt.config or {},
        text_field=options.text_field,
        samples=options.samples,
        max_length=options.max_length,
        held_out=options.held_out,
        seed=options.seed,
    )
    pad = pad_token_id(folder, ckpt.config or {})
    times["read_data"] = time.perf_counter() - t0
    phase(progress, command, f"loading the {reference} model ({task}) on {device}")
    t0 = time.perf_counter()
    model = load_calib_model(ckpt, adapter, plan, task, device, deltas=deltas)
    times["load_model"] = time.perf_counter() - t0
    phase(progress, command, f"running the {reference} model on {len(data.train)} calibration samples")
    t0 = time.perf_counter()
    grams = collect_grams(model, batches(data.train, options.batch_size, pad))
    times["grams"] = time.perf_counter() - t0
    missing = [layer.name for layer in model.layers if layer.name not in grams.leader]
    if missing:
        raise UsageError(
            "--calibration",
            f"no calibration input reached the adapted layer {missing[0]}",
            "pass --task for the model class the adapter was trained on",
        )
    notes = list(data.notes)
    narrow = [m for m in grams.leader if grams.tokens[m] < int(grams.of(m).shape[0])]
    if narrow:
        notes.append(
            f"{len(narrow)} layer(s) saw fewer calibration tokens than their input width (first: {narrow[0]}, "
            f"{grams.tokens[narrow[0]]} tokens): the fit is exact on those inputs and may not generalise; "
            "use more calibration samples"
        )
    return ReferenceRun(model, data, grams, pad, times, notes)


def gram_factors(model: CalibModel, grams: Grams, ridge: float) -> dict[str, torch.Tensor]:
    """Cholesky factor of every Gram matrix (by group leader), with the relative ``ridge``.

    Raises:
        UsageError: A matrix that is not positive definite even with the largest ridge (names the layer).

    Example:
        >>> factors = gram_factors(run.model, run.grams, RIDGE)  # doctest: +SKIP
    """
    out: dict[str, torch.Tensor] = {}
    for layer in model.layers:
        lead = grams.leader[layer.name]
        if lead not in out:
            try:
                out[lead] = gram_factor(grams.groups[lead], ridge)
            except ValueError as exc:
                raise UsageError("--calibration", f"{layer.name}: {exc}", "check the calibration data") from None
    return out


def data_line(source: str, kind: str, fitted: int, held_out: int, tokens: int, grams: str) -> str:
    """The first line of a calibration report: what data, how split, how many tokens, how many Gram matrices."""
    return (
        f"calibration: {fitted} samples fitted, {held_out} held out, from {source} ({kind}); {tokens:,} tokens per "
        f"layer; {grams}"
    )


def with_agreements(doc: dict[str, Any], stages: Sequence[StageFigures]) -> dict[str, Any]:
    """``doc`` (a report's ``asdict``) with each of its ``stages`` given its ``agreement`` share."""
    for stage, figures in zip(doc["stages"], stages, strict=True):
        stage["agreement"] = figures.agreement
    return doc


def stage_lines(
    stages: Sequence[StageFigures], labels: Mapping[str, str], held_out: int, compared: str, column: str
) -> list[str]:
    """The held-out stage table both conversions print: a heading and one line per stage.

    Args:
        stages: The figures, in order.
        labels: Stage name -> its label (names without one are printed as they are).
        held_out: Held-out samples.
        compared: What is compared with what, e.g. ``LoRA model against the FourierFT model``.
        column: The first column's heading.

    Returns:
        The lines (none without stages).
    """
    if not stages:
        return []
    out = [
        f"held-out ({held_out} samples), {compared} on {stages[0].output}:",
        f"  {column:<34} {'top-1 agreement':>22} {'mean err':>10} {'max err':>10} {'rel err':>9}",
    ]
    for s in stages:
        agree = "-" if s.agree is None else f"{s.agree}/{s.total} ({s.agree / max(s.total, 1):.1%})"
        out.append(
            f"  {labels.get(s.stage, s.stage):<34} {agree:>22} {s.mean_error:>10.3g} {s.max_error:>10.3g} "
            f"{s.relative_error:>9.3g}"
        )
    return out


def _check_options(o: CalibrationOptions) -> None:
    if o.distill_steps < 0:
        raise UsageError("--distill", f"{o.distill_steps} steps", "use 0 (none) or a positive count, e.g. 300")
    if o.batch_size < 1:
        raise UsageError("--batch-size", f"{o.batch_size} samples per batch", "use a positive count, e.g. 16")
    if not o.lr > 0:
        raise UsageError("--lr", f"{o.lr} is not a positive learning rate", "use e.g. 0.02")
