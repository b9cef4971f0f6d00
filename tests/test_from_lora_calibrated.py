"""from-lora --calibration: the weighted least-squares maths against brute force, the runtime's figures against
PEFT, the CLI and its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fourier_convert as fc
from fourier_convert.calibrate.pipeline import CalibrationOptions
from fourier_convert.errors import UsageError
from fourier_convert.io.calibration import batches, pad_token_id, read_calibration
from fourier_convert.lora_to_fourierft import FromLoraReport, from_lora
from fourier_convert.maths.calibrated import gram_factor
from fourier_convert.maths.indices import spectral_indices
from fourier_convert.maths.project import project_lowrank, project_lowrank_weighted
from tests.conftest import FIXTURES
from tests.reference import peft_indices, reference_delta
from tests.test_calibrate import text_file
from tests.test_forward import load_task_model

BASE = FIXTURES / "llama" / "base"
SPEC = ".fourierft_spectrum"
N_FREQUENCY, SEED, SCALING = 1000, 3, 150.0


# -- maths -----------------------------------------------------------------------------------------------------


def _dense_basis(idx: np.ndarray, shape: tuple[int, int], scaling: float) -> list[np.ndarray]:
    """Every FourierFT basis delta, built as PEFT builds it (dense complex spectrum, ifft2, real part)."""
    out = []
    for u, v in idx.T:
        dense = np.zeros(shape, dtype=np.complex128)
        dense[u, v] = 1.0
        out.append(np.fft.ifft2(dense).real * scaling)
    return out


def _brute_force(target: np.ndarray, basis: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Minimum-norm ``argmin_c ||(target - sum_k c_k basis_k) x||_F`` from the dense columns ``vec(basis_k x)``."""
    design = np.stack([(phi @ x).ravel() for phi in basis], 1)
    coeffs, *_ = np.linalg.lstsq(design, (target @ x).ravel(), rcond=None)
    result: np.ndarray = coeffs
    return result


def _kinds(idx: np.ndarray, shape: tuple[int, int]) -> tuple[int, int]:
    """(self-conjugate bins, bins whose mirror is also in the support)."""
    m, n = shape
    flat = set((idx[0] * n + idx[1]).tolist())
    mirror = ((-idx[0]) % m) * n + (-idx[1]) % n
    self_conj = int(np.sum(mirror == idx[0] * n + idx[1]))
    paired = sum(
        1 for f, g in zip((idx[0] * n + idx[1]).tolist(), mirror.tolist(), strict=True) if g in flat and f != g
    )
    return self_conj, paired


CASES = [((8, 6), 20, 2), ((7, 5), 35, 2), ((4, 4), 16, 3), ((6, 6), 10, 1), ((9, 7), 30, 2), ((2, 2), 4, 1),
         ((1, 5), 3, 1), ((5, 1), 4, 1), ((12, 16), 60, 3), ((10, 9), 45, 4)]  # fmt: skip


def test_the_cases_cover_self_conjugate_bins_mirrored_pairs_and_odd_and_even_sizes() -> None:
    kinds = [_kinds(spectral_indices(m, k, n, 777).numpy(), (m, k)) for (m, k), n, _ in CASES]
    assert sum(s for s, _ in kinds) >= 5 and sum(p for _, p in kinds) >= 10
    assert {m % 2 for (m, _), _, _ in CASES} == {0, 1} and {k % 2 for (_, k), _, _ in CASES} == {0, 1}


