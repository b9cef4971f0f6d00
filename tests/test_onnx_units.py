"""to-onnx building blocks without an export: tasks, inputs, comparisons, the PEFT-free unmerged adapter
(against PEFT), loading in another dtype from memory, and argument errors raised before any work."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fourier_convert as fc
from fourier_convert.io.checkpoint import open_checkpoint
from fourier_convert.maths import spectral_indices
from fourier_convert.maths.delta import delta_apply, spectral_basis
from fourier_convert.onnx.compare import compare_outputs
from fourier_convert.onnx.inputs import Case, export_case, make_inputs, row_lengths, validation_cases
from fourier_convert.onnx.models import load_checkpoint_model, load_task_model, stored_in
from fourier_convert.onnx.proof import apply_unmerged
from fourier_convert.onnx.signature import FlatModel, Signature, describe
from fourier_convert.onnx.tasks import infer_task
from tests.conftest import FIXTURES
from tests.reference import reference_delta
from tests.test_forward import load_task_model as peft_task_model

TASK_OF = {
    "llama": "causal-lm",
    "gpt2": "causal-lm",
    "roberta": "text-classification",
    "vit": "image-classification",
    "bert_head": "text-classification",
}


@pytest.mark.parametrize(
    ("arch", "task"),
    [
        ("LlamaForCausalLM", "causal-lm-with-past"),
        ("GPT2LMHeadModel", "causal-lm-with-past"),
        ("RobertaForSequenceClassification", "text-classification"),
        ("BertForTokenClassification", "token-classification"),
        ("ViTForImageClassification", "image-classification"),
        ("BertModel", "feature-extraction"),
    ],
)
def test_infer_task(arch: str, task: str) -> None:
    assert infer_task({"architectures": [arch]}) == (task, f"architectures[0] is {arch}")


def test_infer_task_errors() -> None:
    with pytest.raises(fc.UsageError) as e:
        infer_task({"architectures": ["BertForMaskedLM"]})
    assert str(e.value) == (
        "config.json: architecture BertForMaskedLM maps to no supported task; pass --task explicitly "
        "(feature-extraction, text-classification, token-classification, image-classification, causal-lm, "
        "causal-lm-with-past) if the model fits one of them"
    )
    with pytest.raises(fc.UsageError, match="names no architectures"):
        infer_task({})


@pytest.mark.parametrize(("m", "n", "k"), [(12, 8, 20), (7, 10, 15), (16, 16, 256)])
def test_delta_apply_equals_dense_delta(m: int, n: int, k: int) -> None:
    rng = np.random.default_rng(m * n)
    values = rng.standard_normal(k)
    dense = reference_delta(values, m, n, 150.0, 777)  # PEFT's definition, float64, shares no code
    idx = spectral_indices(m, n, k, 777).numpy()
    x = torch.from_numpy(rng.standard_normal((3, 5, n)))
    got = delta_apply(x, values, idx, (m, n), 150.0)
    assert got.shape == (3, 5, m) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), x.numpy() @ dense.T, rtol=1e-10, atol=1e-12)
    e_u, e_v = spectral_basis(idx, (m, n))
    assert e_u.shape == (m, k) and e_v.shape == (n, k) and e_u.dtype == torch.complex128
    p, q = np.arange(m)[:, None], np.arange(n)[:, None]  # exp evaluated directly, unreduced phases
    np.testing.assert_allclose(e_u.numpy(), np.exp(2j * np.pi * idx[0] * p / m), atol=1e-12)
    np.testing.assert_allclose(e_v.numpy(), np.exp(2j * np.pi * idx[1] * q / n), atol=1e-12)
    shared = delta_apply(x, 2 * values, idx, (m, n), 150.0, (e_u, e_v))  # another layer, same positions
    np.testing.assert_allclose(shared.numpy(), 2 * got.numpy(), rtol=1e-12, atol=1e-14)


def _sig(task: str, inputs: tuple[str, ...], past: int = 0, image: bool = False) -> Signature:
    return Signature(
        task,
        inputs,
        ("logits",),
        tuple(i for i in inputs if not i.startswith("past_")),
        ("logits",),
        past_layers=past,
        past_shape=(2, 4),
        vocab_size=100,
        pad_token_id=1,
        max_positions=64,
        image_shape=(3, 8, 8) if image else None,
    )


TEXT = ("input_ids", "attention_mask")
CAUSAL = ("input_ids", "attention_mask", "position_ids")
PAST = (*CAUSAL, "past_key_values.0.key", "past_key_values.0.value")


@pytest.mark.parametrize(
    "sig",
    [
        _sig("text-classification", TEXT),
        _sig("causal-lm", CAUSAL),
        _sig("causal-lm-with-past", PAST, past=1),
        _sig("image-classification", ("pixel_values",), image=True),
    ],
    ids=["encoder", "decoder", "with-past", "image"],
)
def test_validation_shapes(sig: Signature) -> None:
    example = export_case(sig)
    cases = validation_cases(sig)
    assert len(cases) >= 3 and example not in cases
    assert example.batch >= 2 and (example.seq >= 2 or not sig.is_text)
    if sig.is_text:
        assert any(c.padding for c in cases)
    if sig.past_layers:
        assert {c.past == 0 for c in cases} == {True, False}


def test_inputs_left_padding_and_positions() -> None:
    sig = _sig("causal-lm-with-past", PAST, past=1)
    case = Case(3, 2, 4, "left")
    ids, mask, pos, key, value = make_inputs(sig, case, seed=3)
    assert row_lengths(case) == [6, 3, 2]  # padding stays inside the past: every current token is real
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert pos.tolist() == [[4, 5], [1, 2], [0, 1]]
    assert ids.shape == (3, 2) and key.shape == value.shape == (3, 2, 4, 4)
    right = make_inputs(_sig("text-classification", TEXT), Case(2, 4, 0, "right"), seed=1)
    assert right[1].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert right[0][1, 1:].tolist() == [1, 1, 1]  # pad_token_id at padded positions
    assert torch.equal(make_inputs(sig, case, seed=3)[0], ids)  # deterministic


def test_compare_uses_unmasked_positions_only() -> None:
    sig = Signature("causal-lm", CAUSAL, ("logits",), CAUSAL, ("logits",), selection={"logits": "query"})
    mask = np.array([[True, True, True], [False, True, True]])
    ref = np.arange(18, dtype=np.float32).reshape(2, 3, 3)
    got = ref.copy()
    got[1, 0] = np.nan  # a padded position: ignored
    check = compare_outputs(sig, "b2", {}, mask, [ref], [got + 1e-6], 1e-4, 1e-3)
    assert check.passed and check.outputs[0].compared == 15 and check.outputs[0].top1_agreement == 1.0
    got[0, 1, 2] += 0.1  # a real position: fails, and the arg-max of that row changes
    got[0, 1, 0] += 10
    bad = compare_outputs(sig, "b2", {}, mask, [ref], [got], 1e-4, 1e-3).outputs[0]
    assert not bad.passed and math.isclose(bad.max_abs_diff, 10.0, rel_tol=1e-6)
    assert bad.top1_agreement == pytest.approx(4 / 5)
    got[0, 0, 0] = np.nan
    assert compare_outputs(sig, "b2", {}, mask, [ref], [got], 1e-4, 1e-3).outputs[0].max_abs_diff == math.inf


def _merged_and_unmerged(name: str, folder: Path) -> tuple[Any, Any, Signature, list[torch.Tensor]]:
    """Merge a fixture, load the merged model twice: as merged, and turned into base + unmerged adapter."""
    merged = fc.merge(FIXTURES / name / "base", FIXTURES / name / "adapter", folder, device="cpu")
    task = TASK_OF[name]
    model = load_task_model(folder, task)
    sig = describe(model, task)
    x = make_inputs(sig, validation_cases(sig)[1], seed=7)
    adapter = fc.read_adapter(str(FIXTURES / name / "adapter"))
    layers = [(r.module, r.key) for r in merged.layers]
    unmerged = load_task_model(folder, task)
    done = apply_unmerged(unmerged, open_checkpoint(FIXTURES / name / "base"), layers, [adapter], [1.0])
    return model, (unmerged, done), sig, x


@pytest.mark.parametrize("name", list(TASK_OF))
def test_unmerged_adapter_equals_peft(name: str, tmp_path: Path) -> None:
    """The merge proof's PEFT-free route (base weights back, closed-form hooks, biases, heads) is PEFT's forward,
    and every other tensor of the merged model equals the base's."""
    from peft import PeftModel

    merged, (unmerged, done), sig, x = _merged_and_unmerged(name, tmp_path / "merged")
    oracle = PeftModel.from_pretrained(
        peft_task_model(name, FIXTURES / name / "base"), str(FIXTURES / name / "adapter")
    ).eval()
    kwargs: dict[str, Any] = dict(zip(sig.model_inputs, x, strict=True))
    with torch.no_grad():
        got = FlatModel(unmerged, sig)(*x)[0]
        want = oracle(**kwargs).logits
        merged_out = FlatModel(merged, sig)(*x)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_out, want, rtol=1e-4, atol=1e-5)
    assert len(done.hooked) == len(fc.read_adapter(str(FIXTURES / name / "adapter")).spectra)
    assert done.checked > 5 and not done.mismatched and not done.unchecked
    if name in ("roberta", "bert_head"):
        assert {"classifier.out_proj.weight", "classifier.weight"} & set(done.replaced)
    modules = dict(unmerged.named_modules())
    hooked = {id(modules[name].weight) for name in done.hooked}
    swapped = [(p, data) for p, data in done.saved if id(p) in hooked]
    assert swapped and all(not torch.equal(p.data, data) for p, data in swapped), "base weights must be in place"
    done.restore()
    with torch.no_grad():
        restored = FlatModel(unmerged, sig)(*x)[0]
    assert torch.equal(restored, merged_out), "restore() must give the merged model back, bit for bit"
    mine, theirs = unmerged.state_dict(), merged.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not done.handles and not done.saved


