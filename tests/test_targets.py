"""is_targeted agrees with PEFT's own check_target_module_exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fourier_convert.io.adapter import parse_settings
from fourier_convert.targets import is_targeted

KEYS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.v_proj",
    "model.layers.2.mlp.down_proj",
    "model.embed_tokens",
    "lm_head",
    "q_proj",
    "score",
    "transformer.h.3.attn.c_attn",
    "model.layers.1.experts.0.q_proj",
    "classifier.dense",
    "model.norm",
]
CONFIGS: list[dict[str, Any]] = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.(q|v)_proj"},
    {"target_modules": ["q_proj"], "layers_to_transform": 1},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 10]},
    {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_to_transform": [3], "layers_pattern": ["h"]},
    {"target_modules": ["c_attn"], "layers_to_transform": [3], "layers_pattern": ["h"]},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.1\..*"},
    {"target_modules": ["dense", "q_proj"], "modules_to_save": ["classifier"]},
    {"target_modules": ["layers.0.self_attn.q_proj"]},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: str(sorted(c.items())))
def test_same_selection_as_peft(cfg: dict[str, Any]) -> None:
    from peft import FourierFTConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_cfg = FourierFTConfig(**cfg)
    ours = parse_settings({"peft_type": "FOURIERFT", **cfg}, Path("adapter_config.json"))
    for key in KEYS:
        theirs = check_target_module_exists(peft_cfg, key)
        assert is_targeted(ours, key) == (bool(theirs) and type(theirs).__name__ != "_ExcludedModule"), key