@pytest.mark.parametrize(("shape", "n", "rank"), CASES)
def test_weighted_coefficients_equal_a_dense_weighted_least_squares_solve(
    shape: tuple[int, int], n: int, rank: int
) -> None:
    rng = np.random.default_rng(n * 10 + rank)
    m, k = shape
    idx = spectral_indices(m, k, n, 777).numpy()
    b, a = rng.normal(size=(m, rank)), rng.normal(size=(rank, k))
    x = rng.normal(size=(k, 3 * k + 5)) * rng.uniform(0.2, 3.0, size=(k, 1))
    if k > 1:
        x[1] += 2.0 * x[0]  # correlated inputs
    scale, scaling = 0.7, 13.0
    target = scale * b @ a
    basis = _dense_basis(idx, shape, scaling)
    want = _brute_force(target, basis, x)  # minimum norm: a mirrored pair is split evenly
    got = project_lowrank_weighted(b, a, scale, idx, scaling, torch.from_numpy(x @ x.T), ridge=0.0)
    np.testing.assert_allclose(got.values, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
    fit = sum(c * phi for c, phi in zip(got.values, basis, strict=True))
    energy = float(np.sum((target @ x) ** 2))
    assert got.energy == pytest.approx(energy, rel=1e-10)
    assert got.kept_energy == pytest.approx(energy - float(np.sum(((target - fit) @ x) ** 2)), rel=1e-8, abs=1e-9)
    assert got.relative_error == pytest.approx(np.linalg.norm((target - fit) @ x) / np.sqrt(energy), abs=1e-7)


def test_the_ridge_is_gram_factors_and_rank_deficient_inputs_are_solved() -> None:
    rng = np.random.default_rng(1)
    m, k = 8, 10
    idx = spectral_indices(m, k, 30, 777).numpy()
    b, a = rng.normal(size=(m, 2)), rng.normal(size=(2, k))
    x = rng.normal(size=(k, 4))  # 4 tokens for 10 input dimensions: C is singular
    gram = x @ x.T
    ridge = 1e-3
    shift = ridge * float(np.trace(gram)) / k
    lifted = np.concatenate([x, np.sqrt(shift) * np.eye(k)], 1)  # lifted @ lifted.T = C + shift I
    want = _brute_force(b @ a, _dense_basis(idx, (m, k), 2.0), lifted)
    got = project_lowrank_weighted(b, a, 1.0, idx, 2.0, torch.from_numpy(gram), ridge=ridge)
    np.testing.assert_allclose(got.values, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
    factor = gram_factor(torch.from_numpy(gram), ridge)
    again = project_lowrank_weighted(b, a, 1.0, idx, 2.0, np.zeros((1, 1)), factor=factor)
    np.testing.assert_array_equal(again.values, got.values)
    with pytest.raises(ValueError, match="the Gram matrix is"):
        project_lowrank_weighted(b, a, 1.0, idx, 2.0, torch.eye(k + 1, dtype=torch.float64))


@pytest.mark.parametrize(("shape", "n", "rank"), CASES)
@pytest.mark.parametrize("level", [1.0, 3.7e-3])
def test_identity_inputs_give_the_plain_projection(shape: tuple[int, int], n: int, rank: int, level: float) -> None:
    rng = np.random.default_rng(n + rank)
    m, k = shape
    idx = spectral_indices(m, k, n, 777).numpy()
    b, a = rng.normal(size=(m, rank)), rng.normal(size=(rank, k))
    plain = project_lowrank(b, a, 0.7, idx, 13.0)
    got = project_lowrank_weighted(b, a, 0.7, idx, 13.0, level * torch.eye(k, dtype=torch.float64))
    np.testing.assert_allclose(got.values, plain.values, rtol=1e-10, atol=1e-12 * np.abs(plain.values).max())
    assert got.retained == pytest.approx(plain.retained, abs=1e-12)
    # C = level (1 + ridge) I: the weighted energies are the plain ones times that constant
    assert got.energy == pytest.approx(level * (1 + 1e-6) * plain.energy, rel=1e-12)


def test_weighted_fit_beats_the_plain_one_where_the_inputs_are() -> None:
    rng = np.random.default_rng(7)
    m, k = 24, 32
    idx = spectral_indices(m, k, 80, 777).numpy()
    b, a = rng.normal(size=(m, 4)), rng.normal(size=(4, k))
    mixing = rng.normal(size=(k, 3)) @ rng.normal(size=(3, k)) + 0.05 * rng.normal(size=(k, k))
    x = mixing @ rng.normal(size=(k, 400))  # strongly correlated inputs: a few dominant directions
    plain = project_lowrank(b, a, 1.0, idx, 5.0)
    got = project_lowrank_weighted(b, a, 1.0, idx, 5.0, torch.from_numpy(x @ x.T), baseline=plain.values)
    basis = _dense_basis(idx, (m, k), 5.0)
    target = b @ a

    def out_error(values: np.ndarray) -> float:
        fit = sum(c * phi for c, phi in zip(values, basis, strict=True))
        return float(np.linalg.norm((target - fit) @ x) / np.linalg.norm(target @ x))

    assert got.baseline_retained is not None
    assert out_error(got.values) < 0.8 * out_error(plain.values)
    assert got.relative_error == pytest.approx(out_error(got.values), rel=1e-4)
    assert np.sqrt(1 - got.baseline_retained) == pytest.approx(out_error(plain.values), rel=1e-4)


# -- runtime ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LoRA made from the llama fixture (to-lora, rank 4), calibration text, and from-lora with and without it."""
    tmp = tmp_path_factory.mktemp("calibrated")
    lora, _ = fc.to_lora(FIXTURES / "llama" / "adapter", base=BASE, rank=4)
    lora.save(tmp / "lora")
    calib = text_file(tmp / "calib.txt", 60)
    kwargs: dict[str, Any] = {"base": BASE, "n_frequency": N_FREQUENCY, "scaling": SCALING, "seed": SEED}
    fft, report = from_lora(tmp / "lora", calibration=calib, **kwargs)
    fft.save(tmp / "fft")
    plain, plain_report = from_lora(tmp / "lora", **kwargs)
    plain.save(tmp / "plain")
    return {"tmp": tmp, "calib": calib, "fft": fft, "report": report, "plain": plain, "plain_report": plain_report}


def test_calibrated_fit_follows_the_lora_model_better_on_held_out_inputs(converted: dict[str, Any]) -> None:
    report: FromLoraReport = converted["report"]
    cal = report.calibration
    assert cal is not None and [s.stage for s in cal.stages] == ["plain", "calibrated"]
    assert cal.fit_samples == 48 and cal.held_out_samples == 12 and cal.gram_groups == 2 and cal.task == "causal-lm"
    plain, fitted = cal.stages
    assert fitted.relative_error < plain.relative_error and fitted.mean_error < plain.mean_error
    assert fitted.agree is not None and plain.agree is not None and fitted.agree > plain.agree
    for module, row in cal.layers.items():
        assert row.held_out_error is not None and row.held_out_plain is not None
        assert row.held_out_error < row.held_out_plain, module
        assert row.output_kept > row.output_kept_plain, module
        assert fitted.layers[module].delta_error == row.held_out_error
    # only the spectra differ from the plain conversion; the plain report has no calibration part
    plain_files = converted["plain"]
    assert converted["fft"].config == plain_files.config
    for key, value in plain_files.tensors.items():
        assert key.endswith(SPEC) != torch.equal(value, converted["fft"].tensors[key]), key
    plain_report: FromLoraReport = converted["plain_report"]
    assert "calibration" not in plain_report.to_dict() and "out.kept" not in plain_report.table()
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["calibration"]["stages"][1]["agreement"] == fitted.agreement
    table = report.table()
    assert "calibrated (written)" in table and "out.kept" in table.splitlines()[0]
    # the weight-space columns describe the coefficients written: ||dW - fit||_F from dense float64 matrices
    for row in report.layers:
        m, k = row.shape
        lora = _lora_delta(converted["tmp"] / "lora", row.module)
        spectrum = converted["fft"].tensors[f"base_model.model.{row.module}{SPEC}"].double().numpy()
        fit = reference_delta(spectrum, m, k, SCALING, SEED)
        err = float(np.linalg.norm(lora - fit) / np.linalg.norm(lora))
        assert row.relative_error == pytest.approx(err, rel=1e-5)


def _lora_delta(folder: Path, module: str) -> np.ndarray:
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
    b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
    r = a.shape[0]
    alpha = next((v for k, v in cfg["alpha_pattern"].items() if module.endswith(k)), cfg["lora_alpha"])
    assert next((v for k, v in cfg["rank_pattern"].items() if module.endswith(k)), cfg["r"]) == r
    result: np.ndarray = alpha / r * b @ a
    return result


def test_peft_sees_what_the_report_says(converted: dict[str, Any]) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    tmp = converted["tmp"]
    cal = converted["report"].calibration
    config = json.loads((BASE / "config.json").read_text())
    data = read_calibration(converted["calib"], BASE, config)
    held = list(batches(data.held_out, 16, pad_token_id(BASE, config)))

    def peft(folder: Path) -> Any:
        return PeftModel.from_pretrained(load_task_model("llama", BASE), str(folder)).eval()

    lora_model = peft(tmp / "lora")
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in lora_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):

            def hook(mod: Any, args: Any, name: str = name) -> None:
                inputs.setdefault(name, []).append(args[0].detach())

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        reference = [lora_model(**batch).logits for batch in held]
    for h in hooks:
        h.remove()
    masks = [batch["attention_mask"].bool() for batch in held]
    for stage, folder in (("plain", tmp / "plain"), ("calibrated", tmp / "fft")):
        figures = cal.stage(stage)
        model = peft(folder)
        diff_sq = ref_sq = abs_sum = 0.0
        count = agree = tokens = 0
        with torch.no_grad():
            for batch, ref, keep in zip(held, reference, masks, strict=True):
                got, want = model(**batch).logits[keep].double(), ref[keep].double()
                diff_sq += float(((got - want) ** 2).sum())
                ref_sq += float((want**2).sum())
                abs_sum += float((got - want).abs().sum())
                count += want.numel()
                agree += int((got.argmax(-1) == want.argmax(-1)).sum())
                tokens += int(want.shape[0])
        assert tokens == figures.total and agree == figures.agree
        assert (diff_sq / ref_sq) ** 0.5 == pytest.approx(figures.relative_error, rel=1e-4)
        assert abs_sum / count == pytest.approx(figures.mean_error, rel=1e-4)
        # per layer, on the LoRA model's own held-out inputs
        for module, row in figures.layers.items():
            x = torch.cat([xs[keep] for xs, keep in zip(inputs[module], masks, strict=True)]).double().numpy()
            lora = _lora_delta(tmp / "lora", module)
            values = converted[stage if stage == "plain" else "fft"].tensors[f"base_model.model.{module}{SPEC}"]
            fit = reference_delta(values.double().numpy(), lora.shape[0], lora.shape[1], SCALING, SEED)
            want_err = np.linalg.norm(x @ (fit - lora).T) / np.linalg.norm(x @ lora.T)
            assert row.delta_error == pytest.approx(want_err, rel=1e-4), (stage, module)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("gpt2", {"task_type": "CAUSAL_LM", "r": 3, "lora_alpha": 6, "target_modules": ["c_attn", "c_fc"],
                  "fan_in_fan_out": True, "bias": "lora_only"}),
        ("roberta", {"task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"],
                     "bias": "all"}),
    ],
)  # fmt: skip
def test_conv1d_biases_and_heads_calibrate_and_peft_agrees(name: str, config: dict[str, Any], tmp_path: Path) -> None:
    from tests.test_calibrate import _held_out_batches, _peft
    from tests.test_from_lora import _peft_lora

    src = _peft_lora(tmp_path, name, **config)
    calib = text_file(tmp_path / "calib.txt", 40)
    fft, report = from_lora(src, base=FIXTURES / name / "base", n_frequency=300, scaling=50.0, calibration=calib)
    fft.save(tmp_path / "fft")
    cal = report.calibration
    assert cal is not None
    for module, row in cal.layers.items():
        assert row.held_out_error is not None and row.held_out_plain is not None
        assert row.held_out_error < row.held_out_plain, module
    lora_model, fourier_model = _peft(name, src), _peft(name, tmp_path / "fft")
    errs = []
    with torch.no_grad():
        for batch in _held_out_batches(name, calib):
            want, got = lora_model(**batch).logits, fourier_model(**batch).logits
            if want.ndim == 3:
                keep = batch["attention_mask"].bool()
                want, got = want[keep], got[keep]
            errs.append((got - want).abs().double().reshape(-1))
    figures = cal.stage("calibrated")
    assert figures is not None
    assert float(torch.cat(errs).mean()) == pytest.approx(figures.mean_error, rel=1e-4)


