"""GPU path (run with `pytest -m gpu` on a CUDA machine; skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fourier_convert as fc
from fourier_convert.maths import check_delta, delta_weights, spectral_indices
from tests.conftest import FIXTURE_NAMES, FIXTURES
from tests.reference import load_model_tensors

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_cuda_merge_equals_cpu_merge(name: str, tmp_path: Path) -> None:
    cpu = fc.merge(FIXTURES / name / "base", FIXTURES / name / "adapter", tmp_path / "cpu", device="cpu")
    gpu = fc.merge(FIXTURES / name / "base", FIXTURES / name / "adapter", tmp_path / "gpu", device="cuda")
    assert gpu.device.startswith("cuda") and not gpu.fallbacks
    a, b = load_model_tensors(tmp_path / "cpu"), load_model_tensors(tmp_path / "gpu")
    for key in a:  # float64 deltas, rounded once: both are the correctly rounded value, bit for bit
        assert torch.equal(a[key], b[key]), key
    assert [r.key for r in cpu.layers] == [r.key for r in gpu.layers]


def test_cuda_merge_is_correctly_rounded_at_4096_width(tmp_path: Path) -> None:
    from tests.rounding_reference import nearest_even
    from tests.test_merge import _wide_llama

    spectrum = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    delta = _wide_llama(tmp_path, spectrum, planted=40_000, seed=4)
    key = "model.layers.0.self_attn.q_proj.weight"
    cpu = fc.merge_in_memory(tmp_path / "base", tmp_path / "adapter", device="cpu").tensors
    gpu = fc.merge_in_memory(tmp_path / "base", tmp_path / "adapter", device="cuda").tensors
    base = load_model_tensors(tmp_path / "base")[key]
    want = nearest_even(base.double() + delta, 7)
    assert int((gpu[key].double() != want).sum()) == 0
    for name in cpu:
        assert torch.equal(cpu[name], gpu[name]), name


def test_cuda_folder_merge_streams_in_parts_and_is_correctly_rounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder merge sends each 4096 x 4096 weight to the GPU and back through pinned buffers of an odd size
    (many parts, a short last one): every element is still the correctly rounded value, as on the CPU."""
    from fourier_convert.merging import transfer
    from tests.rounding_reference import nearest_even
    from tests.test_merge import _wide_llama

    monkeypatch.setattr(transfer, "STAGE_BYTES", (1 << 20) + 6)
    spectrum = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    delta = _wide_llama(tmp_path, spectrum, planted=40_000, seed=6)
    key = "model.layers.0.self_attn.q_proj.weight"
    fc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "gpu", device="cuda")
    fc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "cpu", device="cpu")
    gpu, cpu = load_model_tensors(tmp_path / "gpu"), load_model_tensors(tmp_path / "cpu")
    want = nearest_even(load_model_tensors(tmp_path / "base")[key].double() + delta, 7)
    assert int((gpu[key].double() != want).sum()) == 0
    assert gpu.keys() == cpu.keys()
    for name in cpu:
        assert torch.equal(cpu[name], gpu[name]), name


