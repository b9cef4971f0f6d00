"""A seeded mutator over the fixtures' headers, index and configs, run through ``merge``, ``inspect``, ``to-lora``
and ``to-onnx``, and over a LoRA adapter (and its base) run through ``from-lora``.

Every case must end in one of two ways, within a few seconds: exit 0 with an output that the safetensors
library loads, or exit 1 / 2 with one ``error:`` line on stderr, nothing published and the inputs untouched;
never a traceback or an ``unexpected`` error. The seeds are fixed, so a failure reproduces; CI runs
``FUZZ_CASES`` cases, a third as many from-lora cases and ``FUZZ_ONNX_CASES`` to-onnx cases (more with
``FOURIER_CONVERT_FUZZ_CASES`` / ``FOURIER_CONVERT_FUZZ_ONNX_CASES``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from fourier_convert.cli.main import cli
from tests.conftest import FIXTURES
from tests.test_errors import snapshot

FUZZ_CASES = int(os.environ.get("FOURIER_CONVERT_FUZZ_CASES", "300"))
#: to-onnx cases: a case that exports and validates takes seconds, so CI runs fewer.
FUZZ_ONNX_CASES = int(os.environ.get("FOURIER_CONVERT_FUZZ_ONNX_CASES", "16"))
#: Values a mutated JSON field can take.
ODD_VALUES: list[Any] = [
    None, True, -1, 0, 1, 2**64, 1.5, -0.0, 1e300, float("nan"), "", "x", "F32", "../x", "\n\x1b", [], [1], [-1, 2],
    [0.5], ["1"], {}, {"a": "b"}, {"a": {"b": 1}}, [[1, 2]],
]  # fmt: skip


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + hlen]), raw[8 + hlen :]


def _write_header(path: Path, header: dict[str, Any], data: bytes) -> None:
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + data)


def _mutate_header(rng: random.Random, path: Path) -> str:
    header, data = _header(path)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    kind = rng.randrange(6)
    if kind == 0:
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rng.choice(ODD_VALUES)
        what = f"{name}.{field}"
    elif kind == 1:
        shape = header[name]["shape"]
        if shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 7, 10**6])
        what = f"{name}.shape off"
    elif kind == 2:
        begin, end = header[name]["data_offsets"]
        delta = rng.choice([-2, -1, 1, 2, 4096])
        header[name]["data_offsets"] = [begin + delta, end + delta]
        what = f"{name}.data_offsets shifted"
    elif kind == 3:
        header["__metadata__"] = rng.choice(ODD_VALUES)
        what = "__metadata__"
    elif kind == 4:
        del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
        what = f"{name} field deleted"
    else:
        header[name + rng.choice(["\n", ".x", ""])] = header.pop(name)
        what = f"{name} renamed"
    _write_header(path, header, data)
    return f"{path.name}: {what}"


def _flip_bytes(rng: random.Random, path: Path) -> str:
    raw = bytearray(path.read_bytes())
    hlen = int.from_bytes(raw[:8], "little")
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(0, 8 + hlen)] = rng.randrange(256)
    path.write_bytes(bytes(raw))
    return f"{path.name}: header bytes flipped"


def _truncate(rng: random.Random, path: Path) -> str:
    raw = path.read_bytes()
    cut = rng.randrange(0, len(raw))
    path.write_bytes(raw[:cut])
    return f"{path.name}: cut at {cut} of {len(raw)}"


def _mutate_json(rng: random.Random, path: Path) -> str:
    doc = json.loads(path.read_text())
    if path.name.endswith("index.json"):
        weight_map = doc["weight_map"]
        key = rng.choice(list(weight_map))
        if rng.random() < 0.5:
            weight_map[key] = rng.choice(ODD_VALUES)
            what = f"weight_map[{key}]"
        else:
            doc[rng.choice(["metadata", "weight_map"])] = rng.choice(ODD_VALUES)
            what = "top-level entry"
    else:
        key = rng.choice([*doc, "n_frequency_pattern", "layers_to_transform", "exclude_modules"])
        doc[key] = rng.choice(ODD_VALUES)
        what = key
    path.write_text(json.dumps(doc))
    return f"{path.name}: {what}"


def _case(rng: random.Random, root: Path) -> str:
    base, adapter = root / "base", root / "adapter"
    shards = sorted(base.glob("*.safetensors"))
    index = base / "model.safetensors.index.json"
    mutations: list[tuple[Callable[[random.Random, Path], str], Path]] = [
        (_mutate_header, rng.choice(shards)),
        (_mutate_header, adapter / "adapter_model.safetensors"),
        (_flip_bytes, rng.choice(shards)),
        (_flip_bytes, adapter / "adapter_model.safetensors"),
        (_truncate, rng.choice([*shards, adapter / "adapter_model.safetensors"])),
        (_mutate_json, index if index.is_file() else base / "config.json"),
        (_mutate_json, adapter / "adapter_config.json"),
        (_mutate_json, base / "config.json"),
    ]
    fn, path = rng.choice(mutations)
    return fn(rng, path)


def _loads(folder: Path) -> bool:
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="np") as f:
            for key in f.keys():  # noqa: SIM118
                f.get_tensor(key)
    return True


def _onnx_loads(folder: Path) -> bool:
    import onnxruntime as ort

    ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return True


def _run_and_check(
    args: list[Any], label: str, out: Path, root: Path, before: dict[str, str], *, bound: float = 10
) -> None:
    """One command on a corrupted input: a loadable output, or one error line with nothing published; the inputs
    untouched either way; never an internal error. A refusal takes 10 s at most, a success ``bound`` seconds."""
    start = time.perf_counter()
    res = CliRunner().invoke(cli, [str(a) for a in args])
    took = time.perf_counter() - start
    assert took < (bound if res.exit_code == 0 else 10), f"{label}: took {took:.1f} s"
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{label}: {res.exception!r}"
    internal = "run again with --debug for the traceback and report it"  # the CLI's wording for a bug
    assert internal not in res.stderr and "Traceback" not in res.stderr, f"{label}: {res.stderr}"
    if res.exit_code == 0:
        if args[0] != "inspect":
            assert _onnx_loads(out) if args[0] == "to-onnx" else _loads(out), label
            shutil.rmtree(out)
    else:
        assert res.exit_code in (1, 2), f"{label}: exit {res.exit_code}"
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}: {res.stderr!r}"
        assert not out.exists(), label
    assert snapshot(root) == before, f"{label}: an input changed"


@pytest.mark.parametrize("seed", range(FUZZ_CASES))
def test_a_corrupted_input_gives_a_loadable_output_or_one_line(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    name = "llama" if seed % 3 else "gpt2"  # gpt2: Conv1D, a single shard, the model skeleton
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    what = _case(rng, root)
    before = snapshot(root)
    out = tmp_path / "merged"
    runs = [
        ["merge", "--base", root / "base", "--adapter", root / "adapter", "--out", out, "--device", "cpu", "-q"],
        ["inspect", root / "adapter", "--base", root / "base", "-q"],
        ["to-lora", "--adapter", root / "adapter", "--base", root / "base", "--out", out, "--rank", "2", "-q"],
    ]
    for args in runs:
        _run_and_check(args, f"seed {seed} ({what}), {args[0]}", out, root, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.fixture(scope="module")
def lora_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter of the llama fixture (to-lora at rank 4), the input the from-lora cases corrupt."""
    lora = tmp_path_factory.mktemp("lora-input") / "lora"
    args = ["to-lora", "--adapter", FIXTURES / "llama" / "adapter", "--base", FIXTURES / "llama" / "base"]
    res = CliRunner().invoke(cli, [str(a) for a in [*args, "--rank", "4", "--out", lora, "-q"]])
    assert res.exit_code == 0, res.output
    return lora


