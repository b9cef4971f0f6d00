"""from-lora: least-squares coefficients against brute force, round trips with to-lora, PEFT loads the output."""

from __future__ import annotations

import hashlib
import json
import re
import time
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
from tests.conftest import FIXTURES, UNADAPTABLE_SELECTIONS, replace_with_special_file
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


# -- errors: one line, exit 1, nothing published, inputs untouched -----------------------------------
LLAMA_BASE = FIXTURES / "llama" / "base"
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
RETRAIN = "pass the base model the adapter was trained on, or re-save the adapter with PEFT"


def _snapshot(*folders: Path) -> dict[str, tuple[int, int] | str | None]:
    """Every path under ``folders`` -> sha256 of its bytes (size and mtime for files over 64 MiB, such as a sparse
    1 GB file; None for folders)."""
    out: dict[str, tuple[int, int] | str | None] = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                out[str(p)] = None
            elif p.stat().st_size > 64 * 2**20:
                out[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns)
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cli_fails(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    exc_type: type[fc.FourierConvertError],
    message: str,
    adapter: Path,
    base: Path = LLAMA_BASE,
    *,
    reads_factors: bool = False,
) -> None:
    """``from_lora`` raises exactly ``exc_type(message)``; ``fourier-convert from-lora`` prints ``error: message``
    alone and exits 1 within 10 s; neither publishes anything nor changes an input, and (unless ``reads_factors``)
    neither reads a byte of LoRA factor data."""
    from click.testing import CliRunner

    import fourier_convert.io.lora_adapter as lora_io
    from fourier_convert.cli.main import cli

    reads: list[str] = []
    real = lora_io.read_numpy_float64

    def spy(info: Any) -> np.ndarray:
        reads.append(info.name)
        return real(info)

    monkeypatch.setattr(lora_io, "read_numpy_float64", spy)
    out = tmp_path / "fft"
    before = _snapshot(tmp_path, base)
    start = time.perf_counter()
    with pytest.raises(fc.FourierConvertError) as info:
        from_lora(adapter, base=base, n_frequency=100)
    assert time.perf_counter() - start < 10
    assert (type(info.value), str(info.value)) == (exc_type, message)
    args = ["from-lora", "--adapter", adapter, "--base", base, "--n-frequency", 100, "--out", out]
    start = time.perf_counter()
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert time.perf_counter() - start < 10
    assert (res.exit_code, res.stdout, res.stderr) == (1, "", f"error: {message}\n"), res.output
    assert not out.exists()
    assert _snapshot(tmp_path, base) == before
    if not reads_factors:
        assert reads == []


def _set_tensors(adapter: Path, **tensors: torch.Tensor) -> None:
    """Replace or add tensors of the adapter's safetensors file (keys given without ``base_model.model.``)."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    path = adapter / "adapter_model.safetensors"
    stored = {k: v.clone() for k, v in load_torch(str(path)).items()}
    stored.update({f"base_model.model.{k}": v for k, v in tensors.items()})
    save_file(stored, str(path), metadata={"format": "pt"})


def _set_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _factor(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.01


@pytest.mark.parametrize(
    ("name", "key", "shape", "expected", "layer"),
    [
        ("llama", f"{V0}.lora_A.weight", (2, 1_000_000), [2, 64], f"'{V0}.weight' (a Linear, out x in = 32x64)"),
        ("llama", f"{V0}.lora_B.weight", (64, 2), [32, 2], f"'{V0}.weight' (a Linear, out x in = 32x64)"),
        ("llama", f"{Q0}.lora_A.weight", (2, 32), [2, 64], f"'{Q0}.weight' (a Linear, out x in = 64x64)"),
        ("gpt2", "transformer.h.1.attn.c_attn.lora_B.weight", (32, 2), [96, 2],
         "'transformer.h.1.attn.c_attn.weight' (a Conv1D stored in x out = 32x96, so out x in = 96x32)"),
        ("gpt2", "transformer.h.0.attn.c_attn.lora_A.weight", (2, 96), [2, 32],
         "'transformer.h.0.attn.c_attn.weight' (a Conv1D stored in x out = 32x96, so out x in = 96x32)"),
    ],
)  # fmt: skip
def test_cli_refuses_factors_that_do_not_fit_the_base_layer_before_reading_them(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    key: str,
    shape: tuple[int, int],
    expected: list[int],
    layer: str,
) -> None:
    """A lora_A / lora_B whose shape is not the base layer's (out x in, Conv1D weights stored in x out) is
    refused from the header, naming the key, the shape found and the shape expected."""
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[name]
    src = _peft_lora(tmp_path, name, r=2, target_modules=targets, fan_in_fan_out=name == "gpt2")
    _set_tensors(src, **{key: _factor(*shape)})
    msg = (
        f"{src}: base_model.model.{key}: shape {list(shape)}, expected {expected} for the base weight {layer} at "
        f"rank 2; {RETRAIN}"
    )
    _cli_fails(tmp_path, monkeypatch, fc.BaseMismatchError, msg, src, FIXTURES / name / "base")


def test_cli_refuses_factors_of_the_other_orientation_when_only_the_flag_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture_copy: Any
) -> None:
    """With a base lacking config.json, orientation comes from fan_in_fan_out; a GPT-2 LoRA saved with the
    flag off no longer gives a transposed delta silently: its factors do not fit, and the message names the flag."""
    base = fixture_copy("gpt2") / "base"
    (base / "config.json").unlink()
    src = _peft_lora(tmp_path, "gpt2", r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    _set_config(src, fan_in_fan_out=False)
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    msg = (
        f"{src}: {key}: shape [2, 32], expected [2, 96] for the base weight 'transformer.h.0.attn.c_attn.weight' (a "
        "Linear, out x in = 32x96) at rank 2; fan_in_fan_out in adapter_config.json is False and the base has no "
        f"config.json to say whether the layer is a Conv1D; check the flag, or {RETRAIN}"
    )
    _cli_fails(tmp_path, monkeypatch, fc.BaseMismatchError, msg, src, base)


def _sparse_factor(adapter: Path, key: str, shape: tuple[int, int]) -> None:
    """Store ``key`` as an F32 tensor of ``shape`` whose bytes are a hole at the end of a sparse file."""
    from safetensors.numpy import load_file as load_numpy

    path = adapter / "adapter_model.safetensors"
    small = {k: v for k, v in load_numpy(str(path)).items() if k != key}
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for k, v in small.items():
        data = np.ascontiguousarray(v, dtype=np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    size = 4 * shape[0] * shape[1]
    header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
        f.truncate(8 + len(raw) + offset + size)


def test_cli_refuses_a_1gb_sparse_lora_a_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A [4, 62,500,000] float32 lora_A (1 GB, a sparse file) for a 32x64 layer was read whole (18.8 GB of
    memory, over 200 s); it is refused from the header, in well under a second of work."""
    src = _peft_lora(tmp_path, "llama", r=4, target_modules=["q_proj", "v_proj"])
    key = f"base_model.model.{V0}.lora_A.weight"
    _sparse_factor(src, key, (4, 62_500_000))
    assert (src / "adapter_model.safetensors").stat().st_size > 10**9
    msg = (
        f"{src}: {key}: shape [4, 62500000], expected [4, 64] for the base weight '{V0}.weight' (a Linear, out x in "
        f"= 32x64) at rank 4; {RETRAIN}"
    )
    _cli_fails(tmp_path, monkeypatch, fc.BaseMismatchError, msg, src)


