"""Calibrated ``from-lora``: LoRA -> FourierFT coefficients fitted on the layers' real inputs.

The LoRA model (the base with every LoRA delta added densely) runs on the calibration data; the Gram matrix
``X X^T`` of every adapted layer's inputs is collected (:mod:`fourier_convert.calibrate.grams`), and each layer's
coefficients minimise ``||(dW_lora - dW_fourier) X||_F`` on the fixed support
(:func:`~fourier_convert.maths.project.project_lowrank_weighted`). Held-out samples measure how closely the
FourierFT model follows the LoRA model, with the plain least-squares coefficients and with the calibrated ones
(:func:`~fourier_convert.calibrate.evaluate.compare_deltas`). :func:`fourier_convert.from_lora` drives it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fourier_convert.calibrate.evaluate import StageFigures, compare_deltas
from fourier_convert.calibrate.pipeline import (
    CalibrationOptions,
    data_line,
    gram_factors,
    run_reference,
    stage_lines,
    with_agreements,
)
from fourier_convert.errors import FourierConvertError, UsageError
from fourier_convert.io.adapter import FourierFTAdapter
from fourier_convert.io.calibration import batches
from fourier_convert.io.checkpoint import BaseCheckpoint, open_checkpoint
from fourier_convert.io.lora_adapter import LoraAdapterIn
from fourier_convert.io.progress import phase
from fourier_convert.maths.delta import delta_weights
from fourier_convert.maths.project import Projection, WeightedProjection, project_lowrank_weighted
from fourier_convert.plan import MergePlan

#: A layer keeping less of the LoRA delta's output energy than this is called out (as from-lora's LOW_ENERGY).
LOW_ENERGY = 0.5


@dataclass
class CalibratedLayer:
    """One layer's figures with calibration.

    Attributes:
        output_kept_plain: Share of ``||dW_lora X||^2`` on the fit inputs that the plain fit reproduces,
            ``1 - ||(dW_lora - dW_plain) X||^2 / ||dW_lora X||^2`` (Gram matrix with its ridge; may be negative).
        output_kept: The same for the calibrated fit (the coefficients written).
        held_out_plain: Held-out ``||(dW_plain - dW_lora) X|| / ||dW_lora X||`` on the LoRA model's layer inputs
            (None without held-out samples).
        held_out_error: The same for the calibrated fit.
    """

    output_kept_plain: float
    output_kept: float
    held_out_plain: float | None = None
    held_out_error: float | None = None


@dataclass
class FromLoraCalibration:
    """What calibration did and how closely the FourierFT model follows the LoRA model.

    Attributes:
        source: The calibration data given.
        kind: ``text``, ``jsonl``, ``safetensors`` or ``images``.
        task: The model class's task.
        device: Where the model ran.
        fit_samples: Samples the Gram matrices were collected on.
        held_out_samples: Samples kept for the stage figures.
        tokens: Input rows (tokens) per Gram matrix (the smallest count).
        gram_groups: Gram matrices kept (layers reading the same input share one).
        seed: Seed of the sample choice and split.
        layers: Module -> its figures.
        stages: Held-out figures of the FourierFT model against the LoRA model: ``plain`` (the plain least-squares
            coefficients) and ``calibrated`` (those written), with per-layer errors.
        seconds: Wall time per phase.
        notes: Things to know.
    """

    source: str
    kind: str
    task: str
    device: str
    fit_samples: int
    held_out_samples: int
    tokens: int
    gram_groups: int
    seed: int
    layers: dict[str, CalibratedLayer] = field(default_factory=dict)
    stages: list[StageFigures] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageFigures | None:
        """The figures of stage ``name`` (``plain`` or ``calibrated``), None when nothing was held out."""
        return next((s for s in self.stages if s.stage == name), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (each stage with its ``agreement`` share)."""
        return with_agreements(asdict(self), self.stages)

    def lines(self) -> list[str]:
        """The lines the CLI prints: the data, one line per stage, and the notes."""
        grams = f"{self.gram_groups} Gram matrices"
        out = [
            data_line(self.source, self.kind, self.fit_samples, self.held_out_samples, self.tokens, grams)
            + f"; {self.task} on {self.device}"
        ]
        labels = {"plain": "plain (weight space)", "calibrated": "calibrated (written)"}
        out += stage_lines(self.stages, labels, self.held_out_samples, "FourierFT model against the LoRA model", "fit")
        out.extend(self.notes)
        return out


def calibration_options(
    calibration: str | Path | CalibrationOptions | None, device: str | None
) -> CalibrationOptions | None:
    """The options :func:`from_lora` calibrates with (None without calibration data), refusing what does not
    apply to from-lora."""
    if calibration is None:
        if device is not None:
            raise UsageError("--device", "has no effect without --calibration", "pass --calibration DATA as well")
        return None
    options = calibration if isinstance(calibration, CalibrationOptions) else CalibrationOptions(path=calibration)
    if device is not None:
        options = replace(options, device=device)
    if options.distill_steps:
        raise UsageError(
            "--distill",
            f"{options.distill_steps} distillation steps asked for, but from-lora has no distillation (its "
            "calibrated coefficients are an exact least-squares solve)",
            "leave --distill out",
        )
    if options.sequential:
        raise UsageError(
            "--sequential",
            "does not apply to from-lora (every layer is fitted on the LoRA model's own inputs)",
            "leave --sequential out",
        )
    if isinstance(options.batch_size, bool) or options.batch_size < 1:
        raise UsageError("--batch-size", f"{options.batch_size} samples per batch", "use a positive count, e.g. 16")
    if not options.ridge > 0:
        raise UsageError("ridge", f"{options.ridge} is not a positive relative ridge", "use e.g. 1e-6")
    return options