@pytest.mark.parametrize("seed", range(FUZZ_CASES // 3))
def test_a_corrupted_lora_gives_a_loadable_adapter_or_one_line(seed: int, tmp_path: Path, lora_input: Path) -> None:
    """The same promise for from-lora: its LoRA input's header, bytes and config, and the base, corrupted."""
    rng = random.Random(100_000 + seed)
    root = tmp_path / "llama"
    shutil.copytree(FIXTURES / "llama" / "base", root / "base")
    shutil.copytree(lora_input, root / "lora")
    weights, config = root / "lora" / "adapter_model.safetensors", root / "lora" / "adapter_config.json"
    shards = sorted((root / "base").glob("*.safetensors"))
    mutations: list[tuple[Callable[[random.Random, Path], str], Path]] = [
        (_mutate_header, weights),
        (_mutate_header, weights),
        (_flip_bytes, weights),
        (_truncate, weights),
        (_mutate_json, config),
        (_mutate_json, config),
        (_mutate_header, rng.choice(shards)),
        (_mutate_json, root / "base" / "config.json"),
    ]
    fn, path = rng.choice(mutations)
    what = fn(rng, path)
    before = snapshot(root)
    out = tmp_path / "fft"
    args = ["from-lora", "--adapter", root / "lora", "--base", root / "base", "--out", out, "--n-frequency", "20", "-q"]
    _run_and_check(args, f"seed {seed} ({what}), from-lora", out, root, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


@pytest.mark.parametrize("seed", range(FUZZ_ONNX_CASES))
def test_a_corrupted_input_gives_a_validated_onnx_export_or_one_line(seed: int, tmp_path: Path) -> None:
    """The same promise for to-onnx (merge, proof, export, onnxruntime validation), on the same corruptions of the
    base and the adapter: an export onnxruntime loads, or one line with nothing published."""
    rng = random.Random(200_000 + seed)
    name = "llama" if seed % 2 else "gpt2"
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    what = _case(rng, root)
    before = snapshot(root)
    out = tmp_path / "onnx"
    args = ["to-onnx", "--base", root / "base", "--adapter", root / "adapter", "--out", out, "--device", "cpu", "-q"]
    _run_and_check(args, f"seed {seed} ({what}), to-onnx", out, root, before, bound=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