def test_cli_refuses_factors_too_large_to_draw_positions_for_without_a_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a base nothing bounds the factors' shapes: a lora_A [2, 1,000,000] and lora_B [1,000,000, 2] (16 MB,
    sparse) ask for a permutation of 10**12 positions (8 TB). That was an 'unexpected RuntimeError' from torch's
    allocator; it is refused before any factor is read, naming both factors and the memory available."""
    from click.testing import CliRunner

    import fourier_convert.io.lora_adapter as lora_io
    from fourier_convert.cli.main import cli

    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj"])
    _set_config(src, base_model_name_or_path=None)
    for key, shape in [(f"{Q0}.lora_A.weight", (2, 1_000_000)), (f"{Q0}.lora_B.weight", (1_000_000, 2))]:
        _sparse_factor(src, f"base_model.model.{key}", shape)
    reads: list[str] = []
    real = lora_io.read_numpy_float64
    monkeypatch.setattr(lora_io, "read_numpy_float64", lambda info: reads.append(info.name) or real(info))
    out = tmp_path / "fft"
    before = _snapshot(tmp_path, LLAMA_BASE)
    pattern = (
        re.escape(
            f"{src / 'adapter_model.safetensors'}: '{Q0}' (lora_B [1000000, 2] times lora_A [2, 1000000]) is "
            "1000000x1000000: PEFT draws its spectral positions from a permutation of all 1,000,000,000,000 "
            "positions, 8.0 TB of memory, more than the "
        )
        + r"[0-9.]+ [KMGT]?B"
        + re.escape(
            " this machine has available; pass --base to check the factors against the model (factors this size "
            "are likely corrupt), or run on a machine with more memory"
        )
    )
    with pytest.raises(fc.ResourceError) as info:
        from_lora(src, n_frequency=100)
    assert re.fullmatch(pattern, str(info.value)), str(info.value)
    start = time.perf_counter()
    res = CliRunner().invoke(cli, ["from-lora", "--adapter", str(src), "--n-frequency", "100", "--out", str(out)])
    assert time.perf_counter() - start < 10
    assert (res.exit_code, res.stdout) == (1, "")
    assert re.fullmatch(f"error: {pattern}\n", res.stderr), res.stderr
    assert not out.exists()
    assert _snapshot(tmp_path, LLAMA_BASE) == before
    assert reads == []


@pytest.mark.parametrize(
    ("tensors", "config", "found"),
    [
        ({f"{Q0}.lora_B.weight": (64, 3)}, {},
         f"'{Q0}': lora_A is [2, 64] but lora_B is [64, 3] (ranks differ); re-save the adapter with PEFT"),
        ({}, {"rank_pattern": {"v_proj": 3}},
         f"'{V0}': the factors have rank 2 but the config gives rank 3; check r / rank_pattern in adapter_config.json"),
        ({f"{V0}.lora_A.weight": (3, 64), f"{V0}.lora_B.weight": (32, 3)}, {},
         f"'{V0}': the factors have rank 3 but the config gives rank 2; check r / rank_pattern in adapter_config.json"),
    ],
)  # fmt: skip
def test_cli_refuses_factor_ranks_that_disagree_before_reading_them(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tensors: dict[str, tuple[int, int]],
    config: dict[str, Any],
    found: str,
) -> None:
    """Lora_A and lora_B of another rank than each other or than r / rank_pattern, from the header."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_tensors(src, **{k: _factor(*shape) for k, shape in tensors.items()})
    _set_config(src, **config)
    msg = f"{src / 'adapter_model.safetensors'}: {found}"
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, msg, src)


FLOAT32_RANGE = "is beyond float32's range (3.4e+38), where PEFT computes the delta"


