"""to-lora with calibration data: the model runtime, the stages and their figures, checked against PEFT."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fourier_convert.calibrate.grams import collect_grams
from fourier_convert.calibrate.model import calibration_task, load_calib_model
from fourier_convert.calibrate.pipeline import CalibrationOptions
from fourier_convert.errors import UsageError
from fourier_convert.io.adapter import read_adapter
from fourier_convert.io.calibration import batches, pad_token_id, read_calibration
from fourier_convert.io.checkpoint import open_checkpoint
from fourier_convert.lora import to_lora
from fourier_convert.maths.ranks import choose_rank
from fourier_convert.plan import plan_with_orientation
from tests.conftest import FIXTURES
from tests.test_forward import load_task_model

WORDS = [
    *("the", "a", "cat", "dog", "sat", "ran", "on", "over", "under", "big", "small", "red", "blue", "green"),
    *("house", "tree", "river", "stone", "light", "dark"),
]


def text_file(path: Path, lines: int, seed: int = 0, words: list[str] | None = None) -> Path:
    """``lines`` random sentences of 4-12 words, one a line."""
    rng = random.Random(seed)
    vocab = words or WORDS
    path.write_text("\n".join(" ".join(rng.choices(vocab, k=rng.randint(4, 12))) for _ in range(lines)) + "\n")
    return path


def _peft(name: str, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_task_model(name, FIXTURES / name / "base"), str(adapter)).eval()


def _held_out_batches(name: str, calib: Path, **kwargs: Any) -> list[dict[str, torch.Tensor]]:
    base = FIXTURES / name / "base"
    config = json.loads((base / "config.json").read_text())
    data = read_calibration(calib, base, config, **kwargs)
    return list(batches(data.held_out, 16, pad_token_id(base, config)))


def _compare_in_peft(name: str, lora_dir: Path, held: list[dict[str, torch.Tensor]]) -> tuple[float, int, int]:
    """(mean |logit error|, agreeing tokens, tokens) of PEFT's LoRA model against PEFT's FourierFT model."""
    fourier, lora = _peft(name, FIXTURES / name / "adapter"), _peft(name, lora_dir)
    total_err, count, agree, tokens = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in held:
            keep = batch["attention_mask"].bool()
            want, got = fourier(**batch).logits[keep], lora(**batch).logits[keep]
            total_err += float((got - want).abs().double().sum())
            count += want.numel()
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            tokens += int(want.shape[0])
    return total_err / count, agree, tokens


def test_gram_matrices_equal_the_inputs_outer_products_and_q_v_share_one(tmp_path: Path) -> None:
    base = FIXTURES / "llama" / "base"
    ckpt = open_checkpoint(base)
    adapter = read_adapter(FIXTURES / "llama" / "adapter")
    plan = plan_with_orientation(ckpt, [adapter])
    model = load_calib_model(ckpt, adapter, plan, calibration_task(adapter, ckpt.config), torch.device("cpu"))
    data = read_calibration(text_file(tmp_path / "c.txt", 12), base, ckpt.config or {}, held_out=0.0)
    pad = pad_token_id(base, ckpt.config or {})
    grams = collect_grams(model, batches(data.train, 5, pad))
    # q_proj and v_proj of each block read the same hidden states: one matrix per block
    assert sorted(grams.shared()) == [
        [f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.self_attn.v_proj"] for i in range(2)
    ]
    assert len(grams.groups) == 2
    # independently: forward hooks on the wrapped base layers record every real token's input
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for layer in model.layers:

        def hook(mod: Any, args: Any, name: str = layer.name) -> None:
            seen.setdefault(name, []).append(args[0].detach())

        hooks.append(layer.base_layer.register_forward_pre_hook(hook))
    masks = []
    with torch.no_grad(), model.mode("fourier"):
        for batch in batches(data.train, 5, pad):
            masks.append(batch["attention_mask"].bool())
            model.run(batch)
    for h in hooks:
        h.remove()
    for name, xs in seen.items():
        rows = torch.cat([x[m] for x, m in zip(xs, masks, strict=True)]).double()
        torch.testing.assert_close(grams.of(name), rows.T @ rows, rtol=1e-10, atol=1e-8)
        assert grams.tokens[name] == rows.shape[0] == int(sum(int(m.sum()) for m in masks))


def test_closed_form_follows_the_model_better_and_peft_sees_what_the_report_says(tmp_path: Path) -> None:
    calib = text_file(tmp_path / "calib.txt", 60)
    lora, report = to_lora(FIXTURES / "llama" / "adapter", base=FIXTURES / "llama" / "base", rank=2, calibration=calib)
    cal = report.calibration
    assert cal is not None and [s.stage for s in cal.stages] == ["svd", "closed-form"]
    svd, closed = cal.stages
    assert closed.relative_error < svd.relative_error
    for row in report.layers:
        assert row.held_out_error is not None and row.held_out_svd is not None
        assert row.held_out_error < row.held_out_svd
        assert 0 < (row.output_kept or 0) <= 1
    assert cal.fit_samples == 48 and cal.held_out_samples == 12 and cal.kind == "text"
    lora.save(tmp_path / "lora")
    mean_err, agree, tokens = _compare_in_peft("llama", tmp_path / "lora", _held_out_batches("llama", calib))
    # the figures the report prints are what PEFT does with the written files
    assert closed.total == tokens and closed.agree == agree
    assert mean_err == pytest.approx(closed.mean_error, rel=1e-4, abs=1e-7)


def test_calibrated_ranks_and_budgets_use_output_space_energy(tmp_path: Path) -> None:
    calib = text_file(tmp_path / "calib.txt", 40)
    base, adapter = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    _, report = to_lora(adapter, base=base, rank=0.9, calibration=calib)
    assert report.calibration is not None
    for row in report.layers:
        assert row.output_kept is not None and row.output_kept >= 0.9 - 1e-9
    _, plain = to_lora(adapter, base=base, rank=0.9)
    assert [r.rank for r in report.layers] != [r.rank for r in plain.layers]
    # the choice is choose_rank on the output-space singular values
    from fourier_convert.calibrate.pipeline import open_session

    ckpt = open_checkpoint(base)
    fourier = read_adapter(adapter)
    plan = plan_with_orientation(ckpt, [fourier])
    exact = {r.module: r.exact_rank for r in report.layers}
    session = open_session(ckpt, fourier, plan, CalibrationOptions(path=calib), exact)
    assert [choose_rank(session.output_values(r.module), 0.9) for r in report.layers] == [r.rank for r in report.layers]
    _, budget = to_lora(adapter, base=base, param_budget=1000, calibration=calib)
    assert budget.parameters <= 1000 and budget.budget_bound is not None
    kept = sum((r.output_kept or 0) * float(np.sum(session.output_values(r.module) ** 2)) for r in budget.layers) / sum(
        float(np.sum(session.output_values(r.module) ** 2)) for r in budget.layers
    )
    assert kept <= budget.budget_bound + 1e-9


def test_distillation_lowers_the_error_and_is_reproducible(tmp_path: Path) -> None:
    calib = text_file(tmp_path / "calib.txt", 80)
    kwargs: dict[str, Any] = {"base": FIXTURES / "llama" / "base", "rank": 2}

    def run(seed: int) -> tuple[Any, Any]:
        opts = CalibrationOptions(path=calib, distill_steps=40, seed=seed, lr=0.01)
        return to_lora(FIXTURES / "llama" / "adapter", calibration=opts, **kwargs)

    (lora1, rep1), (lora2, _) = run(0), run(0)
    cal = rep1.calibration
    assert cal is not None and cal.distill is not None
    assert [s.stage for s in cal.stages] == ["svd", "closed-form", "distilled"]
    assert cal.distill.history[0][0] == 0 and len(cal.distill.history) >= 2
    best = min(loss for _, loss in cal.distill.history)
    assert best < cal.distill.history[0][1]
    assert cal.stages[2].relative_error < cal.stages[1].relative_error
    for key, value in lora1.tensors.items():
        assert torch.equal(value, lora2.tensors[key]), key
    lora3, _ = run(1)
    assert any(not torch.equal(v, lora3.tensors[k]) for k, v in lora1.tensors.items() if ".lora_" in k)


def test_sequential_closed_form_runs_in_model_order(tmp_path: Path) -> None:
    calib = text_file(tmp_path / "calib.txt", 60)
    _, report = to_lora(
        FIXTURES / "llama" / "adapter", base=FIXTURES / "llama" / "base", rank=2, calibration=calib, sequential=True
    )
    cal = report.calibration
    assert cal is not None and [s.stage for s in cal.stages] == ["svd", "closed-form", "sequential"]
    assert cal.stages[2].relative_error < cal.stages[0].relative_error
    assert "sequential" in cal.seconds


@pytest.mark.parametrize("name", ["gpt2", "roberta"])
def test_conv1d_biases_and_heads_with_calibration_load_in_peft(name: str, tmp_path: Path) -> None:
    calib = text_file(tmp_path / "calib.txt", 40)
    lora, report = to_lora(FIXTURES / name / "adapter", base=FIXTURES / name / "base", rank=2, calibration=calib)
    assert report.calibration is not None and report.calibration.final is not None
    lora.save(tmp_path / "lora")
    held = _held_out_batches(name, calib)
    fourier, peft_lora = _peft(name, FIXTURES / name / "adapter"), _peft(name, tmp_path / "lora")
    errs = []
    with torch.no_grad():
        for batch in held:
            want, got = fourier(**batch).logits, peft_lora(**batch).logits
            if want.ndim == 3:
                keep = batch["attention_mask"].bool()
                want, got = want[keep], got[keep]
            errs.append((got - want).abs().double())
    err = torch.cat([e.reshape(-1) for e in errs])
    assert float(err.mean()) == pytest.approx(report.calibration.final.mean_error, rel=1e-4, abs=1e-7)


def test_vision_model_calibrates_on_a_folder_of_images(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    _, report = to_lora(FIXTURES / "vit" / "adapter", base=FIXTURES / "vit" / "base", rank=2, calibration=folder)
    cal = report.calibration
    assert cal is not None and cal.kind == "images" and cal.task == "image-classification"
    assert cal.stages[-1].agree is not None and cal.stages[-1].total == 2


def test_safetensors_inputs_and_targets(tmp_path: Path) -> None:
    ids = torch.randint(3, 200, (20, 10), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(tmp_path / "calib.safetensors"))
    lora, report = to_lora(
        FIXTURES / "llama" / "adapter",
        base=FIXTURES / "llama" / "base",
        rank=3,
        target="vllm",
        calibration=tmp_path / "calib.safetensors",
    )
    assert report.uniform_rank is None and report.max_lora_rank == 8 and report.calibration is not None
    assert report.calibration.kind == "safetensors" and report.calibration.tokens == 16 * 10
    a = lora.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape[0] == 3  # exact rank; with uniform_rank=True: width 8, a[3:] all zero


def test_calibration_only_options_need_calibration() -> None:
    with pytest.raises(UsageError, match=r"^--distill: has no effect without --calibration; pass --calibration DATA"):
        to_lora(FIXTURES / "llama" / "adapter", base=FIXTURES / "llama" / "base", distill_steps=10)
    with pytest.raises(UsageError, match=r"^--sequential: has no effect without --calibration"):
        to_lora(FIXTURES / "llama" / "adapter", base=FIXTURES / "llama" / "base", sequential=True)


def _cli(*args: object) -> Any:
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_calibrated_to_lora_with_distillation_check_and_json(tmp_path: Path) -> None:
    calib = tmp_path / "calib.jsonl"
    lines = text_file(tmp_path / "c.txt", 40).read_text().splitlines()
    calib.write_text("".join(json.dumps({"prompt": line}) + "\n" for line in lines))
    out, report = tmp_path / "lora", tmp_path / "report.json"
    result = _cli(
        "to-lora", "--adapter", FIXTURES / "llama" / "adapter", "--base", FIXTURES / "llama" / "base",
        "--rank", "2", "--calibration", calib, "--text-field", "prompt", "--distill", "20", "--check",
        "--held-out", "0.25", "--out", out, "--json", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    text = result.output
    assert "closed form (calibrated)" in text and "distilled (20 steps" in text and "plain SVD (no calibration)" in text
    assert "check: 4 layers on the real layer inputs of 10 held-out calibration samples" in text
    assert "30 samples fitted, 10 held out" in text
    doc = json.loads(report.read_text())
    assert [s["stage"] for s in doc["calibration"]["stages"]] == ["svd", "closed-form", "distilled"]
    assert doc["check"]["inputs"] == "calibration" and len(doc["check"]["layers"]) == 4
    assert doc["calibration"]["distill"]["steps"] >= 1


def test_cli_check_without_calibration_says_what_random_inputs_measure(tmp_path: Path) -> None:
    result = _cli(
        "to-lora", "--adapter", FIXTURES / "llama" / "adapter", "--base", FIXTURES / "llama" / "base", "--rank", "2",
        "--check", "--out", tmp_path / "lora",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "random N(0, I) inputs describe the weights, not the model's behaviour" in result.output


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (None, ("--distill", "10"), "error: --distill: has no effect without --calibration; pass --calibration DATA"),
        ("empty", (), "calib.txt: holds 0 usable samples; needs at least 2 samples: one to fit, one to report on"),
        ("binary", (), "calib.txt, line 1: is not UTF-8 text"),
        ("ok", ("--distill", "-1"), "error: --distill: -1 steps; use 0 (none) or a positive count, e.g. 300"),
        ("ok", ("--held-out", "0", "--check"), "error: --check: there are no held-out calibration samples"),
        ("ok", ("--task", "nonsense"), "error: --task: unknown task 'nonsense'"),
    ],
)
def test_cli_calibration_errors_are_one_line_and_publish_nothing(
    tmp_path: Path, setup: str | None, args: tuple[str, ...], message: str
) -> None:
    calib = tmp_path / "calib.txt"
    if setup == "empty":
        calib.write_text("\n\n")
    elif setup == "binary":
        calib.write_bytes(b"\xff\xfe\x00abc\n")
    elif setup == "ok":
        text_file(calib, 20)
    extra = ("--calibration", calib) if setup is not None else ()
    out = tmp_path / "lora"
    result = _cli(
        "to-lora", "--adapter", FIXTURES / "llama" / "adapter", "--base", FIXTURES / "llama" / "base", "--rank", "2",
        *extra, *args, "--out", out,
    )  # fmt: skip
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def _session(tmp_path: Path, lines: int, **kwargs: Any) -> Any:
    from fourier_convert.calibrate.pipeline import open_session

    base, adapter = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    ckpt = open_checkpoint(base)
    fourier = read_adapter(adapter)
    plan = plan_with_orientation(ckpt, [fourier])
    calib = text_file(tmp_path / f"calib-{lines}.txt", lines)
    exact = {layer.module: 64 for layer in plan.layers}
    return open_session(ckpt, fourier, plan, CalibrationOptions(path=calib, **kwargs), exact)


def test_gram_memory_is_one_matrix_per_distinct_input_whatever_the_data_size(tmp_path: Path) -> None:
    """The memory bound: one in x in float64 matrix per distinct layer input, nothing that grows with tokens."""
    small, large = _session(tmp_path, 10), _session(tmp_path, 80)
    for session in (small, large):
        mats = list(session.grams.groups.values())
        assert [tuple(m.shape) for m in mats] == [(64, 64), (64, 64)] and all(m.dtype == torch.float64 for m in mats)
        assert session.report.gram_bytes == 2 * 64 * 64 * 8 == sum(m.numel() * 8 for m in mats)
    assert large.report.tokens > 4 * small.report.tokens
    # the stated bound for a 7B Llama adapted on q and v (32 blocks, 4096 wide): 32 matrices, 4 GiB
    from fourier_convert.calibrate.grams import gram_bytes

    assert gram_bytes([4096] * 32) == 4 * 2**30


def test_distillation_changes_only_the_lora_factors(tmp_path: Path) -> None:
    from fourier_convert.calibrate.distill import distill
    from fourier_convert.io.calibration import collate

    session = _session(tmp_path, 30)
    model = session.model
    ranks = {layer.name: 2 for layer in model.layers}
    closed = {m: session.decompositions[m].factors(r) for m, r in ranks.items()}
    model.set_factors(closed)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    deltas = {layer.name: layer.delta.clone() for layer in model.layers}
    result = distill(model, session.data.train, [], lambda s: collate(s, session.pad_id), steps=5)
    assert result.steps == 5
    after = model.model.state_dict()
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed), changed
    assert all(torch.equal(layer.delta, deltas[layer.name]) for layer in model.layers)
    assert not any(p.requires_grad for p in model.model.parameters())


def test_poor_held_out_agreement_is_a_warning_even_with_quiet(tmp_path: Path) -> None:
    """The tiny random Llama at rank 1 follows its adapter on under 90 % of held-out tokens: the CLI says so on
    stderr (as for every warning), also with --quiet, which silences the table."""
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    calib = text_file(tmp_path / "calib.txt", 60)
    _, report = to_lora(FIXTURES / "llama" / "adapter", base=FIXTURES / "llama" / "base", rank=1, calibration=calib)
    final = report.calibration.final if report.calibration is not None else None
    assert final is not None and final.agreement is not None and final.agreement < 0.9
    want = f"predicts what the FourierFT model predicts only {final.agreement:.1%} of the time"
    assert any(want in w for w in report.warnings)
    result = CliRunner().invoke(
        cli,
        [
            "to-lora", "--adapter", str(FIXTURES / "llama" / "adapter"), "--base", str(FIXTURES / "llama" / "base"),
            "--rank", "1", "--calibration", str(calib), "--quiet", "--out", str(tmp_path / "lora"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"warning: on the held-out samples the LoRA model {want}" in result.stderr
    assert "held-out (" not in result.stdout  # --quiet: no table
