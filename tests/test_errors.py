"""Every error path: the exact one-line message, the exception class, the CLI exit code, and that nothing is
left behind (no output folder, no ``.*.partial-*`` folder) and the inputs are untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

import fourier_convert as fc
import fourier_convert.io.writer as writer_module
from fourier_convert.cli.main import cli
from fourier_convert.maths.closed_form import DeltaCheck, DeltaSample
from tests.conftest import FIXTURES, UNADAPTABLE_SELECTIONS, replace_with_special_file
from tests.reference import load_model_tensors, peft_indices

SPECTRUM = "base_model.model.model.layers.{i}.self_attn.{m}.fourierft_spectrum"
Q0 = SPECTRUM.format(i=0, m="q_proj")
V0 = SPECTRUM.format(i=0, m="v_proj")


# -- helpers --------------------------------------------------------------------------------------
def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, str | None]:
    """Every path under ``folder`` (folders included, hidden ones too) -> sha256 of its bytes (None for folders)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(path).items()}  # clone: never keep the file mapped


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))


#: Seconds a refusal may take, library or command line (the fixtures are tiny; a refusal reads no tensor data).
TIME_BOUND = 10.0


def fails(
    tmp_path: Path,
    exc_type: type[fc.FourierConvertError],
    message: str,
    base: Path,
    adapter: Path | str,
    *cli_extra: str,
    code: int = 1,
    out: Path | None = None,
    **kwargs: Any,
) -> None:
    """The library raises exactly ``exc_type(message)``, the CLI prints ``error: message`` and exits ``code``,
    each within :data:`TIME_BOUND`, and neither leaves anything behind or changes an input."""
    out = out or tmp_path / "merged"
    kwargs.setdefault("device", "cpu")
    before = snapshot(tmp_path)
    start = time.perf_counter()
    with pytest.raises(fc.FourierConvertError) as info:
        fc.merge(base, adapter, out, **kwargs)
    assert time.perf_counter() - start < TIME_BOUND
    assert type(info.value) is exc_type
    assert str(info.value) == message
    assert snapshot(tmp_path) == before
    device = ["--device", kwargs["device"]]
    start = time.perf_counter()
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, *device, *cli_extra)
    assert time.perf_counter() - start < TIME_BOUND
    assert (res.exit_code, res.stdout, res.stderr) == (code, "", f"error: {message}\n"), res.output
    assert snapshot(tmp_path) == before


@pytest.fixture
def llama(fixture_copy) -> tuple[Path, Path]:
    d = fixture_copy("llama")
    return d / "base", d / "adapter"


