"""inspect: adapter facts, and with a base, shapes, exact delta norms and energy shares."""

from __future__ import annotations

import numpy as np
import pytest

from fourier_convert import inspect_adapter
from tests.conftest import FIXTURES
from tests.reference import load_model_tensors, reference_merge


def test_adapter_only() -> None:
    r = inspect_adapter(FIXTURES / "llama" / "adapter")
    assert r.scaling == 150.0 and r.random_loc_seed == 777 and r.bias == "none"
    assert sorted({layer.n for layer in r.layers}) == [30, 50]
    assert r.trainable_parameters == 2 * 50 + 2 * 30
    assert all(layer.shape is None for layer in r.layers)


def test_with_base_norms_equal_reference() -> None:
    r = inspect_adapter(FIXTURES / "gpt2" / "adapter", base=FIXTURES / "gpt2" / "base")
    conv = {layer.module for layer in r.layers}
    ref = reference_merge(FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", conv1d_modules=conv)
    base = load_model_tensors(FIXTURES / "gpt2" / "base")
    for layer in r.layers:
        key = f"{layer.module}.weight"
        want = float(np.linalg.norm(ref[key] - base[key].double().numpy()))
        assert layer.conv1d is True
        assert layer.delta_norm == pytest.approx(want, rel=1e-9)
        assert 0 < layer.energy_top["1%"] <= layer.energy_top["10%"] <= layer.energy_top["50%"] <= 1.0 + 1e-12
    assert r.trainable_parameters == 8 * 40 + sum(base[f"{m}.bias"].numel() for m in conv)


def test_lines_mention_everything() -> None:
    text = "\n".join(inspect_adapter(FIXTURES / "roberta" / "adapter", base=FIXTURES / "roberta" / "base").lines())
    for needle in ("bias:             all", "classifier", "trainable params", "out x in", "SEQ_CLS"):
        assert needle in text