def test_proof_catches_a_bad_merge(tmp_path: Path) -> None:
    """A merged checkpoint with one copied tensor altered and one delta dropped: the untouched-tensor check names
    the first, the outputs of merged vs unmerged expose the second."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "merged"
    fc.merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", folder, device="cpu")
    base = open_checkpoint(FIXTURES / "llama" / "base")
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"][0] += 1e-3
        if "model.layers.1.self_attn.q_proj.weight" in tensors:  # undo the merge of one layer
            tensors["model.layers.1.self_attn.q_proj.weight"] = base_tensor(
                base, "model.layers.1.self_attn.q_proj.weight"
            )
        save_file(tensors, str(shard), metadata={"format": "pt"})
    model = load_task_model(folder, "causal-lm")
    sig = describe(model, "causal-lm")
    x = make_inputs(sig, validation_cases(sig)[1], seed=7)
    with torch.no_grad():
        merged_out = FlatModel(model, sig)(*x)[0]
    adapter = fc.read_adapter(str(FIXTURES / "llama" / "adapter"))
    keys = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
    done = apply_unmerged(model, base, [(k[: -len(".weight")], k) for k in keys], [adapter], [1.0])
    assert done.mismatched == ["model.norm.weight -> model.norm.weight"]
    with torch.no_grad():
        unmerged_out = FlatModel(model, sig)(*x)[0]
    assert (merged_out - unmerged_out).abs().max() > 1e-3


def base_tensor(base: Any, key: str) -> torch.Tensor:
    from fourier_convert.io.safetensors_file import read_torch

    return read_torch(base.tensors[key])


def test_load_in_another_dtype_from_memory() -> None:
    """A checkpoint not stored in the export dtype is converted tensor by tensor in memory and handed to
    transformers: the same parameters as transformers' own conversion on load, and no file written."""
    ckpt = open_checkpoint(FIXTURES / "llama" / "base")
    assert stored_in(ckpt, torch.float32) and not stored_in(ckpt, torch.float16)
    before = sorted(p.name for p in ckpt.folder.iterdir())
    mine = load_checkpoint_model(ckpt, "causal-lm", torch.float16)
    theirs = load_task_model(ckpt.folder, "causal-lm", dtype=torch.float16)
    assert sorted(p.name for p in ckpt.folder.iterdir()) == before
    a, b = mine.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert next(mine.parameters()).dtype == torch.float16


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (
            {"model": "fixtures/llama/base", "dtype": "bfloat16"},
            fc.UsageError,
            "--dtype: bfloat16 is not offered: onnxruntime has bfloat16 kernels for few ops (CPU and CUDA), so the "
            "graph could neither be validated nor run reliably; use --dtype float16 or float32",
        ),
        (
            {"model": "fixtures/llama/base", "base": "fixtures/llama/base"},
            fc.UsageError,
            "--model: given together with --base / --adapter; pass either a merged --model or --base with --adapter",
        ),
        (
            {"base": "fixtures/llama/base"},
            fc.UsageError,
            "--base: an export needs --base with --adapter, or a merged --model; pass --base and --adapter, or --model",
        ),
        ({"model": "fixtures/llama/base", "task": "seq2seq"}, fc.UsageError, "--task: unknown task 'seq2seq'"),
        ({"model": "fixtures/llama/base", "atol": -1.0}, fc.UsageError, "--atol: -1.0 is not a finite"),
        ({"model": "fixtures/llama/base", "device": "tpu"}, fc.UsageError, "--device: unknown device 'tpu'"),
        ({"model": "no/such/folder"}, fc.InputFileError, "no/such/folder: base model folder not found"),
    ],
)
def test_argument_errors_before_any_work(
    kwargs: dict[str, Any], exc: type[Exception], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(FIXTURES.parent)
    out = tmp_path / "onnx"
    with pytest.raises(exc) as e:
        fc.export_onnx(out, **kwargs)
    assert str(e.value).startswith(message)
    _no_output(out)


def test_cuda_without_cuda_provider_fails_early(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    out = tmp_path / "onnx"
    with pytest.raises(fc.ExportError) as e:
        fc.export_onnx(out, model=FIXTURES / "vit" / "base", device="cuda")
    assert str(e.value).startswith(f"--device: cuda requested but this onnxruntime ({ort.__version__}) offers only")
    _no_output(out)


def test_task_needing_an_untrained_head_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    with pytest.raises(fc.ExportError) as e:
        fc.export_onnx(out, model=FIXTURES / "gpt2" / "base", task="text-classification")
    assert (
        "GPT2ForSequenceClassification needs weights the checkpoint lacks: ['score.weight']; they would be random"
        in (str(e.value))
    )
    _no_output(out)


def test_same_values_is_exact_and_bitwise() -> None:
    from fourier_convert.onnx.proof import same_values

    bf16 = torch.tensor([1.5, -2.0, 0.0, -0.0, float("inf"), float("nan")], dtype=torch.bfloat16)
    f32 = bf16.to(torch.float32)
    assert same_values(bf16, f32) and same_values(f32, f32.clone())
    assert not same_values(bf16, torch.nextafter(f32, torch.full_like(f32, 10.0)))  # one float32 ulp off
    assert not same_values(bf16, -f32)
    signed_zero = f32.clone()
    signed_zero[2] = -0.0
    assert not same_values(bf16, signed_zero), "bitwise: -0.0 is not 0.0"
    assert not same_values(bf16[:3], f32)
    f16 = torch.tensor([0.1, 65504.0], dtype=torch.float16)
    assert same_values(f16, f16.to(torch.float32)) and not same_values(f16, torch.tensor([0.1, 65504.0]))
    ints = torch.tensor([1, 2, 3])
    assert same_values(ints, ints.clone()) and not same_values(ints, torch.tensor([1, 2, 4]))


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    from fourier_convert.model_config import config_from_dict

    source = tmp_path / "config.json"
    with pytest.raises(fc.ExportError) as e:
        config_from_dict({}, source)
    assert str(e.value) == f"{source}: is missing or has no model_type; export a transformers model folder"
    with pytest.raises(fc.ExportError) as e:
        config_from_dict({"model_type": "no-such-model"}, source)
    assert (
        str(e.value) == f"{source}: model_type 'no-such-model' is not known to this transformers; upgrade transformers"
    )
