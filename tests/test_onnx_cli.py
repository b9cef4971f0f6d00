"""``fourier-convert to-onnx`` end to end through click: success with --json, a failed validation that
publishes nothing (and --keep-failed), and usage errors with their exit codes."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner, Result

from fourier_convert.cli.main import cli
from tests.conftest import FIXTURES


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_gpt2_causal_lm(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, report = tmp_path / "onnx", tmp_path / "report.json"
    result = invoke(
        "to-onnx", "--base", FIXTURES / "gpt2" / "base", "--adapter", FIXTURES / "gpt2" / "adapter",
        "--out", out, "--task", "causal-lm", "--json", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "task: causal-lm (given with --task)"
    assert lines[2] == (
        "merge proof (merged PyTorch model vs base + unmerged adapter, float32, 1 shape(s); 12 other tensors equal "
        "to the base): passed"
    )
    assert any(line.startswith("validation in onnxruntime on CPUExecutionProvider vs PyTorch") for line in lines)
    assert lines[-1].startswith(f"published {out} (config.json, generation_config.json, model.onnx, onnx_export.json")
    doc = json.loads(report.read_text())
    assert doc["passed"] is True and doc["task"] == "causal-lm" and doc["out"] == str(out)
    assert [c["case"] for c in doc["validation"]] == [
        "batch 1, seq 9",
        "batch 3, seq 11, left-padded",
        "batch 4, seq 1",
    ]
    assert all(o["max_abs_diff"] < 1e-4 for c in doc["validation"] for o in c["outputs"])
    ids = np.array([[10, 20, 30, 40, 50]])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(5)[None]})
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "gpt2" / "base")
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(FIXTURES / "gpt2" / "adapter")).eval()(torch.from_numpy(ids)).logits
    np.testing.assert_allclose(got[0], want.numpy(), rtol=1e-3, atol=1e-4)


def test_failed_validation_publishes_nothing_and_keep_failed(tmp_path: Path) -> None:
    """Zero tolerances make onnxruntime's last-bit differences a failure: exit 1, nothing at --out; with
    --keep-failed the attempt and its report are kept aside."""
    out = tmp_path / "onnx"
    args = ["to-onnx", "--model", FIXTURES / "vit" / "base", "--out", out, "--atol", "0", "--rtol", "0"]
    result = invoke(*args, "--keep-failed")
    assert result.exit_code == 1
    kept = tmp_path / "onnx.failed"
    lines = result.stdout.splitlines()  # the report, where a passing one goes
    assert lines[0] == (
        "task: image-classification (inferred from config.json: architectures[0] is ViTForImageClassification)"
    )
    assert (
        "validation in onnxruntime on CPUExecutionProvider vs PyTorch (atol 0, rtol 0, unmasked positions): FAILED"
        in lines
    )
    assert lines[-1] == f"nothing published; the failed export is kept at {kept}"
    [error] = result.stderr.splitlines()  # one line on stderr
    assert error.startswith("error: validation: onnxruntime differs from PyTorch at batch 1: logits max abs diff ")
    assert error.endswith(f"(atol 0, rtol 0); nothing was published; the failed export is kept at {kept}")
    assert not out.exists()
    assert sorted(p.name for p in kept.iterdir()) == [
        "config.json", "model.onnx", "onnx_export.json", "preprocessor_config.json",
    ]  # fmt: skip
    assert json.loads((kept / "onnx_export.json").read_text())["passed"] is False
    assert not list(tmp_path.glob(".onnx*"))  # no temporary folders left


def nan_weights(tmp_path: Path) -> Path:
    """A copy of fixtures/gpt2/base whose transformer.h.0.attn.c_attn.weight holds a NaN and an inf (patched in the
    safetensors bytes)."""
    folder = tmp_path / "nan-base"
    shutil.copytree(FIXTURES / "gpt2" / "base", folder)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<Q", data[:8])
    entry = json.loads(data[8 : 8 + hlen])["transformer.h.0.attn.c_attn.weight"]
    assert entry["dtype"] == "F32"
    at = 8 + hlen + entry["data_offsets"][0]
    data[at : at + 8] = struct.pack("<2f", float("nan"), float("inf"))
    path.write_bytes(bytes(data))
    return folder


def test_weights_with_nan_are_refused_before_the_export(tmp_path: Path) -> None:
    """Weights holding NaN / inf make PyTorch's own outputs non-finite: refused before the export, in one line that
    names the cause (the validation failure it gave before blamed onnxruntime, after a whole export); nothing
    published, the input untouched, and the same with -q."""
    folder = nan_weights(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "onnx"
    message = (
        f"error: {folder}: PyTorch's own float32 outputs hold inf or NaN (logits at batch 2, seq 7, past 0, "
        "left-padded), so no export of this model can be validated; nothing was exported; check the model's weights "
        "for inf / NaN values\n"
    )
    for quiet in ([], ["-q"]):
        result = invoke("to-onnx", "--model", folder, "--out", out, *quiet)
        assert (result.exit_code, result.stdout, result.stderr) == (1, "", message)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nan-base"]  # no out, no temporary folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "M", "--dtype", "bfloat16"],
            "error: --dtype: bfloat16 is not offered: onnxruntime has bfloat16 kernels for few ops (CPU and CUDA), "
            "so the graph could neither be validated nor run reliably; use --dtype float16 or float32",
        ),
        (
            ["--model", "M", "--base", "M", "--adapter", "A"],
            "error: --model: given together with --base / --adapter; pass either a merged --model or --base with "
            "--adapter",
        ),
        (
            ["--base", "M", "--adapter", "A", "--weight", "1", "--weight", "2"],
            "error: --weight: given 2 time(s) for 1 adapter(s); give one --weight per --adapter",
        ),
    ],
)
def test_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    model = str(FIXTURES / "vit" / "base")
    adapter = str(FIXTURES / "vit" / "adapter")
    args = [model if a == "M" else adapter if a == "A" else a for a in args]
    out = tmp_path / "onnx"
    result = invoke("to-onnx", *args, "--out", out)
    assert result.exit_code == 2
    assert result.output.strip() == message
    assert not out.exists()


def test_json_folder_and_untrained_head(tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    result = invoke("to-onnx", "--model", FIXTURES / "vit" / "base", "--out", out, "--task", "feature-extraction",
                    "--json", tmp_path / "missing" / "r.json")  # fmt: skip
    assert result.exit_code == 2
    assert result.output.startswith("error: --json: cannot write ")
    result = invoke("to-onnx", "--model", FIXTURES / "gpt2" / "base", "--out", out, "--task", "token-classification")
    assert result.exit_code == 1
    assert (
        "GPT2ForTokenClassification needs weights the checkpoint lacks: ['classifier.bias', 'classifier.weight']"
        in (result.output)
    )
    assert not out.exists()
