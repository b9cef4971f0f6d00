"""``to-onnx`` on inputs transformers cannot take: a base config.json that disagrees with the weights, and a folder
that holds the model and adapter folders instead of being one. Each gives one ``error:`` line naming the file
and the fix, exit 1, nothing published, the inputs untouched, within a time bound (the model is never built
for real: the config is checked on the meta device before the merge)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

import fourier_convert as fc
from fourier_convert.cli.main import cli
from fourier_convert.onnx.models import CONFIG_FIX, config_from_dict, load_task_model, reported
from tests.conftest import FIXTURES

#: Seconds one failing run may take in-process (they take 1 to 3 s; a built model would take more).
TIME_BOUND = 10.0


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) -> its bytes (None for folders)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def llama(tmp_path: Path, **changes: Any) -> Path:
    """A copy of fixtures/llama (base/ and adapter/) whose base/config.json has ``changes``."""
    root = tmp_path / "llama"
    shutil.copytree(FIXTURES / "llama", root)
    path = root / "base" / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))
    return root


def fails(tmp_path: Path, args: list[object], message: str) -> None:
    """``to-onnx ARGS --out tmp_path/onnx`` prints exactly ``error: MESSAGE`` on stderr, nothing on stdout, exits 1
    within :data:`TIME_BOUND`, lets no Python warning out, and leaves ``tmp_path`` as it was."""
    out = tmp_path / "onnx"
    before = snapshot(tmp_path)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke("to-onnx", *args, "--out", out)
    assert time.perf_counter() - start < TIME_BOUND
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"error: {message}\n"), result.output
    assert [str(w.message) for w in caught] == []
    assert not out.exists()
    assert snapshot(tmp_path) == before


def _inputs(root: Path, form: str) -> list[object]:
    if form == "model":
        return ["--model", root / "base"]
    return ["--base", root / "base", "--adapter", root / "adapter"]


FORMS = ["model", "base-adapter"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("changes", "found"),
    [
        # transformers: "integer division or modulo by zero" in the config's own validation
        ({"num_attention_heads": 0}, "num_attention_heads is 0, expected a positive integer"),
        ({"num_attention_heads": -4}, "num_attention_heads is -4, expected a positive integer"),
        # transformers: two lines of torch UserWarning on stderr, then a size mismatch
        ({"hidden_size": 0}, "hidden_size is 0, expected a positive integer"),
        # JSON's 1e12 is a float: transformers' strict config says so on its message's second line
        (
            {"vocab_size": 1e12},
            "transformers cannot build a llama config from it (Field 'vocab_size' expected int, got float "
            "(value: 1000000000000.0))",
        ),
        (
            {"num_attention_heads": 3},
            "transformers cannot build a llama config from it (The hidden size (64) is not a multiple of the "
            "number of attention heads (3).)",
        ),
        # transformers: "You set `ignore_mismatched_sizes` to `False`, thus raising an error. For details look at
        # the above report!" (the report is not shown), after trying to allocate 256 TB
        (
            {"vocab_size": 10**12},
            "LlamaForCausalLM built from it has model.embed_tokens.weight of shape [1000000000000, 64], the "
            "weights hold [256, 64] (1 more tensor(s) differ)",
        ),
        (
            {"num_key_value_heads": 3},
            "LlamaForCausalLM built from it has model.layers.0.self_attn.k_proj.weight of shape [48, 64], the "
            "weights hold [32, 64] (3 more tensor(s) differ)",
        ),
        # extra layers would be 'weights the checkpoint lacks', which read as a wrong --task
        ({"num_hidden_layers": 3}, "LlamaForCausalLM built from it has 3 layers, the weights hold 2"),
        # zero-element tensors on the meta device: torch's UserWarning must not reach stderr
        (
            {"intermediate_size": 0},
            "LlamaForCausalLM built from it has model.layers.0.mlp.gate_proj.weight of shape [0, 64], the weights "
            "hold [128, 64] (5 more tensor(s) differ)",
        ),
    ],
    ids=[
        "heads-0",
        "heads-negative",
        "hidden-0",
        "vocab-float",
        "heads-not-dividing",
        "vocab-huge",
        "kv-heads-3",
        "layers-3",
        "intermediate-0",
    ],
)
def test_config_unlike_the_weights(tmp_path: Path, form: str, changes: dict[str, Any], found: str) -> None:
    root = llama(tmp_path, **changes)
    fails(tmp_path, _inputs(root, form), f"{root / 'base' / 'config.json'}: {found}; {CONFIG_FIX}")


def test_one_line_on_the_real_stderr(tmp_path: Path) -> None:
    """The process's own stderr (where torch's warnings went) holds the error line only."""
    root = llama(tmp_path, intermediate_size=0)  # torch warns (two lines) making the zero-element tensors
    before = snapshot(tmp_path)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    run = subprocess.run(
        [sys.executable, "-m", "fourier_convert", "to-onnx", "--model", str(root / "base"), "--out",
         str(tmp_path / "onnx")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert time.perf_counter() - start < 60  # a fresh interpreter imports torch and transformers
    message = (
        f"{root / 'base' / 'config.json'}: LlamaForCausalLM built from it has model.layers.0.mlp.gate_proj.weight "
        f"of shape [0, 64], the weights hold [128, 64] (5 more tensor(s) differ); {CONFIG_FIX}"
    )
    assert (run.returncode, run.stdout, run.stderr) == (1, "", f"error: {message}\n")
    assert snapshot(tmp_path) == before


def test_state_dict_unlike_the_config(tmp_path: Path) -> None:
    """Loading in-memory tensors (a merge, a converted checkpoint) checks them against the config the same way,
    before transformers allocates anything."""
    folder = FIXTURES / "llama" / "base"
    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    with pytest.raises(fc.InputFileError) as info:
        load_task_model(
            folder,
            "causal-lm",
            config=config_from_dict({**config, "num_key_value_heads": 1}, folder / "config.json"),
            state_dict=tensors,
        )
    assert str(info.value) == (
        f"{folder / 'config.json'}: LlamaForCausalLM built from it has model.layers.0.self_attn.k_proj.weight of "
        f"shape [16, 64], the weights hold [32, 64] (3 more tensor(s) differ); {CONFIG_FIX}"
    )


def test_reported_takes_the_cause_of_a_heading() -> None:
    try:
        try:
            raise TypeError("Field 'x' expected int,\nnot this")
        except TypeError as inner:
            raise ValueError("Validation error for field 'x':\n    TypeError: ...") from inner
    except ValueError as exc:
        assert reported(exc) == "Field 'x' expected int,"
    assert reported(RuntimeError("one\x1b[31m\ntwo")) == "one\\x1b[31m"
    assert reported(ZeroDivisionError()) == "ZeroDivisionError"


@pytest.mark.parametrize("form", FORMS)
def test_folder_holding_base_and_adapter(tmp_path: Path, form: str) -> None:
    root = llama(tmp_path)
    args: list[object] = ["--model", root] if form == "model" else ["--base", root, "--adapter", root / "adapter"]
    fails(
        tmp_path,
        args,
        f"{root}: is not a model folder (no model.safetensors or model.safetensors.index.json); it holds the model "
        f"folder base and the adapter folder adapter; pass {root / 'base'} as the base model and {root / 'adapter'} "
        "as the adapter",
    )


def test_folder_holding_models_only(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name in ("b", "a"):
        shutil.copytree(FIXTURES / "llama" / "base", root / name)
    fails(
        tmp_path,
        ["--model", root],
        f"{root}: is not a model folder (no model.safetensors or model.safetensors.index.json); it holds the model "
        f"folders a, b; pass the model folder, such as {root / 'a'}",
    )


def test_empty_folder_keeps_its_message(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    fails(
        tmp_path,
        ["--model", tmp_path / "empty"],
        f"{tmp_path / 'empty'}: no model.safetensors or model.safetensors.index.json found; pass a Hugging Face "
        "model folder",
    )
