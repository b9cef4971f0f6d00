"""Commands that need no tensors start without importing torch, transformers or onnx (issue: < 0.5 s start)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "peft", "safetensors.torch")

PROBE = """
import json, sys
from click.testing import CliRunner
from fourier_convert.cli.main import cli
result = CliRunner().invoke(cli, sys.argv[1:])
print(json.dumps({"code": result.exit_code, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def imported_by(*args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("merge", "--help"),
        ("to-lora", "--help"),
        ("from-lora", "--help"),
        ("to-onnx", "--help"),
        ("inspect", str(FIXTURES / "llama" / "adapter")),
        ("merge", "--base", "x"),  # usage error: --out missing
        ("to-lora", "--adapter", "x", "--out", "y", "--json", "/nonexistent-folder/r.json"),
    ],
)
def test_commands_that_need_no_tensors_import_nothing_heavy(args: tuple[str, ...]) -> None:
    got = imported_by(*args)
    assert got["heavy"] == [], got
    assert got["code"] in (0, 2)


def test_the_package_imports_lazily() -> None:
    code = f"import sys, fourier_convert as fc; fc.UsageError; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import fourier_convert as fc; print(fc.to_lora.__module__, 'to_lora' in dir(fc))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fourier_convert.lora", "True"]


def test_public_names_are_not_shadowed_by_submodules() -> None:
    """A submodule named like a public function would replace it on the package once imported (PEP 562 lazy
    names are looked up only when the attribute is missing): no public name may equal a submodule's name."""
    import pkgutil

    import fourier_convert as fc

    submodules = {m.name for m in pkgutil.iter_modules(fc.__path__)}
    assert not submodules & set(fc.__all__)
    code = (
        "import importlib, pkgutil, fourier_convert as fc\n"
        "for m in pkgutil.walk_packages(fc.__path__, 'fourier_convert.'):\n"
        "    if not m.name.endswith('__main__'):\n        importlib.import_module(m.name)\n"
        "print(sorted(n for n in fc.__all__ if type(getattr(fc, n)).__name__ == 'module'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_cpu_merge_runs_without_torch(tmp_path: Path) -> None:
    """The default merge (CPU, float64) is numpy alone: ``import torch`` costs as long as copying a 1B model on
    2 cores. The output is the one the torch path writes (tests/test_merge.py compares it with PEFT's)."""
    base, adapter = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    got = imported_by("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m"), "-q")
    assert got == {"code": 0, "heavy": []}
    provenance = json.loads((tmp_path / "m" / "fourier_convert.json").read_text())
    assert provenance["torch"] is None and provenance["numpy"]
    assert {layer["backend"] for layer in provenance["report"]["layers"]} == {"numpy-cpu-float64"}


def test_auto_on_a_gpu_machine_merges_on_the_cpu_and_says_why(tmp_path: Path) -> None:
    """Where a GPU driver exists, ``--device auto`` still merges with numpy (the GPU path only broke even at 7B
    and was 2.3x slower at 1.1B, docs/benchmarks.md), imports no torch, and its report says so."""
    base, adapter = FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter"
    code = (
        "import json, sys\n"
        "import fourier_convert.merging.folder as folder\n"
        "folder._gpu_driver_present = lambda: True\n"
        f"report = folder.merge({str(base)!r}, {str(adapter)!r}, {str(tmp_path / 'm')!r})\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'notes': report.notes, 'device': report.device, 'heavy': heavy,"
        " 'note': folder.AUTO_DEVICE_NOTE}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["note"] in got["notes"] and got["note"].startswith("device auto: merging on the CPU")
    assert got["device"] == "cpu" and got["heavy"] == []


@pytest.mark.parametrize("module", ["click", "fourier_convert.cli.merge_cmd"])
def test_an_interrupt_while_starting_prints_one_line(module: str) -> None:
    """Ctrl-C while the command line is still being imported: one line and exit 130, no traceback. (Only the
    interpreter's own start, about 17 ms on the 2-core VM, and the package's first ~4 ms of imports, before the
    entry point runs, remain outside this: docs/merge.md, "Interruption and crashes".)"""
    code = f"""
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["fourier-convert", "--help"]
from fourier_convert.cli.entry import main
main()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (130, "")
    assert out.stderr == "interrupted: nothing was published and the inputs were not touched\n"
