"""The command line end to end: CliRunner for most, a real ``python -m fourier_convert`` for the entry point,
exit codes, tracebacks only with --debug, and what an interrupted merge leaves behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

import fourier_convert as fc
from fourier_convert.cli.main import cli
from fourier_convert.merging.folder import AdapterSpec
from tests.conftest import FIXTURES, ROOT

LLAMA_Q = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
INTERRUPTED = "interrupted: nothing was published and the inputs were not touched\n"


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def tree_hash(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial-*"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.clone() for k, v in load_file(f).items()})
    return out


def run_module(*args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("FOURIER_CONVERT_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "fourier_convert", *[str(a) for a in args]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def llama(fixture_copy) -> tuple[Path, Path]:
    d = fixture_copy("llama")
    return d / "base", d / "adapter"


# -- merge ----------------------------------------------------------------------------------------
def test_merge_prints_summary_and_output_loads_in_transformers(llama: tuple[Path, Path], tmp_path: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    base, adapter = llama
    out = tmp_path / "merged"
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[:2] == [
        "note: names matched through checkpoint names",
        "note: orientation (Linear / Conv1D) decided from the transformers "
        f"{transformers.__version__} source (modeling_llama.py: no Conv1D, every module is a Linear)",
    ]
    assert lines[2] == f"wrote 0.4 MB in 3 file(s) to {out}"
    assert lines[3] == "tensors: 17 copy, 4 merge"
    assert lines[4].startswith("4 deltas rebuilt on cpu (float64), each checked at ")
    assert lines[5].startswith("took ") and "fsync and publish" in lines[5]
    assert len(lines) == 6
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            *SHARDS,
            "model.safetensors.index.json",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "fourier_convert.json",
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    merged = weights(out)
    original = weights(base)
    for key in LLAMA_Q:
        assert torch.equal(state[key], merged[key])
        assert not torch.equal(merged[key], original[key])
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])


def test_merge_json_report(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    out, report = tmp_path / "merged", tmp_path / "report.json"
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu", "--json", report)
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert doc["out"] == str(out) and doc["dry_run"] is False
    assert doc["tensors"] == {"copy": 17, "merge": 4}
    assert doc["shards"] == SHARDS
    assert doc["adapters"] == [str(adapter)] and doc["base"] == str(base)
    assert [layer["key"] for layer in doc["layers"]] == LLAMA_Q
    assert [layer["n"] for layer in doc["layers"]] == [[50], [30], [50], [30]]
    assert [layer["shape"] for layer in doc["layers"]] == [[64, 64], [32, 64], [64, 64], [32, 64]]
    for layer in doc["layers"]:
        assert layer["conv1d"] is False
        assert layer["backend"] == "numpy-cpu-float64" and layer["checked_entries"] > 0
        assert 0 <= layer["max_abs_error"] <= layer["tolerance"]
        assert layer["delta_norm"] > 0


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_report_orientation_comes_from_the_skeleton(tmp_path: Path, name: str) -> None:
    report = tmp_path / "r.json"
    res = invoke(
        "merge",
        "--base",
        FIXTURES / name / "base",
        "--adapter",
        FIXTURES / name / "adapter",
        "--out",
        tmp_path / "m",
        "--device",
        "cpu",
        "--json",
        report,
        "-q",
    )
    assert res.exit_code == 0, res.output
    layers = json.loads(report.read_text())["layers"]
    # GPT-2 names Conv1D in its source, so its skeleton is built; the others are settled by the source scan
    assert [layer["orientation"] for layer in layers] == ["skeleton" if name == "gpt2" else "source"] * len(layers)
    assert all(layer["conv1d"] is (name == "gpt2") for layer in layers)


def test_quiet_prints_nothing(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    out = tmp_path / "merged"
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and res.stderr == ""
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("command", ["to-lora", "from-lora", "to-onnx", "inspect"])
def test_quiet_prints_nothing_on_every_command(command: str, llama: tuple[Path, Path], tmp_path: Path) -> None:
    """-q on every command: no stdout and no progress, only warning lines on stderr (warnings are kept, as
    documented), and the output still written."""
    base, adapter = llama
    lora = tmp_path / "lora"
    if command == "from-lora":
        made = invoke("to-lora", "--adapter", adapter, "--base", base, "--rank", "4", "--out", lora, "-q")
        assert made.exit_code == 0, made.output
    out = tmp_path / "out"
    args = {
        "to-lora": ["to-lora", "--adapter", adapter, "--base", base, "--rank", "4", "--out", out],
        "from-lora": ["from-lora", "--adapter", lora, "--base", base, "--n-frequency", "40", "--out", out],
        "to-onnx": ["to-onnx", "--base", base, "--adapter", adapter, "--out", out],
        "inspect": ["inspect", adapter, "--base", base, "--json", tmp_path / "r.json"],
    }[command]
    res = invoke(*args, "-q")
    assert (res.exit_code, res.stdout) == (0, ""), res.output
    assert all(line.startswith("warning: ") for line in res.stderr.splitlines()), res.stderr
    assert (tmp_path / "r.json").is_file() if command == "inspect" else any(out.iterdir())


def _stderr_on_a_terminal(args: list[str], tmp_path: Path) -> str:
    """Run the CLI in a new process whose stderr is a pseudo-terminal; return what it wrote there."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fourier_convert", *args], stdout=subprocess.DEVNULL, stderr=follower, cwd=tmp_path
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, seen
    return seen.decode(errors="replace")


