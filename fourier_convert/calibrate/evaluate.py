"""How closely a LoRA model follows the FourierFT model on held-out calibration inputs.

For each *stage* of a conversion (plain SVD, closed form, distilled: a set of LoRA factors per layer), on the
same held-out batches:

* model level: the LoRA model's outputs against the FourierFT model's (logits where the model has them, else
  the last hidden state): top-1 agreement (per sequence for classifiers, per token for language models and
  token classifiers; none for feature extractors), mean / max absolute and relative error;
* layer level: each adapted layer's inputs are the FourierFT model's real activations; the error of the LoRA
  delta, ``||(B A - dW) x||``, relative to the adapter's own contribution ``||dW x||`` and to the layer's
  output ``||(W + dW) x + b||``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fourier_convert.calibrate.grams import token_rows
from fourier_convert.calibrate.model import AdaptedLayer, CalibModel

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LayerFigures:
    """One layer on the held-out inputs.

    Attributes:
        delta_error: ``||(B A - dW) X|| / ||dW X||``.
        output_error: ``||(B A - dW) X|| / ||(W + dW) X + b||``.
    """

    delta_error: float
    output_error: float


@dataclass
class StageFigures:
    """One stage's LoRA model against the FourierFT model on the held-out inputs.

    Attributes:
        stage: ``svd``, ``closed-form``, ``sequential`` or ``distilled``.
        output: What was compared: ``logits`` or ``last_hidden_state``.
        agree: Predictions equal to the FourierFT model's (None without logits).
        total: Predictions compared (sequences or tokens).
        mean_error: Mean ``|out - out_fourier|``.
        max_error: Max of the same.
        relative_error: ``||out - out_fourier|| / ||out_fourier||`` over all held-out outputs.
        layers: Module -> its figures.
    """

    stage: str
    output: str
    agree: int | None
    total: int
    mean_error: float
    max_error: float
    relative_error: float
    layers: dict[str, LayerFigures] = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        """``agree / total`` (None without logits)."""
        return None if self.agree is None else self.agree / max(self.total, 1)


@dataclass
class _Sums:
    agree: int = 0
    total: int = 0
    abs_sum: float = 0.0
    count: int = 0
    max_error: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    layer: dict[str, list[float]] = field(default_factory=dict)  # module -> [err^2, own^2, out^2]


def compare_stages(
    model: CalibModel, held_out: Iterable[Mapping[str, torch.Tensor]], stages: Mapping[str, Factors]
) -> list[StageFigures]:
    """Compare each stage's LoRA model with the FourierFT model on the held-out batches.

    Args:
        model: The calibration model (its current factors are restored afterwards).
        held_out: Held-out batches.
        stages: Stage name -> module -> ``(B, A)``, in report order.

    Returns:
        One :class:`StageFigures` per stage, in the order given.

    Example:
        >>> figures = compare_stages(model, batches(held, 8, pad), {"svd": svd, "closed-form": closed})
        ... # doctest: +SKIP
    """
    saved = model.factors()
    on_device = {
        stage: {m: (b.to(model.device), a.to(model.device)) for m, (b, a) in factors.items()}
        for stage, factors in stages.items()
    }

    def use(stage: str | None) -> None:
        if stage is not None:
            model.set_factors(stages[stage])

    def layer_delta(stage: str, layer: AdaptedLayer, rows: torch.Tensor) -> torch.Tensor:
        factors = on_device[stage].get(layer.name)
        if factors is None:
            return rows.new_zeros(rows.shape[0], layer.delta.shape[0])
        b, a = factors
        return (rows @ a.T) @ b.T

    try:
        return _compare(model, held_out, list(stages), use, "lora", layer_delta)
    finally:
        model.set_factors(saved)


def compare_deltas(
    model: CalibModel,
    held_out: Iterable[Mapping[str, torch.Tensor]],
    stages: Mapping[str, Mapping[str, torch.Tensor]],
) -> list[StageFigures]:
    """Compare the model with other dense deltas in its adapted layers against the model as loaded (the
    reference: every layer with the delta it holds; for ``from-lora`` the LoRA deltas).

    The figures are those of :func:`compare_stages`, with each stage's deltas swapped into the layers' ``delta``
    buffers instead of LoRA factors.

    Args:
        model: The calibration model (its layers' deltas are restored afterwards).
        held_out: Held-out batches.
        stages: Stage name -> module -> ``(out, in)`` float32 delta on the model's device, for every adapted layer.

    Returns:
        One :class:`StageFigures` per stage, in the order given.

    Raises:
        KeyError: A stage lacks a delta for an adapted layer.
        ValueError: A stage's delta has another shape than the layer's.

    Example:
        >>> figures = compare_deltas(model, batches(held, 8, pad), {"plain": plain, "calibrated": fitted})
        ... # doctest: +SKIP
    """
    reference = {layer.name: layer.delta for layer in model.layers}
    for deltas in stages.values():
        for layer in model.layers:
            if tuple(deltas[layer.name].shape) != tuple(layer.delta.shape):
                raise ValueError(
                    f"{layer.name}: a delta of shape {tuple(deltas[layer.name].shape)} for a layer of "
                    f"{tuple(layer.delta.shape)}"
                )

    def use(stage: str | None) -> None:
        chosen = reference if stage is None else stages[stage]
        for layer in model.layers:
            layer.delta = chosen[layer.name]

    def layer_delta(stage: str, layer: AdaptedLayer, rows: torch.Tensor) -> torch.Tensor:
        return rows @ stages[stage][layer.name].T

    try:
        return _compare(model, held_out, list(stages), use, "fourier", layer_delta)
    finally:
        use(None)


def _compare(
    model: CalibModel,
    held_out: Iterable[Mapping[str, torch.Tensor]],
    names: list[str],
    use: Callable[[str | None], None],
    student_mode: str,
    layer_delta: Callable[[str, AdaptedLayer, torch.Tensor], torch.Tensor],
) -> list[StageFigures]:
    """The comparison loop: per batch, the reference model (``use(None)``, ``fourier`` mode) with every layer's
    real inputs tapped, then each stage (``use(stage)``, ``student_mode``) on the same batch."""
    sums = {stage: _Sums() for stage in names}
    output = "logits"
    mask: torch.Tensor | None = None

    def layer_tap(layer: AdaptedLayer, x: torch.Tensor) -> None:
        rows = token_rows(x.detach(), mask).to(layer.delta.dtype)
        own = rows @ layer.delta.T
        out = layer.base_layer(rows).to(own.dtype) + own
        own_sq, out_sq = float((own.double() ** 2).sum()), float((out.double() ** 2).sum())
        for stage in names:
            err = layer_delta(stage, layer, rows) - own
            acc = sums[stage].layer.setdefault(layer.name, [0.0, 0.0, 0.0])
            acc[0] += float((err.double() ** 2).sum())
            acc[1] += own_sq
            acc[2] += out_sq

    with torch.no_grad():
        for batch in held_out:
            mask = batch.get("attention_mask")
            use(None)
            with model.mode("fourier"), model.tapping(layer_tap):
                ref, output = _output(model.run(batch))
            for stage in names:
                use(stage)
                with model.mode(student_mode):
                    got, _ = _output(model.run(batch))
                _accumulate(sums[stage], output, ref, got, mask)
    return [_figures(stage, output, sums[stage]) for stage in names]


def _output(out: Any) -> tuple[torch.Tensor, str]:
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits.float(), "logits"
    return out.last_hidden_state.float(), "last_hidden_state"


def _accumulate(s: _Sums, output: str, ref: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None) -> None:
    if ref.ndim == 3 and mask is not None and ref.shape[:2] == mask.shape:  # one row per real token
        keep = mask.to(ref.device).bool()
        ref, got = ref[keep], got[keep]
    diff = (got - ref).abs()
    s.abs_sum += float(diff.double().sum())
    s.count += diff.numel()
    s.max_error = max(s.max_error, float(diff.max()) if diff.numel() else 0.0)
    s.diff_sq += float((diff.double() ** 2).sum())
    s.ref_sq += float((ref.double() ** 2).sum())
    ref, got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    s.total += int(ref.shape[0])
    if output == "logits" and ref.shape[-1] > 1 and s.agree >= 0:
        s.agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
    else:
        s.agree = -1  # no class predictions (feature extraction, regression)


def _figures(stage: str, output: str, s: _Sums) -> StageFigures:
    layers = {
        m: LayerFigures(
            float((e / own) ** 0.5) if own > 0 else 0.0,
            float((e / out) ** 0.5) if out > 0 else 0.0,
        )
        for m, (e, own, out) in s.layer.items()
    }
    return StageFigures(
        stage=stage,
        output=output,
        agree=None if s.agree < 0 else s.agree,
        total=s.total,
        mean_error=s.abs_sum / max(s.count, 1),
        max_error=s.max_error,
        relative_error=(s.diff_sq / s.ref_sq) ** 0.5 if s.ref_sq > 0 else 0.0,
        layers=layers,
    )