def calibration_base(base: str | Path | None, lora: LoraAdapterIn) -> BaseCheckpoint:
    """The base a calibrated conversion runs (its weights and tokenizer are read): ``base``, else the adapter's."""
    if base is not None:
        return open_checkpoint(base)
    implicit = lora.settings.base_model_name_or_path
    if not implicit:
        raise UsageError(
            "--calibration",
            "runs the LoRA model, but no --base was given and the adapter names no base",
            "pass --base with the base model's folder (weights and tokenizer)",
        )
    try:
        return open_checkpoint(implicit)
    except FourierConvertError as exc:
        raise UsageError(
            "--calibration",
            f"runs the LoRA model, but the adapter's base {implicit!r} could not be opened ({exc.found})",
            "pass --base with the base model's folder (weights and tokenizer)",
        ) from None


def calibrate(
    ckpt: BaseCheckpoint,
    out_adapter: FourierFTAdapter,
    plan: MergePlan,
    lora: LoraAdapterIn,
    positions: Mapping[str, np.ndarray],
    fits: Mapping[str, Projection],
    scaling: float,
    options: CalibrationOptions,
    progress: bool,
) -> tuple[dict[str, WeightedProjection], FromLoraCalibration]:
    """Run the LoRA model on the calibration data, fit every layer on its inputs' Gram matrix, and compare the
    plain and the calibrated FourierFT models with the LoRA model on the held-out samples."""
    deltas = {
        module: torch.from_numpy(mod.scale * (mod.b @ mod.a)) for module, mod in lora.modules.items()
    }  # (out, in) float64, as PEFT's LoRA adds it
    run = run_reference(
        ckpt, out_adapter, plan, options, command="from-lora", reference="LoRA", progress=progress, deltas=deltas
    )
    del deltas
    model, data, grams, pad, times = run.model, run.data, run.grams, run.pad_id, run.seconds
    dev, task = model.device, model.task
    phase(progress, "from-lora", "fitting the coefficients on the layer inputs")
    t0 = time.perf_counter()
    factors = gram_factors(model, grams, options.ridge)
    weighted: dict[str, WeightedProjection] = {}
    figures: dict[str, CalibratedLayer] = {}
    for module, mod in lora.modules.items():
        lead = grams.leader[module]
        fit = project_lowrank_weighted(
            mod.b,
            mod.a,
            mod.scale,
            positions[module],
            scaling,
            grams.groups[lead],
            options.ridge,
            factor=factors[lead],
            baseline=fits[module].values,
        )
        weighted[module] = fit
        figures[module] = CalibratedLayer(fit.baseline_retained or 0.0, fit.retained)
    del factors
    times["fit"] = time.perf_counter() - t0
    tokens = min(grams.tokens.values()) if grams.tokens else 0
    cal = FromLoraCalibration(
        source=str(options.path),
        kind=data.kind,
        task=task,
        device=str(dev),
        fit_samples=len(data.train),
        held_out_samples=len(data.held_out),
        tokens=tokens,
        gram_groups=len(grams.groups),
        seed=options.seed,
        layers=figures,
        seconds=times,
        notes=run.notes,
    )
    del grams
    if data.held_out:
        phase(progress, "from-lora", f"comparing with the LoRA model on {len(data.held_out)} held-out samples")
        t0 = time.perf_counter()
        stages: dict[str, dict[str, torch.Tensor]] = {"plain": {}, "calibrated": {}}
        for module, mod in lora.modules.items():
            m, n_in = mod.shape
            for stage, values in (("plain", fits[module].values), ("calibrated", weighted[module].values)):
                stored = torch.from_numpy(values).float().double()  # the float32 coefficients as written
                delta = delta_weights(
                    stored, torch.from_numpy(positions[module]), m, n_in, scaling, dtype=torch.float64
                )
                stages[stage][module] = delta.to(dev, torch.float32)
        cal.stages = compare_deltas(model, batches(data.held_out, options.batch_size, pad), stages)
        for module, row in figures.items():
            row.held_out_plain = cal.stages[0].layers[module].delta_error
            row.held_out_error = cal.stages[1].layers[module].delta_error
        times["evaluate"] = time.perf_counter() - t0
        cal.notes.append(
            "these figures are on held-out samples of the calibration data: they say how the FourierFT adapter "
            "follows the LoRA on inputs like those; data unlike the task's inputs fits it only there "
            "(docs/from-lora.md)"
        )
    else:
        cal.notes.append("no held-out samples (--held-out 0): nothing measured how the FourierFT model behaves")
    return weighted, cal