@pytest.mark.parametrize(
    ("config", "found"),
    [
        ({"lora_alpha": 1e300},
         f"lora_alpha is 1e+300: the LoRA scale lora_alpha / r = 5e+299 of '{Q0}' (rank 2) {FLOAT32_RANGE}; "
         "set lora_alpha to the value the adapter was trained with"),
        ({"lora_alpha": 1e39},
         f"lora_alpha is 1e+39: the LoRA scale lora_alpha / r = 5e+38 of '{Q0}' (rank 2) {FLOAT32_RANGE}; "
         "set lora_alpha to the value the adapter was trained with"),
        ({"alpha_pattern": {"v_proj": 1e39}, "use_rslora": True},
         f"alpha_pattern['v_proj'] is 1e+39: the LoRA scale alpha_pattern['v_proj'] / sqrt(r) = 7.07e+38 of '{V0}' "
         f"(rank 2) {FLOAT32_RANGE}; set alpha_pattern['v_proj'] to the value the adapter was trained with"),
        ({"lora_alpha": float("inf")}, "lora_alpha is inf, expected a finite number; fix the config"),
        ({"lora_alpha": float("-inf")}, "lora_alpha is -inf, expected a finite number; fix the config"),
        ({"lora_alpha": float("nan")}, "lora_alpha is nan, expected a finite number; fix the config"),
        ({"lora_alpha": 10**400}, f"lora_alpha is 1{'0' * 56}..., expected a finite number; fix the config"),
        ({"lora_alpha": "16"}, "lora_alpha is '16', expected a finite number; fix the config"),
        ({"lora_alpha": None}, "lora_alpha is None, expected a finite number; fix the config"),
        ({"alpha_pattern": {"v_proj": float("inf")}},
         "alpha_pattern['v_proj'] is inf, expected a finite number; fix the config"),
        ({"alpha_pattern": {"v_proj": float("nan")}},
         "alpha_pattern['v_proj'] is nan, expected a finite number; fix the config"),
        ({"alpha_pattern": {"v_proj": 10**400}},
         f"alpha_pattern['v_proj'] is 1{'0' * 56}..., expected a finite number; fix the config"),
        ({"r": 0}, "r is 0, expected an integer >= 1; fix the config"),
        ({"r": -2}, "r is -2, expected an integer >= 1; fix the config"),
        ({"r": 2.0}, "r is 2.0, expected an integer >= 1; fix the config"),
        ({"r": float("nan")}, "r is nan, expected an integer >= 1; fix the config"),
        ({"r": True}, "r is True, expected an integer >= 1; fix the config"),
        ({"rank_pattern": {"v_proj": 0}}, "rank_pattern['v_proj'] is 0, expected an integer >= 1; fix the config"),
        ({"rank_pattern": {"v_proj": -2}}, "rank_pattern['v_proj'] is -2, expected an integer >= 1; fix the config"),
        ({"rank_pattern": {"v_proj": 2.5}},
         "rank_pattern['v_proj'] is 2.5, expected an integer >= 1; fix the config"),
    ],
)  # fmt: skip
def test_cli_refuses_non_finite_or_overflowing_scales_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], found: str
) -> None:
    """Lora_alpha 1e300 ended in ``unexpected OverflowError``; a scale beyond float32 (PEFT computes the delta
    in the layer's dtype), a non-finite or non-numeric alpha and a rank below 1 are refused from the config, naming
    the field and the value, before any factor is read."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(src, **config)
    msg = f"{src / 'adapter_config.json'}: {found}"
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, msg, src)


def test_cli_refuses_coefficients_beyond_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scale float32 holds, times large factors, gave infinite float32 coefficients and exit 0."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(src, lora_alpha=1e37)
    key = "model.layers.1.self_attn.v_proj.lora_B.weight"
    b = load_file(str(src / "adapter_model.safetensors"))[f"base_model.model.{key}"]
    _set_tensors(src, **{key: torch.from_numpy(b * 1e4)})
    msg = (
        f"{src / 'adapter_model.safetensors'}: the FourierFT coefficients of 'model.layers.1.self_attn.v_proj' "
        "reach 2.66e+39 with --scaling 150 (LoRA scale lora_alpha / r = 5e+36), beyond float32's range (3.4e+38); "
        "raise --scaling (e.g. to 1.2e+04; the coefficients shrink in proportion), or check lora_alpha and the factors"
    )
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, msg, src, reads_factors=True)
    fft, _ = from_lora(src, base=LLAMA_BASE, n_frequency=100, scaling=1.2e4)  # as the message says
    assert all(bool(torch.isfinite(t).all()) for t in fft.tensors.values())


def test_a_large_representable_alpha_converts_exactly(tmp_path: Path) -> None:
    """A large alpha whose scale float32 holds converts, without overflow, to the same fit, scaled."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _, plain = from_lora(src, base=LLAMA_BASE, n_frequency=100)
    _set_config(src, lora_alpha=8e30)  # 1e30 times the default alpha of 8
    fft, report = from_lora(src, base=LLAMA_BASE, n_frequency=100, scaling=150e30)
    for got, want in zip(report.layers, plain.layers, strict=True):
        assert got.retained_energy == pytest.approx(want.retained_energy, rel=1e-9)
        assert got.energy == pytest.approx(want.energy * 1e60, rel=1e-9)
    assert all(bool(torch.isfinite(t).all()) for t in fft.tensors.values())


def _onnx_export(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"\x08\x07")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


@pytest.mark.parametrize("kind", ["model", "parent", "onnx", "fourierft"])
def test_cli_says_what_a_wrong_adapter_folder_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture_copy: Any, kind: str
) -> None:
    """A model folder, the folder above a LoRA adapter, an ONNX export or a FourierFT adapter given as
    --adapter: the message says what the folder is and what to pass (the checks merge uses)."""
    if kind == "model":
        adapter = fixture_copy("llama") / "base"
        cls: type[fc.FourierConvertError] = fc.AdapterError
        msg = (
            f"{adapter}: is a model folder (config.json and weights), not a LoRA adapter; pass it as --base (or "
            "--model for to-onnx), and the adapter folder as --adapter"
        )
    elif kind == "parent":
        lora = _peft_lora(tmp_path / "loras", "llama", r=2, target_modules=["q_proj"])
        adapter = lora.parent
        cls = fc.InputFileError
        msg = (
            f"{adapter / 'adapter_config.json'}: file not found; adapter folders inside it: {lora.name}; pass {lora}, "
            f"or {adapter}:{lora.name}"
        )
    elif kind == "onnx":
        adapter = _onnx_export(tmp_path / "onnx")
        cls = fc.AdapterError
        msg = f"{adapter}: is an ONNX export (model.onnx), not a LoRA adapter; pass the LoRA adapter folder itself"
    else:
        adapter = fixture_copy("llama") / "adapter"
        cls = fc.AdapterError
        msg = (
            f"{adapter / 'adapter_config.json'}: peft_type is 'FOURIERFT', expected 'LORA'; this is already a "
            "FourierFT adapter (to-lora converts the other way)"
        )
    _cli_fails(tmp_path, monkeypatch, cls, msg, adapter)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_cli_refuses_lora_weights_that_are_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    """A FIFO (which would block) or a link to /dev/zero as adapter_model.safetensors is named by type, not read
    and not reported missing."""
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    lora = _peft_lora(tmp_path / "loras", "llama", r=2, target_modules=["q_proj"])
    weights = lora / "adapter_model.safetensors"
    replace_with_special_file(weights, kind)
    out = tmp_path / "fft"
    start = time.perf_counter()
    res = CliRunner().invoke(cli, ["from-lora", "--adapter", str(lora), "--base", str(FIXTURES / "llama" / "base"),
                                   "--out", str(out)])  # fmt: skip
    assert time.perf_counter() - start < 10
    assert (res.exit_code, res.stdout) == (1, "")
    assert res.stderr == f"error: {weights}: is not a regular file (a FIFO or a device); pass a .safetensors file\n"
    assert not out.exists()


