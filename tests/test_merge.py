"""merge: every fixture against the independent float64 reference, PEFT's merge, and PEFT's forward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import fourier_convert as fc
from fourier_convert.merging.folder import AdapterSpec
from tests.conftest import FIXTURE_NAMES, FIXTURES
from tests.reference import load_model_tensors, reference_merge

GPT2_CONV1D = {
    f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}


def _key_map(name: str) -> dict[str, str]:
    if name == "vit":
        out = {}
        for i in range(2):
            for new, old in (("q_proj", "query"), ("v_proj", "value")):
                for p in ("weight", "bias"):
                    out[f"vit.layers.{i}.attention.{new}.{p}"] = f"vit.encoder.layer.{i}.attention.attention.{old}.{p}"
        return out
    if name == "bert_head":
        base = load_model_tensors(FIXTURES / "bert_head" / "base")
        return {f"bert.{k}": k for k in base}
    return {}


def _assert_close_f32(got: np.ndarray, want: np.ndarray, what: str, base: np.ndarray | None = None) -> None:
    """Equal to float32 rounding: one rounding of the result plus float32 FFT error on the delta's scale."""
    eps = float(np.finfo(np.float32).eps)
    delta = want - base if base is not None and base.shape == want.shape else want
    rms = float(np.sqrt(np.mean(delta**2))) if delta.size else 0.0
    err = np.abs(got.astype(np.float64) - want)
    bound = eps * np.abs(want) + 64 * eps * rms
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert (err <= bound).all(), f"{what}: err {err[worst]:.3e} > bound {bound[worst]:.3e}"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_merge_matches_float64_reference(name: str, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    report = fc.merge(FIXTURES / name / "base", FIXTURES / name / "adapter", out, device="cpu")
    assert report.tensors.get("merge", 0) >= 4
    got = load_model_tensors(out)
    base = load_model_tensors(FIXTURES / name / "base")
    ref = reference_merge(
        FIXTURES / name / "base",
        FIXTURES / name / "adapter",
        conv1d_modules=GPT2_CONV1D if name == "gpt2" else None,
        key_map=_key_map(name),
    )
    assert set(got) == set(base) | set(ref)
    for key, value in got.items():
        if key in ref:
            b = base[key].double().numpy() if key in base else None
            _assert_close_f32(value.double().numpy(), ref[key], key, b)
        else:
            assert torch.equal(value, base[key]), f"{key} changed but the adapter does not touch it"
    # every adapted layer was verified against float64 and stayed well inside its tolerance
    assert all(r.max_abs_error <= r.tolerance for r in report.layers)
    assert not report.fallbacks


def test_gpt2_is_merged_transposed(tmp_path: Path) -> None:
    report = fc.merge(FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", tmp_path / "m", device="cpu")
    assert all(r.conv1d and r.orientation == "skeleton" for r in report.layers)


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit", "bert_head"])
def test_merge_equals_peft_merge_and_unload(name: str, tmp_path: Path) -> None:
    from peft import PeftModel

    from tests.test_forward import load_task_model

    out = tmp_path / "merged"
    fc.merge(FIXTURES / name / "base", FIXTURES / name / "adapter", out, device="cpu")
    base = load_task_model(name, FIXTURES / name / "base")
    peft_merged = PeftModel.from_pretrained(base, str(FIXTURES / name / "adapter")).merge_and_unload()
    ours = load_task_model(name, out)
    theirs = peft_merged.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, theirs[key], rtol=1e-5, atol=1e-6), key


def test_untouched_shards_are_byte_identical(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    fc.merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", out, device="cpu")
    base_index = json.loads((FIXTURES / "llama" / "base" / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    changed = {k for k in base_index["weight_map"] if ("q_proj" in k or "v_proj" in k)}
    for shard in sorted(set(base_index["weight_map"].values())):
        a = (FIXTURES / "llama" / "base" / shard).read_bytes()
        b = (out / shard).read_bytes()
        assert len(a) == len(b)
        with safe_open(str(out / shard), "pt") as f:
            names = set(f.keys())
        if not names & changed:
            assert a == b, f"{shard} holds no changed tensor but differs"
        else:
            # the header is reused verbatim; only the changed tensors' bytes differ
            hlen = 8 + int.from_bytes(a[:8], "little")
            assert a[:hlen] == b[:hlen]


def test_small_files_and_provenance(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    fc.merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", out, device="cpu")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (FIXTURES / "llama" / "base" / name).read_bytes()
    prov = json.loads((out / "fourier_convert.json").read_text())
    assert prov["adapters"][0]["config"]["peft_type"] == "FOURIERFT"
    assert len(prov["adapters"][0]["files"]["adapter_model.safetensors"]) == 64
    assert len(prov["report"]["layers"]) == 4
    assert all(layer["checked_entries"] > 100 for layer in prov["report"]["layers"])
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_two_adapters_with_weights(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    specs = [
        AdapterSpec(str(FIXTURES / "llama" / "adapter"), weight=0.5),
        AdapterSpec(str(FIXTURES / "llama" / "adapter"), subfolder="second", weight=2.0),
    ]
    report = fc.merge(FIXTURES / "llama" / "base", specs, out, device="cpu")
    assert report.tensors["merge"] == 8
    base = load_model_tensors(FIXTURES / "llama" / "base")
    r1 = reference_merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")
    r2 = reference_merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter" / "second")
    got = load_model_tensors(out)
    for key in set(r1) | set(r2):
        w = base[key].double().numpy()
        want = w + 0.5 * (r1.get(key, w) - w) + 2.0 * (r2.get(key, w) - w)
        _assert_close_f32(got[key].double().numpy(), want, key, w)


def test_path_colon_name_selects_named_adapter(tmp_path: Path) -> None:
    report = fc.merge(
        FIXTURES / "llama" / "base", f"{FIXTURES / 'llama' / 'adapter'}:second", tmp_path / "m", device="cpu"
    )
    assert {r.module.rsplit(".", 1)[1] for r in report.layers} == {"o_proj", "down_proj"}


def test_bf16_base_keeps_dtype_and_rounds_once(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(FIXTURES / "llama" / "base", dtype=torch.bfloat16).save_pretrained(bf16)
    out = tmp_path / "merged"
    fc.merge(bf16, FIXTURES / "llama" / "adapter", out, device="cpu")
    got = load_model_tensors(out)
    ref = reference_merge(bf16, FIXTURES / "llama" / "adapter")
    for key, want in ref.items():
        assert got[key].dtype == torch.bfloat16
        want_bf16 = torch.from_numpy(want).to(torch.bfloat16)
        ulps = (got[key].view(torch.int16).int() - want_bf16.view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1, key
        assert float((ulps > 0).float().mean()) < 0.01, key


def test_dtype_cast_and_reshard(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    report = fc.merge(
        FIXTURES / "llama" / "base",
        FIXTURES / "llama" / "adapter",
        out,
        device="cpu",
        dtype="float16",
        max_shard_size="50KB",
    )
    assert len(report.shards) >= 4
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = load_model_tensors(out)
    assert all(t.dtype == torch.float16 for t in got.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    ref = reference_merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter")
    for key, want in ref.items():
        assert torch.equal(got[key], torch.from_numpy(want).float().half()) or torch.allclose(
            got[key].float(), torch.from_numpy(want).float(), rtol=1e-3, atol=1e-4
        )


def test_single_file_output_when_resharded_large(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    report = fc.merge(
        FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", out, device="cpu", max_shard_size="1GB"
    )
    assert report.shards == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_float64_precision(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    report = fc.merge(FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", out, device="cpu", precision="float64")
    got = load_model_tensors(out)
    ref = reference_merge(FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", conv1d_modules=GPT2_CONV1D)
    for key, want in ref.items():
        assert torch.equal(got[key], torch.from_numpy(want).float()), key  # correctly rounded once
    assert report.precision == "float64"


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    report = fc.merge(FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", out, dry_run=True)
    assert report.dry_run and not out.exists() and not list(tmp_path.iterdir())
    assert report.tensors == {"copy": 12, "merge": 8, "replace": 8}
    assert all(layer.conv1d for layer in report.layers)


def test_bias_all_replaces_every_bias_and_composite_head(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    report = fc.merge(FIXTURES / "roberta" / "base", FIXTURES / "roberta" / "adapter", out, device="cpu")
    got = load_model_tensors(out)
    sd = load_model_tensors(FIXTURES / "roberta" / "adapter")
    # the clean (trained) copies win; the stale original_module copies are ignored
    assert torch.equal(
        got["classifier.dense.bias"], sd["base_model.model.classifier.modules_to_save.default.dense.bias"]
    )
    assert torch.equal(got["classifier.out_proj.weight"], sd["base_model.model.classifier.out_proj.weight"])
    assert torch.equal(
        got["roberta.embeddings.LayerNorm.bias"], sd["base_model.model.roberta.embeddings.LayerNorm.bias"]
    )
    assert report.tensors["replace"] == 21


def test_new_head_updates_config(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    report = fc.merge(FIXTURES / "bert_head" / "base", FIXTURES / "bert_head" / "adapter", out, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert len(cfg["id2label"]) == 2
    assert any("num_labels=2" in n for n in report.notes)


def test_wrong_fan_in_fan_out_flag_is_overruled_by_the_module_type(tmp_path: Path, fixture_copy) -> None:  # type: ignore[no-untyped-def]
    gpt2 = fixture_copy("gpt2")
    cfg_path = gpt2 / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fan_in_fan_out"] = False  # what PEFT can leave behind for mixed models
    cfg_path.write_text(json.dumps(cfg))
    report = fc.merge(gpt2 / "base", gpt2 / "adapter", tmp_path / "m", device="cpu")
    assert any("disagrees with the module type" in w for w in report.warnings)
    assert all(r.conv1d and r.orientation == "skeleton" for r in report.layers)
    got = load_model_tensors(tmp_path / "m")
    ref = reference_merge(gpt2 / "base", gpt2 / "adapter", conv1d_modules=GPT2_CONV1D)
    base = load_model_tensors(gpt2 / "base")
    for key, want in ref.items():
        b = base[key].double().numpy() if key in base else None
        _assert_close_f32(got[key].double().numpy(), want, key, b)


def test_without_config_orientation_comes_from_the_flag(tmp_path: Path, fixture_copy) -> None:  # type: ignore[no-untyped-def]
    gpt2 = fixture_copy("gpt2")
    (gpt2 / "base" / "config.json").unlink()
    report = fc.merge(gpt2 / "base", gpt2 / "adapter", tmp_path / "m", device="cpu")
    assert all(r.conv1d and r.orientation == "flag" for r in report.layers)
    assert any("taken from fan_in_fan_out (the base has no config.json)" in w for w in report.warnings)


def test_leftover_partial_folder_is_reported(tmp_path: Path) -> None:
    leftover = tmp_path / ".merged.partial-deadbeef"
    leftover.mkdir()
    report = fc.merge(FIXTURES / "gpt2" / "base", FIXTURES / "gpt2" / "adapter", tmp_path / "merged", device="cpu")
    assert any(str(leftover) in w for w in report.warnings)
    assert leftover.exists()  # never deleted: another run may own it


def test_single_shard_with_an_index_keeps_its_index(tmp_path: Path) -> None:
    # save_pretrained writes model-00001-of-00001.safetensors plus an index when asked to shard a small model;
    # transformers finds such a shard only through the index, so the output must have one too
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "gpt2" / "base", base)
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    keys = load_model_tensors(FIXTURES / "gpt2" / "base")
    index = {
        "metadata": {"total_size": 0},
        "weight_map": dict.fromkeys(sorted(keys), "model-00001-of-00001.safetensors"),
    }
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "merged"
    fc.merge(base, FIXTURES / "gpt2" / "adapter", out, device="cpu")
    assert (out / "model.safetensors.index.json").is_file()
    written = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(written["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    merged = AutoModelForCausalLM.from_pretrained(out)
    want = load_model_tensors(tmp_path / "merged")
    for key, value in merged.state_dict().items():
        if key in want:
            torch.testing.assert_close(value, want[key])


def test_durable_false_skips_fsync_and_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real_fsync(fd))
    fc.merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", tmp_path / "a", device="cpu")
    durable_calls = len(calls)
    fc.merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", tmp_path / "b", device="cpu", durable=False)
    assert durable_calls >= 3 and len(calls) == durable_calls  # one per shard before, none now
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def _wide_llama(folder: Path, spectrum: torch.Tensor, planted: int, seed: int) -> torch.Tensor:
    """A one-layer Llama whose q_proj is 4096 x 4096 (bf16), with a FourierFT adapter on q_proj; at ``planted``
    places the base weight is minus the delta, rounded, so that base + delta nearly cancels there. Returns the
    float64 delta (PEFT's algorithm in numpy)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from fourier_convert.maths.delta_numpy import delta_weights_numpy
    from fourier_convert.maths.indices import spectral_indices
    from fourier_convert.maths.rounding import round_once

    m = 4096
    config = LlamaConfig(vocab_size=16, hidden_size=m, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (16, m),
        "model.layers.0.self_attn.q_proj.weight": (m, m),
        "model.layers.0.self_attn.k_proj.weight": (128, m),
        "model.layers.0.self_attn.v_proj.weight": (128, m),
        "model.layers.0.self_attn.o_proj.weight": (m, m),
        "model.layers.0.mlp.gate_proj.weight": (16, m),
        "model.layers.0.mlp.up_proj.weight": (16, m),
        "model.layers.0.mlp.down_proj.weight": (m, 16),
        "model.layers.0.input_layernorm.weight": (m,),
        "model.layers.0.post_attention_layernorm.weight": (m,),
        "model.norm.weight": (m,),
        "lm_head.weight": (16, m),
    }
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    idx = spectral_indices(m, m, spectrum.numel(), 777).numpy()
    delta = torch.from_numpy(delta_weights_numpy(spectrum.double().numpy(), idx, m, m, 150.0))
    q = tensors["model.layers.0.self_attn.q_proj.weight"].view(-1)
    where = torch.randperm(m * m, generator=gen)[:planted]
    q[where] = round_once(-delta.view(-1)[where], torch.bfloat16)
    (folder / "base").mkdir(parents=True)
    save_file(tensors, str(folder / "base" / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder / "base")
    (folder / "adapter").mkdir()
    adapter_config = {
        "peft_type": "FOURIERFT", "task_type": "CAUSAL_LM", "target_modules": ["q_proj"], "n_frequency": 1000,
        "scaling": 150.0, "random_loc_seed": 777, "bias": "none", "fan_in_fan_out": False, "init_weights": False,
    }  # fmt: skip
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    key = "base_model.model.model.layers.0.self_attn.q_proj.fourierft_spectrum"
    save_file({key: spectrum}, str(folder / "adapter" / "adapter_model.safetensors"))
    return delta


def test_every_merged_element_is_correctly_rounded_at_4096_width(tmp_path: Path) -> None:
    """bf16(base + float64 delta), rounded once, for all 16.8M elements of a 4096-wide layer, 40,000 of them
    near-cancellations (where a float32 sum is many ulps off); float32 precision misrounds some of those."""
    from tests.rounding_reference import nearest_even

    spectrum = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    delta = _wide_llama(tmp_path, spectrum, planted=40_000, seed=4)
    key = "model.layers.0.self_attn.q_proj.weight"
    base = safe_open(str(tmp_path / "base" / "model.safetensors"), framework="pt").get_tensor(key)
    want = nearest_even(base.double() + delta, 7)
    got = fc.merge_in_memory(tmp_path / "base", tmp_path / "adapter", device="cpu").tensors[key]
    assert got.dtype == torch.bfloat16
    assert int((got.double() != want).sum()) == 0
    fast = fc.merge_in_memory(tmp_path / "base", tmp_path / "adapter", device="cpu", precision="float32")
    assert int((fast.tensors[key].double() != want).sum()) > 0  # the planted cancellations do catch misrounding


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_numpy_and_torch_float64_paths_write_the_same_bits(name: str) -> None:
    """The default CPU merge (numpy, row blocks over threads) and the torch float64 path (the CUDA path's code,
    run on the CPU) both round once from float64 and settle elements next to a midpoint from the closed form:
    the same bits, Conv1D (gpt2) included. Without the settling, one float32 element of bert_head differed."""
    from fourier_convert.io.adapter import read_adapter
    from fourier_convert.io.checkpoint import open_checkpoint
    from fourier_convert.merging.core import merge_layers
    from fourier_convert.merging.cpu import merge_layers_cpu
    from fourier_convert.merging.memory import stored_to_torch
    from fourier_convert.plan import plan_with_orientation

    ckpt = open_checkpoint(FIXTURES / name / "base")
    plan = plan_with_orientation(ckpt, [read_adapter(FIXTURES / name / "adapter")], weights=[1.0], out_dtype=None)
    assert any(layer.conv1d for layer in plan.layers) == (name == "gpt2")
    with_numpy: dict[str, torch.Tensor] = {}
    with_torch: dict[str, torch.Tensor] = {}
    numpy_reports, _ = merge_layers_cpu(
        plan.layers, plan, lambda k, v: with_numpy.__setitem__(k, stored_to_torch(v)), threads=3
    )
    torch_reports, _ = merge_layers(plan.layers, plan, with_torch.__setitem__, torch.device("cpu"), torch.float64)
    assert with_numpy.keys() == with_torch.keys() and with_numpy
    for key, value in with_torch.items():
        assert torch.equal(with_numpy[key], value), key
    # the same window on both paths: the same elements settled, and the same figures reported
    for key, rep in numpy_reports.items():
        assert rep.near_ties == torch_reports[key].near_ties, key
        assert rep.delta_norm == pytest.approx(torch_reports[key].delta_norm, rel=1e-12), key
        assert rep.base_norm == pytest.approx(torch_reports[key].base_norm, rel=1e-12), key
    if name == "bert_head":
        assert sum(layer.near_ties for layer in numpy_reports.values()) >= 1
