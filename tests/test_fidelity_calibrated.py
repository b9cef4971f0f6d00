"""Calibrated to-lora on the real MiniLM adapter (fixtures/minilm_cls): the issue's targets, recomputed, and the
calibrated table of docs/fidelity.md checked against what the conversion does now."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import minilm_calibrated as mc
from benchmarks import minilm_fidelity as mf

#: Rows recomputed here (the others are in the page, from ``python benchmarks/minilm_calibrated.py``).
RECOMPUTED = [
    "task: closed form, rank 8",
    "task: distilled, rank 8",
    "task: distilled, rank 4",
    "unrelated: closed form, rank 8",
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mc.CalRow]:
    work: Path = tmp_path_factory.mktemp("calibrated")
    return {r.name: r for r in mc.evaluate(RECOMPUTED, work=work)}


def test_calibrated_rank_8_and_4_follow_the_fourierft_adapter(rows: dict[str, mc.CalRow]) -> None:
    """The targets: closed form alone >= 90 % agreement at rank 8; distilled >= 97 % at rank 8, >= 95 % at
    rank 4 (the plain SVD gets 53 % at rank 8: docs/fidelity.md)."""
    closed, r8, r4 = rows["task: closed form, rank 8"], rows["task: distilled, rank 8"], rows["task: distilled, rank 4"]
    assert closed.agree / closed.total >= 0.90
    assert r8.agree / r8.total >= 0.97
    assert r4.agree / r4.total >= 0.95
    # the report's own held-out figure (on held-out calibration sentences) tells the user the same story
    for row in (closed, r8, r4):
        assert abs(row.report_agree - row.agree / row.total) < 0.05


def test_unrelated_calibration_data_does_not_help(rows: dict[str, mc.CalRow]) -> None:
    unrelated, task = rows["unrelated: closed form, rank 8"], rows["task: closed form, rank 8"]
    assert unrelated.agree / unrelated.total < 0.75 < task.agree / task.total


def test_the_page_shows_what_the_conversion_does_now(rows: dict[str, mc.CalRow]) -> None:
    page = mc.parse_table(mf.DOC.read_text())
    assert set(page) == set(mc.ROWS), "every row of benchmarks/minilm_calibrated.py is on the page"
    for name, row in rows.items():
        want = page[name]
        assert want["total"] == row.total and want["lora_parameters"] == row.lora_parameters
        # the closed form is deterministic up to float rounding; distillation's path depends on the CPU's kernels
        slack = 3 if "closed form" in name else 15
        assert abs(want["agree"] - row.agree) <= slack, name
        assert abs(want["correct"] - row.correct) <= slack, name