# -- what PEFT would not apply, or would apply differently, is refused -----------------------------------------------
SELECTED = "in adapter_config.json if the module was trained, or remove its factors"
Q1, V1 = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
NAMES_FIX = "set target_modules in adapter_config.json to the adapted modules' names, as PEFT's save_pretrained writes"


def _factor_key(module: str, half: str = "A") -> str:
    return f"base_model.model.{module}.lora_{half}.weight"


@pytest.mark.parametrize(
    ("config", "module", "found", "fix", "peft_loads"),
    [
        ({"target_modules": ["q_proj"]}, V0, "which target_modules ['q_proj'] does not select",
         "add the module to target_modules", True),
        ({"target_modules": ["self_attn.q_proj", V1]}, V0,
         f"which target_modules ['self_attn.q_proj', '{V1}'] does not select",
         "add the module to target_modules", True),
        ({"target_modules": r".*\.q_proj"}, V0,
         r"which target_modules '.*\\.q_proj' (a regex matched against the whole name) does not select",
         "make target_modules match the module", True),
        ({"target_modules": []}, Q0, "which target_modules [] does not select", "add the module to target_modules",
         False),
        ({"exclude_modules": ["v_proj"]}, V0, "which exclude_modules ['v_proj'] excludes",
         "remove the module from exclude_modules", True),
        ({"exclude_modules": r".*layers\.1\..*"}, Q1, r"which exclude_modules '.*layers\\.1\\..*' excludes",
         "make exclude_modules not match the module", True),
        ({"layers_to_transform": [0]}, Q1, "which layers_to_transform [0] does not select",
         "add its layer to layers_to_transform", True),
        ({"layers_to_transform": 1, "layers_pattern": "h"}, Q0,
         "which layers_to_transform 1 with layers_pattern 'h' does not select",
         "add its layer to layers_to_transform (or fix layers_pattern)", False),
        ({"modules_to_save": ["v_proj"]}, V0,
         "which modules_to_save ['v_proj'] lists (PEFT saves that module whole instead)",
         "remove the module from modules_to_save", False),
    ],
)  # fmt: skip
def test_cli_refuses_factors_of_a_module_the_config_does_not_select(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, Any],
    module: str,
    found: str,
    fix: str,
    peft_loads: bool,
) -> None:
    """Factors of a module the config leaves out (target_modules as a list or a regex, exclude_modules,
    layers_to_transform / layers_pattern, modules_to_save) were converted; PEFT puts no LoRA layer on that module
    and ignores them. Refused, naming the first such tensor, the field and the fix; PEFT agrees on the module."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(src, **config)
    msg = (
        f"{src / 'adapter_model.safetensors'}: tensor '{_factor_key(module)}' is a factor of '{module}', {found}, so "
        f"PEFT puts no LoRA layer there and ignores it; {fix} {SELECTED}"
    )
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, msg, src)
    if peft_loads:  # PEFT, given the same folder, puts no LoRA layer on the module
        assert module not in _peft_deltas("llama", src)
    else:  # PEFT matches no module at all, or fails on the modules_to_save entry it finds no tensor for
        with pytest.raises((ValueError, KeyError)):
            _peft_deltas("llama", src)


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": r".*\.layers\.1\..*_proj", "exclude_modules": ["k_proj"]},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        {"target_modules": ["q_proj", "o_proj"], "exclude_modules": r".*\.0\.self_attn\.o_proj"},
        {"target_modules": ["self_attn.q_proj", "model.layers.1.mlp.up_proj"], "layers_to_transform": 1},
    ],
)
def test_peft_selections_convert_exactly_the_modules_peft_adapts(tmp_path: Path, config: dict[str, Any]) -> None:
    """PEFT-saved adapters selecting by regex, exclude_modules, layers_to_transform / layers_pattern pass the
    selection check, and every module PEFT adapts is converted."""
    src = _peft_lora(tmp_path, "llama", r=2, **config)
    _, report = from_lora(src, base=LLAMA_BASE, n_frequency=100)
    assert {x.module for x in report.layers} == set(_peft_deltas("llama", src))


@pytest.mark.parametrize(
    ("config", "found", "fix"),
    [
        ({"target_modules": None},
         "target_modules is not set, so PEFT adapts the default modules of the base model's type, which the adapter "
         "does not say", None),
        ({"target_modules": "all-linear"},
         "target_modules is 'all-linear', which PEFT expands against the base model when it loads the adapter (every "
         "linear layer but the output layer)", None),
        ({"target_modules": "ALL-Linear"},
         "target_modules is 'ALL-Linear', which PEFT expands against the base model when it loads the adapter (every "
         "linear layer but the output layer)", None),
        ({"target_modules": 5}, "target_modules is 5, expected a list or a regex", "fix the config"),
        ({"exclude_modules": [1]}, "exclude_modules is [1], expected a list of names or a regex", "fix the config"),
        ({"layers_to_transform": "1"}, "layers_to_transform is '1', expected an int or list", "fix the config"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]},
         "layers_to_transform is [0] with target_modules a regex ('.*q_proj'), which PEFT refuses on loading",
         "remove layers_to_transform, or make target_modules a list of names"),
        ({"target_modules": ".*q_proj", "layers_pattern": "layers"},
         "layers_pattern is 'layers' with target_modules a regex ('.*q_proj'), which PEFT refuses on loading",
         "remove layers_pattern, or make target_modules a list of names"),
        ({"layers_pattern": "layers"},
         "layers_pattern is 'layers' without layers_to_transform, which PEFT refuses on loading",
         "set layers_to_transform, or remove layers_pattern"),
    ],
)  # fmt: skip
def test_cli_refuses_a_selection_the_adapter_cannot_check_or_peft_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], found: str, fix: str | None
) -> None:
    """target_modules unset or 'all-linear' is resolved by PEFT against the base model (PEFT's save_pretrained
    always writes the names); selection fields of the wrong type, and combinations PEFT's LoraConfig refuses."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(src, **config)
    fix = fix or NAMES_FIX
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, f"{src / 'adapter_config.json'}: {found}; {fix}", src)


