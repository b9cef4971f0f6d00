"""Second moments of every adapted layer's inputs, accumulated while the model runs.

Only the Gram matrices ``X X^T`` (``in x in``, float64) are kept, never the activations. Layers that read the
same input tensor (q, k and v of one attention block) share one matrix: the first batch finds the groups (the
same tensor object reaches them during one forward pass), later batches accumulate each group once.

Padding positions are left out: the tap receives the batch's attention mask, and a layer input with one row per
token of the batch uses only the rows where the mask is 1.

Memory: one ``in x in`` float64 matrix per group of layers sharing an input, on the model's device
(:func:`gram_bytes`); nothing grows with the number of calibration tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from fourier_convert.calibrate.model import AdaptedLayer, CalibModel


@dataclass
class Grams:
    """Gram matrices of adapted layers' inputs.

    Attributes:
        groups: Group leader's module -> ``X X^T`` (float64).
        leader: Module -> the leader of its group.
        tokens: Module -> input rows (tokens) accumulated.
    """

    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    leader: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def of(self, module: str) -> torch.Tensor:
        """The Gram matrix of ``module``'s inputs."""
        return self.groups[self.leader[module]]

    def shared(self) -> list[list[str]]:
        """Groups of more than one module, each in model order."""
        members: dict[str, list[str]] = {}
        for module, lead in self.leader.items():
            members.setdefault(lead, []).append(module)
        return [group for group in members.values() if len(group) > 1]


def gram_bytes(in_features: Iterable[int]) -> int:
    """Bytes of float64 Gram matrices for groups with these input widths.

    Example:
        >>> gram_bytes([384, 384])
        2359296
    """
    return sum(8 * n * n for n in in_features)


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` as ``(tokens, in)``, without padding positions when ``x`` has one row per token of ``mask``.

    Example:
        >>> token_rows(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])).shape
        torch.Size([3, 4])
    """
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0]:
        rows = rows[mask.reshape(-1).to(rows.device).bool()]
    return rows


def collect_grams(model: CalibModel, batches: Iterable[Mapping[str, torch.Tensor]], *, mode: str = "fourier") -> Grams:
    """Run ``model`` in ``mode`` over ``batches`` and accumulate each adapted layer's input Gram matrix.

    Args:
        model: The calibration model.
        batches: Model inputs (``attention_mask`` marks padding where present).
        mode: Whose inputs: ``fourier`` (the FourierFT model's, the default) or ``lora``.

    Returns:
        The Gram matrices (on the model's device).

    Example:
        >>> grams = collect_grams(model, batches(train, 8, pad))  # doctest: +SKIP
    """
    grams = Grams()
    mask: torch.Tensor | None = None
    first: dict[str, torch.Tensor] = {}  # first batch: module -> its input (kept alive to compare identities)

    def tap(layer: AdaptedLayer, x: torch.Tensor) -> None:
        name = layer.name
        if not grams.leader or name not in grams.leader:
            # discovering: a layer whose input is the very tensor an earlier layer read joins its group
            for other, seen in first.items():
                if seen is x:
                    grams.leader[name] = grams.leader[other]
                    first[name] = x
                    return
            first[name] = x
            grams.leader[name] = name
            grams.tokens[name] = 0
        if grams.leader[name] != name:
            return
        rows = token_rows(x.detach(), mask).double()  # float64 products: float32 sums are not even PSD
        g = rows.T @ rows
        if name in grams.groups:
            grams.groups[name] += g
        else:
            grams.groups[name] = g
        grams.tokens[name] += int(rows.shape[0])

    with torch.no_grad(), model.mode(mode), model.tapping(tap):
        for batch in batches:
            mask = batch.get("attention_mask")
            model.run(batch)
            first.clear()
    for name, lead in grams.leader.items():
        grams.tokens[name] = grams.tokens[lead]
    return grams
