"""to-lora: PEFT loads the output, full rank is lossless, truncation matches the dense-SVD oracle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fourier_convert as fc
from fourier_convert.lora import to_lora
from tests.conftest import FIXTURES
from tests.reference import load_model_tensors, reference_merge
from tests.test_forward import _inputs, load_task_model
from tests.test_merge import GPT2_CONV1D


def _peft_lora_model(name: str, lora_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_task_model(name, FIXTURES / name / "base"), str(lora_dir)).eval()


@pytest.mark.parametrize("name", ["llama", "gpt2", "roberta"])
def test_full_rank_lora_reproduces_the_fourierft_model(name: str, tmp_path: Path) -> None:
    lora, report = to_lora(FIXTURES / name / "adapter", base=FIXTURES / name / "base", rank=1.0)
    assert all(x.rank == x.exact_rank and x.relative_error < 1e-6 for x in report.layers)
    lora.save(tmp_path / "lora")
    merged = tmp_path / "merged"
    fc.merge(FIXTURES / name / "base", FIXTURES / name / "adapter", merged, device="cpu")
    x = _inputs(name)
    with torch.no_grad():
        want = load_task_model(name, merged)(**x).logits
        got = _peft_lora_model(name, tmp_path / "lora")(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_low_rank_error_equals_the_dense_svd_oracle(tmp_path: Path) -> None:
    lora, report = to_lora(FIXTURES / "gpt2" / "adapter", base=FIXTURES / "gpt2" / "base", rank=4)
    ref = reference_merge(FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", conv1d_modules=GPT2_CONV1D)
    base = load_model_tensors(FIXTURES / "gpt2" / "base")
    for layer in report.layers:
        key = f"{layer.module}.weight"
        dense = (ref[key] - base[key].double().numpy()).T  # Conv1D: stored (in, out); the delta is (out, in)
        sigma = np.linalg.svd(dense, compute_uv=False)
        want = np.sqrt(np.sum(sigma[4:] ** 2) / np.sum(sigma**2))
        assert layer.rank == 4
        assert layer.relative_error == pytest.approx(want, rel=1e-5)
        a = lora.tensors[f"base_model.model.{layer.module}.lora_A.weight"].double().numpy()
        b = lora.tensors[f"base_model.model.{layer.module}.lora_B.weight"].double().numpy()
        assert np.linalg.norm(dense - b @ a) / np.linalg.norm(dense) == pytest.approx(want, rel=1e-5)


def test_config_loads_in_peft_without_warnings(tmp_path: Path) -> None:
    import warnings

    lora, report = to_lora(FIXTURES / "llama" / "adapter", base=FIXTURES / "llama" / "base", rank=0.9, max_rank=6)
    lora.save(tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert all(x.rank <= 6 for x in report.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _peft_lora_model("llama", tmp_path / "lora")


def test_carries_biases_and_heads(tmp_path: Path) -> None:
    lora, _ = to_lora(FIXTURES / "roberta" / "adapter", base=FIXTURES / "roberta" / "base", rank=2)
    assert lora.config["bias"] == "all" and lora.config["modules_to_save"] == ["classifier", "score"]
    assert "base_model.model.roberta.encoder.layer.0.attention.self.query.base_layer.bias" in lora.tensors
    assert "base_model.model.classifier.out_proj.weight" in lora.tensors
    gpt2, _ = to_lora(FIXTURES / "gpt2" / "adapter", base=FIXTURES / "gpt2" / "base", rank=2)
    assert gpt2.config["bias"] == "lora_only" and gpt2.config["fan_in_fan_out"] is True


def test_bad_rank_is_a_usage_error() -> None:
    with pytest.raises(fc.UsageError, match=r"--rank: 1\.5 is neither an integer rank nor a share in"):
        to_lora(FIXTURES / "llama" / "adapter", base=FIXTURES / "llama" / "base", rank=1.5)


def test_cli_to_lora_writes_a_loadable_adapter_and_json(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    out, report = tmp_path / "lora", tmp_path / "r.json"
    args = [
        "to-lora",
        "--adapter",
        str(FIXTURES / "gpt2" / "adapter"),
        "--base",
        str(FIXTURES / "gpt2" / "base"),
        "--rank",
        "8",
        "--out",
        str(out),
        "--json",
        str(report),
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "total: 8 layers, 8,192 LoRA parameters" in res.stdout
    doc = json.loads(report.read_text())
    assert len(doc["layers"]) == 8 and 0 < doc["retained_energy"] < 1
    assert (out / "adapter_model.safetensors").is_file()
    bad = CliRunner().invoke(cli, [*args[:7], "--rank", "eight", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2
    assert bad.stderr == "error: --rank: cannot read 'eight'; use an integer rank (8) or an energy share (0.9)\n"


def test_save_refuses_to_write_over_the_input_adapter(tmp_path: Path, fixture_copy) -> None:  # type: ignore[no-untyped-def]
    d = fixture_copy("gpt2")
    before = {p: p.read_bytes() for p in (d / "adapter").iterdir() if p.is_file()}
    lora, _ = to_lora(d / "adapter", base=d / "base", rank=2)
    with pytest.raises(fc.UsageError, match="overlaps the input folder"):
        lora.save(d / "adapter", overwrite=True)
    assert {p: p.read_bytes() for p in (d / "adapter").iterdir() if p.is_file()} == before