@pytest.mark.parametrize("part", [1000, 4096, 1 << 20])
def test_upload_and_download_through_small_pinned_buffers(part: int, tmp_path: Path) -> None:
    """A weight read from its file onto the GPU part by part, and sent back part by part, in order."""
    from fourier_convert.io.checkpoint import open_checkpoint
    from fourier_convert.io.safetensors_file import read_torch
    from fourier_convert.merging.transfer import PinnedBuffers, download, upload

    info = open_checkpoint(FIXTURES / "llama" / "base").tensors["model.embed_tokens.weight"]
    ring = PinnedBuffers(torch.device("cuda"), nbytes=part)
    on_gpu = upload(info, ring)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), read_torch(info))
    got = bytearray()
    starts: list[int] = []

    def write(data: memoryview, at: int) -> None:
        starts.append(at)
        got.extend(data)

    download(on_gpu, ring, write)
    assert bytes(got) == bytes(read_torch(info).view(torch.uint8).numpy())
    assert starts == list(range(0, info.nbytes, part))
    starts.clear()
    download(torch.empty(0, device="cuda"), ring, write)
    assert starts == [0]


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)])
def test_cuda_delta_passes_float64_check_at_real_widths(shape: tuple[int, int]) -> None:
    m, n = shape
    values = np.random.default_rng(0).standard_normal(1000)
    idx = spectral_indices(m, n, 1000, 777)
    got = delta_weights(torch.tensor(values, dtype=torch.float32), idx, m, n, 150.0, device="cuda")
    cpu = delta_weights(torch.tensor(values, dtype=torch.float32), idx, m, n, 150.0)
    assert check_delta(got, values, idx.numpy(), 150.0, rng=np.random.default_rng(1)).passed
    scale = 150.0 * np.linalg.norm(values) / (m * n)
    assert float((got.cpu() - cpu).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_cuda_merge_in_memory_equals_merge_on_disk(name: str, tmp_path: Path) -> None:
    """Deltas rebuilt on the GPU, tensors returned on the CPU: what merge writes with the same device."""
    base, adapter = FIXTURES / name / "base", FIXTURES / name / "adapter"
    fc.merge(base, adapter, tmp_path / "gpu", device="cuda", dtype="float32")
    state = fc.merge_in_memory(base, adapter, device="cuda", dtype="float32")
    assert state.report.device.startswith("cuda") and not state.report.fallbacks
    written = load_model_tensors(tmp_path / "gpu")
    assert written.keys() == state.tensors.keys()
    for key, value in written.items():
        got = state.tensors[key]
        assert got.device.type == "cpu" and torch.equal(got, value), key


def test_to_onnx_merges_on_the_gpu(tmp_path: Path) -> None:
    """export_onnx rebuilds the deltas on the GPU (device auto); onnxruntime validates on whatever provider
    is active and the merge proof passes."""
    pytest.importorskip("onnxruntime")
    report = fc.export_onnx(
        tmp_path / "onnx", base=FIXTURES / "llama" / "base", adapter=FIXTURES / "llama" / "adapter", task="causal-lm"
    )
    assert report.merge["device"].startswith("cuda")
    assert report.passed and report.proof_passed and (tmp_path / "onnx" / "model.onnx").is_file()


def test_calibrated_to_lora_on_cuda_equals_cpu_and_distils_reproducibly(tmp_path: Path) -> None:
    """The closed form on the GPU gives the CPU's factors (float64 Gram matrices); distillation on the GPU is
    reproducible with a seed and lowers the held-out error; PEFT (CPU) gives the figures the report states."""
    from tests.test_calibrate import _compare_in_peft, _held_out_batches, text_file

    calib = text_file(tmp_path / "calib.txt", 60)
    base, adapter = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    cpu, _ = fc.to_lora(adapter, base=base, rank=2, calibration=calib, device="cpu")
    gpu, rep_gpu = fc.to_lora(adapter, base=base, rank=2, calibration=calib, device="cuda")
    assert rep_gpu.calibration is not None and rep_gpu.calibration.device.startswith("cuda")
    for key, value in cpu.tensors.items():
        torch.testing.assert_close(gpu.tensors[key], value, rtol=1e-4, atol=1e-5)
    runs = [fc.to_lora(adapter, base=base, rank=2, calibration=calib, device="cuda", distill_steps=30) for _ in "ab"]
    (lora1, rep1), (lora2, _) = runs
    for key, value in lora1.tensors.items():
        assert torch.equal(value, lora2.tensors[key]), key
    cal = rep1.calibration
    assert cal is not None and cal.stages[-1].relative_error < cal.stages[1].relative_error
    lora1.save(tmp_path / "lora")
    mean_err, agree, _ = _compare_in_peft("llama", tmp_path / "lora", _held_out_batches("llama", calib))
    assert agree == cal.stages[-1].agree
    assert mean_err == pytest.approx(cal.stages[-1].mean_error, rel=1e-3, abs=1e-6)