@pytest.mark.parametrize("half", ["A", "B"])
def test_cli_refuses_a_factor_without_the_peft_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, half: str
) -> None:
    """A lora_A (or lora_B) stored without 'base_model.model.' was converted; PEFT warns of a missing adapter key
    and keeps the factor it initialised the layer with. Refused, naming the key."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    path = src / "adapter_model.safetensors"
    stored = load_torch(str(path))
    key = _factor_key(V0, half)
    stored[key.removeprefix("base_model.model.")] = stored.pop(key)
    save_file(stored, str(path), metadata={"format": "pt"})
    msg = (
        f"{path}: tensor '{V0}.lora_{half}.weight' lacks PEFT's 'base_model.model.' prefix, so PEFT would ignore it; "
        "re-save the adapter with PEFT (or add the prefix)"
    )
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, msg, src)


MERGE_INSTEAD = "convert a plain LoRA adapter (merge this one with PEFT instead)"
NO_MERGE_EITHER = "convert a plain LoRA adapter (PEFT cannot merge this one either)"
NOT_A_MAP = "which PEFT refuses on loading: it takes a map or null; fix the config"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kasa_config": {}},
         "kasa_config is {}: KaSA drops the base weight's r smallest singular directions and puts a learned diagonal "
         f"(lora_diag) between lora_A and lora_B, so the delta is not scale * lora_B @ lora_A; {MERGE_INSTEAD}"),
        ({"kasa_config": {"beta": 0.0001, "gamma": 0.001}},
         "kasa_config is {'beta': 0.0001, 'gamma': 0.001}: KaSA drops the base weight's r smallest singular directions "
         "and puts a learned diagonal (lora_diag) between lora_A and lora_B, so the delta is not scale * lora_B @ "
         f"lora_A; {MERGE_INSTEAD}"),
        ({"use_bdlora": {"target_modules_bd_a": ["q_proj"], "nblocks": 2}},
         "use_bdlora is {'target_modules_bd_a': ['q_proj'], 'nblocks': 2}: BD-LoRA stores lora_A or lora_B as the "
         f"blocks of a block-diagonal matrix, not as the factor itself; {MERGE_INSTEAD}"),
        ({"use_bdlora": {}},
         "use_bdlora is {}: BD-LoRA stores lora_A or lora_B as the blocks of a block-diagonal matrix, not as the "
         f"factor itself; {MERGE_INSTEAD}"),
        ({"use_bdlora": True}, f"use_bdlora is True, {NOT_A_MAP}"),
        ({"use_bdlora": False}, f"use_bdlora is False, {NOT_A_MAP}"),
        ({"arrow_config": {}},
         "arrow_config is {}: Arrow routes every token through the top-k of several LoRA experts, which no single "
         f"static delta represents; {NO_MERGE_EITHER}"),
        ({"arrow_config": "yes"}, f"arrow_config is 'yes', {NOT_A_MAP}"),
        ({"velora_config": True}, f"velora_config is True, {NOT_A_MAP}"),
        ({"monteclora_config": 1}, f"monteclora_config is 1, {NOT_A_MAP}"),
        ({"eva_config": []}, f"eva_config is [], {NOT_A_MAP}"),
        ({"lora_bias": True},
         f"lora_bias is True: lora_bias adds a bias to lora_B, which FourierFT cannot represent; {MERGE_INSTEAD}"),
        ({"alora_invocation_tokens": [5, 6]},
         "alora_invocation_tokens is [5, 6]: aLoRA activates only after invocation tokens, which a static delta "
         f"cannot do; {NO_MERGE_EITHER}"),
        ({"use_qalora": True},
         f"use_qalora is True: QA-LoRA pools the input groups, which changes the maths of the delta; {MERGE_INSTEAD}"),
        ({"layer_replication": [[0, 2], [1, 2]]},
         "layer_replication is [[0, 2], [1, 2]]: layer_replication duplicates base layers, which changes the model "
         f"itself; {MERGE_INSTEAD}"),
        ({"trainable_token_indices": [1, 2]},
         "trainable_token_indices is [1, 2]: trainable tokens change embedding rows, which FourierFT cannot "
         f"represent; {MERGE_INSTEAD}"),
        ({"megatron_config": {"tensor_model_parallel_size": 2}},
         "megatron_config is {'tensor_model_parallel_size': 2}: Megatron-parallel LoRA layers are not plain linear "
         f"layers; {MERGE_INSTEAD}"),
        ({"target_parameters": ["mlp.experts.down_proj"]},
         "target_parameters is ['mlp.experts.down_proj']: target_parameters adapts raw parameters (e.g. MoE "
         f"experts), not linear layers; {MERGE_INSTEAD}"),
    ],
)  # fmt: skip
def test_cli_refuses_lora_variants_peft_applies_differently_or_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], message: str
) -> None:
    """KaSA (even kasa_config {}: PEFT makes it a KasaConfig, which is true), BD-LoRA and Arrow were converted as
    plain LoRA; they, the other variants that change the delta, and sub-configs PEFT cannot load are refused from
    the config, before any factor is read."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(src, **config)
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, f"{src / 'adapter_config.json'}: {message}", src)


