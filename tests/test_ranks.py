"""Rank choice: energy shares and the parameter-budget allocation against exhaustive search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fourier_convert.maths.ranks import allocate_budget, choose_rank


def test_choose_rank_fixed_energy_and_caps() -> None:
    s = np.array([4.0, 2.0, 1.0, 1.0])
    assert choose_rank(s, 3) == 3 and choose_rank(s, 9) == 4 and choose_rank(s, 3, max_rank=2) == 2
    assert choose_rank(s, 0.72) == 1 and choose_rank(s, 0.73) == 2 and choose_rank(s, 1.0) == 4
    assert choose_rank(np.zeros(0), 0.5) == 0
    with pytest.raises(ValueError, match=r"1\.5 is neither an integer rank nor a share"):
        choose_rank(s, 1.5)
    with pytest.raises(ValueError, match="is not a positive rank"):
        choose_rank(s, 0)


def _best(values: list[np.ndarray], costs: list[int], budget: int) -> float:
    best = 0.0
    for ranks in itertools.product(*(range(len(v) + 1) for v in values)):
        if sum(r * c for r, c in zip(ranks, costs, strict=True)) <= budget:
            best = max(best, sum(float(np.sum(v[:r] ** 2)) for v, r in zip(values, ranks, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_budget_allocation_against_exhaustive_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(1, 4))
    values = [np.sort(rng.random(int(rng.integers(1, 6))))[::-1] for _ in range(layers)]
    same_shape = seed % 2 == 0
    costs = [7] * layers if same_shape else [int(c) for c in rng.integers(3, 12, layers)]
    budget = int(rng.integers(0, sum(len(v) * c for v, c in zip(values, costs, strict=True)) + 5))
    alloc = allocate_budget(values, costs, budget)
    best = _best(values, costs, budget)
    assert alloc.parameters <= budget
    assert alloc.parameters == sum(r * c for r, c in zip(alloc.ranks, costs, strict=True))
    assert alloc.energy == pytest.approx(
        sum(float(np.sum(v[:r] ** 2)) for v, r in zip(values, alloc.ranks, strict=True))
    )
    assert alloc.energy <= best + 1e-12 <= alloc.upper_bound + 2e-12  # the bound really bounds the optimum
    if same_shape:
        assert alloc.energy == pytest.approx(best)  # one cost per rank: the greedy choice is optimal


def test_budget_respects_max_rank_and_rejects_bad_input() -> None:
    alloc = allocate_budget([np.array([5.0, 4.0, 3.0])], [2], 100, max_rank=2)
    assert alloc.ranks == [2] and alloc.parameters == 4
    with pytest.raises(ValueError, match="negative"):
        allocate_budget([np.ones(2)], [1], -1)