@pytest.mark.parametrize("command", ["merge", "to-lora", "from-lora", "to-onnx"])
def test_progress_shows_on_a_terminal_and_not_with_quiet(
    command: str, llama: tuple[Path, Path], tmp_path: Path
) -> None:
    """On a terminal a long command shows its phases and bars on stderr; -q removes them."""
    base, adapter = llama
    lora = tmp_path / "lora"
    if command == "from-lora":
        made = invoke("to-lora", "--adapter", adapter, "--base", base, "--rank", "4", "--out", lora, "-q")
        assert made.exit_code == 0, made.output
    args = {
        "merge": ["merge", "--base", str(base), "--adapter", str(adapter), "--device", "cpu"],
        "to-lora": ["to-lora", "--adapter", str(adapter), "--base", str(base), "--rank", "64"],
        "from-lora": ["from-lora", "--adapter", str(lora), "--base", str(base), "--n-frequency", "40"],
        "to-onnx": ["to-onnx", "--base", str(base), "--adapter", str(adapter)],
    }[command]
    shown = _stderr_on_a_terminal([*args, "--out", str(tmp_path / "a")], tmp_path)
    expected = {
        "merge": "merge [",
        "to-lora": "to-lora: factorising 4 layer deltas",
        "from-lora": "from-lora: fitting the FourierFT coefficients",
        "to-onnx": "validate [",  # a bar over the validation cases, after the phase lines
    }[command]
    assert expected in shown, shown
    quiet = _stderr_on_a_terminal([*args, "--out", str(tmp_path / "b"), "-q"], tmp_path)
    assert all(line.startswith("warning: ") for line in quiet.splitlines() if line.strip()), quiet


