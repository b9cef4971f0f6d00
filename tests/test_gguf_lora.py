"""GGUF LoRA files (fourier_convert/io/gguf_lora.py): byte-identical to llama.cpp's convert_lora_to_gguf.py on the
serving fixture, readable by the gguf package's reader, q / k rows permuted as llama.cpp does, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fourier_convert as fc
from fourier_convert.io.adapter_writer import AdapterFiles
from fourier_convert.io.gguf_lora import GGUF_NAME, gguf_layout, gguf_lora_bytes
from fourier_convert.lora import to_lora
from tests.conftest import FIXTURES

SERVING = FIXTURES / "serving"
#: ``to-lora --target llama.cpp --rank 0.4`` of the serving adapter, without its GGUF file.
LORA = SERVING / "lora"
#: What llama.cpp's convert_lora_to_gguf.py wrote for LORA (folder name ``lora``).
REFERENCE = SERVING / "lora.reference.gguf"
GGUF_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HF_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NO_GGUF = (
    "--target: llama.cpp output is written with the gguf package, which is not installed; "
    "pip install 'fourier-convert[gguf]' (or: pip install gguf)"
)


def _base_config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads((SERVING / "base" / "config.json").read_text())
    return config


def _lora() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads((LORA / "adapter_config.json").read_text()), load_file(str(LORA / "adapter_model.safetensors"))


def _fields(path: Path) -> dict[str, tuple[list[Any], Any]]:
    """GGUF metadata: key -> (value types, value)."""
    import gguf

    return {f.name: (list(f.types), f.contents()) for f in gguf.GGUFReader(path).fields.values()}


def _tensors(path: Path) -> dict[str, Any]:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def llama_cpp_permute(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Llama converter's q / k row order (HF's rotary halves -> interleaved pairs)."""
    out, r = b.shape
    return b.reshape(n_head, 2, out // n_head // 2, r).swapaxes(1, 2).reshape(out, r)


def test_gguf_bytes_equal_convert_lora_to_gguf() -> None:
    config, tensors = _lora()
    data = gguf_lora_bytes(gguf_layout(_base_config()), config, tensors, "lora")
    assert data == REFERENCE.read_bytes()


def test_gguf_reads_back_like_the_reference(tmp_path: Path) -> None:
    config, tensors = _lora()
    ours = tmp_path / GGUF_NAME
    ours.write_bytes(gguf_lora_bytes(gguf_layout(_base_config()), config, tensors, "lora"))
    fields, want = _fields(ours), _fields(REFERENCE)
    assert fields == want
    assert {k: v for k, (_, v) in fields.items() if not k.startswith("GGUF.")} == {
        "general.architecture": "llama",
        "general.type": "adapter",
        "adapter.type": "lora",
        "general.name": "Lora",
        "adapter.lora.alpha": float(config["lora_alpha"]),
        "general.quantization_version": 2,
    }
    got, ref = _tensors(ours), _tensors(REFERENCE)
    assert list(got) == list(ref) and len(got) == 2 * len(config["target_modules"])
    for name, t in got.items():
        assert (t.tensor_type, list(t.shape)) == (ref[name].tensor_type, list(ref[name].shape)), name
        np.testing.assert_array_equal(t.data, ref[name].data, err_msg=name)


def test_cli_to_lora_writes_the_gguf_llama_cpp_reads(tmp_path: Path) -> None:
    import gguf
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    out = tmp_path / "lora"
    args = ["to-lora", "--adapter", str(SERVING / "adapter"), "--base", str(SERVING / "base"), "--rank", "0.4",
            "--target", "llama.cpp", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", GGUF_NAME, "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == _lora()[0]  # the fixture is what to-lora writes
    factors = load_file(str(out / "adapter_model.safetensors"))
    reader = gguf.GGUFReader(out / GGUF_NAME)
    assert reader.fields["adapter.lora.alpha"].contents() == float(config["lora_alpha"])
    got = {t.name: t for t in reader.tensors}
    n_blocks, base = 2, _base_config()
    assert set(got) == {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(n_blocks) for n in GGUF_TENSORS for ab in "ab"}
    for name, t in got.items():
        block, kind, part = int(name.split(".")[1]), name.split(".")[2], name[-1]
        key = f"base_model.model.model.layers.{block}.{HF_MODULES[kind]}.lora_{part.upper()}.weight"
        want = factors[key]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.data.shape == tuple(want.shape), name
        if part == "b" and kind in ("attn_q", "attn_k"):
            want = llama_cpp_permute(want, base["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"])
        np.testing.assert_array_equal(t.data, want.numpy(), err_msg=name)
    fixture = _lora()[1]  # and the same products as the fixture (signs of singular vectors aside)
    for key in (k for k in factors if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(factors[b_key] @ factors[key], fixture[b_key] @ fixture[key], rtol=0, atol=1e-5)


def test_refuses_bases_it_does_not_know(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    with pytest.raises(fc.UsageError) as info:
        to_lora(FIXTURES / "gpt2" / "adapter", base=FIXTURES / "gpt2" / "base", target="llama.cpp", drop_extras=True)
    message = (
        f"--target: {FIXTURES / 'gpt2' / 'base' / 'config.json'}: writing GGUF LoRA files directly knows "
        "LlamaForCausalLM, MistralForCausalLM, not 'GPT2LMHeadModel'; use --target peft and convert with python "
        "convert_lora_to_gguf.py --base BASE_FOLDER ADAPTER_FOLDER (from llama.cpp)"
    )
    assert str(info.value) == message
    out = tmp_path / "x"  # the CLI publishes nothing
    res = CliRunner().invoke(cli, ["to-lora", "--adapter", str(FIXTURES / "gpt2" / "adapter"), "--base",
                                   str(FIXTURES / "gpt2" / "base"), "--target", "llama.cpp", "--drop-extras",
                                   "--out", str(out)])  # fmt: skip
    assert res.exit_code == 2 and res.stderr == f"error: {message}\n"
    assert not out.exists()


def test_refuses_an_alpha_pattern_and_publishes_nothing(tmp_path: Path) -> None:
    config, tensors = _lora()
    config["alpha_pattern"] = {"model.layers.0.mlp.up_proj": 16}
    message = (
        "--target: llama.cpp scales every layer by one lora_alpha / rank; this LoRA has an alpha_pattern, rsLoRA or "
        "DoRA; convert with --target llama.cpp, which folds per-layer scales into lora_B"
    )
    layout = gguf_layout(_base_config())
    with pytest.raises(fc.UsageError) as info:
        gguf_lora_bytes(layout, config, tensors, "lora")
    assert str(info.value) == message
    with pytest.raises(fc.UsageError) as info:
        AdapterFiles(config, tensors, gguf=layout).save(tmp_path / "lora")
    assert str(info.value) == message and not (tmp_path / "lora").exists()


def test_refuses_tensors_other_than_factors() -> None:
    config, tensors = _lora()
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
    with pytest.raises(fc.UsageError) as info:
        gguf_lora_bytes(gguf_layout(_base_config()), config, {**tensors, key: torch.zeros(128)}, "lora")
    assert str(info.value) == (
        f"--target: llama.cpp LoRA files hold only lora_A / lora_B tensors, not {key!r}; use --drop-extras"
    )


def test_refuses_half_a_factor_pair() -> None:
    config, tensors = _lora()
    module = "model.layers.0.self_attn.q_proj"
    half = {k: v for k, v in tensors.items() if k != f"base_model.model.{module}.lora_B.weight"}
    with pytest.raises(fc.UsageError) as info:
        gguf_lora_bytes(gguf_layout(_base_config()), config, half, "lora")
    assert str(info.value) == (
        f"--target: {module!r} has no lora_B tensor; write both lora_A and lora_B of every module"
    )


def test_refuses_an_lm_head_lora_on_a_tied_base() -> None:
    assert gguf_layout(_base_config()).tensor_name("lm_head") == "output.weight"
    with pytest.raises(fc.UsageError) as info:
        gguf_layout({**_base_config(), "tie_word_embeddings": True}).tensor_name("lm_head")
    assert str(info.value) == (
        "--target: llama.cpp's llama model ties lm_head to the embeddings, so a LoRA on it cannot be served; leave "
        "the module out of the adapter, or use --target peft"
    )


def test_missing_gguf_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from fourier_convert.cli.main import cli

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(fc.UsageError) as info:
        gguf_layout(_base_config())
    assert str(info.value) == NO_GGUF
    with pytest.raises(fc.UsageError) as info:
        to_lora(SERVING / "adapter", base=SERVING / "base", rank=0.4, target="llama.cpp")
    assert str(info.value) == NO_GGUF
    out = tmp_path / "lora"  # refused before any work: nothing is published
    res = CliRunner().invoke(cli, ["to-lora", "--adapter", str(SERVING / "adapter"), "--base", str(SERVING / "base"),
                                   "--target", "llama.cpp", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 2 and res.stderr == f"error: {NO_GGUF}\n"
    assert not out.exists()
