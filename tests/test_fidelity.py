"""A real adapter: fixtures/minilm_cls (FourierFT trained with PEFT on the real MiniLM checkpoint) and its LoRA
conversions. Full rank gives the FourierFT logits in PEFT, retained energy grows with the rank and equals the
dense SVD's, and the table in docs/fidelity.md is what the evaluation computes now."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fourier_convert as fc
from benchmarks import minilm_fidelity as mf
from tests.reference import reference_delta

FIXED_RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[mf.Row], Path]:
    """Every row of the fidelity table, computed once; the converted LoRA folders are kept in the folder."""
    work = tmp_path_factory.mktemp("fidelity")
    return mf.evaluate(mf.FIXTURE, work=work), work


def test_fixture_is_a_small_fourierft_adapter_on_minilm() -> None:
    files = sorted(p.name for p in mf.FIXTURE.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert sum(p.stat().st_size for p in mf.FIXTURE.iterdir()) < 300_000
    config = json.loads((mf.FIXTURE / "adapter_config.json").read_text())
    assert config["peft_type"] == "FOURIERFT" and config["n_frequency"] == mf.N_FREQUENCY
    assert sorted(config["target_modules"]) == sorted(mf.TARGET_MODULES)
    train, test = mf.comparison_dataset()
    assert len(train) == mf.N_TRAIN and len(test) == mf.N_TEST and not set(train) & set(test)
    assert 0.4 < np.mean([y for _, y in test]) < 0.6


def test_full_rank_lora_gives_the_fourierft_logits_in_peft(evaluated: tuple[list[mf.Row], Path]) -> None:
    rows, work = evaluated
    _, test = mf.comparison_dataset()
    sentences = [s for s, _ in test[:200]]
    want = mf.predict_logits(mf.fourierft_model(), sentences)
    got = mf.predict_logits(mf.lora_model(work / "lora-full-exact-rank"), sentences)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = mf.predict_logits(mf.head_only_model(), sentences)
    assert (plain - want).abs().max() > 0.5, "the delta must matter for this comparison to mean anything"
    by = {r.name: r for r in rows}
    full, original = by["LoRA full (exact rank)"], by[mf.FOURIERFT]
    assert full.agree == full.total and full.correct == original.correct
    assert by[mf.HEAD_ONLY].correct < original.correct - 0.2 * original.total


def test_retained_energy_grows_with_rank_and_equals_the_dense_svd() -> None:
    def report(rank: float) -> fc.LoraReport:
        return fc.to_lora(mf.FIXTURE, base=mf.base_model_dir(), rank=rank)[1]

    fixed = {r: report(r) for r in FIXED_RANKS}
    full, share_90, share_50 = report(1.0), report(0.9), report(0.5)
    modules = [x.module for x in full.layers]
    for i, module in enumerate(modules):
        layers = [fixed[r].layers[i] for r in FIXED_RANKS]
        assert all(x.module == module for x in layers)
        energy = [x.retained_energy for x in layers]
        exact = full.layers[i].exact_rank
        # strictly increasing up to the exact rank (every kept singular value is non-zero)
        assert all(b > a for (a, b), r in zip(itertools.pairwise(energy), FIXED_RANKS[1:], strict=True) if r <= exact)
        assert full.layers[i].rank == exact and full.layers[i].retained_energy == pytest.approx(1.0)
        assert share_90.layers[i].retained_energy >= 0.9 > share_50.layers[i].retained_energy
    totals = [fixed[r].retained_energy for r in FIXED_RANKS]
    assert all(b > a for a, b in itertools.pairwise(totals)) and totals[-1] < 1.0

    # the energies are the cumulative squared singular values, and those are the dense float64 SVD's
    values = mf.singular_values(mf.FIXTURE)
    per_layer, _, _ = mf.energy_curves(values)
    for i, layer in enumerate(fixed[8].layers):
        assert per_layer[i, 7] == pytest.approx(layer.retained_energy, rel=1e-6)
    config = json.loads((mf.FIXTURE / "adapter_config.json").read_text())
    spectra = load_file(str(mf.FIXTURE / "adapter_model.safetensors"))
    for module in (modules[0], modules[-1]):
        spectrum = spectra[f"base_model.model.{module}.fourierft_spectrum"].double().numpy()
        dense = reference_delta(spectrum, 384, 384, config["scaling"], config["random_loc_seed"])
        sigma = np.linalg.svd(dense, compute_uv=False)
        ours = values[module]
        np.testing.assert_allclose(ours, sigma[: len(ours)], rtol=1e-5, atol=1e-5 * sigma[0])
        assert sigma[len(ours) :].max(initial=0.0) < 1e-9 * sigma[0]


def test_docs_table_is_what_the_evaluation_gives_now(evaluated: tuple[list[mf.Row], Path]) -> None:
    """docs/fidelity.md's table against a fresh evaluation. Counts may differ by one sentence (a logit margin
    within float rounding of zero on another CPU / BLAS); everything else as printed."""
    rows, _ = evaluated
    doc = mf.parse_table(mf.DOC.read_text())
    assert list(doc) == [r.name for r in rows]
    for r in rows:
        d = doc[r.name]
        assert (d["total"], d["lora_parameters"], d["rank"]) == (r.total, r.lora_parameters, r.rank), r.name
        assert abs(d["correct"] - r.correct) <= 1 and abs(d["agree"] - r.agree) <= 1, r.name
        if r.energy is None:
            assert d["energy"] is None
        else:
            assert d["energy"] == pytest.approx(r.energy, abs=0.0006), r.name
        for key in ("max_logit_error", "mean_logit_error"):
            got = getattr(r, key)
            assert abs(d[key] - got) <= max(0.06 * got, 1e-4), (r.name, key, d[key], got)
