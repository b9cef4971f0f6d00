"""from-lora: least-squares coefficients against brute force, round trips with to-lora, PEFT loads the output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import fourier_convert as fc
from fourier_convert.lora_to_fourierft import from_lora, parse_pattern
from fourier_convert.maths.indices import spectral_indices
from fourier_convert.maths.project import project_lowrank
from tests.conftest import FIXTURES
from tests.reference import peft_indices, reference_delta
from tests.test_forward import _inputs, load_task_model

SPEC = ".fourierft_spectrum"


def _basis(idx: np.ndarray, shape: tuple[int, int], scaling: float) -> np.ndarray:
    """Design matrix: column k is the flattened FourierFT delta of a unit coefficient at position k."""
    m, n = shape
    cols = []
    for u, v in idx.T:
        dense = np.zeros((m, n), dtype=np.complex128)
        dense[u, v] = 1.0
        cols.append(np.fft.ifft2(dense).real.ravel() * scaling)
    return np.stack(cols, 1)


def _even_projection(target: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Dense oracle: keep the real DFT of the target on the support and its mirror, transform back."""
    m, n = target.shape
    mask = np.zeros((m, n))
    mask[idx[0], idx[1]] = 1.0
    mask[(-idx[0]) % m, (-idx[1]) % n] = 1.0
    return np.fft.ifft2(np.fft.fft2(target).real * mask).real


@pytest.mark.parametrize(
    ("shape", "n", "rank"),
    [((8, 6), 20, 2), ((8, 6), 48, 3), ((7, 5), 35, 2), ((6, 6), 10, 1), ((4, 4), 16, 4), ((1, 5), 3, 1),
     ((9, 1), 9, 1), ((16, 12), 1, 2), ((12, 16), 60, 5), ((2, 2), 4, 1)],
)  # fmt: skip
def test_coefficients_equal_a_brute_force_least_squares_solve(shape: tuple[int, int], n: int, rank: int) -> None:
    rng = np.random.default_rng(n + rank)
    m, k = shape
    idx = spectral_indices(m, k, n, 777).numpy()
    b, a = rng.normal(size=(m, rank)), rng.normal(size=(rank, k))
    scale, scaling = 0.7, 13.0
    target = scale * b @ a
    design = _basis(idx, shape, scaling)
    want, *_ = np.linalg.lstsq(design, target.ravel(), rcond=None)  # minimum-norm: mirrored pairs split evenly
    got = project_lowrank(b, a, scale, idx, scaling)
    np.testing.assert_allclose(got.values, want, rtol=1e-9, atol=1e-12)
    fit = design @ got.values
    assert got.kept_energy == pytest.approx(float(fit @ fit), rel=1e-9, abs=1e-12)
    assert got.energy == pytest.approx(float(np.sum(target**2)), rel=1e-12)
    np.testing.assert_allclose(fit.reshape(shape), _even_projection(target, idx), atol=1e-10)
    every = spectral_indices(m, k, m * k, 777).numpy()
    assert got.ceiling_energy == pytest.approx(float(np.sum(_even_projection(target, every) ** 2)), rel=1e-9)


def _pairs(idx: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, dict[int, int]]:
    m, n = shape
    flat = {int(u) * n + int(v): i for i, (u, v) in enumerate(idx.T)}
    partner = {}
    for i, (u, v) in enumerate(idx.T):
        j = flat.get(int((-u) % m) * n + int((-v) % n))
        if j is not None and j != i:
            partner[i] = j
    return np.array(sorted(set(range(idx.shape[1])) - set(partner))), partner


