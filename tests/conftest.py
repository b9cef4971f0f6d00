"""Shared test helpers: fixture paths, an independent float64 reference merge, tiny model builders."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# merge remembers passed config checks (fourier_convert.io.fit_cache): in a folder of this run's, not the user's
if "FOURIER_CONVERT_CACHE" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="fourier-convert-test-cache-")
    os.environ["FOURIER_CONVERT_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # leaves nothing in the temp folder

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
FIXTURE_NAMES = ["llama", "gpt2", "roberta", "vit", "bert_head"]

#: target_modules that pick modules of the llama fixture no PEFT adapter layer can wrap (a norm; the containers
#: ".*" picks too), with what the refusal says of the first one: shared by the FourierFT and LoRA readers' tests.
UNADAPTABLE_SELECTIONS = [
    (["q_proj", "v_proj", "input_layernorm"],
     "'model.layers.0.input_layernorm' of the base, whose weight is 1-D (a norm or scale, not a linear layer)"),
    (".*", "'model' of the base, a container of 20 tensor(s) in modules below it, with no weight of its own"),
]  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture
def fixture_copy(tmp_path: Path):
    """Copy a shipped fixture into tmp_path so a test may modify it."""

    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return dst

    return make


def replace_with_special_file(path: Path, kind: str) -> None:
    """Put a file that is not a regular one where ``path`` was: ``"fifo"`` (reading it would block),
    ``"dev-zero"`` (a link to a device that never ends) or ``"dangling-link"`` (a link to nothing)."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "dangling-link":
        path.symlink_to(path.parent / f".{path.name}.gone")
    else:
        raise ValueError(f"unknown kind {kind!r}")