def test_two_merges_into_one_out_never_both_succeed(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """Two runs started together into the same --out without --overwrite: one publishes, the other fails with one
    line (which line depends on when it looks), never replacing what the first published."""

    base, adapter = llama
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fourier_convert", "merge", "--base", str(base), "--adapter", str(adapter)]
    cmd += ["--out", str(out), "--device", "cpu", "-q"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = sorted((p.wait(timeout=120), *p.communicate()) for p in runs)
    (ok, ok_out, ok_err), (failed, failed_out, failed_err) = done
    assert (ok, ok_out) == (0, "")
    # the winner may see the other run's temporary folder, and says so (it is not its own to delete)
    seen = r"warning: 1 unfinished output folder\(s\) from an interrupted run lie beside --out \(first: \S+\); "
    seen += r"delete them if no other merge is writing there\n"
    assert ok_err == "" or re.fullmatch(seen, ok_err), ok_err
    assert (failed, failed_out) == (1, "")
    assert failed_err in (
        f"error: {out}: exists and is not empty; choose another --out or pass --overwrite\n",
        f"error: {out}: appeared or filled up while this run was writing (another run?); nothing was published; "
        "choose another --out or pass --overwrite\n",
    ), failed_err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out"]  # nothing left beside it
    assert (out / "model.safetensors.index.json").is_file()


def test_dry_run_writes_nothing_and_lists_merged_tensors(llama: tuple[Path, Path], tmp_path: Path) -> None:
    import transformers

    base, adapter = llama
    before = tree_hash(tmp_path)
    out = tmp_path / "merged"
    res = invoke("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu", "--dry-run")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[0] == "dry run: nothing written; tensors that would change:"
    rows = [line.split() for line in lines[1:5]]
    shapes, sizes, ns = ["64x64", "32x64"] * 2, ["16,384", "8,192"] * 2, [50, 30] * 2
    assert rows == [
        ["merge", k, "F32", shape, size, "B", "base", "+", "delta", "of", str(adapter), f"(n={n},", "scaling=150)"]
        for k, shape, size, n in zip(LLAMA_Q, shapes, sizes, ns, strict=True)
    ]
    assert lines[5:] == [
        "note: names matched through checkpoint names",
        "note: orientation (Linear / Conv1D) decided from the transformers "
        f"{transformers.__version__} source (modeling_llama.py: no Conv1D, every module is a Linear)",
        "would write 0.4 MB in 3 file(s)",
        "tensors: 17 copy, 4 merge",
    ]
    assert not out.exists()
    assert tree_hash(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_dry_run_marks_conv1d(tmp_path: Path) -> None:
    res = invoke(
        "merge",
        "--base",
        FIXTURES / "gpt2" / "base",
        "--adapter",
        FIXTURES / "gpt2" / "adapter",
        "--out",
        tmp_path / "m",
        "--device",
        "cpu",
        "--dry-run",
    )
    assert res.exit_code == 0, res.output
    rows = [line for line in res.stdout.splitlines() if line.startswith("  merge ")]
    adapter = FIXTURES / "gpt2" / "adapter"
    assert len(rows) == 8
    assert all(row.endswith(f"  base + delta^T (Conv1D) of {adapter} (n=40, scaling=100)") for row in rows)
    # stored (in, out): the c_attn weight of a 32-wide model is 32x96
    assert rows[0].split()[1:4] == ["transformer.h.0.attn.c_attn.weight", "F32", "32x96"]
    assert not (tmp_path / "m").exists()


def test_several_adapters_with_weights(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    out = tmp_path / "cli"
    res = invoke(
        "merge",
        "--base",
        base,
        "--adapter",
        adapter,
        "--adapter",
        f"{adapter}:second",
        "--weight",
        "0.5",
        "--weight",
        "2",
        "--out",
        out,
        "--device",
        "cpu",
        "-q",
    )
    assert res.exit_code == 0, res.output
    lib = tmp_path / "lib"
    fc.merge(base, [AdapterSpec(str(adapter), None, 0.5), AdapterSpec(str(adapter), "second", 2.0)], lib, device="cpu")
    for shard in SHARDS:
        assert (out / shard).read_bytes() == (lib / shard).read_bytes()
    unweighted = tmp_path / "unweighted"
    fc.merge(base, [str(adapter), f"{adapter}:second"], unweighted, device="cpu")
    got, plain = weights(out), weights(unweighted)
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        assert not torch.equal(got[key], plain[key])
    doc = json.loads((out / "fourier_convert.json").read_text())
    assert doc["report"]["tensors"] == {"copy": 13, "merge": 8}


def test_adapter_subfolder_selects_named_adapter(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    report = tmp_path / "r.json"
    res = invoke(
        "merge",
        "--base",
        base,
        "--adapter",
        adapter,
        "--adapter-subfolder",
        "second",
        "--out",
        tmp_path / "m",
        "--device",
        "cpu",
        "--json",
        report,
        "-q",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert [layer["key"] for layer in doc["layers"]] == [
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("mlp.down_proj", "self_attn.o_proj")
    ]
    assert all(layer["n"] == [20] for layer in doc["layers"])


# -- inspect --------------------------------------------------------------------------------------
def test_inspect_adapter(tmp_path: Path) -> None:
    adapter = FIXTURES / "llama" / "adapter"
    report = tmp_path / "i.json"
    res = invoke("inspect", adapter, "--json", report)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        f"adapter:          {adapter}",
        "method:           FourierFT (peft 0.21.2)",
        "target_modules:   ['q_proj', 'v_proj']",
        "scaling:          150.0",
        "random_loc_seed:  777",
        "bias:             none",
        "modules_to_save:  -",
        "task_type:        CAUSAL_LM",
        "trainable params: 160",
        "adapted layers:   4",
        f"  {'module':<56} {'n':>7}",
        *[f"  {k[: -len('.weight')]:<56} {n:>7}" for k, n in zip(LLAMA_Q, [50, 30, 50, 30], strict=True)],
    ]
    doc = json.loads(report.read_text())
    assert doc["trainable_parameters"] == 160 and doc["random_loc_seed"] == 777 and doc["base"] is None
    first = doc["layers"][0]
    assert (first["module"], first["n"], first["shape"]) == ("model.layers.0.self_attn.q_proj", 50, None)


def test_inspect_named_adapter() -> None:
    res = invoke("inspect", FIXTURES / "llama" / "adapter", "--adapter-subfolder", "second")
    assert res.exit_code == 0, res.output
    assert "random_loc_seed:  1234" in res.stdout.splitlines()
    assert "trainable params: 80" in res.stdout.splitlines()


def test_inspect_with_base_gpt2_conv1d() -> None:
    res = invoke("inspect", FIXTURES / "gpt2" / "adapter", "--base", FIXTURES / "gpt2" / "base")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1:10] == [
        "method:           FourierFT (peft 0.21.2)",
        "target_modules:   ['c_attn', 'c_fc', 'c_proj']",
        "scaling:          100.0",
        "random_loc_seed:  777",
        "bias:             fourier_only",
        "modules_to_save:  -",
        "task_type:        CAUSAL_LM",
        "trainable params: 896",  # 8 spectra x 40 + the 8 trained biases (96+32+128+32) x 2
        "adapted layers:   8",
    ]
    assert lines[10].split() == ["module", "n", "out", "x", "in", "conv1d", "||dW||_F", "top1%", "top10%"]
    rows = [line.split() for line in lines[11:19]]
    shapes = {"attn.c_attn": "96x32", "attn.c_proj": "32x32", "mlp.c_fc": "128x32", "mlp.c_proj": "32x128"}
    assert [r[0] for r in rows] == [f"transformer.h.{i}.{m}" for i in range(2) for m in shapes]
    for r in rows:
        assert r[1] == "40" and r[2] == shapes[r[0].split(".", 3)[3]] and r[3] == "yes"
        assert float(r[4]) > 0 and r[5].endswith("%") and r[6].endswith("%")
    assert lines[19:] == [
        "note: names matched through checkpoint names",
        "note: orientation (Linear / Conv1D) decided from the model skeleton",
    ]


def test_inspect_with_base_roberta_bias_and_heads() -> None:
    adapter = FIXTURES / "roberta" / "adapter"
    res = invoke("inspect", adapter, "--base", FIXTURES / "roberta" / "base")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    # every stored tensor counts once (not the PEFT wrapper copies): 4x30 spectra, 608 biases, 1155 head values
    with open(adapter / "adapter_model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    numel = sum(
        int(torch.tensor(v["shape"]).prod())
        for k, v in header.items()
        if k != "__metadata__" and ".original_module." not in k and ".modules_to_save." not in k
    )
    assert numel == 1883
    assert "bias:             all" in lines
    assert "modules_to_save:  ['classifier', 'score']" in lines
    assert "task_type:        SEQ_CLS" in lines
    assert "trainable params: 1,883" in lines
    rows = [line.split() for line in lines if line.startswith("  roberta.")]
    assert len(rows) == 4 and all(r[1:4] == ["30", "32x32", "no"] for r in rows)


# -- misc -----------------------------------------------------------------------------------------
def test_version() -> None:
    res = invoke("--version")
    assert res.exit_code == 0
    assert res.stdout == f"fourier-convert, version {fc.__version__}\n"


def test_usage_error_missing_out() -> None:
    res = invoke("merge", "--base", FIXTURES / "llama" / "base", "--adapter", FIXTURES / "llama" / "adapter")
    assert res.exit_code == 2
    assert res.stdout == ""
    assert res.stderr == "error: Missing option '--out'; see 'fourier-convert merge --help'\n"


def test_usage_error_weight_count(tmp_path: Path) -> None:
    adapter = FIXTURES / "llama" / "adapter"
    res = invoke(
        "merge",
        "--base",
        FIXTURES / "llama" / "base",
        "--adapter",
        adapter,
        "--adapter",
        adapter,
        "--weight",
        "1",
        "--out",
        tmp_path / "m",
    )
    assert res.exit_code == 2
    assert res.stderr == "error: --weight: given 1 time(s) for 2 adapter(s); give one --weight per --adapter\n"
    assert list(tmp_path.iterdir()) == []


def test_usage_error_subfolder_count(tmp_path: Path) -> None:
    adapter = FIXTURES / "llama" / "adapter"
    res = invoke(
        "merge",
        "--base",
        FIXTURES / "llama" / "base",
        *["--adapter", adapter] * 3,
        "--adapter-subfolder",
        "a",
        "--adapter-subfolder",
        "b",
        "--out",
        tmp_path / "m",
    )
    assert res.exit_code == 2
    assert res.stderr == (
        "error: --adapter-subfolder: given 2 time(s) for 3 adapter(s); give it once or once per --adapter\n"
    )


def test_usage_error_unknown_precision(tmp_path: Path) -> None:
    res = invoke(
        "merge",
        "--base",
        FIXTURES / "llama" / "base",
        "--adapter",
        FIXTURES / "llama" / "adapter",
        "--out",
        tmp_path / "m",
        "--precision",
        "float16",
    )
    assert res.exit_code == 2
    assert res.stderr == (
        "error: Invalid value for '--precision': 'float16' is not one of 'float32', 'float64'; see 'fourier-convert "
        "merge --help'\n"
    )


def test_debug_raises_where_default_prints_one_line(tmp_path: Path) -> None:
    args = ["merge", "--base", FIXTURES / "llama" / "base", "--adapter", tmp_path / "nope", "--out", tmp_path / "m"]
    message = f"{tmp_path / 'nope'}: adapter folder not found; check the path"
    res = invoke(*args)
    assert res.exit_code == 1
    assert res.stderr == f"error: {message}\n"
    assert res.exception is None or isinstance(res.exception, SystemExit)
    for how in (["--debug", *args], args):
        env = {"FOURIER_CONVERT_DEBUG": "1"} if how is args else None
        res = invoke(*how, env=env)
        assert res.exit_code == 1
        assert isinstance(res.exception, fc.InputFileError) and str(res.exception) == message
        assert res.exc_info is not None and res.exc_info[2] is not None  # the traceback the user would see
        assert res.stderr == ""


# -- the real entry point -------------------------------------------------------------------------
def test_console_entry_merge_succeeds(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    out = tmp_path / "merged"
    p = run_module("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu")
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert "Traceback" not in stderr and stderr == ""
    assert f"wrote 0.4 MB in 3 file(s) to {out}" in stdout.splitlines()
    assert weights(out).keys() == weights(base).keys()


def test_console_entry_exit_codes_and_tracebacks(tmp_path: Path) -> None:
    base = FIXTURES / "llama" / "base"
    bad = ["merge", "--base", base, "--adapter", tmp_path / "nope", "--out", tmp_path / "m"]
    procs = {
        "error": run_module(*bad),
        "debug": run_module("--debug", *bad),
        "usage": run_module("merge", "--base", base, "--adapter", tmp_path / "nope"),
    }
    res = {k: (p.communicate(timeout=120), p.returncode) for k, p in procs.items()}
    message = f"{tmp_path / 'nope'}: adapter folder not found; check the path"

    (out, err), code = res["error"]
    assert code == 1 and out == "" and err == f"error: {message}\n"

    (out, err), code = res["debug"]
    assert code == 1 and out == ""
    assert "Traceback (most recent call last):" in err
    assert err.splitlines()[-1] == f"fourier_convert.errors.InputFileError: {message}"

    (out, err), code = res["usage"]
    assert code == 2 and "Traceback" not in err
    assert err == "error: Missing option '--out'; see 'fourier-convert merge --help'\n"

    assert list(tmp_path.iterdir()) == []


# -- interruption ---------------------------------------------------------------------------------
@pytest.fixture
def slow(tmp_path: Path) -> tuple[Path, Path]:
    """A base of six 4096 x 2048 float32 layers (192 MB) and a FourierFT adapter on all of them: a merge that
    takes seconds, so that a signal reliably arrives mid-write (the tiny fixtures merge in milliseconds)."""
    from safetensors.torch import save_file

    base, adapter = tmp_path / "slow" / "base", tmp_path / "slow" / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file(
        {f"layers.{i}.q.weight": torch.randn(4096, 2048, generator=gen) for i in range(6)}, base / "model.safetensors"
    )
    spectra = {f"base_model.model.layers.{i}.q.fourierft_spectrum": torch.randn(100, generator=gen) for i in range(6)}
    save_file(spectra, adapter / "adapter_model.safetensors")
    config = {"peft_type": "FOURIERFT", "n_frequency": 100, "scaling": 150.0, "target_modules": ["q"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


def _start_and_wait_for_partial(base: Path, adapter: Path, out: Path) -> tuple[subprocess.Popen[str], Path]:
    p = run_module("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = list(out.parent.glob(f".{out.name}.partial-*"))
        if found:
            return p, found[0]
        if p.poll() is not None:
            break
        time.sleep(0.005)
    p.kill()
    stdout, stderr = p.communicate()
    pytest.fail(f"no partial folder appeared (exit {p.returncode}): {stdout} {stderr}")


def test_sigkill_mid_merge_publishes_nothing_and_keeps_inputs(slow: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = slow
    before = tree_hash(tmp_path / "slow")
    out = tmp_path / "merged"
    p, _partial = _start_and_wait_for_partial(base, adapter, out)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    assert tree_hash(tmp_path / "slow") == before
    # only the hidden temp folder may remain after a SIGKILL (nothing can clean it up)
    assert {p.name for p in tmp_path.iterdir()} - {"slow"} <= {x.name for x in partials(tmp_path)}


def test_sigint_mid_merge_cleans_up_and_exits_130(slow: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = slow
    before = tree_hash(tmp_path / "slow")
    out = tmp_path / "merged"
    p, partial = _start_and_wait_for_partial(base, adapter, out)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert stderr == INTERRUPTED
    assert "Traceback" not in stdout
    assert not out.exists()
    assert not partial.exists() and partials(tmp_path) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == ["slow"]
    assert tree_hash(tmp_path / "slow") == before


# -- bugs -----------------------------------------------------------------------------------------
def test_json_into_missing_folder_fails_before_publishing(tmp_path: Path) -> None:
    out, report = tmp_path / "m", tmp_path / "nodir" / "r.json"
    res = invoke(
        "merge",
        "--base",
        FIXTURES / "llama" / "base",
        "--adapter",
        FIXTURES / "llama" / "adapter",
        "--out",
        out,
        "--device",
        "cpu",
        "--json",
        report,
    )
    assert res.exit_code in (1, 2)
    assert len(res.stderr.splitlines()) == 1 and "unexpected" not in res.stderr and str(report) in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["merge", "to-lora"])
def test_json_in_a_folder_that_takes_no_new_file_fails_before_publishing(command: str, tmp_path: Path) -> None:
    """--json /proc/version passed the checks (a regular file), then failed to write after the output was published
    (exit 1 with the output in place). The report is now written beside its target and renamed over it, so its
    folder must take a new file: checked before any work."""
    base, adapter, out = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", tmp_path / "m"
    args = {
        "merge": ["merge", "--base", base, "--adapter", adapter, "--out", out, "--device", "cpu"],
        "to-lora": ["to-lora", "--base", base, "--adapter", adapter, "--out", out, "--rank", "2"],
    }[command]
    res = invoke(*args, "--json", "/proc/version")
    assert (res.exit_code, res.stdout) == (2, "")
    assert re.fullmatch(
        r"error: --json: cannot write /proc/version: no new file can be made in /proc \([^)]+\); choose another "
        r"--json path\n",
        res.stderr,
    ), res.stderr
    assert not out.exists()


def test_json_report_replaces_its_target_whole(tmp_path: Path) -> None:
    """The report goes to a new file renamed over the target: an existing read-only report is replaced, and a link
    named by --json is written through (its target replaced, the link kept)."""
    report = tmp_path / "r.json"
    report.write_text("old")
    report.chmod(0o444)
    link = tmp_path / "link.json"
    link.symlink_to(report)
    args = ["inspect", FIXTURES / "llama" / "adapter", "-q", "--json", link]
    res = invoke(*args)
    assert (res.exit_code, res.stderr) == (0, ""), res.output
    assert link.is_symlink() and json.loads(report.read_text())["layers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "r.json"]


def test_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`fourier-convert inspect ... | head -1` must not print an error."""
    proc = subprocess.run(
        f"{sys.executable} -m fourier_convert inspect {FIXTURES / 'gpt2' / 'adapter'} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.stdout.startswith("adapter:") and proc.stderr == ""


def test_sigterm_publishes_nothing(slow: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = slow
    out = tmp_path / "merged"
    cmd = [
        sys.executable,
        "-m",
        "fourier_convert",
        "merge",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".merged.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("interrupted: nothing was published")
    assert not out.exists() and not list(tmp_path.glob(".merged.partial-*"))


def test_inspect_quiet_and_debug_anywhere(tmp_path: Path) -> None:
    import subprocess
    import sys

    report = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["inspect", str(FIXTURES / "llama" / "adapter"), "-q", "--json", str(report)])
    assert res.exit_code == 0 and res.stdout == "" and json.loads(report.read_text())["layers"]
    args = ["merge", "--base", str(tmp_path / "nobase"), "--adapter", str(tmp_path / "noadapter"), "--out", "x"]
    plain = subprocess.run([sys.executable, "-m", "fourier_convert", *args], capture_output=True, text=True)
    debug = subprocess.run([sys.executable, "-m", "fourier_convert", *args, "--debug"], capture_output=True, text=True)
    assert plain.stderr.startswith("error: ") and "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr and "InputFileError" in debug.stderr


def test_running_out_of_memory_is_one_line_not_an_internal_error(tmp_path: Path) -> None:
    """A LoRA of a 30,000 x 30,000 layer, converted without a base: drawing its positions takes 7.2 GB. Under a 4 GB
    address-space limit torch's allocator fails; the CLI says so in one line (it printed 'unexpected RuntimeError
    ... report it'), exits 1 and publishes nothing."""
    import resource

    from safetensors.torch import save_file

    from fourier_convert.host import available_memory

    if (available_memory() or 0) < 8 * 10**9:
        pytest.skip("needs 8 GB available: the position-draw check would refuse the layer first")
    lora = tmp_path / "lora"
    lora.mkdir()
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{key}.lora_A.weight": torch.zeros(2, 30_000), f"{key}.lora_B.weight": torch.zeros(30_000, 2)},
        str(lora / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (lora / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "fft"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 * 10**9, 4 * 10**9))

    args = ["from-lora", "--adapter", str(lora), "--out", str(out), "--n-frequency", "10", "-q"]
    proc = subprocess.run(
        [sys.executable, "-m", "fourier_convert", *args], capture_output=True, text=True, preexec_fn=limit, timeout=120
    )
    assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr
    assert proc.stderr == (
        "error: out of memory: an allocation of 7.2 GB failed; nothing was published; free memory or use a machine "
        "with more (run again with --debug to see where)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["merge", "--threads", "0"], "Invalid value for '--threads': 0 is not in the range x>=1; see "
         "'fourier-convert merge --help'"),
        (["merge", "--bogus"], "No such option '--bogus'. (Did you mean one of: '--base', '--out'?); see "
         "'fourier-convert merge --help'"),
        (["bogus"], "No such command 'bogus'; see 'fourier-convert --help'"),
        (["inspect"], "Missing argument 'ADAPTER'; see 'fourier-convert inspect --help'"),
        (["from-lora", "--n-frequency", "abc"], "Invalid value for '--n-frequency': 'abc' is not a valid integer; "
         "see 'fourier-convert from-lora --help'"),
    ],
)  # fmt: skip
def test_click_usage_errors_are_one_line(args: list[str], line: str) -> None:
    """click's own errors were four lines (usage, hint, blank, 'Error: ...'); now one, as every other error."""
    res = invoke(*args)
    assert (res.exit_code, res.stdout, res.stderr) == (2, "", f"error: {line}\n")
