"""Choosing LoRA ranks from singular values: fixed, energy share, parameter budget, serving-stack rank sets.

Pure functions of singular values and layer shapes; they know nothing of adapters or files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The values vLLM accepts for ``--max-lora-rank`` (formats.md): it serves adapters of any rank up to the one given.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def choose_rank(values: np.ndarray, rank: float, max_rank: int | None = None) -> int:
    """Rank for one layer with singular values ``values`` (descending).

    An ``int`` is a fixed rank; a ``float`` in (0, 1] is the smallest rank keeping that share of the energy
    (``sum sigma^2``). Both are capped by ``max_rank`` and by the exact rank ``len(values)``.

    Args:
        values: Singular values, descending, zeros dropped.
        rank: Fixed rank (int >= 1) or energy share (float in (0, 1]).
        max_rank: Optional cap.

    Returns:
        The rank, between 0 and ``len(values)``.

    Raises:
        ValueError: ``rank`` is not a positive int or a float in (0, 1].

    Example:
        >>> s = np.array([3.0, 2.0, 1.0])
        >>> choose_rank(s, 0.9), choose_rank(s, 2), choose_rank(s, 0.9, 1), choose_rank(s, 10)
        (2, 2, 1, 3)
    """
    exact = len(values)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank <= 0:
        raise ValueError(f"{rank!r} is not a positive rank or energy share")
    if isinstance(rank, int):
        r = rank
    else:
        if rank > 1.0:
            raise ValueError(f"{rank} is neither an integer rank nor a share in (0, 1]")
        cum = np.cumsum(np.asarray(values, dtype=np.float64) ** 2)
        r = int(np.searchsorted(cum, rank * cum[-1] * (1 - 1e-12)) + 1) if exact else 0
    if max_rank is not None:
        r = min(r, max_rank)
    return max(0, min(r, exact))


@dataclass(frozen=True)
class BudgetAllocation:
    """Per-layer ranks chosen under a parameter budget.

    Attributes:
        ranks: Rank per layer, in the order given.
        parameters: LoRA parameters they use (``sum r * (out + in)``), at most the budget.
        energy: Energy they keep (sum of the kept ``sigma^2`` over all layers).
        upper_bound: No choice of ranks within the budget keeps more energy than this (the fractional
            relaxation); ``energy / upper_bound`` says how close the allocation is to the optimum.
    """

    ranks: list[int]
    parameters: int
    energy: float
    upper_bound: float


def allocate_budget(
    values: Sequence[np.ndarray], costs: Sequence[int], budget: int, max_rank: int | None = None
) -> BudgetAllocation:
    """Per-layer ranks that keep the most total energy for at most ``budget`` LoRA parameters.

    Rank ``r`` of a layer costs ``r * (out + in)`` parameters and keeps its ``r`` largest ``sigma^2``. Every
    singular value is a unit of value ``sigma^2`` and cost ``out + in``; within a layer the units come in
    decreasing order at one cost, so taking units in decreasing ``sigma^2 / cost`` order, each when it still
    fits, always takes a prefix of every layer. This greedy choice is optimal when all layers cost the same
    per rank (one shape); otherwise it can miss the optimum by less than one unit per shape, and
    ``upper_bound`` (the fractional relaxation) bounds the gap.

    Args:
        values: Singular values per layer, each descending.
        costs: ``out + in`` per layer.
        budget: Parameter budget (>= 0).
        max_rank: Optional cap on every layer's rank.

    Returns:
        The allocation.

    Raises:
        ValueError: Negative budget, non-positive costs, or mismatched lengths.

    Example:
        >>> a = allocate_budget([np.array([4.0, 1.0]), np.array([3.0, 2.0])], [10, 10], 30)
        >>> a.ranks, a.parameters, a.energy
        ([1, 2], 30, 29.0)
    """
    if budget < 0:
        raise ValueError(f"budget {budget} is negative")
    if len(values) != len(costs) or any(c <= 0 for c in costs):
        raise ValueError("one positive cost per layer is needed")
    caps = [len(v) if max_rank is None else min(len(v), max_rank) for v in values]
    energy = [np.asarray(v[:cap], dtype=np.float64) ** 2 for v, cap in zip(values, caps, strict=True)]
    layer = np.concatenate(
        [np.full(len(e), i, dtype=np.int64) for i, e in enumerate(energy)] or [np.zeros(0, np.int64)]
    )
    gain = np.concatenate(energy or [np.zeros(0)])
    cost = np.asarray(costs, dtype=np.int64)[layer]
    order = np.lexsort((np.arange(len(gain)), -gain / np.maximum(cost, 1)))
    ranks = [0] * len(values)
    left = budget
    kept = 0.0
    bound = None
    for i in order.tolist():
        c = int(cost[i])
        if c <= left:
            ranks[int(layer[i])] += 1
            left -= c
            kept += float(gain[i])
        elif bound is None:  # the first unit that does not fit: the relaxation takes a fraction of it
            bound = kept + float(gain[i]) * left / c
    return BudgetAllocation(ranks, budget - left, kept, kept if bound is None else max(bound, kept))