def test_cli_from_lora_with_calibration_writes_json(converted: dict[str, Any], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    out, doc = tmp_path / "fft", tmp_path / "r.json"
    args = ["from-lora", "--adapter", str(converted["tmp"] / "lora"), "--base", str(BASE), "--out", str(out)]
    args += ["--n-frequency", "200", "--seed", str(SEED), "--calibration", str(converted["calib"])]
    args += ["--calibration-samples", "40", "--held-out", "0.25", "--calibration-seed", "1", "--device", "cpu"]
    res = CliRunner().invoke(cli, [*args, "--batch-size", "7", "--json", str(doc)])
    assert res.exit_code == 0, res.output
    assert "calibration: 30 samples fitted, 10 held out" in res.stdout and "calibrated (written)" in res.stdout
    report = json.loads(doc.read_text())
    cal = report["calibration"]
    assert (
        cal["seed"] == 1 and cal["device"] == "cpu" and [s["stage"] for s in cal["stages"]] == ["plain", "calibrated"]
    )
    assert cal["stages"][1]["relative_error"] < cal["stages"][0]["relative_error"]
    assert json.loads((out / "adapter_config.json").read_text())["random_loc_seed"] == SEED
    refused = CliRunner().invoke(cli, [*args, "--overwrite", "--distill", "10"])
    assert refused.exit_code == 2 and "No such option '--distill'" in refused.output


def test_refusals(converted: dict[str, Any], tmp_path: Path) -> None:
    lora, calib = converted["tmp"] / "lora", converted["calib"]
    with pytest.raises(UsageError) as info:
        from_lora(lora, base=BASE, calibration=CalibrationOptions(path=calib, distill_steps=10))
    assert str(info.value).startswith("--distill: 10 distillation steps asked for, but from-lora has no distillation")
    with pytest.raises(UsageError, match=r"^--sequential: does not apply to from-lora"):
        from_lora(lora, base=BASE, calibration=CalibrationOptions(path=calib, sequential=True))
    with pytest.raises(UsageError, match=r"^--device: has no effect without --calibration; pass --calibration"):
        from_lora(lora, base=BASE, device="cpu")
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    for f in lora.iterdir():
        (orphan / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((orphan / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (orphan / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError) as info:
        from_lora(orphan, calibration=calib)
    assert str(info.value) == (
        "--calibration: runs the LoRA model, but no --base was given and the adapter names no base; pass --base "
        "with the base model's folder (weights and tokenizer)"
    )
    # the plain conversion still works without a base (unchecked, with a warning)
    _, report = from_lora(orphan, n_frequency=10)
    assert report.base is None and report.calibration is None


def test_peft_indices_are_the_positions_used() -> None:
    # the reference deltas above draw positions independently of fourier_convert
    np.testing.assert_array_equal(peft_indices(64, 64, N_FREQUENCY, SEED), spectral_indices(64, 64, N_FREQUENCY, SEED))
