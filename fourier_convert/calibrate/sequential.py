"""The sequential closed form: fit layer groups in model order, each against the FourierFT model's output given
the inputs the partly converted model actually produces.

The per-layer closed form fits ``B A`` to ``dW`` on the FourierFT model's own inputs ``X``; in the converted
model, earlier layers' approximation errors change what reaches a layer (``X~``). Here each group of layers
sharing an input (q, k, v of one block), in model order, is fitted with every earlier group already converted:

    min over rank-r B A of || (W + dW) X + b  -  ((W + B A) X~ + b) ||_F

a reduced-rank regression of the target ``T = (W + dW) X - W X~`` on ``X~``
(:func:`~fourier_convert.maths.calibrated.reduced_rank_fit`), so later layers correct what earlier ones lost.
Only second moments are kept (``X~ X~^T`` per group, ``T X~^T`` per layer). Each group costs one teacher and
one student forward pass over the fit samples, cut short just after the group's input is seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch

from fourier_convert.calibrate.grams import token_rows
from fourier_convert.calibrate.model import AdaptedLayer, CalibModel
from fourier_convert.maths.calibrated import RIDGE, gram_factor, reduced_rank_fit


class _Seen(Exception):
    """Raised by the tap once the group's input has been captured: the rest of the forward pass is not needed."""


def sequential_fit(
    model: CalibModel,
    ranks: Mapping[str, int],
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    groups: Sequence[Sequence[str]],
    ridge: float = RIDGE,
    start: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Refit every layer in model order against the FourierFT model's outputs on the converted model's inputs.

    Args:
        model: The calibration model.
        ranks: Module -> rank (rank-0 layers are skipped and stay out of the LoRA).
        batches: Fit batches.
        groups: Modules grouped by shared input, groups in model order.
        ridge: Relative ridge of the Gram matrices.
        start: Factors before (used for nothing but the layers a group leaves as they were).

    Returns:
        Module -> ``(B, A)`` float32 (CPU), for every module of rank > 0.

    Example:
        >>> fitted = sequential_fit(model, ranks, fit_batches, groups=groups, start=closed)  # doctest: +SKIP
    """
    by_name = {layer.name: layer for layer in model.layers}
    result = {m: f for m, f in start.items() if ranks.get(m, 0) > 0}
    saved_modes = {layer.name: layer.mode for layer in model.layers}
    model.set_factors(result)
    done: set[str] = set()
    try:
        for group in groups:
            layers = [by_name[m] for m in group if ranks.get(m, 0) > 0]
            if layers:
                for module, factors in _fit_group(model, layers, ranks, batches, done, ridge).items():
                    result[module] = factors
                    by_name[module].set_factors(*factors)
            done.update(group)
    finally:
        for layer in model.layers:
            layer.mode = saved_modes[layer.name]
    return result


def _fit_group(
    model: CalibModel,
    layers: list[AdaptedLayer],
    ranks: Mapping[str, int],
    batches: Sequence[Mapping[str, torch.Tensor]],
    done: set[str],
    ridge: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    first = layers[0]
    width = int(first.delta.shape[1])
    dev = first.delta.device
    gram = torch.zeros(width, width, dtype=torch.float64, device=dev)
    cross = {layer.name: torch.zeros(layer.delta.shape, dtype=torch.float64, device=dev) for layer in layers}
    energy = dict.fromkeys(cross, 0.0)
    captured: list[torch.Tensor] = []

    def tap(layer: AdaptedLayer, x: torch.Tensor) -> None:
        if layer is first:
            captured.append(x.detach())
            raise _Seen

    def capture(batch: Mapping[str, torch.Tensor], converted: set[str]) -> torch.Tensor:
        captured.clear()
        for layer in model.layers:
            layer.mode = "lora" if layer.name in converted else "fourier"
        with model.tapping(tap), contextlib.suppress(_Seen):
            model.run(batch)
        if not captured:
            raise RuntimeError(f"{first.name}: the forward pass never reached this layer")
        return captured[0]

    with torch.no_grad():
        for batch in batches:
            mask = batch.get("attention_mask")
            x_f = token_rows(capture(batch, set()), mask).float()
            x_s = token_rows(capture(batch, done), mask).float()
            s64 = x_s.double()
            gram += s64.T @ s64
            for layer in layers:
                target = (layer.base_layer(x_f) + x_f @ layer.delta.T - layer.base_layer(x_s)).double()
                cross[layer.name] += target.T @ s64
                energy[layer.name] += float((target**2).sum())
    factor = gram_factor(gram, ridge)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in layers:
        fit, _ = reduced_rank_fit(cross[layer.name], factor, energy[layer.name])
        b, a = fit.factors(ranks[layer.name])
        out[layer.name] = (b.float().cpu(), a.float().cpu())
    return out
