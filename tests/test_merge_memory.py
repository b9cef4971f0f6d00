"""merge_in_memory: the same tensors as merge writes, bit for bit, and the same input checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fourier_convert as fc
from tests.conftest import FIXTURE_NAMES, FIXTURES


def _written(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_equals_merge_on_disk(name: str, dtype: str | None, tmp_path: Path) -> None:
    base, adapter = FIXTURES / name / "base", FIXTURES / name / "adapter"
    on_disk = fc.merge(base, adapter, tmp_path / "out", device="cpu", dtype=dtype)
    state = fc.merge_in_memory(base, adapter, device="cpu", dtype=dtype)
    written = _written(tmp_path / "out")
    assert state.tensors.keys() == written.keys()
    for key, value in written.items():
        got = state.tensors[key]
        assert got.dtype == value.dtype and got.device.type == "cpu" and torch.equal(got, value), key
    assert state.report.tensors == on_disk.tensors and state.report.out is None and not state.report.dry_run
    assert [(r.key, r.max_abs_error) for r in state.report.layers] == [(r.key, r.max_abs_error) for r in on_disk.layers]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert state.config == config
    assert state.config_changed == (config != json.loads((base / "config.json").read_text()))
    assert {p.name for p in state.files} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_head_added_by_the_adapter_changes_the_config() -> None:
    state = fc.merge_in_memory(FIXTURES / "bert_head" / "base", FIXTURES / "bert_head" / "adapter", device="cpu")
    assert state.config_changed and state.config is not None
    assert state.report.tensors.get("add", 0) == 2


def test_weights_and_several_adapters(tmp_path: Path) -> None:
    base, adapter = FIXTURES / "llama" / "base", str(FIXTURES / "llama" / "adapter")
    specs = [fc.AdapterSpec(adapter, weight=0.5), fc.AdapterSpec(adapter, weight=-0.25)]
    fc.merge(base, specs, tmp_path / "out", device="cpu")
    state = fc.merge_in_memory(base, specs, device="cpu")
    written = _written(tmp_path / "out")
    assert all(torch.equal(state.tensors[k], v) for k, v in written.items())


def test_input_errors_match_merge() -> None:
    base, adapter = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    with pytest.raises(fc.UsageError) as e:
        fc.merge_in_memory(base, adapter, precision="float16")
    assert str(e.value) == "--precision: unknown precision 'float16'; use float32 or float64"
    with pytest.raises(fc.UsageError) as e:
        fc.merge_in_memory(base, fc.AdapterSpec(str(adapter), weight=float("nan")))
    assert str(e.value) == "--weight: nan is not a finite number; pass a multiplier such as 1.0 or 0.5"
    with pytest.raises(fc.UsageError) as e:
        fc.merge_in_memory(base, [])
    assert str(e.value) == "--adapter: no adapter given; pass at least one --adapter"
    with pytest.raises(fc.BaseMismatchError):
        fc.merge_in_memory(FIXTURES / "gpt2" / "base", adapter)