# -- adapter folder and config --------------------------------------------------------------------
def test_adapter_folder_missing(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    nope = adapter.parent / "nope"
    fails(tmp_path, fc.InputFileError, f"{nope}: adapter folder not found; check the path", base, nope)


def test_adapter_is_a_file(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    f = adapter / "adapter_config.json"
    fails(tmp_path, fc.InputFileError, f"{f}: the adapter must be a folder, found a file; pass its folder", base, f)


def test_named_adapter_missing(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    msg = f"{adapter / 'third'}: adapter subfolder 'third' not found; list {adapter} for the adapter names"
    fails(tmp_path, fc.InputFileError, msg, base, f"{adapter}:third")


def test_adapter_config_missing(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    (adapter / "adapter_config.json").unlink()
    msg = (  # the fixture holds a second, named adapter: it is offered
        f"{adapter / 'adapter_config.json'}: file not found; adapter folders inside it: second; "
        f"pass {adapter / 'second'}, or {adapter}:second"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)
    shutil.rmtree(adapter / "second")
    msg = f"{adapter / 'adapter_config.json'}: file not found; check the folder"
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_swapped_or_wrong_folders_are_recognised(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """A model given as the adapter, an adapter given as the base, the folder above an adapter."""
    base, adapter = llama
    msg = (
        f"{base}: is a model folder (config.json and weights), not a FourierFT adapter; pass it as --base "
        "(or --model for to-onnx), and the adapter folder as --adapter"
    )
    fails(tmp_path, fc.AdapterError, msg, base, base)
    msg = (
        f"{adapter}: is a PEFT adapter folder (adapter_config.json), not a base model; pass it as --adapter and "
        "the model it was trained on as --base"
    )
    fails(tmp_path, fc.InputFileError, msg, adapter, adapter)
    parent = adapter.parent
    msg = (
        f"{parent / 'adapter_config.json'}: file not found; adapter folders inside it: adapter; "
        f"pass {parent / 'adapter'}, or {parent}:adapter"
    )
    fails(tmp_path, fc.InputFileError, msg, base, parent)


def test_adapter_config_invalid_json(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    (adapter / "adapter_config.json").write_text('{"peft_type": "FOURIERFT",')
    msg = (
        f"{adapter / 'adapter_config.json'}: not valid JSON (Expecting property name enclosed in double quotes "
        "at line 1 column 27); fix or re-save it"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_adapter_config_not_an_object(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    (adapter / "adapter_config.json").write_text("[1, 2]")
    msg = f"{adapter / 'adapter_config.json'}: expected a JSON object, found list; re-save it"
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_lora_adapter_is_refused_with_a_fix(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    edit_config(adapter, peft_type="LORA")
    with pytest.raises(fc.AdapterError) as info:
        fc.merge(base, adapter, tmp_path / "merged", device="cpu")
    err = info.value
    assert err.where == str(adapter / "adapter_config.json")
    assert err.found == "peft_type is 'LORA', expected 'FOURIERFT'"
    assert (
        err.fix == "this is a LoRA adapter: PEFT merges it itself (merge_and_unload), and fourier-convert from-lora "
        "converts it to FourierFT"
    )
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "merged")
    assert (res.exit_code, res.stderr) == (1, f"error: {err}\n")
    assert not (tmp_path / "merged").exists()


def test_lora_fix_names_only_existing_commands(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    edit_config(adapter, peft_type="LORA")
    with pytest.raises(fc.AdapterError) as info:
        fc.merge(base, adapter, tmp_path / "merged", device="cpu")
    for command in re.findall(r"`fourier-convert ([\w-]+)", str(info.value)):
        assert command in cli.commands, f"the fix suggests `fourier-convert {command}`, which does not exist"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("peft_type", "shown"), [("BOFT", "'BOFT'"), (None, "None")])
def test_unknown_peft_type(llama: tuple[Path, Path], tmp_path: Path, peft_type: str | None, shown: str) -> None:
    base, adapter = llama
    edit_config(adapter, peft_type=peft_type)
    msg = f"{adapter / 'adapter_config.json'}: peft_type is {shown}, expected 'FOURIERFT'; pass a FourierFT adapter"
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


# -- adapter weights ------------------------------------------------------------------------------
def _to_pickle(adapter: Path) -> None:
    st = adapter / "adapter_model.safetensors"
    torch.save(read_tensors(st), adapter / "adapter_model.bin")
    st.unlink()


def test_pickled_adapter_is_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    _to_pickle(adapter)
    msg = (
        f"{adapter / 'adapter_model.bin'}: adapter weights are a pickle, which can run code when loaded; refused; "
        "re-save the adapter with PEFT's save_pretrained(safe_serialization=True), "
        "or pass --allow-pickle to load it with torch's weights-only loader"
    )
    fails(tmp_path, fc.PickleRefusedError, msg, base, adapter)


def test_allow_pickle_merges_identically(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    reference = tmp_path / "from_safetensors"
    fc.merge(base, adapter, reference, device="cpu")
    _to_pickle(adapter)
    lib, cli_out = tmp_path / "from_pickle", tmp_path / "from_pickle_cli"
    fc.merge(base, adapter, lib, device="cpu", allow_pickle=True)
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", cli_out, "--device", "cpu", "--allow-pickle")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in reference.iterdir())
    for other in (lib, cli_out):
        assert sorted(p.name for p in other.iterdir()) == names
        for name in names:
            if name != "fourier_convert.json":  # provenance: adapter file hashes and a time stamp
                assert (other / name).read_bytes() == (reference / name).read_bytes(), name
    files = json.loads((lib / "fourier_convert.json").read_text())["adapters"][0]["files"]
    assert sorted(files) == ["adapter_config.json", "adapter_model.bin"]


def test_a_pickled_adapter_is_memory_mapped_not_read_whole(llama: tuple[Path, Path]) -> None:
    """torch.save's zip format is mapped: a spectrum's data stays in the file until it is used (so shapes are checked
    first); a legacy (non-zip) pickle, which cannot be mapped, still loads."""
    from fourier_convert.io.adapter import load_pickle

    _, adapter = llama
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    _to_pickle(adapter)
    path = adapter / "adapter_model.bin"
    loaded = load_pickle(path, allow=True)
    assert {k: _mapped_file(t.value) for k, t in loaded.items()} == dict.fromkeys(tensors, str(path))
    assert all(torch.equal(loaded[k].value, v) for k, v in tensors.items())
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    legacy = load_pickle(path, allow=True)
    assert all(torch.equal(legacy[k].value, v) for k, v in tensors.items())
    assert all(_mapped_file(t.value) is None for t in legacy.values())


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``t``'s data (from /proc/self/maps), or None for anonymous memory."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= ptr < high:
                return fields[5].strip() if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_pickle_that_is_not_a_regular_file_is_refused_by_type(
    llama: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    """With --allow-pickle, a FIFO under adapter_model.bin blocked for ever and a link to /dev/zero was read until
    the kernel killed the process (24 GB); both are refused before opening."""
    base, adapter = llama
    _to_pickle(adapter)
    replace_with_special_file(adapter / "adapter_model.bin", kind)
    msg = f"{adapter / 'adapter_model.bin'}: is not a regular file (a folder, FIFO or device); "
    msg += "re-save the adapter with PEFT"
    fails(tmp_path, fc.InputFileError, msg, base, adapter, "--allow-pickle", allow_pickle=True)


class _RunsCode:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo this ran",))


@pytest.mark.parametrize(
    ("case", "found"),
    [
        ("int key", "has a key 1 that is not a string"),
        ("list", "holds a list, not a dict of tensors"),
        ("complex", "{key!r} has dtype torch.complex64, not one a PEFT adapter holds"),
        ("sparse", "{key!r} is a torch.sparse_coo tensor, not a dense one"),
        ("meta", "{key!r} is a tensor on the meta device, which holds no data here"),
        ("code", "cannot be loaded with the weights-only loader (Trying to load unsupported GLOBAL posix.system whose "
         "module posix is blocked.)"),
        ("plain pickle", "cannot be loaded with the weights-only loader (WeightsUnpickler error: Unsupported operand "
         "149)"),
    ],
)  # fmt: skip
def test_a_pickle_that_is_not_a_dict_of_dense_tensors_is_one_line(
    llama: tuple[Path, Path], tmp_path: Path, case: str, found: str
) -> None:
    """Each of these was an 'unexpected' error, and a pickle torch did not write printed torch's warning too: now
    one line, without torch's advice to load with weights_only=False (which runs code)."""
    import pickle

    base, adapter = llama
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    key = next(iter(tensors))
    path = adapter / "adapter_model.bin"
    objects: dict[str, Any] = {
        "int key": {1: tensors[key]},
        "list": [tensors[key]],
        "complex": {**tensors, key: tensors[key].to(torch.complex64)},
        "sparse": {**tensors, key: tensors[key].to_sparse()},
        "meta": {**tensors, key: torch.empty(tensors[key].shape, device="meta")},
        "code": {key: _RunsCode()},
    }
    (adapter / "adapter_model.safetensors").unlink()
    if case == "plain pickle":
        path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    else:
        torch.save(objects[case], path)
    fix = "re-save it with PEFT" if "weights-only" in found or "dtype" in found else "re-save the adapter with PEFT"
    msg = f"{path}: {found.format(key=key)}; {fix}"
    fails(tmp_path, fc.InputFileError, msg, base, adapter, "--allow-pickle", allow_pickle=True)


def test_a_pickle_of_parameters_merges_like_its_tensors(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """A dict of nn.Parameter (torch.save of a state dict with grads on) was an 'unexpected' error; it merges."""
    base, adapter = llama
    reference = tmp_path / "reference"
    fc.merge(base, adapter, reference, device="cpu")
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    torch.save({k: torch.nn.Parameter(v) for k, v in tensors.items()}, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    out = tmp_path / "out"
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu", "--allow-pickle", "-q")
    assert (res.exit_code, res.stdout, res.stderr) == (0, "", "")
    for shard in reference.glob("*.safetensors"):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_adapter_weights_missing(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    (adapter / "adapter_model.safetensors").unlink()
    msg = (
        f"{adapter / 'adapter_model.safetensors'}: adapter weights not found; check the adapter folder; "
        "named adapters here: second (use PATH:NAME)"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_truncated_adapter(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[:-10])
    last = SPECTRUM.format(i=1, m="v_proj")
    msg = (
        f"{st}: truncated: tensor {last!r} ends at byte {len(raw)} but the file has {len(raw) - 10} bytes; "
        "re-download or re-save the file"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_adapter_cut_inside_its_header(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[:100])
    hlen = int.from_bytes(raw[:8], "little")
    msg = (
        f"{st}: header length {hlen} does not fit in the 100-byte file (truncated or not safetensors); "
        "re-download or re-save the file"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_adapter_header_garbage(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[:8] + b"\xff" * 50 + raw[58:])
    msg = (
        f"{st}: safetensors header is not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: "
        "invalid start byte); re-download or re-save the file"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_adapter_empty_file(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    st.write_bytes(b"")
    msg = f"{st}: file is 0 bytes, too short to be safetensors; re-download or re-save the file"
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


@pytest.mark.parametrize(
    ("bad", "summary"),
    [
        ({3: float("nan")}, "1 non-finite value (first at index 3: nan)"),
        ({0: float("inf"), 7: float("-inf")}, "2 non-finite values (first at index 0: inf)"),
    ],
)
def test_non_finite_spectrum(llama: tuple[Path, Path], tmp_path: Path, bad: dict[int, float], summary: str) -> None:
    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    tensors = read_tensors(st)
    for i, v in bad.items():
        tensors[Q0][i] = v
    write_tensors(st, tensors)
    msg = f"{st}: {Q0!r} holds {summary}; the training diverged; use an earlier checkpoint"
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


def test_spectrum_length_disagrees_with_n_frequency(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    edit_config(adapter, n_frequency=40)
    msg = (
        f"{adapter / 'adapter_model.safetensors'}: {Q0!r} has 50 coefficients but the config gives this module "
        "n_frequency=40; check n_frequency / n_frequency_pattern in adapter_config.json"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


def test_spectrum_length_disagrees_with_n_frequency_pattern(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    edit_config(adapter, n_frequency_pattern={"v_proj": 31})
    msg = (
        f"{adapter / 'adapter_model.safetensors'}: {V0!r} has 30 coefficients but the config gives this module "
        "n_frequency=31; check n_frequency / n_frequency_pattern in adapter_config.json"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


def test_missing_spectrum_is_an_error_not_a_skip(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    tensors = read_tensors(st)
    del tensors[Q0]
    write_tensors(st, tensors)
    msg = (
        f"{adapter}: config selects 4 modules but 1 of them has no spectrum "
        "(first: 'model.layers.0.self_attn.q_proj'); "
        "the adapter file is incomplete or does not belong to this config/base; re-save it with PEFT"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


@pytest.mark.parametrize(
    ("targets", "found"),
    UNADAPTABLE_SELECTIONS,
)
def test_a_selection_of_modules_fourierft_cannot_adapt(
    llama: tuple[Path, Path], tmp_path: Path, targets: Any, found: str
) -> None:
    """A norm in target_modules, or a regex that picks the containers too: PEFT fails to load the adapter
    (TypeError / ValueError: Target module ... is not supported); the norm case merged with exit 0."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = llama
    edit_config(adapter, target_modules=targets)
    msg = (
        f"{adapter}: target_modules selects {found}: PEFT's FourierFT cannot adapt it and fails to load the adapter "
        "(Target module ... is not supported); narrow target_modules in adapter_config.json to the adapted linear "
        "layers (the modules of the adapter's spectra), or list the module in exclude_modules"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)
    with pytest.raises((TypeError, ValueError), match=r"(?s)Target module .* is not supported"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))


def test_extra_spectrum_for_an_untargeted_module(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    tensors = read_tensors(st)
    tensors[SPECTRUM.format(i=0, m="k_proj")] = tensors[Q0].clone()
    write_tensors(st, tensors)
    msg = (
        f"{adapter}: spectrum for 'model.layers.0.self_attn.k_proj', which target_modules / exclude_modules / "
        "layers_to_transform do not select; check that adapter_config.json belongs to these weights"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


def test_a_stray_tensor_in_the_adapter_is_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    tensors = read_tensors(st)
    tensors["base_model.model.foo.weight"] = torch.zeros(3)
    write_tensors(st, tensors)
    msg = (
        f"{st}: tensor 'base_model.model.foo.weight' has no role PEFT would load it in (not a spectrum, not a trained "
        "bias for bias='none', not in modules_to_save []); check that adapter_config.json belongs to these weights"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


# -- adapter against base -------------------------------------------------------------------------
def test_wrong_base_names_near_matches(fixture_copy, tmp_path: Path) -> None:
    adapter = fixture_copy("llama") / "adapter"
    base = fixture_copy("gpt2") / "base"
    msg = (
        f"{adapter}: {Q0}: module 'model.layers.0.self_attn.q_proj' has no weight in the base checkpoint; "
        "is this the base model the adapter was trained on?"
    )
    fails(tmp_path, fc.BaseMismatchError, msg, base, adapter)


def test_renamed_module_lists_near_matches(fixture_copy, tmp_path: Path) -> None:
    d = fixture_copy("llama")
    st = d / "adapter" / "adapter_model.safetensors"
    tensors = read_tensors(st)
    tensors[Q0.replace("q_proj", "qproj")] = tensors.pop(Q0)
    write_tensors(st, tensors)
    edit_config(d / "adapter", target_modules=["q_proj", "v_proj", "qproj"])
    msg = (
        f"{d / 'adapter'}: {Q0.replace('q_proj', 'qproj')}: module 'model.layers.0.self_attn.qproj' has no weight "
        "in the base checkpoint; near matches: model.layers.0.self_attn.q_proj.weight, "
        "model.layers.1.self_attn.q_proj.weight, model.layers.0.self_attn.v_proj.weight"
    )
    fails(tmp_path, fc.BaseMismatchError, msg, d / "base", d / "adapter")


def test_head_shape_mismatch(fixture_copy, tmp_path: Path) -> None:
    d = fixture_copy("roberta")
    st = d / "adapter" / "adapter_model.safetensors"
    tensors = read_tensors(st)
    tensors["base_model.model.classifier.out_proj.weight"] = torch.zeros(5, 32)
    write_tensors(st, tensors)
    msg = (
        f"{d / 'adapter'}: base_model.model.classifier.out_proj.weight: shape [5, 32] but the base tensor "
        "'classifier.out_proj.weight' is [3, 32]; is this the base model the adapter was trained on?"
    )
    fails(tmp_path, fc.BaseMismatchError, msg, d / "base", d / "adapter")


def test_trained_bias_shape_mismatch(fixture_copy, tmp_path: Path) -> None:
    d = fixture_copy("roberta")
    st = d / "adapter" / "adapter_model.safetensors"
    tensors = read_tensors(st)
    key = "base_model.model.roberta.encoder.layer.0.output.dense.bias"
    tensors[key] = torch.zeros(33)
    write_tensors(st, tensors)
    msg = (
        f"{d / 'adapter'}: {key}: shape [33] but the base tensor 'roberta.encoder.layer.0.output.dense.bias' "
        "is [32]; is this the base model the adapter was trained on?"
    )
    fails(tmp_path, fc.BaseMismatchError, msg, d / "base", d / "adapter")


# -- base checkpoint ------------------------------------------------------------------------------
def test_truncated_base_shard(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    shard = base / "model-00002-of-00003.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-1000])
    msg = (
        f"{shard}: truncated: tensor 'model.layers.1.self_attn.v_proj.weight' ends at byte {len(raw)} but the file "
        f"has {len(raw) - 1000} bytes; re-download or re-save the file"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_base_shard_is_garbage(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    shard = base / "model-00001-of-00003.safetensors"
    shard.write_bytes(b"garbage!" * 20)
    hlen = int.from_bytes(b"garbage!", "little")
    msg = (
        f"{shard}: header length {hlen} does not fit in the 160-byte file (truncated or not safetensors); "
        "re-download or re-save the file"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_base_with_only_pickled_weights_is_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(base.glob("*.safetensors")):
        state.update(read_tensors(shard))
        shard.unlink()
    (base / "model.safetensors.index.json").unlink()
    torch.save(state, base / "pytorch_model.bin")
    msg = (
        f"{base / 'pytorch_model.bin'}: base weights are pickles, which can run code when loaded and cannot be "
        "streamed; convert them once: AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_base_folder_empty(llama: tuple[Path, Path], tmp_path: Path) -> None:
    _, adapter = llama
    empty = tmp_path / "empty_base"
    empty.mkdir()
    msg = f"{empty}: no model.safetensors or model.safetensors.index.json found; pass a Hugging Face model folder"
    fails(tmp_path, fc.InputFileError, msg, empty, adapter)


def test_index_references_a_missing_shard(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    shard = base / "model-00003-of-00003.safetensors"
    shard.unlink()
    msg = f"{shard}: listed in model.safetensors.index.json but missing; re-download the model"
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


# -- output ---------------------------------------------------------------------------------------
def test_output_exists_and_is_not_empty(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = f"{out}: exists and is not empty; choose another --out or pass --overwrite"
    fails(tmp_path, fc.OutputError, msg, base, adapter, out=out)


def test_overwrite_replaces_the_output_completely(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    fresh = tmp_path / "fresh"
    fc.merge(base, adapter, fresh, device="cpu")
    out = tmp_path / "merged"
    (out / "old_shards").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "old_shards" / "model.safetensors").write_bytes(b"stale")
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu", "--overwrite", "-q")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in fresh.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name != "fourier_convert.json":
            assert (out / name).read_bytes() == (fresh / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "llama", "merged"]  # no .old-* or .partial-*


def test_output_path_is_a_file(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    out = tmp_path / "merged"
    out.write_text("not a folder")
    msg = f"{out}: exists and is not a folder; choose another --out"
    fails(tmp_path, fc.OutputError, msg, base, adapter, "--overwrite", out=out, overwrite=True)


def test_output_may_not_replace_an_input(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    before = snapshot(tmp_path)
    with pytest.raises(fc.FourierConvertError) as info:
        fc.merge(base, adapter, base, device="cpu", overwrite=True)
    assert str(base) in str(info.value)
    assert snapshot(tmp_path) == before


# -- options --------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_gpu(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    msg = "--device: cuda requested but no CUDA GPU is available; use --device cpu"
    fails(tmp_path, fc.UsageError, msg, base, adapter, code=2, device="cuda")


def test_unknown_device(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    msg = "--device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N"
    fails(tmp_path, fc.UsageError, msg, base, adapter, code=2, device="tpu")


def test_dtype_int8(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    msg = "--dtype: unknown dtype 'int8'; use one of bf16, bfloat16, float16, float32, float64, fp16, fp32"
    fails(tmp_path, fc.UsageError, msg, base, adapter, "--dtype", "int8", code=2, dtype="int8")


@pytest.mark.parametrize("size", ["abc", "0", "-1GB", "1.5XB", "2 PB"])
def test_bad_max_shard_size(llama: tuple[Path, Path], tmp_path: Path, size: str) -> None:
    base, adapter = llama
    msg = f"--max-shard-size: cannot read size {size!r}; write it like 2GB, 500MB or 1GiB"
    fails(tmp_path, fc.UsageError, msg, base, adapter, "--max-shard-size", size, code=2, max_shard_size=size)


@pytest.mark.parametrize("size", ["nan", "inf"])
def test_non_finite_max_shard_size(llama: tuple[Path, Path], tmp_path: Path, size: str) -> None:
    base, adapter = llama
    msg = f"--max-shard-size: cannot read size {size!r}; write it like 2GB, 500MB or 1GiB"
    fails(tmp_path, fc.UsageError, msg, base, adapter, "--max-shard-size", size, code=2, max_shard_size=size)


# -- disk space and write failures ----------------------------------------------------------------
def _needed(base: Path) -> str:
    """What the output needs: the mirrored shards (same headers) plus the carried small files."""
    n = sum(p.stat().st_size for p in base.iterdir() if p.name != "model.safetensors.index.json")
    return f"{n / 1000:.1f} KB"


def test_not_enough_free_space(llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = llama
    real = shutil.disk_usage
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda p: real(p)._replace(free=999))
    out = tmp_path / "merged"
    msg = f"{out}: needs {_needed(base)} of free disk space, 999 B available; free some space"
    assert _needed(base) == "442.6 KB"
    fails(tmp_path, fc.DiskSpaceError, msg, base, adapter, out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def _enospc_on(monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if when == "always" or offset > 0:  # "tensors": the headers (offset 0) go through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)


@pytest.mark.parametrize("when", ["always", "tensors"])
def test_disk_full_while_writing(
    llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    base, adapter = llama
    _enospc_on(monkeypatch, when)
    before = snapshot(tmp_path)
    out = tmp_path / "merged"
    with pytest.raises(fc.DiskSpaceError) as info:
        fc.merge(base, adapter, out, device="cpu")
    err = info.value
    assert err.where == str(out) and err.fix == "free some space and retry"
    assert re.fullmatch(r"disk full while writing \(the output needs \d+\.\d KB\)", err.found)
    assert snapshot(tmp_path) == before
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu")
    assert (res.exit_code, res.stdout) == (1, "")
    assert res.stderr.startswith(f"error: {out}: disk full while writing") and res.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


@pytest.mark.parametrize("when", ["always", "tensors"])
def test_disk_full_reports_the_full_size(
    llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    base, adapter = llama
    _enospc_on(monkeypatch, when)
    out = tmp_path / "merged"
    msg = f"{out}: disk full while writing (the output needs {_needed(base)}); free some space and retry"
    fails(tmp_path, fc.DiskSpaceError, msg, base, adapter, out=out)

    with pytest.raises(fc.DiskSpaceError):
        fc.merge(base, adapter, tmp_path / "a" / "b" / "merged", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


@pytest.mark.parametrize(("precision", "library"), [("float64", "numpy"), ("float32", "torch")])
def test_verification_failure_publishes_nothing(
    llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, library: str
) -> None:
    """float64: the numpy CPU merge; float32: the torch path (the GPU's code, on the CPU)."""
    base, adapter = llama
    monkeypatch.setattr(DeltaSample, "check", lambda *a, **k: DeltaCheck(10, 1.0, 1e-6, False))
    version = np.__version__ if library == "numpy" else torch.__version__
    msg = (
        "model.layers.0.self_attn.q_proj.weight: reconstructed delta differs from the float64 closed form by "
        "1.000e+00 (tolerance 1.000e-06) on every backend; nothing was written; report this with the layer shape "
        f"and your {library} version ({version})"
    )
    fails(tmp_path, fc.VerificationError, msg, base, adapter, "--precision", precision, precision=precision)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]
    with pytest.raises(fc.VerificationError) as e:
        fc.merge_in_memory(base, adapter, device="cpu", precision=precision)
    assert str(e.value) == msg


@pytest.mark.parametrize(
    ("precision", "warning"),
    [
        ("float64", "numpy-cpu-float64 failed its check; used numpy-float64"),
        ("float32", "torch-cpu failed its check; used torch-cpu-float64-1thread"),
    ],
)
def test_fallback_backend_is_reported(
    llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, warning: str
) -> None:
    calls = {"n": 0}
    check = DeltaSample.check

    def first_fails(*args: Any, **kwargs: Any) -> DeltaCheck:
        calls["n"] += 1
        result = check(*args, **kwargs)
        return DeltaCheck(result.entries, 1.0, result.tolerance, False) if calls["n"] == 1 else result

    monkeypatch.setattr(DeltaSample, "check", first_fails)
    base, adapter = llama
    out = tmp_path / "m"
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, "--precision", precision, "-q")
    assert res.exit_code == 0, res.output
    assert res.stderr == f"warning: model.layers.0.self_attn.q_proj: {warning}\n"
    report = json.loads((out / "fourier_convert.json").read_text())["report"]
    assert report["layers"][0]["backend"] == warning.rsplit(" ", 1)[1]
    assert {layer["backend"] for layer in report["layers"][1:]} == {warning.split(" ", 1)[0]}


def test_more_coefficients_than_positions(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    edit_config(adapter, n_frequency_pattern={"v_proj": 3000})
    st = adapter / "adapter_model.safetensors"
    tensors = read_tensors(st)
    for i in range(2):
        tensors[SPECTRUM.format(i=i, m="v_proj")] = torch.ones(3000)
    write_tensors(st, tensors)
    msg = (
        f"{adapter}: {V0}: 3000 coefficients but the 32x64 base weight 'model.layers.0.self_attn.v_proj.weight' "
        "has only 2048 positions; is this the base model the adapter was trained on?"
    )
    fails(tmp_path, fc.BaseMismatchError, msg, base, adapter)


@pytest.mark.parametrize("weight", ["nan", "inf"])
def test_non_finite_weight_is_a_usage_error(llama: tuple[Path, Path], tmp_path: Path, weight: str) -> None:
    base, adapter = llama
    before = snapshot(tmp_path)
    res = invoke("merge", "--base", base, "--adapter", adapter, "--weight", weight, "--out", tmp_path / "m")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: --weight: ") and res.stderr.count("\n") == 1
    assert snapshot(tmp_path) == before


# -- the --json report ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["merge", "to-lora", "inspect"])
def test_json_report_never_lands_in_an_input(command: str, llama: tuple[Path, Path], tmp_path: Path) -> None:
    """--json is written after success: a path in an input folder would overwrite an input file."""
    base, adapter = llama
    before = snapshot(base.parent)
    target = base / "config.json" if command != "inspect" else adapter / "adapter_config.json"
    args = {
        "merge": ["merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "out"],
        "to-lora": ["to-lora", "--adapter", adapter, "--base", base, "--out", tmp_path / "out"],
        "inspect": ["inspect", adapter],
    }[command]
    res = invoke(*args, "--json", target)
    where = base if command != "inspect" else adapter
    assert res.exit_code == 2
    assert res.stderr == f"error: --json: {target} lies in the input {where}; write the report outside the inputs\n"
    assert snapshot(base.parent) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "to-lora", "from-lora", "to-onnx", "inspect"])
@pytest.mark.parametrize("kind", ["folder", "fifo", "link-loop", "the-out-folder"])
def test_json_report_path_that_cannot_take_the_report_is_refused_before_any_work(
    command: str, kind: str, llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """The report is written after the output is published: a folder, a FIFO (which would block), a link loop or
    the output folder itself would fail only then, so each is refused first."""
    base, adapter = llama
    out = tmp_path / "out"
    target = tmp_path / "report"
    if kind == "folder":
        target.mkdir()
        why = f"{target} is a folder; give a file path, such as {target / 'report.json'}"
    elif kind == "fifo":
        os.mkfifo(target)
        why = f"{target} is not a regular file (a FIFO or a device); give a file path"
    elif kind == "link-loop":
        target.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(target)
        why = f"{target} is a symbolic link loop; choose another --json path"
    else:
        if command == "inspect":
            pytest.skip("inspect has no output folder")
        target = out
        why = f"{out} lies in --out {out}; write the report outside the output folder"
    args = {
        "merge": ["merge", "--base", base, "--adapter", adapter, "--out", out],
        "to-lora": ["to-lora", "--adapter", adapter, "--base", base, "--out", out],
        "to-onnx": ["to-onnx", "--base", base, "--adapter", adapter, "--out", out],
        "from-lora": ["from-lora", "--adapter", adapter, "--base", base, "--out", out],  # checked before reading
        "inspect": ["inspect", adapter],
    }[command]
    before = snapshot(tmp_path)
    start = time.perf_counter()
    res = invoke(*args, "--json", target)
    assert time.perf_counter() - start < TIME_BOUND
    assert (res.exit_code, res.stdout, res.stderr) == (2, "", f"error: --json: {why}\n")
    assert snapshot(tmp_path) == before


def test_a_report_that_cannot_be_written_says_the_output_was_published(tmp_path: Path) -> None:
    """Checked paths can still fail when written (the folder removed meanwhile, a full disk): one line that says
    the output exists, never an internal error. A FIFO put at the path meanwhile is replaced, never written into
    (which would block)."""
    from fourier_convert.cli.merge_cmd import write_report

    gone = tmp_path / "gone" / "r.json"
    with pytest.raises(fc.OutputError) as info:
        write_report(gone, {"a": 1})
    assert str(info.value) == (
        f"--json: cannot write the report to {gone} (No such file or directory); the output itself was published; "
        "give a writable --json path next time (a merge's output also holds its report, in fourier_convert.json)"
    )
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    write_report(fifo, {"a": 1})
    assert json.loads(fifo.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_an_out_that_is_a_link_loop_is_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    fails(tmp_path, fc.OutputError, f"{loop}: is a symbolic link loop; remove the link or choose another --out",
          base, adapter, out=loop)  # fmt: skip


@pytest.mark.parametrize("scaling", [1e300, -1e300])
def test_inspect_reports_an_absurd_scaling_without_overflowing(
    scaling: float, llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """inspect --base squared the scaling first: 1e300 raised OverflowError ('unexpected'). Norms are now the
    unscaled ones times |scaling|, and the energy shares do not depend on it."""
    base, adapter = llama
    original = json.loads((adapter / "adapter_config.json").read_text())["scaling"]
    invoke("inspect", adapter, "--base", base, "--json", tmp_path / "one.json", "-q")
    edit_config(adapter, scaling=scaling)
    start = time.perf_counter()
    res = invoke("inspect", adapter, "--base", base, "--json", tmp_path / "big.json", "-q")
    assert time.perf_counter() - start < TIME_BOUND
    assert (res.exit_code, res.stdout, res.stderr) == (0, "", "")
    one = json.loads((tmp_path / "one.json").read_text())["layers"]
    big = json.loads((tmp_path / "big.json").read_text())["layers"]
    scale = abs(scaling) / abs(original)
    for a, b in zip(one, big, strict=True):
        assert b["delta_norm"] == pytest.approx(a["delta_norm"] * scale, rel=1e-12)
        assert b["energy_top"] == pytest.approx(a["energy_top"], rel=1e-12)


def test_to_lora_refuses_a_delta_float32_factors_cannot_hold(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """scaling 1e300 overflowed inside the SVD (numpy warnings) and ended in 'every layer got rank 0'."""
    base, adapter = llama
    edit_config(adapter, scaling=1e300)
    before = snapshot(tmp_path)
    start = time.perf_counter()
    res = invoke("to-lora", "--adapter", adapter, "--base", base, "--out", tmp_path / "lora")
    assert time.perf_counter() - start < TIME_BOUND
    first = "model.layers.0.self_attn.q_proj"
    assert (res.exit_code, res.stdout) == (1, "")
    assert re.fullmatch(
        rf"error: {first}: scaling 1e\+300 makes its delta \S+e\+298 in Frobenius norm, beyond float32's range "
        r"\(the LoRA factors' dtype\); check the adapter's scaling\n",
        res.stderr,
    ), res.stderr
    assert snapshot(tmp_path) == before


def test_to_lora_warns_about_a_delta_far_larger_than_its_weight(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """The warning merge gives (delta norm over 100x the base weight's), now from to-lora too."""
    base, adapter = llama
    edit_config(adapter, scaling=1e36)
    res = invoke("to-lora", "--adapter", adapter, "--base", base, "--out", tmp_path / "lora", "-q")
    assert (res.exit_code, res.stdout) == (0, "")
    assert re.fullmatch(
        r"warning: 4 layer\(s\) change by more than 100x their own weight \(largest: \S+, delta norm \S+ = \S+ x "
        r"the base weight's\); check the adapter's scaling\n",
        res.stderr,
    ), res.stderr


def test_a_merge_that_overflows_publishes_nothing(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """A scaling of 1e300 makes every merged value infinite in bf16: refused, not published with a warning."""
    base, adapter = llama
    edit_config(adapter, scaling=1e300)
    with pytest.raises(fc.VerificationError) as info:
        fc.merge(base, adapter, tmp_path / "merged", device="cpu")
    msg = str(info.value)
    assert msg.startswith("model.layers.0.self_attn.q_proj.weight: merging gives 4096 non-finite value(s) in F32")
    assert msg.endswith("scaling 1e+300); nothing was written; check the adapter's scaling and spectrum")
    fails(tmp_path, fc.VerificationError, msg, base, adapter)


# -- hostile inputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_config_that_is_not_a_regular_file_is_refused_without_reading(
    kind: str, llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """A FIFO would block and /dev/zero would never end: both are refused from their file type."""
    base, adapter = llama
    config = adapter / "adapter_config.json"
    replace_with_special_file(config, kind)
    msg = f"{config}: is not a regular file (a folder, FIFO or device); pass a JSON file"
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


@pytest.mark.parametrize(
    "which",
    [
        "base/config.json",
        "base/model.safetensors.index.json",
        "base/model-00002-of-00003.safetensors",
        "base/tokenizer.json",
        "adapter/adapter_model.safetensors",
    ],
)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "dangling-link"])
def test_special_files_in_place_of_inputs_are_refused_not_taken_as_missing(
    which: str, kind: str, llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """A FIFO, a device or a dangling link under a name the tool reads (or copies) is named as such: before, a
    base config.json there was taken as absent (no config copied, orientation guessed), a tokenizer left out of
    the output, and weights reported missing."""
    base, _ = llama
    path = base.parent / which
    replace_with_special_file(path, kind)
    if path.name.endswith(".json") and path.name != "tokenizer.json":
        why = "is not a regular file (a folder, FIFO or device); pass a JSON file"
        if kind == "dangling-link":
            why = "file not found; check the folder"
    elif path.name.endswith(".safetensors"):
        why = "is not a regular file (a FIFO or a device); pass a .safetensors file"
        if kind == "dangling-link":
            why = "file not found; check the path"
    else:
        why = "is not a regular file (a FIFO, a device or a dangling link) and would be copied to the output; "
        why += "replace it with the real file or remove it"
    fails(tmp_path, fc.InputFileError, f"{path}: {why}", base, base.parent / "adapter")


def test_a_safetensors_header_nested_too_deeply_is_an_error_not_a_crash(
    llama: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = llama
    header = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    (adapter / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    msg = f"{adapter / 'adapter_model.safetensors'}: safetensors header is JSON nested too deeply to read; "
    msg += "re-save the file"
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_a_shard_listing_too_many_tensors_is_refused_from_its_header(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """A million zero-size tensors in a 59 MB header took 33 s and 1.5 GB to merge: more than MAX_TENSORS in one
    file is refused after parsing the header, before any other work."""
    from fourier_convert.io.safetensors_file import MAX_TENSORS

    base, adapter = llama
    shard = base / "model-00003-of-00003.safetensors"
    tensors = read_tensors(shard)
    tensors.update({f"z.{i}": torch.zeros(0) for i in range(MAX_TENSORS + 1 - len(tensors))})
    write_tensors(shard, tensors)
    msg = (
        f"{shard}: header lists {MAX_TENSORS + 1:,} tensors, more than the {MAX_TENSORS:,} one file may hold here; "
        "re-save the checkpoint in more shards"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_a_layer_too_large_to_draw_positions_for_is_refused_by_every_command(tmp_path: Path) -> None:
    """A base weight of 300,000 x 300,000 (a 180 GB sparse file) asks for a permutation of 9e10 positions (720 GB).
    merge, inspect and to-lora refuse it from the header, naming the module and the memory available; inspect and
    to-lora used to fail inside torch's allocator ('unexpected RuntimeError')."""
    side = 300_000
    base, adapter = tmp_path / "inputs" / "base", tmp_path / "inputs" / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    header = json.dumps(
        {
            "model.layers.0.self_attn.q_proj.weight": {
                "dtype": "F16",
                "shape": [side, side],
                "data_offsets": [0, 2 * side * side],
            }
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(base / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2 * side * side)
    write_tensors(adapter / "adapter_model.safetensors", {Q0: torch.ones(10)})
    config = {"peft_type": "FOURIERFT", "n_frequency": 10, "scaling": 150.0, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    stat = (base / "model.safetensors").stat()
    before = snapshot(adapter)
    pattern = (
        re.escape(
            f"error: {adapter}: {Q0}: module 'model.layers.0.self_attn.q_proj' (base weight "
            "'model.layers.0.self_attn.q_proj.weight') is 300000x300000: PEFT draws its spectral positions from a "
            "permutation of all 90,000,000,000 positions, 720.0 GB of memory, more than the "
        )
        + r"[0-9.]+ [KMGT]?B"
        + re.escape(
            " this machine has available; run on a machine with more memory (PEFT needs as much to load this adapter)\n"
        )
    )
    out = tmp_path / "out"
    for args in [
        ["merge", "--base", base, "--adapter", adapter, "--out", out],
        ["inspect", adapter, "--base", base],
        ["to-lora", "--adapter", adapter, "--base", base, "--out", out, "--rank", "2"],
    ]:
        start = time.perf_counter()
        res = invoke(*args)
        assert time.perf_counter() - start < TIME_BOUND
        assert (res.exit_code, res.stdout) == (1, ""), res.output
        assert re.fullmatch(pattern, res.stderr), res.stderr
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
    assert snapshot(adapter) == before
    after = (base / "model.safetensors").stat()
    assert (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_json_nested_too_deeply_is_an_error_not_a_crash(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    config = adapter / "adapter_config.json"
    config.write_text("[" * 200_000 + "]" * 200_000)
    fails(tmp_path, fc.InputFileError, f"{config}: is JSON nested too deeply to read; fix or re-save it", base, adapter)


def test_a_config_with_a_byte_order_mark_or_a_5000_digit_number_is_one_line(
    llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """Python's JSON reader (PEFT's too) refuses both; the messages were 'Unexpected UTF-8 BOM' and 'unexpected
    ValueError: Exceeds the limit (4300 digits)'."""
    base, adapter = llama
    config = adapter / "adapter_config.json"
    text = config.read_text()
    config.write_bytes(b"\xef\xbb\xbf" + text.encode())
    msg = f"{config}: starts with a UTF-8 byte-order mark, which the JSON readers of PEFT and transformers refuse; "
    fails(tmp_path, fc.InputFileError, msg + "re-save it as UTF-8 without the mark", base, adapter)
    config.write_text(text.replace('"scaling": ', '"scaling": 1' + "0" * 5000 + ', "was_scaling": ', 1))
    msg = f"{config}: holds an integer of more than 4,300 digits, which Python's JSON reader (PEFT's and "
    fails(tmp_path, fc.InputFileError, msg + "transformers' too) refuses to convert; fix the number", base, adapter)


@pytest.mark.parametrize(
    ("dtype", "value", "found"),
    [
        (torch.float32, 3e38, "{key!r}: its coefficients' magnitudes sum to 1.5e+40, beyond float32's range (3.4e+38): "
         "PEFT takes the inverse DFT in float32, where such a spectrum overflows to inf or NaN"),
        (torch.float64, 1e40, "{key!r} holds a coefficient of 1e+40, beyond float32's range (3.4e+38): PEFT loads the "
         "spectrum into a float32 parameter, where it becomes inf"),
    ],
)  # fmt: skip
def test_a_spectrum_peft_turns_into_inf_is_refused(
    llama: tuple[Path, Path], tmp_path: Path, dtype: torch.dtype, value: float, found: str
) -> None:
    """With a tiny scaling (1e-30) these merged to finite weights with only a warning, while PEFT's delta (float32
    parameter, ifft2 in complex64) holds inf / NaN, as the first lines show."""
    base, adapter = llama
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    tensors[Q0] = torch.full_like(tensors[Q0], value, dtype=dtype)
    peft_param = tensors[Q0].to(torch.float32)  # PEFT's parameter, then its get_delta_weight:
    rows, cols = peft_indices(64, 64, peft_param.numel(), 777)
    dense = torch.zeros(64, 64, dtype=torch.float32)
    dense[rows, cols] = peft_param
    assert not torch.fft.ifft2(dense).real.mul(1e-30).isfinite().all()
    write_tensors(adapter / "adapter_model.safetensors", tensors)
    edit_config(adapter, scaling=1e-30)
    fix = "the training diverged; use an earlier checkpoint"
    msg = f"{adapter / 'adapter_model.safetensors'}: {found.format(key=Q0)}; {fix}"
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


@pytest.mark.parametrize(
    ("field", "value", "found"),
    [
        ("task_type", "BOGUS", "task_type is 'BOGUS', which PEFT refuses on loading; it takes one of SEQ_CLS, "
         "SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION or null"),
        ("task_type", 5, "task_type is 5, which PEFT refuses on loading; it takes one of SEQ_CLS, SEQ_2_SEQ_LM, "
         "CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION or null"),
        ("bias", None, "bias is None, expected one of none, all, fourier_only"),
        ("bias", 0, "bias is 0, expected one of none, all, fourier_only"),
    ],
)  # fmt: skip
def test_config_values_peft_cannot_load_are_refused(
    llama: tuple[Path, Path], tmp_path: Path, field: str, value: Any, found: str
) -> None:
    """PEFT fails to load these (ValueError: Invalid task type; AttributeError on a null bias); to-lora copied the
    task type into a LoRA PEFT could not load, and merge took a null bias as 'none'."""
    base, adapter = llama
    edit_config(adapter, **{field: value})
    fails(tmp_path, fc.AdapterError, f"{adapter / 'adapter_config.json'}: {found}; fix the config", base, adapter)
    res = invoke("to-lora", "--adapter", adapter, "--base", base, "--out", tmp_path / "lora", "--rank", "2")
    assert (res.exit_code, res.stderr) == (1, f"error: {adapter / 'adapter_config.json'}: {found}; fix the config\n")


def test_modules_to_save_naming_a_base_module_the_adapter_lacks_is_refused(
    llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """PEFT wraps the base's lm_head and fails on loading (KeyError: 'base_model.model.lm_head.weight'); merge and
    to-lora gave exit 0. An entry that names no module of the base stays accepted, as PEFT accepts it."""
    base, adapter = llama
    edit_config(adapter, modules_to_save=["score", "classifier"])
    ok = invoke("inspect", adapter, "--base", base, "-q")
    assert (ok.exit_code, ok.stderr) == (0, ""), ok.output
    edit_config(adapter, modules_to_save=["lm_head"])
    msg = (
        f"{adapter}: modules_to_save lists 'lm_head', the base's module 'lm_head', but the adapter holds no "
        "'lm_head.weight'; PEFT fails to load such an adapter (KeyError); remove the entry from modules_to_save in "
        "adapter_config.json, or re-save the adapter with PEFT"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


def test_the_heads_a_task_type_adds_are_read_as_peft_reads_them(fixture_copy: Any, tmp_path: Path) -> None:
    """PEFT's SEQ_CLS / TOKEN_CLS models add classifier and score to modules_to_save on loading (QUESTION_ANS:
    qa_outputs). With modules_to_save null the saved head was refused ("no role PEFT would load it in"), though PEFT
    loads it; now it merges as with the list. Without the head's tensors PEFT fails (KeyError), and so do we: every
    tensor under the module counts (RoBERTa's classifier holds dense and out_proj; only leaf modules were checked)."""
    d = fixture_copy("roberta")
    base, adapter = d / "base", d / "adapter"
    listed = tmp_path / "listed"
    fc.merge(base, adapter, listed, device="cpu")
    edit_config(adapter, modules_to_save=None)
    implied = tmp_path / "implied"
    fc.merge(base, adapter, implied, device="cpu")
    for shard in sorted(listed.glob("*.safetensors")):
        assert (implied / shard.name).read_bytes() == shard.read_bytes()
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), str(adapter))
    assert loaded.peft_config["default"].modules_to_save == ["classifier", "score"]  # PEFT's own addition
    st = adapter / "adapter_model.safetensors"
    write_tensors(st, {k: v for k, v in read_tensors(st).items() if ".classifier." not in k})
    msg = (
        f"{adapter}: task_type SEQ_CLS adds 'classifier' to modules_to_save (PEFT does on loading), the base's module "
        "'classifier', but the adapter holds no 'classifier.dense.bias'; PEFT fails to load such an adapter "
        "(KeyError); save the head's tensors in the adapter (PEFT's save_pretrained does), or set task_type to match "
        "the model"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)
    edit_config(adapter, modules_to_save=["classifier"])
    listed_msg = msg.replace(
        "task_type SEQ_CLS adds 'classifier' to modules_to_save (PEFT does on loading)",
        "modules_to_save lists 'classifier'",
    ).replace(
        "save the head's tensors in the adapter (PEFT's save_pretrained does), or set task_type to match the model",
        "remove the entry from modules_to_save in adapter_config.json, or re-save the adapter with PEFT",
    )
    fails(tmp_path, fc.AdapterError, listed_msg, base, adapter)


@pytest.mark.parametrize(
    ("weight", "found"),
    [
        (1e-310, "scaling x weight = 150 x 1e-310 = 1.5e-308 for {adapter}, below float32's smallest normal number "
         "(1.18e-38): PEFT's float32 delta would vanish or keep no precision; pass --weight 0 to leave the adapter "
         "out, or a multiplier such as 0.5"),
        (1e308, "scaling x weight = 150 x 1e+308 overflows for {adapter}; pass a multiplier such as 1.0 or 0.5"),
    ],
)  # fmt: skip
def test_a_weight_whose_delta_scale_leaves_float32_is_a_usage_error(
    llama: tuple[Path, Path], tmp_path: Path, weight: float, found: str
) -> None:
    """--weight 1e-310 failed the float64 spot check (a tolerance of 0) and asked for a bug report; 1e308 printed
    13 lines of numpy warnings before one."""
    base, adapter = llama
    msg = f"--weight: {found.format(adapter=adapter)}"
    before, out = snapshot(tmp_path), tmp_path / "merged"
    with pytest.raises(fc.UsageError) as info:
        fc.merge(base, fc.AdapterSpec(adapter, weight=weight), out, device="cpu")
    assert str(info.value) == msg
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, "--weight", weight)
    assert (res.exit_code, res.stdout, res.stderr) == (2, "", f"error: {msg}\n")
    assert snapshot(tmp_path) == before


def test_a_subnormal_scaling_is_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    edit_config(adapter, scaling=1e-310)
    msg = (
        f"{adapter}: scaling is 1e-310 in its adapter_config.json, below float32's smallest normal number (1.18e-38): "
        "PEFT's float32 delta would vanish or keep no precision; set scaling to the value the adapter was trained with"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


def test_a_safetensors_header_with_a_byte_order_mark_is_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """The message quoted Python's 'Unexpected UTF-8 BOM'; the safetensors library refuses such a header too."""
    from safetensors import safe_open

    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    raw = st.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = b"\xef\xbb\xbf" + raw[8 : 8 + hlen].rstrip(b" ")
    header += b" " * (-len(header) % 8)
    st.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + hlen :])
    with pytest.raises(Exception):  # noqa: B017  (the library's own error type)
        safe_open(str(st), framework="np")
    msg = f"{st}: safetensors header starts with a UTF-8 byte-order mark, which the safetensors library refuses; "
    fails(tmp_path, fc.InputFileError, msg + "re-save the file", base, adapter)


@pytest.mark.parametrize("sub", ["/etc", "../adapter", "second/../../adapter"])
def test_a_named_adapter_that_leads_out_of_its_folder_is_refused(
    llama: tuple[Path, Path], tmp_path: Path, sub: str
) -> None:
    """PATH:../adapter merged a sibling folder with exit 0; a named adapter is a folder inside PATH."""
    base, adapter = llama
    msg = (
        f"{adapter}:{sub}: the adapter subfolder {sub!r} leads out of {adapter} (a named adapter is a folder inside "
        f"it); pass the other folder itself, or a name listed in {adapter}"
    )
    fails(tmp_path, fc.InputFileError, msg, base, f"{adapter}:{sub}")


def test_random_loc_seed_beyond_64_bits_is_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """PEFT seeds torch.Generator with it, which takes at most 64 bits: such an adapter cannot be loaded."""
    base, adapter = llama
    edit_config(adapter, random_loc_seed=2**70)
    msg = (
        f"{adapter / 'adapter_config.json'}: random_loc_seed is {2**70}, expected an integer >= 0 and < {2**64}; "
        "fix the config"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


def test_control_characters_in_names_are_escaped_in_messages() -> None:
    err = fc.AdapterError("model.layers.0.q\nproj\x1b[31m", "not in the base", "check the adapter")
    assert str(err) == "model.layers.0.q\\nproj\\x1b[31m: not in the base; check the adapter"
    assert "\n" not in str(err) and "\x1b" not in str(err)


# -- tensors PEFT would not read --------------------------------------------------------------------
def test_modules_to_save_copies_without_modules_to_save_are_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """modules_to_save is null, but the file holds a modules_to_save copy of the embeddings: PEFT ignores it, so
    merging it would make the output differ from what PEFT loads."""
    base, adapter = llama
    weights = adapter / "adapter_model.safetensors"
    tensors = read_tensors(weights)
    tensors["base_model.model.modules_to_save.default.model.embed_tokens.weight"] = torch.zeros(256, 64)
    write_tensors(weights, tensors)
    msg = (
        f"{weights}: tensor 'model.embed_tokens.weight' is saved as a modules_to_save copy, but modules_to_save "
        "is [], so PEFT would ignore it; list the module in modules_to_save, or remove the tensor"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


#: modules_to_save copies as PEFT names them: fixture, plain key (the one PEFT reads), copy (never read).
COPIES = {
    "default": ("llama", "lm_head.weight", "lm_head.modules_to_save.default.weight"),
    "other-name": ("llama", "lm_head.weight", "lm_head.modules_to_save.other.weight"),
    "no-name": ("bert_head", "classifier.bias", "classifier.modules_to_save.bias"),  # bias="all" on a Linear head
    "bias-all": ("roberta", "classifier.dense.bias", "classifier.modules_to_save.default.dense.bias"),  # as saved
}


def _with_copy(fixture_copy: Any, case: str, *, plain_too: bool) -> tuple[str, Path, Path, str, str, torch.Tensor]:
    """A copy of the case's fixture whose file holds the copy (values unlike the plain key's) and, with
    ``plain_too``, the plain key: the fixture, base, adapter, plain key, copy key and the plain key's values."""
    name, plain, copy = COPIES[case]
    plain, copy = f"base_model.model.{plain}", f"base_model.model.{copy}"
    d = fixture_copy(name)
    weights = d / "adapter" / "adapter_model.safetensors"
    tensors = read_tensors(weights)
    if name == "llama":  # the fixture has no head: train lm_head
        edit_config(d / "adapter", modules_to_save=["lm_head"])
        tensors[plain] = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    value = tensors.pop(plain)
    tensors[copy] = value + 1.0
    if plain_too:
        tensors[plain] = value
    write_tensors(weights, tensors)
    return name, d / "base", d / "adapter", plain, copy, value


@pytest.mark.parametrize("case", list(COPIES))
def test_a_modules_to_save_copy_without_its_plain_key_is_refused(case: str, fixture_copy: Any, tmp_path: Path) -> None:
    """PEFT 0.21.2 reads a modules_to_save module only from its plain keys and never reads the wrapper copies:
    without the plain key it fails (KeyError), whatever the copy's name. merge took a lone copy as the head and
    exited 0 (a comment said bias="all" saved head biases only as copies: PEFT saves the plain key too)."""
    from peft import PeftModel

    from tests.test_forward import load_task_model

    name, base, adapter, plain, copy, _ = _with_copy(fixture_copy, case, plain_too=False)
    msg = (
        f"{adapter / 'adapter_model.safetensors'}: tensor {copy!r} is a modules_to_save copy, which PEFT never reads: "
        f"it reads {plain!r}, which the file lacks, and fails to load the adapter (KeyError); store the tensor as "
        f"{plain!r}, or re-save the adapter with PEFT"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)
    with pytest.raises(KeyError, match=re.escape(plain)):
        PeftModel.from_pretrained(load_task_model(name, base), str(adapter))


@pytest.mark.parametrize("case", list(COPIES))
def test_a_modules_to_save_copy_beside_its_plain_key_is_ignored_as_peft_ignores_it(
    case: str, fixture_copy: Any, tmp_path: Path
) -> None:
    """The copy's values differ from the plain key's: PEFT loads the plain key, and so does merge."""
    from peft import PeftModel

    from tests.test_forward import _inputs, load_task_model

    name, base, adapter, plain, _, value = _with_copy(fixture_copy, case, plain_too=True)
    out = tmp_path / "merged"
    fc.merge(base, adapter, out, device="cpu")
    assert torch.equal(load_model_tensors(out)[plain.removeprefix("base_model.model.")], value)
    x = _inputs(name)
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_task_model(name, base), str(adapter)).eval()(**x).logits
        got = load_task_model(name, out)(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("both", [False, True])
def test_spectra_without_peft_prefix_are_refused(both: bool, llama: tuple[Path, Path], tmp_path: Path) -> None:
    """PEFT loads only keys under base_model.model.: an unprefixed spectrum (alone, or beside the prefixed one)
    would be ignored by PEFT."""
    base, adapter = llama
    weights = adapter / "adapter_model.safetensors"
    tensors = read_tensors(weights)
    bare = Q0.removeprefix("base_model.model.")
    tensors[bare] = tensors[Q0].clone() if both else tensors.pop(Q0)
    write_tensors(weights, tensors)
    msg = (
        f"{weights}: tensor {bare!r} lacks PEFT's 'base_model.model.' prefix, so PEFT would ignore it; "
        "re-save the adapter with PEFT (or add the prefix)"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)


def test_one_tensor_stored_twice_is_refused() -> None:
    from fourier_convert.io.adapter import classify_tensors

    with pytest.raises(fc.AdapterError) as info:
        classify_tensors(
            {"base_model.model.a.lora_A.weight": object(), "a.lora_A.weight": object()},  # type: ignore[dict-item]
            is_method=lambda k: ".lora_" in k, method_noun="a factor", bias="none", modules_to_save=[], where="f",
        )  # fmt: skip
    assert str(info.value) == (
        "f: 'base_model.model.a.lora_A.weight' and 'a.lora_A.weight' are one tensor stored twice; keep one of them "
        "and re-save"
    )


def test_a_single_file_beside_an_index_is_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """transformers loads model.safetensors when both exist; merging the shards would not be that model."""
    base, adapter = llama
    shutil.copy(next(base.glob("model-0000*.safetensors")), base / "model.safetensors")
    msg = (
        f"{base}: holds both model.safetensors and model.safetensors.index.json: transformers loads "
        "model.safetensors and ignores the shards, so which weights are meant is unclear; remove the stale one"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_a_config_claiming_200000_layers_is_refused_quickly(fixture_copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Building 200,000 GPT-2 blocks on the meta device did not finish in 40 s; the weights hold two."""
    d = fixture_copy("gpt2")
    config = d / "base" / "config.json"
    doc = json.loads(config.read_text())
    doc["n_layer"] = 200_000
    config.write_text(json.dumps(doc))
    msg = f"{config}: n_layer is 200000, but the checkpoint's weights hold 2 layer(s); pass the config.json that "
    msg += "belongs to these weights"
    fails(tmp_path, fc.BaseMismatchError, msg, d / "base", d / "adapter")


def test_a_small_file_linked_from_outside_the_model_is_not_copied(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """tokenizer.json -> a file outside the model (a secret, say) would be published in the output."""
    base, adapter = llama
    secret = tmp_path / "secret.txt"
    secret.write_text("do not publish")
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(secret)
    msg = (
        f"{base / 'tokenizer.json'}: is a link to {secret.resolve()}, outside the model folder, and would be copied "
        "into the output; copy the file into the model folder, or remove the link"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


def test_a_folder_merely_named_snapshots_does_not_widen_what_links_may_reach(tmp_path: Path) -> None:
    """A base at <home>/snapshots/rev with a link to <home>/.ssh/id_rsa: the hub-cache rule (snapshot -> blob links)
    took any folder named 'snapshots' as the cache and published the key. Only models--*/snapshots/<rev> links
    into that repository's blobs/ are followed, as the second half checks with a real cache layout."""
    home = tmp_path / "home"
    base = home / "snapshots" / "rev"
    shutil.copytree(FIXTURES / "llama" / "base", base)
    adapter = FIXTURES / "llama" / "adapter"
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    (base / "special_tokens_map.json").symlink_to("../../.ssh/id_rsa")
    out = tmp_path / "out"
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out)
    msg = (
        f"{base / 'special_tokens_map.json'}: is a link to {(home / '.ssh' / 'id_rsa').resolve()}, outside the model "
        "folder, and would be copied into the output; copy the file into the model folder, or remove the link"
    )
    assert (res.exit_code, res.stdout, res.stderr) == (1, "", f"error: {msg}\n")
    assert not out.exists()
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(FIXTURES / "llama" / "base", snapshot)
    (repo / "blobs").mkdir()
    (snapshot / "tokenizer.json").rename(repo / "blobs" / "0f1e2d")
    (snapshot / "tokenizer.json").symlink_to("../../blobs/0f1e2d")
    res = invoke("merge", "--base", snapshot, "--adapter", adapter, "--out", out, "-q")
    assert (res.exit_code, res.stderr) == (0, ""), res.output
    assert (out / "tokenizer.json").read_bytes() == (repo / "blobs" / "0f1e2d").read_bytes()


@pytest.mark.parametrize("value", [-1, "2", 2.0, True, None])
def test_a_layer_count_that_is_not_a_whole_number_is_refused(fixture_copy, tmp_path: Path, value: Any) -> None:  # type: ignore[no-untyped-def]
    """num_hidden_layers -1 was an 'unexpected ValueError' in to-onnx, and merge published a folder transformers
    cannot load; a string, float, bool or null does the same in transformers."""
    d = fixture_copy("llama")
    config = d / "base" / "config.json"
    doc = json.loads(config.read_text())
    doc["num_hidden_layers"] = value
    config.write_text(json.dumps(doc))
    msg = (
        f"{config}: num_hidden_layers is {value!r}, expected a whole number of layers (transformers cannot build the "
        "model); pass the config.json that belongs to these weights"
    )
    fails(tmp_path, fc.InputFileError, msg, d / "base", d / "adapter")


# -- headers of base shards that are copied byte for byte ---------------------------------------------------
def _edit_header(path: Path, change: Any) -> None:
    """Rewrite a safetensors header through ``change(header_dict)``, keeping the data bytes."""
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + hlen])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + hlen :])


def _untouched_shard(base: Path) -> tuple[Path, str]:
    """A base shard none of whose tensors the llama adapter changes, and its first tensor."""
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.embed_tokens.weight"
    return base / index[name], name


def _set(field: str, value: Any) -> Any:
    def change(header: dict[str, Any]) -> None:
        header["model.embed_tokens.weight"][field] = value

    return change


EMB = "tensor 'model.embed_tokens.weight'"
INTS = "expected non-negative integers"


@pytest.mark.parametrize(
    ("change", "found"),
    [
        (_set("shape", [-1, 64]), f"{EMB} has shape [-1, 64], {INTS}"),
        (_set("shape", [64.5, 64]), f"{EMB} has shape [64.5, 64], {INTS}"),
        (_set("shape", ["256", 64]), f"{EMB} has shape ['256', 64], {INTS}"),
        (_set("dtype", ["F32"]), f"{EMB} has unsupported dtype ['F32']"),
        (_set("data_offsets", [0]), f"{EMB} has data_offsets [0], expected [begin, end] with 0 <= begin <= end"),
        (
            lambda h: h.update({"__metadata__": {"format": {"pt": 1}}}),
            "__metadata__ entry 'format' is a JSON object, expected a string",
        ),
        (
            lambda h: h.update({"__metadata__": [["format", "pt"]]}),
            "__metadata__ is a JSON array, expected an object of strings",
        ),
        (
            lambda h: h.update({"__metadata__": {"format": 1}}),
            "__metadata__ entry 'format' is a JSON number, expected a string",
        ),
        (lambda h: h.update({"model.embed_tokens.weight": [1, 2]}), f"{EMB}: header entry is a JSON array"),
    ],
)
def test_a_copied_shard_with_a_header_safetensors_refuses_is_refused(
    llama: tuple[Path, Path], tmp_path: Path, change: Any, found: str
) -> None:
    """Untouched shards are copied byte for byte: their headers are validated as the safetensors library does
    (which refuses each of these files), before anything is written."""
    from safetensors import safe_open

    base, adapter = llama
    shard, _ = _untouched_shard(base)
    _edit_header(shard, change)
    with pytest.raises(Exception), safe_open(str(shard), framework="np") as f:  # noqa: B017  the library refuses it
        [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
    fails(tmp_path, fc.InputFileError, f"{shard}: {found}; re-save the file", base, adapter)


def test_gaps_and_trailing_bytes_in_a_copied_shard_are_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    base, adapter = llama
    shard, _ = _untouched_shard(base)
    original = shard.read_bytes()
    shard.write_bytes(original + b"\0" * 16)
    with pytest.raises(Exception):  # noqa: B017
        safe_open(str(shard), framework="np")
    size = len(original) + 16
    msg = (
        f"{shard}: the tensors end at byte {len(original)} but the file has {size} bytes (trailing data the "
        "safetensors library refuses); re-save the file"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


@pytest.mark.parametrize(
    "value", [["model-00001-of-00003.safetensors"], "../base/model-00001-of-00003.safetensors", ""]
)
def test_index_entries_that_are_not_file_names_are_refused(
    llama: tuple[Path, Path], tmp_path: Path, value: Any
) -> None:
    base, adapter = llama
    index = base / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.norm.weight"] = value
    index.write_text(json.dumps(doc))
    msg = (
        f"{index}: maps 'model.norm.weight' to {value!r}, expected the name of a .safetensors file in {base}; "
        "re-save the model with save_pretrained"
    )
    fails(tmp_path, fc.InputFileError, msg, base, adapter)


@pytest.mark.parametrize(
    ("name", "module", "source"),
    [
        (
            "llama",
            "model.embed_tokens",
            "an nn.Embedding attribute in transformers {v}'s modeling_llama.py",
        ),
        ("gpt2", "transformer.wte", "model skeleton"),
    ],
)
def test_a_spectrum_on_an_embedding_is_refused(
    fixture_copy: Any, tmp_path: Path, name: str, module: str, source: str
) -> None:
    """PEFT's FourierFT adapts only Linear and Conv1D modules (it refuses such an adapter); merging the
    spectrum as if the embedding were a Linear would publish weights PEFT never computes."""
    import transformers

    d = fixture_copy(name)
    base, adapter = d / "base", d / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    edit_config(adapter, target_modules=[*config["target_modules"], module.rsplit(".", 1)[1]])
    st = adapter / "adapter_model.safetensors"
    tensors = read_tensors(st)
    tensors[f"base_model.model.{module}.fourierft_spectrum"] = torch.ones(config["n_frequency"])
    write_tensors(st, tensors)
    msg = (
        f"{module}.weight: the adapter has a spectrum for {module}, which is an Embedding in the base model "
        f"({source.format(v=transformers.__version__)}); PEFT's FourierFT adapts only Linear and Conv1D modules and "
        "refuses this adapter; remove that spectrum from the adapter, or check that this is the base model it was "
        "trained on"
    )
    fails(tmp_path, fc.BaseMismatchError, msg, base, adapter)


# -- regular expressions from the config ------------------------------------------------------------------
NESTED_FIX = "simplify the pattern in adapter_config.json (for example list the module names instead)"


@pytest.mark.parametrize(
    ("changes", "found"),
    [
        (
            {"target_modules": r"(\w+\.?)+z"},
            r"target_modules: pattern '(\\w+\\.?)+z' did not finish matching 'model.layers.0.input_layernorm' "
            "within 0.1 s (a repeated repetition backtracks exponentially in Python's re, as PEFT uses it); "
            + NESTED_FIX,
        ),
        (
            {"target_modules": ".*" * 12 + "z"},  # polynomial: hung for more than 30 s
            "target_modules: pattern '" + ".*" * 12 + "z' did not finish matching 'model.layers.0.mlp' "
            "within 0.1 s (12 repetitions backtrack polynomially in Python's re, as PEFT uses it); " + NESTED_FIX,
        ),
        (
            {"n_frequency_pattern": {"(v_proj": 30}},
            r"n_frequency_pattern: pattern '(v_proj' (as PEFT matches it: '.*\\.(v_proj$') is not a valid regular "
            "expression (missing ), unterminated subpattern at position 4); fix the pattern in adapter_config.json",
        ),
        (
            {"target_modules": "(a+"},
            "target_modules: pattern '(a+' is not a valid regular expression (missing ), unterminated subpattern "
            "at position 0); fix the pattern in adapter_config.json",
        ),
    ],
)
def test_config_regexes_are_bounded_and_checked(
    llama: tuple[Path, Path], tmp_path: Path, changes: dict[str, Any], found: str
) -> None:
    """PEFT matches these strings with Python's re: a nested repetition would hang every command on module
    names; it is refused within a fraction of a second, as is a pattern that does not compile."""
    import time

    base, adapter = llama
    edit_config(adapter, **changes)
    start = time.perf_counter()
    fails(tmp_path, fc.AdapterError, found, base, adapter)
    assert time.perf_counter() - start < 10
    res = invoke("inspect", str(adapter), "--base", str(base))
    assert (res.exit_code, res.stderr) == (1, f"error: {found}\n")


def test_nested_patterns_are_found_and_refused_off_the_main_thread() -> None:
    import threading

    from fourier_convert.patterns import _compile, config_match

    nested = {r"(a+)+b": True, r"(a|aa)*b": True, r"((ab)*)*": True, r"(\w+\.)+q_proj": True,
              r".*\.q_proj": False, r"model\.layers\.(\d+)\.(q|v)_proj": False, r"(?:a|b)*c": False}  # fmt: skip
    assert {p: _compile(p, "f", p)[1] is not None for p in nested} == nested
    assert config_match("fullmatch", r"(\w+\.)+q_proj", "model.q_proj", "target_modules") is not None
    errors: list[str] = []
    thread = threading.Thread(
        target=lambda: errors.append(_error_of(lambda: config_match("match", "(a+)+b", "aaa", "target_modules")))
    )
    thread.start()
    thread.join()
    assert errors == [
        "target_modules: pattern '(a+)+b' repeats a repetition, which can take exponential time in Python's re; "
        + NESTED_FIX
    ]


def _error_of(call: Any) -> str:
    try:
        call()
    except fc.FourierConvertError as exc:
        return str(exc)
    return ""


def test_a_spectrum_too_large_for_its_layer_is_refused_from_the_header(
    llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """A 240 MB spectrum (a sparse file) for a 32 x 64 layer, consistent with its config: refused from the
    header against the base layer's size, without reading a byte of it."""
    import time

    base, adapter = llama
    st = adapter / "adapter_model.safetensors"
    big, n = SPECTRUM.format(i=1, m="v_proj"), 60_000_000
    tensors = read_tensors(st)
    del tensors[big]
    write_tensors(st, tensors)
    raw = st.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + hlen])
    data = len(raw) - 8 - hlen
    header[big] = {"dtype": "F32", "shape": [n], "data_offsets": [data, data + 4 * n]}
    new = json.dumps(header).encode()
    with open(st, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new + raw[8 + hlen :])
        f.truncate(8 + len(new) + data + 4 * n)  # sparse: nothing is stored
    edit_config(adapter, n_frequency_pattern={"layers.1.self_attn.v_proj": n, "v_proj": 30})
    msg = (
        f"{adapter}: {big}: {n} coefficients but the 32x64 base weight 'model.layers.1.self_attn.v_proj.weight' has "
        "only 2048 positions; is this the base model the adapter was trained on?"
    )
    start = time.perf_counter()
    with pytest.raises(fc.BaseMismatchError):
        fc.merge(base, adapter, tmp_path / "merged", device="cpu")
    assert time.perf_counter() - start < 2  # reading and widening would cost seconds and 480 MB of memory
    fails(tmp_path, fc.BaseMismatchError, msg, base, adapter)


def test_a_linked_out_that_leads_into_an_input_is_refused(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """--out is followed through links: one naming the base folder is an overlap even with --overwrite."""
    base, adapter = llama
    link = tmp_path / "out-link"
    link.symlink_to(base)
    msg = f"--out: {link} overlaps the input folder {base}; write the output to another folder"
    fails(tmp_path, fc.UsageError, msg, base, adapter, "--overwrite", out=link, overwrite=True, code=2)
    assert link.is_symlink() and (base / "config.json").is_file()


FIX_CONFIG = "fix the config"
WRONG_TYPES = [
    (
        "base", "architectures", 5,
        'architectures is 5, expected a list of model class names; fix config.json (for example "architectures": '
        '["LlamaForCausalLM"])',
    ),
    (
        "base", "model_type", [],
        'model_type is [], expected a name such as "llama"; fix config.json, or use the config.json that came with '
        "these weights",
    ),
    ("adapter", "exclude_modules", 1.5, f"exclude_modules is 1.5, expected a list of names or a regex; {FIX_CONFIG}"),
    ("adapter", "target_modules", ["q", 3], f"target_modules is ['q', 3], expected a list or a regex; {FIX_CONFIG}"),
    ("adapter", "fan_in_fan_out", "yes", f"fan_in_fan_out is 'yes', expected true or false; {FIX_CONFIG}"),
]  # fmt: skip


@pytest.mark.parametrize(("where", "field", "value", "found"), WRONG_TYPES)
def test_config_fields_of_the_wrong_type(
    llama: tuple[Path, Path], tmp_path: Path, where: str, field: str, value: Any, found: str
) -> None:
    """tests/test_fuzz.py found the architectures (TypeError, KeyError) and exclude_modules (TypeError) cases as
    internal errors; the others are checks of the same kind (a string fan_in_fan_out was read as true)."""
    base, adapter = llama
    if where == "base":
        path = base / "config.json"
        doc = json.loads(path.read_text())
        doc[field] = value
        path.write_text(json.dumps(doc))
        msg = f"{path}: {found}"
    else:
        edit_config(adapter, **{field: value})
        msg = f"{adapter / 'adapter_config.json'}: {found}"
    fails(tmp_path, fc.InputFileError if where == "base" else fc.AdapterError, msg, base, adapter)


def test_a_zero_scaling_is_merged_with_a_warning(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    edit_config(adapter, scaling=0.0)
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    assert res.stderr == (
        f"warning: {adapter}: scaling is 0 in its adapter_config.json, so its deltas are zero and it changes nothing\n"
    )
    for shard in sorted(base.glob("*.safetensors")):  # base + 0, rounded once: the base's own values
        merged, original = load_file(tmp_path / "m" / shard.name), load_file(shard)
        assert merged.keys() == original.keys() and all(torch.equal(merged[k], original[k]) for k in merged)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_spectrum_not_in_float32_is_merged_and_named(
    dtype: torch.dtype, llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """PEFT trains spectra in float32: one saved in another float dtype is merged as stored, with a warning that
    says so (before, float64 was silent)."""
    base, adapter = llama
    weights = adapter / "adapter_model.safetensors"
    tensors = read_tensors(weights)
    key = next(k for k in sorted(tensors) if k.endswith("fourierft_spectrum"))
    tensors[key] = tensors[key].to(dtype)
    write_tensors(weights, tensors)
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m", "--device", "cpu", "-q")
    assert (res.exit_code, res.stdout) == (0, ""), res.output
    stored = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}[dtype]
    if dtype == torch.float64:
        why = "used as stored (PEFT loads it into a float32 parameter unless the model runs in float64, which can "
        why += "differ in the last bits)"
    else:
        why = "reconstructed in float32 or better"
    assert res.stderr == f"warning: {key}: spectrum saved in {stored}; {why}\n"


def test_control_characters_in_warnings_and_tables_are_escaped(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """A folder or tensor name with a newline or a terminal escape: warnings stay one line, tables one row, and
    no escape sequence reaches the terminal."""
    base, adapter = llama
    odd = adapter.parent / "ad\n\x1b[31mx"
    adapter.rename(odd)
    edit_config(odd, scaling=0.0)
    res = invoke("merge", "--base", base, "--adapter", odd, "--out", tmp_path / "m", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    shown = str(odd).replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert res.stderr == (
        f"warning: {shown}: scaling is 0 in its adapter_config.json, so its deltas are zero and it changes nothing\n"
    )
    weights = odd / "adapter_model.safetensors"
    tensors = read_tensors(weights)
    key = next(k for k in tensors if "layers.0.self_attn.q_proj" in k)
    tensors[key.replace("q_proj", "q\n\x1b[31mproj")] = tensors.pop(key)
    write_tensors(weights, tensors)
    res = invoke("inspect", odd)
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stdout
    rows = [line for line in res.stdout.splitlines() if "self_attn.q" in line]
    assert len(rows) == 2 and any("q\\n\\x1b[31mproj" in row for row in rows), rows


def test_a_folder_holding_the_base_and_the_adapter_is_named_as_such(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    root = base.parent
    msg = (
        f"{root}: is not a model folder (no model.safetensors or model.safetensors.index.json); it holds the model "
        f"folder base and the adapter folder adapter; pass {base} as the base model and {adapter} as the adapter"
    )
    fails(tmp_path, fc.InputFileError, msg, root, adapter)


@pytest.mark.parametrize("role", ["adapter", "base"])
def test_an_onnx_export_folder_is_recognised(llama: tuple[Path, Path], tmp_path: Path, role: str) -> None:
    base, adapter = llama
    export = tmp_path / "llama" / "onnx"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"graph")
    (export / "config.json").write_text("{}")
    what = f"{export}: is an ONNX export (model.onnx), not a"
    if role == "adapter":
        msg = f"{what} FourierFT adapter; pass the FourierFT adapter folder the export was made from"
        fails(tmp_path, fc.AdapterError, msg, base, export)
    else:
        msg = f"{what} Hugging Face model with safetensors weights; pass the model folder the export was made from"
        fails(tmp_path, fc.InputFileError, msg, export, adapter)


def test_a_delta_larger_than_its_weight_is_merged_with_a_warning(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """scaling 1e30: every merged value is still finite in float32, but the deltas dwarf the weights."""
    base, adapter = llama
    edit_config(adapter, scaling=1e30)
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "m" / "fourier_convert.json").read_text())["report"]
    worst = max(report["layers"], key=lambda r: r["delta_norm"] / r["base_norm"])
    assert res.stderr == (
        f"warning: 4 layer(s) change by more than 100x their own weight (largest: {worst['module']}, delta norm "
        f"{worst['delta_norm']:.3g} = {worst['delta_norm'] / worst['base_norm']:.3g} x the base weight's); "
        "check the adapter's scaling and --weight\n"
    )


def test_a_head_tensor_of_an_integer_dtype_is_refused_by_its_stored_key(fixture_copy: Any, tmp_path: Path) -> None:
    """The message named the key with PEFT's prefix cut off, which is not in the file."""
    d = fixture_copy("roberta")
    base, adapter = d / "base", d / "adapter"
    st = adapter / "adapter_model.safetensors"
    tensors = read_tensors(st)
    key = "base_model.model.classifier.out_proj.weight"
    tensors[key] = (tensors[key] * 10).to(torch.int32)
    write_tensors(st, tensors)
    msg = (
        f"{st}: tensor {key!r} has dtype I32, expected a float dtype (a trained bias or a head's weights); re-save "
        "the adapter with PEFT"
    )
    fails(tmp_path, fc.AdapterError, msg, base, adapter)