@pytest.mark.parametrize("name", ["llama", "gpt2", "roberta"])
def test_full_rank_round_trip_returns_the_spectrum_biases_and_heads(name: str, tmp_path: Path) -> None:
    src = FIXTURES / name / "adapter"
    cfg = json.loads((src / "adapter_config.json").read_text())
    lora, _ = fc.to_lora(src, base=FIXTURES / name / "base", rank=1.0)
    lora.save(tmp_path / "lora")
    fft, report = from_lora(
        tmp_path / "lora",
        base=FIXTURES / name / "base",
        n_frequency=cfg["n_frequency"],
        n_frequency_pattern=cfg["n_frequency_pattern"] or None,
        scaling=cfg["scaling"],
        seed=cfg["random_loc_seed"],
    )
    assert report.retained_energy == pytest.approx(1.0, abs=1e-6)
    fft.save(tmp_path / "fft")
    want = load_file(str(src / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "fft" / "adapter_model.safetensors"))
    base_tensors = {k: v.shape for k, v in load_task_model(name, FIXTURES / name / "base").state_dict().items()}
    for key, spectrum in want.items():
        if not key.endswith(SPEC):
            continue
        module = key[len("base_model.model.") : -len(SPEC)]
        w_shape = base_tensors[f"{module}.weight"]
        shape = (w_shape[1], w_shape[0]) if name == "gpt2" else tuple(w_shape)
        idx = peft_indices(shape[0], shape[1], len(spectrum), cfg["random_loc_seed"])
        single, partner = _pairs(idx, shape)
        # a bin and its mirror give the same delta: only their sum is defined, and it comes back
        np.testing.assert_allclose(got[key][single], spectrum[single], rtol=1e-5, atol=1e-5 * np.abs(spectrum).max())
        for i, j in partner.items():
            assert got[key][i] + got[key][j] == pytest.approx(spectrum[i] + spectrum[j], abs=1e-4)
    carried = [
        k for k in want if not k.endswith(SPEC) and ".original_module." not in k and ".modules_to_save." not in k
    ]
    for key in carried:
        np.testing.assert_array_equal(got[key], want[key])
    assert json.loads((tmp_path / "fft" / "adapter_config.json").read_text())["bias"] == cfg["bias"]
    # and PEFT runs it as the original adapter
    from peft import PeftModel

    x = _inputs(name)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(load_task_model(name, FIXTURES / name / "base"), str(src)).eval()(**x).logits
        out = PeftModel.from_pretrained(load_task_model(name, FIXTURES / name / "base"), str(tmp_path / "fft")).eval()
        torch.testing.assert_close(out(**x).logits, ref, rtol=1e-4, atol=1e-5)


