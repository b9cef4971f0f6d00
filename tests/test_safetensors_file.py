"""Reading tensors from safetensors files: copied reads and mapped views agree; a mapped view never writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fourier_convert.io.checkpoint import open_checkpoint
from fourier_convert.io.safetensors_file import map_torch, read_torch
from tests.conftest import FIXTURE_NAMES, FIXTURES


def test_mapped_views_equal_reads_for_every_fixture_tensor() -> None:
    for name in FIXTURE_NAMES:
        ckpt = open_checkpoint(FIXTURES / name / "base")
        for key, info in ckpt.tensors.items():
            mapped, read = map_torch(info), read_torch(info)
            assert mapped.dtype == read.dtype and mapped.shape == read.shape, key
            assert torch.equal(mapped, read), key


def test_writing_to_a_mapped_view_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "empty": torch.zeros(0)}, str(path))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    info = {t.name: t for t in open_checkpoint(tmp_path).tensors.values()}
    view = map_torch(info["a"])
    assert view.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    view.add_(1.0)
    assert view[0, 0].item() == 1.0 and hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert map_torch(info["empty"]).shape == (0,)


def test_float_norm_reads_in_blocks_and_equals_the_float64_norm(tmp_path: Path) -> None:
    """to-lora's base-weight norms: read a block at a time (blocks of 100 bytes here, so most tensors take many),
    decoded exactly, summed in float64."""
    from fourier_convert.io.safetensors_file import float_norm

    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"w_{d}": torch.randn(37, 11, generator=gen).to(d) for d in (torch.bfloat16, torch.float16, torch.float32)
    }
    tensors["w_f64"] = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    tensors["empty"] = torch.zeros(0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for info in open_checkpoint(tmp_path).tensors.values():
        want = float(torch.linalg.vector_norm(tensors[info.name].double()))
        assert float_norm(info, block_bytes=100) == pytest.approx(want, rel=1e-14, abs=0.0), info.name
        assert float_norm(info) == pytest.approx(want, rel=1e-14, abs=0.0), info.name
