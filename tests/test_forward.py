"""The merged model's outputs equal the unmerged PeftModel's (float32), loaded with the matching AutoModel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fourier_convert as fc
from tests.conftest import FIXTURE_NAMES, FIXTURES


def load_task_model(name: str, folder: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    if name in ("llama", "gpt2"):
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    if name == "vit":
        return AutoModelForImageClassification.from_pretrained(folder).eval()
    kwargs = {"num_labels": 2} if name == "bert_head" and "base" in folder.name else {}
    return AutoModelForSequenceClassification.from_pretrained(folder, **kwargs).eval()


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    ids = torch.randint(3, 200, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_merged_logits_equal_unmerged_peft(name: str, tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "merged"
    fc.merge(FIXTURES / name / "base", FIXTURES / name / "adapter", out, device="cpu")
    x = _inputs(name)
    peft_model = PeftModel.from_pretrained(
        load_task_model(name, FIXTURES / name / "base"), str(FIXTURES / name / "adapter")
    ).eval()
    with torch.no_grad():
        want = peft_model(**x).logits
        got = load_task_model(name, out)(**x).logits
        plain = load_task_model(name, FIXTURES / name / "base")(**x).logits
    assert not torch.allclose(plain, want, atol=1e-4), (
        "the adapter must change the outputs for this test to mean anything"
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
