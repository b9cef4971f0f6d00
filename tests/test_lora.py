"""to-lora: PEFT loads the output, full rank is lossless, truncation matches the dense-SVD oracle."""

from __future__ import annotations

import json
import math
import re
import shutil
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


def test_low_rank_error_equals_the_dense_svd_oracle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lora, report = to_lora(FIXTURES / "gpt2" / "adapter", base=FIXTURES / "gpt2" / "base", rank=4, progress=True)
    err = capsys.readouterr().err
    assert err.startswith(f"to-lora: factorising {len(report.layers)} layer deltas (exact SVD from the spectrum) ...\n")
    assert f"svd [{'#' * 30}] {len(report.layers)}/{len(report.layers)}" in err  # the bar reaches the end
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


# -- serving targets ----------------------------------------------------------------------------------
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def vllm_rank_and_scaling(cfg: dict[str, Any], module: str) -> tuple[int, float]:
    """vLLM's ``PEFTHelper.get_rank_and_scaling``: a module's rank and scale from the first ``rank_pattern`` /
    ``alpha_pattern`` key matching its name (else ``r`` / ``lora_alpha``)."""
    r, alpha = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    if rank_pattern or alpha_pattern:
        r = next((v for k, v in rank_pattern.items() if re.match(rf"(.*\.)?({k})$", module)), r)
        alpha = next((v for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", module)), alpha)
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def read_as_vllm(folder: Path, expected_modules: set[str], max_lora_rank: int) -> dict[str, tuple[Any, Any]]:
    """Load a LoRA folder with the rules vLLM 0.32's loader applies (PEFTHelper, LoRAModel.from_local_checkpoint);
    return module -> (lora_a, lora_b) with lora_b already multiplied by the module's scale, or raise as vLLM would."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    missing = {"r", "lora_alpha", "target_modules"} - set(cfg)
    if missing:
        raise ValueError(f"Missing required configuration fields: {missing}")
    if cfg.get("modules_to_save") is not None and not set(cfg["modules_to_save"]) <= {"classifier", "score"}:
        raise ValueError("vLLM only supports modules_to_save being None.")
    if cfg.get("use_dora"):
        raise ValueError("vLLM does not yet support DoRA.")
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise ValueError(f"max_lora_rank {max_lora_rank} is not one of {VLLM_MAX_LORA_RANKS}")
    max_rank = max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()])
    if max_rank > max_lora_rank:
        raise ValueError(f"LoRA rank {max_rank} is greater than max_lora_rank {max_lora_rank}.")
    if cfg.get("bias", "none") != "none":
        raise ValueError("Adapter bias is not supported.")
    loras: dict[str, dict[str, Any]] = {}
    for name, tensor in load_file(str(folder / "adapter_model.safetensors")).items():
        parts = name.split(".")
        if parts[:2] != ["base_model", "model"] or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
            raise ValueError(f"{name} is unsupported LoRA weight")
        module = ".".join(parts[2:-2])
        if module.rsplit(".", 1)[-1] not in expected_modules:
            raise ValueError(f"expected target modules in {expected_modules} but received {module}")
        loras.setdefault(module, {})[parts[-2]] = tensor
    out = {}
    for module, pair in loras.items():
        a, b = pair["lora_A"], pair["lora_B"]  # KeyError: vLLM would fail on a half-missing pair too
        if a.shape[0] > max_lora_rank or b.shape[1] != a.shape[0]:
            raise ValueError(f"{module}: rank {a.shape[0]} does not fit max_lora_rank {max_lora_rank}")
        _, scaling = vllm_rank_and_scaling(cfg, module)
        out[module] = (a, b * scaling)
    return out


def test_vllm_target_loads_by_vllm_rules_and_equals_the_peft_conversion(tmp_path: Path) -> None:
    base, src = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    peft_lora, peft_report = to_lora(src, base=base, rank=0.9)
    vllm_lora, report = to_lora(src, base=base, rank=0.9, target="vllm")
    vllm_lora.save(tmp_path / "vllm")
    ranks = {x.module: x.rank for x in report.layers}
    assert ranks == {x.module: x.rank for x in peft_report.layers} and len(set(ranks.values())) > 1
    assert report.uniform_rank is None
    assert report.max_lora_rank == min(r for r in VLLM_MAX_LORA_RANKS if r >= max(ranks.values())) == 32
    assert report.table().splitlines()[-1].endswith("; serve with vLLM's --max-lora-rank 32")
    cfg = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] and cfg["rank_pattern"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in vllm_lora.tensors)
    loaded = read_as_vllm(tmp_path / "vllm", LLAMA_LORA_MODULES, max_lora_rank=report.max_lora_rank)
    assert set(loaded) == set(ranks)
    for module, (a, b) in loaded.items():
        assert a.shape[0] == b.shape[1] == ranks[module] == vllm_rank_and_scaling(cfg, module)[0]  # exact rank
        assert bool((a.abs().sum(dim=1) > 0).all()) and bool((b.abs().sum(dim=0) > 0).all())  # no zero padding
        key = f"base_model.model.{module}"
        want = peft_lora.tensors[f"{key}.lora_B.weight"] @ peft_lora.tensors[f"{key}.lora_A.weight"]
        torch.testing.assert_close(b @ a, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"^LoRA rank 18 is greater than max_lora_rank 16\.$"):
        read_as_vllm(tmp_path / "vllm", LLAMA_LORA_MODULES, max_lora_rank=16)
    # --uniform-rank: one width vLLM allows for every tensor, zero-padded, no patterns; the same products
    padded_lora, padded = to_lora(src, base=base, rank=0.9, target="vllm", uniform_rank=True)
    padded_lora.save(tmp_path / "padded")
    assert padded.uniform_rank == padded.max_lora_rank == report.max_lora_rank
    assert [x.rank for x in padded.layers] == [x.rank for x in report.layers]
    cfg = json.loads((tmp_path / "padded" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == padded.uniform_rank and cfg["rank_pattern"] == cfg["alpha_pattern"] == {}
    for module, (a, b) in read_as_vllm(tmp_path / "padded", LLAMA_LORA_MODULES, padded.uniform_rank).items():
        assert a.shape[0] == b.shape[1] == padded.uniform_rank
        want = loaded[module][1] @ loaded[module][0]
        torch.testing.assert_close(b @ a, want, rtol=0, atol=1e-6)
    x = _inputs("llama")  # and PEFT still runs it
    with torch.no_grad():
        a_logits = _peft_lora_model("llama", tmp_path / "vllm")(**x).logits
        peft_lora.save(tmp_path / "peft")
        torch.testing.assert_close(a_logits, _peft_lora_model("llama", tmp_path / "peft")(**x).logits)


def test_llama_cpp_target_has_only_factors_and_one_alpha_per_rank(tmp_path: Path) -> None:
    with pytest.raises(fc.UsageError) as info:  # the GGUF writer knows Llama / Mistral only: gpt2 is refused
        to_lora(FIXTURES / "gpt2" / "adapter", base=FIXTURES / "gpt2" / "base", rank=5, target="llama.cpp",
                drop_extras=True)  # fmt: skip
    assert str(info.value) == (
        f"--target: {FIXTURES / 'gpt2' / 'base' / 'config.json'}: writing GGUF LoRA files directly knows "
        "LlamaForCausalLM, MistralForCausalLM, not 'GPT2LMHeadModel'; use --target peft and convert with python "
        "convert_lora_to_gguf.py --base BASE_FOLDER ADAPTER_FOLDER (from llama.cpp)"
    )
    base, src = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    peft_lora, _ = to_lora(src, base=base, rank=0.9)
    lora, report = to_lora(src, base=base, rank=0.9, target="llama.cpp")
    lora.save(tmp_path / "gg")
    names = sorted(p.name for p in (tmp_path / "gg").iterdir())
    assert names == ["adapter_config.json", "adapter_model.gguf", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "gg" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] and cfg["lora_alpha"] == cfg["r"] and cfg["alpha_pattern"] == {}
    assert report.uniform_rank is None and report.max_lora_rank is None
    ranks = {x.module: x.rank for x in report.layers}
    assert cfg["rank_pattern"] == {m: r for m, r in ranks.items() if r != cfg["r"]} != {}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora.tensors)  # llama.cpp aborts otherwise
    assert cfg["bias"] == "none" and cfg["modules_to_save"] is None
    for module, r in ranks.items():
        # llama.cpp: one alpha for the file, each tensor scaled by alpha / its own rank
        key = f"base_model.model.{module}"
        a, b = lora.tensors[f"{key}.lora_A.weight"], lora.tensors[f"{key}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == r
        want = peft_lora.tensors[f"{key}.lora_B.weight"] @ peft_lora.tensors[f"{key}.lora_A.weight"]
        torch.testing.assert_close((b * (cfg["lora_alpha"] / a.shape[0])) @ a, want, rtol=0, atol=1e-6)
    x = _inputs("llama")  # PEFT (alpha / rank_pattern per layer) gives the same model
    with torch.no_grad():
        got = _peft_lora_model("llama", tmp_path / "gg")(**x).logits
        peft_lora.save(tmp_path / "peft")
        torch.testing.assert_close(got, _peft_lora_model("llama", tmp_path / "peft")(**x).logits)


def test_targets_refuse_extras_they_cannot_carry() -> None:
    with pytest.raises(fc.UsageError) as info:
        to_lora(FIXTURES / "roberta" / "adapter", base=FIXTURES / "roberta" / "base", target="vllm")
    assert str(info.value) == (
        f"--target: vllm loads only lora_A / lora_B tensors, so 17 trained bias(es) (bias='all') and modules_to_save "
        f"['classifier', 'score'] of {FIXTURES / 'roberta' / 'adapter'} would be lost; use --target peft, or pass "
        "--drop-extras to convert without them (the report lists what is lost)"
    )


def test_param_budget_is_respected_and_close_to_the_bound(tmp_path: Path) -> None:
    base, src = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    for budget in (700, 5000, 20_000):
        _, report = to_lora(src, base=base, param_budget=budget)
        assert report.parameters <= budget
        assert report.parameters == sum(x.rank * sum(x.shape) for x in report.layers)
        assert report.budget_bound is not None and report.retained_energy <= report.budget_bound + 1e-12
        assert report.retained_energy >= report.budget_bound - 0.02
    # a budget is at least as good as the uniform fixed rank that costs the same
    _, fixed = to_lora(src, base=base, rank=8)
    _, budgeted = to_lora(src, base=base, param_budget=fixed.parameters)
    assert budgeted.retained_energy >= fixed.retained_energy - 1e-12
    with pytest.raises(fc.UsageError, match="given together with --rank"):
        to_lora(src, base=base, rank=8, param_budget=1000)
    # vllm: per-layer ranks within the budget, the --max-lora-rank to serve them with
    _, vllm = to_lora(src, base=base, param_budget=5000, target="vllm")
    assert vllm.parameters <= 5000 and vllm.uniform_rank is None
    assert vllm.parameters == sum(x.rank * sum(x.shape) for x in vllm.layers)
    assert vllm.max_lora_rank == min(r for r in VLLM_MAX_LORA_RANKS if r >= max(x.rank for x in vllm.layers))
    assert len({x.rank for x in vllm.layers}) > 1
    padded_lora, padded = to_lora(src, base=base, param_budget=5000, target="vllm", uniform_rank=True)
    assert padded.uniform_rank in VLLM_MAX_LORA_RANKS and padded.parameters <= 5000
    assert padded.max_lora_rank == padded.uniform_rank
    assert {t.shape[0] for k, t in padded_lora.tensors.items() if k.endswith("lora_A.weight")} == {padded.uniform_rank}


def test_check_compares_layer_outputs(tmp_path: Path) -> None:
    from fourier_convert.check import check_lora_outputs

    base, src = FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter"
    full, _ = to_lora(src, base=base, rank=1.0)
    exact = check_lora_outputs(full, src, base=base)
    assert exact.worst_output_error < 1e-6 and exact.worst_delta_error < 1e-6
    low, report = to_lora(src, base=base, rank=2)
    approx = check_lora_outputs(low, src, base=base, samples=2000)
    for layer, checked in zip(report.layers, approx.layers, strict=True):
        # many random inputs: the output error of the delta approaches the relative Frobenius error
        assert checked.delta_error == pytest.approx(layer.relative_error, rel=0.1)
    dropped, _ = to_lora(src, base=base, rank=1.0, target="vllm", drop_extras=True)
    lost = check_lora_outputs(dropped, src, base=base)
    assert lost.worst_delta_error < 1e-6 and lost.worst_output_error > 1e-3  # the dropped biases show


def test_cli_to_lora_target_budget_and_check(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    out, doc = tmp_path / "lora", tmp_path / "r.json"
    args = ["to-lora", "--adapter", str(FIXTURES / "llama" / "adapter"), "--base", str(FIXTURES / "llama" / "base")]
    res = CliRunner().invoke(cli, [*args, "--param-budget", "4000", "--target", "vllm", "--check", "--out", str(out),
                                   "--json", str(doc)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "; serve with vLLM's --max-lora-rank 16; budget 4,000 (no allocation within it" in res.stdout
    assert "uniform rank" not in res.stdout
    assert "check: 4 layers on 64 random inputs each: largest layer-output error" in res.stdout
    report = json.loads(doc.read_text())
    assert report["parameters"] <= 4000 and report["check"]["worst_delta_error"] < 1
    assert report["max_lora_rank"] == 16 and report["uniform_rank"] is None
    res = CliRunner().invoke(cli, [*args, "--param-budget", "4000", "--target", "vllm", "--uniform-rank", "--out",
                                   str(tmp_path / "padded")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "; uniform rank 8 (smaller layers zero-padded); serve with vLLM's --max-lora-rank 8" in res.stdout
    bad = CliRunner().invoke(cli, [*args, "--target", "onnx", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "Invalid value for '--target'" in bad.stderr


def test_adapter_outputs_hold_exactly_the_peft_files(tmp_path: Path) -> None:
    """to-lora and from-lora write adapter_config.json and adapter_model.safetensors, and nothing else (no model
    index beside an adapter)."""
    lora, _ = to_lora(FIXTURES / "llama" / "adapter", base=FIXTURES / "llama" / "base", rank=4)
    lora.save(tmp_path / "lora")
    fft, _ = fc.from_lora(tmp_path / "lora", base=FIXTURES / "llama" / "base", n_frequency=100)
    fft.save(tmp_path / "fft")
    for folder in (tmp_path / "lora", tmp_path / "fft"):
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_missing_base_named_by_the_adapter_says_so_and_suggests_base(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "llama" / "adapter", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "nowhere")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(fc.FourierConvertError) as info:
        to_lora(adapter, rank=4)
    assert str(info.value) == (
        f"{tmp_path / 'nowhere'}: base model folder not found (the base named by the adapter's "
        "base_model_name_or_path; no --base was given); pass --base with the base model's folder or hub id"
    )


def test_dropping_the_heads_of_a_task_type_peft_adds_them_for_clears_it(tmp_path: Path) -> None:
    """roberta's adapter is SEQ_CLS, whose classifier / score PEFT adds to modules_to_save on loading. A vLLM LoRA
    without the heads (--drop-extras) kept task_type SEQ_CLS, so PEFT looked for the classifier and failed
    (KeyError); it now has no task type, and PEFT loads it. With the heads (--target peft) the config keeps the
    adapter's own list and task type, and PEFT adds the heads to it as it does to the FourierFT adapter's."""
    src, base = FIXTURES / "roberta" / "adapter", FIXTURES / "roberta" / "base"
    dropped, _ = to_lora(src, base=base, rank=1.0, target="vllm", drop_extras=True)
    dropped.save(tmp_path / "vllm")
    cfg = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["modules_to_save"]) == (None, None)
    from peft import PeftModel

    PeftModel.from_pretrained(load_task_model("roberta", base), str(tmp_path / "vllm"))  # no KeyError
    kept, _ = to_lora(src, base=base, rank=1.0)
    kept.save(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["modules_to_save"]) == ("SEQ_CLS", ["classifier", "score"])
