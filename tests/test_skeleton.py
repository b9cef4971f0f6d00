"""Module types: the source scan agrees with transformers' own meta-device model, and refuses what it cannot prove."""

from __future__ import annotations

import json
import time

import pytest

from fourier_convert.skeleton import CONV1D, LINEAR, build_skeleton, scan_linear_only
from tests.conftest import FIXTURE_NAMES, FIXTURES

# common architectures, with and without Conv1D (gpt2, openai-gpt, imagegpt use it)
MODEL_TYPES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt_neox", "opt", "bert", "roberta", "distilbert",
               "vit", "t5", "bart", "gpt2", "imagegpt"]  # fmt: skip


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_scan_agrees_with_the_skeleton_on_the_fixtures(name: str) -> None:
    config = json.loads((FIXTURES / name / "base" / "config.json").read_text())
    skeleton, why = build_skeleton(config, [])
    assert skeleton is not None, why
    has_conv1d = CONV1D in skeleton.module_types.values()
    scanned = scan_linear_only(config)
    assert (scanned is None) if has_conv1d else (scanned is not None)
    if scanned is not None:
        for module, kind in skeleton.module_types.items():
            if kind in (LINEAR, CONV1D):
                assert scanned.module_type(module) == kind


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_scan_never_calls_a_conv1d_model_linear(model_type: str) -> None:
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    config = transformers.AutoConfig.for_model(model_type)
    cls = transformers.MODEL_MAPPING[type(config)]
    with torch.device("meta"):
        model = cls(config)
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    scanned = scan_linear_only({**config.to_dict(), "architectures": [cls.__name__]})
    # never wrong (a Conv1D model is never called linear-only) and, for these common models, never needlessly slow
    assert (scanned is None) == conv1d


def test_scan_refuses_custom_code_unknown_types_and_composed_models() -> None:
    assert scan_linear_only({"model_type": "llama", "architectures": ["X"], "auto_map": {"AutoModel": "m.X"}}) is None
    assert scan_linear_only({"model_type": "no_such_model", "architectures": ["X"]}) is None
    assert scan_linear_only({"model_type": "llama"}) is None  # no architecture named
    assert scan_linear_only({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}) is None


def test_scan_imports_nothing_and_is_fast() -> None:
    import subprocess
    import sys

    code = (
        "import sys, time; t = time.perf_counter();"
        "from fourier_convert.skeleton import scan_linear_only;"
        "s = scan_linear_only({'model_type': 'llama', 'architectures': ['LlamaForCausalLM']});"
        "print(s.source, 'transformers' in sys.modules, time.perf_counter() - t)"
    )
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "modeling_llama.py: no Conv1D" in out and " False " in out, out
    assert time.perf_counter() - t < 30


@pytest.mark.parametrize("model_type", ["\ud800", "../llama", "llama/../llama", "ll ama"])
def test_the_source_scan_takes_only_a_plain_name_as_model_type(model_type: str) -> None:
    """A lone surrogate was an unexpected UnicodeEncodeError in merge, inspect and to-lora (it went into a file
    path); '..' and '/' reached other folders of transformers."""
    assert scan_linear_only({"model_type": model_type, "architectures": ["LlamaForCausalLM"]}) is None