def _distinct_frequency_adapter(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A FourierFT adapter on the llama fixture's q_proj (64x64) whose row and column frequencies are all
    distinct, non-zero, non-Nyquist and unmirrored, with coefficients of distinct magnitudes."""
    from peft import FourierFTConfig, get_peft_model

    n = 6
    seed = next(s for s in range(1000) if _generic(peft_indices(64, 64, n, s), 64))
    model = load_task_model("llama", FIXTURES / "llama" / "base")
    peft_model = get_peft_model(
        model,
        FourierFTConfig(
            task_type="CAUSAL_LM", target_modules=["q_proj"], layers_to_transform=[0], n_frequency=n,
            random_loc_seed=seed, scaling=150.0, init_weights=False,
        ),
    )  # fmt: skip
    values = np.array([3.0, -1.0, 2.5, 0.5, -2.0, 1.5])
    peft_model.base_model.model.model.layers[0].self_attn.q_proj.fourierft_spectrum["default"].data = torch.tensor(
        values, dtype=torch.float32
    )
    out = tmp_path / "distinct"
    peft_model.save_pretrained(out)
    return out, values


def _generic(idx: np.ndarray, size: int) -> bool:
    for row in idx:
        canon = np.minimum(row, size - row)
        if len(set(canon.tolist())) != len(row) or (canon == 0).any() or (2 * canon == size).any():
            return False
    return True


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_low_rank_round_trip_keeps_exactly_the_largest_coefficients(rank: int, tmp_path: Path) -> None:
    src, values = _distinct_frequency_adapter(tmp_path)
    base = FIXTURES / "llama" / "base"
    lora, report = fc.to_lora(src, base=base, rank=rank)
    assert report.layers[0].exact_rank == 2 * len(values)  # every coefficient: a pair of equal singular values
    lora.save(tmp_path / "lora")
    cfg = json.loads((src / "adapter_config.json").read_text())
    fft, _ = from_lora(tmp_path / "lora", base=base, n_frequency=6, scaling=150.0, seed=cfg["random_loc_seed"])
    got = fft.tensors["base_model.model.model.layers.0.self_attn.q_proj" + SPEC].double().numpy()
    kept = np.argsort(-np.abs(values))[: rank // 2]
    want = np.zeros_like(values)
    want[kept] = values[kept]
    np.testing.assert_allclose(got, want, atol=1e-5)


def _peft_lora(tmp_path: Path, name: str, **config: Any) -> Path:
    """A LoRA adapter made by PEFT on a fixture base, both factors random (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = load_task_model(name, FIXTURES / name / "base")
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    out = tmp_path / f"{name}-lora"
    peft_model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(FIXTURES / name / "base")
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def _peft_deltas(name: str, lora_dir: Path) -> dict[str, np.ndarray]:
    """PEFT's own delta of every LoRA layer, oriented (out, in)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_task_model(name, FIXTURES / name / "base"), str(lora_dir))
    deltas = {}
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            d = module.get_delta_weight("default").detach().double().numpy()
            deltas[module_name] = d.T if module.fan_in_fan_out else d
    return deltas


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("llama", {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                   "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
        ("llama", {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["o_proj"],
                   "use_rslora": True}),
        ("gpt2", {"task_type": "CAUSAL_LM", "r": 3, "lora_alpha": 6, "target_modules": ["c_attn", "c_fc"],
                  "fan_in_fan_out": True, "bias": "lora_only"}),
        ("roberta", {"task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"],
                     "bias": "all"}),
    ],
)  # fmt: skip
def test_output_is_the_projection_of_peft_delta_and_loads_in_peft(
    name: str, config: dict[str, Any], tmp_path: Path
) -> None:
    from peft import PeftModel

    src = _peft_lora(tmp_path, name, **config)
    deltas = _peft_deltas(name, src)
    n = 300
    fft, report = from_lora(src, base=FIXTURES / name / "base", n_frequency=n, scaling=50.0, seed=3)
    fft.save(tmp_path / "fft")
    assert {x.module for x in report.layers} == set(deltas)
    merged = load_task_model(name, FIXTURES / name / "base")
    state = merged.state_dict()
    for layer in report.layers:
        m, k = layer.shape
        idx = peft_indices(m, k, n, 3)
        want = _even_projection(deltas[layer.module], idx)
        spectrum = fft.tensors[f"base_model.model.{layer.module}{SPEC}"].double().numpy()
        got = reference_delta(spectrum, m, k, 50.0, 3)
        np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())
        energy = float(np.sum(deltas[layer.module] ** 2))
        assert layer.energy == pytest.approx(energy, rel=1e-6)
        assert layer.retained_energy == pytest.approx(float(np.sum(want**2)) / energy, rel=1e-6)
        key = f"{layer.module}.weight"
        state[key] += torch.from_numpy(got.T if name == "gpt2" else got).float()
    for key, value in fft.tensors.items():  # carried biases and heads
        if not key.endswith(SPEC):
            state[key[len("base_model.model.") :].replace(".base_layer.", ".")] = value
    merged.load_state_dict(state)
    x = _inputs(name)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(load_task_model(name, FIXTURES / name / "base"), str(tmp_path / "fft"))
        torch.testing.assert_close(loaded.eval()(**x).logits, merged.eval()(**x).logits, rtol=1e-4, atol=1e-5)
    cfg = json.loads((tmp_path / "fft" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (name == "gpt2")
    assert cfg["bias"] == {"none": "none", "lora_only": "fourier_only", "all": "all"}[config.get("bias", "none")]


def test_refuses_dora_embeddings_and_fourierft_with_the_reason(tmp_path: Path) -> None:
    dora = _peft_lora(tmp_path / "a", "llama", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(fc.AdapterError) as info:
        from_lora(dora)
    assert str(info.value) == (
        f"{dora / 'adapter_config.json'}: use_dora is True: DoRA rescales every column of W + delta by a learned "
        "magnitude, which no additive delta represents; convert a plain LoRA adapter (merge this one with PEFT instead)"
    )
    emb = _peft_lora(tmp_path / "b", "llama", r=2, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(fc.AdapterError, match="is embedding LoRA"):
        from_lora(emb)
    with pytest.raises(
        fc.AdapterError, match=r"peft_type is 'FOURIERFT', expected 'LORA'; this is already a FourierFT"
    ):
        from_lora(FIXTURES / "llama" / "adapter")


def test_n_larger_than_a_layer_and_bad_options_are_usage_errors(tmp_path: Path) -> None:
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["v_proj"])
    with pytest.raises(fc.UsageError) as info:
        from_lora(src, n_frequency=5000)
    assert str(info.value) == (
        "--n-frequency: model.layers.0.self_attn.v_proj is 32x64 = 2048 positions, fewer than n = 5000; lower "
        "--n-frequency or give this module a smaller n with --n-frequency-pattern"
    )
    with pytest.raises(fc.UsageError, match=r"--scaling: 0\.0 is not a finite non-zero number"):
        from_lora(src, scaling=0.0)
    with pytest.raises(fc.UsageError, match=r"--n-frequency-pattern: cannot read 'v_proj'"):
        parse_pattern(("v_proj",))
    fft, report = from_lora(src, n_frequency=5000, n_frequency_pattern={"v_proj": 2048})
    assert [x.n for x in report.layers] == [2048, 2048]
    assert report.layers[0].retained_energy == pytest.approx(report.layers[0].ceiling, rel=1e-9)
    assert fft.config["n_frequency_pattern"] == {"v_proj": 2048}


def test_low_energy_is_reported_loudly(tmp_path: Path) -> None:
    src = _peft_lora(tmp_path, "llama", r=4, target_modules=["q_proj"])
    _, report = from_lora(src, n_frequency=10)
    assert report.retained_energy < 0.05
    assert report.warnings[0].startswith("the FourierFT adapter keeps ")
    assert "raise --n-frequency to keep more (the ceiling with every frequency is " in report.warnings[0]
    assert report.ceiling == pytest.approx(0.5, abs=0.1)  # a generic matrix keeps about half its energy when even


def test_cli_from_lora_writes_a_loadable_adapter_and_json(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    src = _peft_lora(tmp_path, "gpt2", r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    out, doc = tmp_path / "fft", tmp_path / "r.json"
    args = ["from-lora", "--adapter", str(src), "--base", str(FIXTURES / "gpt2" / "base"), "--n-frequency", "100"]
    res = CliRunner().invoke(cli, [*args, "--n-frequency-pattern", "c_attn=200", "--out", str(out), "--json", str(doc)])
    assert res.exit_code == 0, res.output
    assert "total: 2 layers, 400 coefficients" in res.stdout
    report = json.loads(doc.read_text())
    assert [x["n"] for x in report["layers"]] == [200, 200] and 0 < report["retained_energy"] < report["ceiling"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "FOURIERFT" and cfg["n_frequency_pattern"] == {"c_attn": 200}
    again = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert again.exit_code == 1
    assert again.stderr == f"error: {out}: exists and is not empty; choose another --out or pass --overwrite\n"


def test_wrong_base_names_the_lora_key(tmp_path: Path) -> None:
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj"])
    with pytest.raises(fc.BaseMismatchError) as info:
        from_lora(src, base=FIXTURES / "gpt2" / "base")
    assert str(info.value) == (
        f"{src}: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: module "
        "'model.layers.0.self_attn.q_proj' has no weight in the base checkpoint; is this the base model the adapter "
        "was trained on?"
    )