@pytest.mark.parametrize(
    ("field", "value", "found"),
    [
        ("task_type", "BOGUS", "task_type is 'BOGUS', which PEFT refuses on loading; it takes one of SEQ_CLS, "
         "SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION or null"),
        ("bias", None, "bias is None, expected one of none, all, lora_only"),
    ],
)  # fmt: skip
def test_cli_refuses_config_values_peft_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str, value: Any, found: str
) -> None:
    """The task type was copied into a FourierFT adapter PEFT could not load; a null bias was taken as 'none'."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(src, **{field: value})
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, f"{src / 'adapter_config.json'}: {found}; fix the config", src)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_cli_refuses_an_initialisation_peft_reruns_on_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: str
) -> None:
    """PEFT re-runs these on the base weights when it loads the adapter (q_proj's base moved by up to 0.04 on this
    fixture with PiSSA), so converting the factors against the unchanged base would not behave like the adapter."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(src, init_lora_weights=init)
    message = (
        f"init_lora_weights is {init!r}: PEFT runs this initialisation again on the base weights when it loads the "
        "adapter (the base becomes W - scale * B0 @ A0), so the adapter's delta against the original base is not "
        "scale * lora_B @ lora_A; re-save it with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion"
        "=...), which turns it into a plain LoRA"
    )
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, f"{src / 'adapter_config.json'}: {message}", src)


INIT_FIX = "set init_lora_weights to true (it only sets the factors PEFT starts from, which the saved ones replace)"
UNKNOWN_INIT = "PEFT fails to load the adapter with it (an initialisation it does not know)"


@pytest.mark.parametrize(
    ("init", "lora", "found", "peft_error"),
    [
        ("bogus", {}, f"init_lora_weights is 'bogus': {UNKNOWN_INIT}", "Unknown initialization"),
        ("EVA", {}, f"init_lora_weights is 'EVA': {UNKNOWN_INIT}", "Unknown initialization"),
        ("pissa_x", {}, f"init_lora_weights is 'pissa_x': {UNKNOWN_INIT}", "should be 'pissa' or"),
        (1, {}, f"init_lora_weights is 1: {UNKNOWN_INIT}", "no attribute 'lower'"),
        ([1], {}, f"init_lora_weights is [1]: {UNKNOWN_INIT}", "no attribute 'lower'"),
        ("orthogonal", {"r": 3}, f"init_lora_weights is 'orthogonal' and '{Q0}' has rank 3: PEFT fails to load the "
         "adapter (its orthogonal initialisation needs an even rank)", "requires the LoRA rank to be even"),
        ("orthogonal", {"rank_pattern": {"v_proj": 3}}, f"init_lora_weights is 'orthogonal' and '{V0}' has rank 3: "
         "PEFT fails to load the adapter (its orthogonal initialisation needs an even rank)",
         "requires the LoRA rank to be even"),
        ("MICA", {"r": 40}, f"init_lora_weights is 'MICA' and '{V0}' has rank 40, more than min(out, in) = 32: PEFT "
         "fails to load the adapter (MiCA takes lora_B from r of the base weight's singular vectors)",
         "MiCA requires `r` <= min"),
    ],
)  # fmt: skip
def test_cli_refuses_an_initialisation_peft_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: Any, lora: dict[str, Any], found: str, peft_error: str
) -> None:
    """init_lora_weights PEFT fails on even with every factor present (a string it does not know, in any other case
    than it matches, a true non-string, orthogonal at an odd rank of r or rank_pattern, MiCA at a rank above
    min(out, in)) were converted; refused from the config and the factor headers."""
    from peft import PeftModel

    src = _peft_lora(tmp_path, "llama", **{"r": 2, "target_modules": ["q_proj", "v_proj"], **lora})
    _set_config(src, init_lora_weights=init)
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, f"{src / 'adapter_config.json'}: {found}; {INIT_FIX}", src)
    with pytest.raises((ValueError, AttributeError), match=re.escape(peft_error)):
        PeftModel.from_pretrained(load_task_model("llama", LLAMA_BASE), str(src))


@pytest.mark.parametrize(
    "config",
    [
        {"init_lora_weights": "mica"},
        {"init_lora_weights": "MICA"},
        {"init_lora_weights": "Gaussian"},
        {"init_lora_weights": None},
        {"init_lora_weights": 0},
        {"init_lora_weights": "orthogonal"},
        {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}},
        {"init_lora_weights": "lora_ga", "lora_ga_config": {}},
        {"corda_config": {"corda_method": "kpm"}, "loftq_config": {"loftq_bits": 4}},
        {"lora_dropout": 0.1, "ensure_weight_tying": True},
        {"use_dora": False, "lora_bias": False, "kasa_config": None, "use_bdlora": None, "arrow_config": None,
         "alora_invocation_tokens": [], "monteclora_config": False, "megatron_core": "megatron.core",
         "qalora_group_size": 8},
    ],
)  # fmt: skip
def test_fields_that_do_not_change_peft_delta_are_accepted(tmp_path: Path, config: dict[str, Any]) -> None:
    """Initialisation fields that leave the base weights alone when PEFT loads the adapter (MiCA, orthogonal, EVA,
    LoRA-GA; CorDA's and LoftQ's sub-configs without their init_lora_weights), training-only fields and variant
    fields at values PEFT treats as off convert to the same adapter as without them."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    plain, _ = from_lora(src, base=LLAMA_BASE, n_frequency=100)
    _set_config(src, **config)
    fft, _ = from_lora(src, base=LLAMA_BASE, n_frequency=100)
    assert fft.tensors.keys() == plain.tensors.keys()
    for key, value in plain.tensors.items():
        torch.testing.assert_close(fft.tensors[key], value, rtol=0, atol=0)


def _drop_factors(adapter: Path, *modules: str) -> None:
    """Remove the lora_A / lora_B of ``modules`` from the adapter's safetensors file."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    path = adapter / "adapter_model.safetensors"
    keys = {_factor_key(m, half) for m in modules for half in "AB"}
    stored = load_torch(str(path))
    assert keys <= set(stored)
    save_file({k: v for k, v in stored.items() if k not in keys}, str(path), metadata={"format": "pt"})


UNFACTORED_FIX = (
    "re-save the adapter with PEFT if the module was trained, or leave the module out of the selection in "
    "adapter_config.json (e.g. list it in exclude_modules)"
)


@pytest.mark.parametrize(
    ("init", "dropped", "problem"),
    [
        (False, [V0], "PEFT would initialise it randomly when loading the adapter (init_lora_weights=False), so "
         "PEFT's delta there is random"),
        ("", [V0], "PEFT would initialise it randomly when loading the adapter (init_lora_weights=''), so PEFT's "
         "delta there is random"),  # a false value PEFT loads, as false
        ("orthogonal", [V0, V1], "PEFT would initialise it randomly when loading the adapter "
         "(init_lora_weights='orthogonal': random factors whose product is zero only up to rounding, different on "
         "every load)"),
    ],
)  # fmt: skip
def test_cli_refuses_a_selected_module_without_factors_that_peft_initialises_randomly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: Any, dropped: list[str], problem: str
) -> None:
    """A module the config selects in the base but the file holds no factors for was taken as "no delta"; PEFT
    loads the adapter (warning of the missing keys) with the LoRA layer it initialised there, which with these
    init_lora_weights has random factors: refused from the headers, naming the first such module."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _drop_factors(src, *dropped)
    _set_config(src, init_lora_weights=init)
    more = " (nor for 1 other selected module)" if len(dropped) > 1 else ""
    msg = (
        f"{src / 'adapter_model.safetensors'}: adapter_config.json selects '{V0}' of the base, but the adapter holds "
        f"no lora_A / lora_B for it{more}: {problem}; {UNFACTORED_FIX}"
    )
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, msg, src)
    from peft import PeftModel

    deltas = []
    missing = f"Found missing adapter keys while loading the checkpoint: ['{_factor_key(V0)[: -len('weight')]}default"
    for seed in (0, 1):  # PEFT loads it, warning only, with a non-zero delta at the module, different on every load
        torch.manual_seed(seed)
        with pytest.warns(UserWarning, match=re.escape(missing)):
            model = PeftModel.from_pretrained(load_task_model("llama", LLAMA_BASE), str(src))
        deltas.append(model.base_model.model.get_submodule(V0).get_delta_weight("default").detach())
    assert bool((deltas[0] != 0).any()) and not torch.equal(deltas[0], deltas[1])


@pytest.mark.parametrize(
    ("targets", "found"),
    UNADAPTABLE_SELECTIONS,
)
def test_cli_refuses_a_selection_of_modules_lora_cannot_adapt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, targets: Any, found: str
) -> None:
    """target_modules that pick a norm, or a regex that also picks the containers: PEFT fails to load the adapter
    (the factors in the file are only q_proj / v_proj's); it was converted with exit 0."""
    from peft import PeftModel

    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(src, target_modules=targets)
    msg = (
        f"{src / 'adapter_config.json'}: target_modules selects {found}: PEFT's LoRA cannot adapt it and fails to "
        "load the adapter (Target module ... is not supported); narrow target_modules to the adapted linear layers "
        "(the modules of the adapter's lora_A keys), or list the module in exclude_modules"
    )
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, msg, src)
    with pytest.raises(ValueError, match=r"(?s)Target module .* is not supported"):
        PeftModel.from_pretrained(load_task_model("llama", LLAMA_BASE), str(src))


@pytest.mark.parametrize(
    "config",
    [
        {"init_lora_weights": True},
        {},
        {"init_lora_weights": "gaussian"},
        {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}},
        {"init_lora_weights": "lora_ga", "lora_ga_config": {}},
        {"init_lora_weights": "mica"},
    ],
)
def test_cli_converts_a_selected_module_without_factors_as_the_zero_delta_peft_loads(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    """With init_lora_weights that start one factor at zero, PEFT loads a selected module without factors with a
    zero delta: the conversion leaves it out, says so in one warning, and PEFT runs the output as it runs the LoRA."""
    from click.testing import CliRunner
    from peft import PeftModel

    from fourier_convert.cli.main import cli

    lora, _ = fc.to_lora(FIXTURES / "llama" / "adapter", base=LLAMA_BASE, rank=1.0)  # exact: the round trip is too
    src = tmp_path / "lora"
    lora.save(src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k != "init_lora_weights"}
    cfg["rank_pattern"] = {**cfg["rank_pattern"], "k_proj": 8}  # MiCA needs r <= min(out, in) = 32
    (src / "adapter_config.json").write_text(
        json.dumps({**cfg, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **config})
    )
    unfactored = sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "o_proj"))
    peft_deltas = _peft_deltas("llama", src)
    assert all(not peft_deltas[m].any() for m in unfactored)  # PEFT puts a LoRA layer there, with a zero delta
    out = tmp_path / "fft"
    args = [
        "from-lora",
        "--adapter",
        src,
        "--base",
        LLAMA_BASE,
        "--n-frequency",
        50,
        "--n-frequency-pattern",
        "v_proj=30",
    ]
    res = CliRunner().invoke(cli, [str(a) for a in [*args, "--seed", 777, "--scaling", 150, "--out", out]])
    assert res.exit_code == 0, res.output
    init = repr(config.get("init_lora_weights", True))
    warning = (
        f"warning: 4 modules that adapter_config.json selects in the base have no lora_A / lora_B in the adapter "
        f"({', '.join(unfactored[:3])}, ...): PEFT loads them with a zero delta (init_lora_weights={init} starts one "
        "factor at zero), so the FourierFT adapter leaves them unchanged too"
    )
    assert warning in res.stderr.splitlines(), res.stderr
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    )
    x = _inputs("llama")
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_task_model("llama", LLAMA_BASE), str(src)).eval()(**x).logits
        got = PeftModel.from_pretrained(load_task_model("llama", LLAMA_BASE), str(out)).eval()(**x).logits
        plain = load_task_model("llama", LLAMA_BASE)(**x).logits
    assert not torch.allclose(plain, want, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("config", "state"), [({"velora_config": {}}, "lora_velora_embed"), ({"monteclora_config": {}}, "lora_monteclora")]
)
def test_velora_and_monteclora_convert_as_the_plain_lora_peft_runs(
    tmp_path: Path, config: dict[str, Any], state: str
) -> None:
    """VeLoRA changes only the backward pass and MonteCLoRA samples only in training: PEFT's delta and its forward
    pass in eval mode are plain LoRA's. The training state PEFT saves beside the factors is skipped, and PEFT runs the
    adapter as the same adapter without the variant."""
    from peft import PeftModel
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"], **config)
    assert any(state in k for k in load_file(str(src / "adapter_model.safetensors")))
    _, report = from_lora(src, base=LLAMA_BASE, n_frequency=100)
    deltas = _peft_deltas("llama", src)
    assert {x.module for x in report.layers} == set(deltas)
    for layer in report.layers:
        assert layer.energy == pytest.approx(float(np.sum(deltas[layer.module] ** 2)), rel=1e-6)
    plain = tmp_path / "plain"
    plain.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**cfg, **dict.fromkeys(config)}))
    tensors = load_torch(str(src / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if state not in k}, str(plain / "adapter_model.safetensors"))
    x = _inputs("llama")
    with torch.no_grad():
        got = PeftModel.from_pretrained(load_task_model("llama", LLAMA_BASE), str(src)).eval()(**x).logits
        want = PeftModel.from_pretrained(load_task_model("llama", LLAMA_BASE), str(plain)).eval()(**x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _, plain_report = from_lora(plain, base=LLAMA_BASE, n_frequency=100)
    assert [x.energy for x in report.layers] == [x.energy for x in plain_report.layers]


def test_a_training_state_tensor_without_its_variant_is_still_refused(tmp_path: Path) -> None:
    """A VeLoRA embedding in an adapter whose config sets no velora_config is no factor, bias or head: refused as
    before (the skip is only for the variant the config sets, on a module with factors)."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"], velora_config={})
    _set_config(src, velora_config=None)
    with pytest.raises(fc.AdapterError, match=re.escape(f"'base_model.model.{Q0}.lora_velora_embed'")):
        from_lora(src, base=LLAMA_BASE, n_frequency=100)
    src2 = _peft_lora(tmp_path / "b", "llama", r=2, target_modules=["q_proj", "v_proj"], velora_config={})
    _set_tensors(src2, **{"model.layers.0.mlp.up_proj.lora_velora_embed": torch.zeros(2)})
    with pytest.raises(fc.AdapterError, match=re.escape("'base_model.model.model.layers.0.mlp.up_proj.lora_velora")):
        from_lora(src2, base=LLAMA_BASE, n_frequency=100)


@pytest.mark.parametrize(
    ("init", "rank", "found", "peft_error"),
    [
        ("orthogonal", 3, "has rank 3: PEFT fails to load the adapter (its orthogonal initialisation needs an even "
         "rank)", "requires the LoRA rank to be even"),
        ("mica", 40, "has rank 40, more than min(out, in) = 32: PEFT fails to load the adapter (MiCA takes lora_B "
         "from r of the base weight's singular vectors)", "MiCA requires `r` <= min(in_features, out_features)"),
    ],
)  # fmt: skip
def test_cli_refuses_a_selected_module_without_factors_at_a_rank_peft_cannot_initialise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init: str, rank: int, found: str, peft_error: str
) -> None:
    """PEFT initialises a selected module without factors too, at the rank the config gives it: where its
    initialisation cannot take that rank, PEFT fails to load the adapter at all."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(
        src, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=init, rank_pattern={"k_proj": rank}
    )
    k0 = "model.layers.0.self_attn.k_proj"
    message = f"{src / 'adapter_config.json'}: init_lora_weights is {init!r} and {k0!r} {found}; {INIT_FIX}"
    _cli_fails(tmp_path, monkeypatch, fc.AdapterError, message, src)
    from peft import PeftModel

    with pytest.raises(Exception, match=re.escape(peft_error)):
        PeftModel.from_pretrained(load_task_model("llama", LLAMA_BASE), str(src))


def test_a_seq_cls_lora_with_modules_to_save_null_carries_the_heads_peft_adds(tmp_path: Path) -> None:
    """PEFT's SEQ_CLS model adds classifier / score to modules_to_save on loading, so it loads the saved classifier
    of a LoRA whose config says null; from-lora refused it ("no role PEFT would load it in"). Converted now: the
    output keeps modules_to_save null and task_type SEQ_CLS, PEFT adds the heads to it the same way, and its
    classifier is the LoRA's."""
    from peft import PeftModel

    src = _peft_lora(tmp_path, "roberta", r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    _set_config(src, modules_to_save=None)
    out = tmp_path / "fft"
    fft, _ = from_lora(src, base=FIXTURES / "roberta" / "base")
    fft.save(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["modules_to_save"]) == ("SEQ_CLS", None)
    heads = []
    for folder in (src, out):
        model = PeftModel.from_pretrained(load_task_model("roberta", FIXTURES / "roberta" / "base"), str(folder))
        heads.append({k: v.detach().clone() for k, v in model.base_model.model.classifier.state_dict().items()})
    assert heads[0].keys() == heads[1].keys() and len(heads[0]) > 0
    for key, value in heads[0].items():
        assert torch.equal(heads[1][key], value), key


def test_without_a_base_a_random_initialisation_is_named_in_a_warning(tmp_path: Path) -> None:
    """With init_lora_weights false, PEFT gives a selected module without factors random ones (refused with a base:
    test_cli_refuses_a_selected_module_without_factors_that_peft_initialises_randomly); without a base nobody can
    tell which modules the config selects, and the warning said only that the output was not checked."""
    src = _peft_lora(tmp_path, "llama", r=2, target_modules=["q_proj", "v_proj"])
    _set_config(src, base_model_name_or_path=None)
    _, report = from_lora(src, n_frequency=50)
    no_base = "no --base given and the adapter names no base: the output was not checked against a base"
    random = (
        "with init_lora_weights=False, a module the config selects but the adapter holds no factors for gets random "
        "ones in PEFT; only a base shows whether there is one: pass --base"
    )
    assert report.warnings.index(random) == report.warnings.index(no_base) + 1
    _set_config(src, init_lora_weights=True)
    _, report = from_lora(src, n_frequency=50)
    assert not any("init_lora_weights" in w for w in report.warnings)
