"""Hub ids resolved offline from a local Hugging Face cache, and ``PATH:NAME`` splitting.

The fake cache has huggingface_hub's real layout: ``models--ORG--NAME/refs/main`` holding a commit hash,
``snapshots/<hash>/<files>``, and (for one repo) ``blobs/<digest>`` with the snapshot files as relative
symlinks into it. huggingface_hub reads ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` once, when
``huggingface_hub.constants`` is imported, and ``snapshot_download`` then reads
``constants.HF_HUB_CACHE`` and ``constants.is_offline_mode()`` at call time. In this process it is
imported long before a test runs, so the in-process tests set the environment *and* patch those two
constants; one test runs a fresh ``python -m fourier_convert`` with nothing but environment variables,
which is what a user does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fourier_convert as fc
from fourier_convert.cli.main import cli
from fourier_convert.io.adapter import read_adapter
from fourier_convert.io.resolve import split_subfolder
from tests.conftest import FIXTURES

BASE_ID = "org/tiny-llama"
ADAPTER_ID = "org/tiny-llama-fourierft"


def commit_of(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


def make_repo(cache: Path, repo_id: str, src: Path, *, blobs: bool) -> Path:
    """Put ``src`` into ``cache`` as huggingface_hub stores a downloaded snapshot; return the snapshot folder."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit_of(repo_id)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    snapshot = storage / "snapshots" / commit
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        dst = snapshot / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if blobs:
            data = f.read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            dst.symlink_to(os.path.relpath(blob, dst.parent))
        else:
            shutil.copyfile(f, dst)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache holding the llama fixture as two repos; returns the cache folder."""
    import huggingface_hub.constants as constants

    hf_home = tmp_path / "hf_home"
    cache = hf_home / "hub"
    make_repo(cache, BASE_ID, FIXTURES / "llama" / "base", blobs=True)
    make_repo(cache, ADAPTER_ID, FIXTURES / "llama" / "adapter", blobs=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "org/..." must not exist as a local folder
    return cache


def _same_output(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert sorted(p.name for p in b.iterdir()) == names
    for name in names:
        if name != "fourier_convert.json":  # provenance names the inputs as given, and a time stamp
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_hub_ids_merge_offline_like_local_folders(hub_cache: Path, tmp_path: Path) -> None:
    hub, local = tmp_path / "from_hub", tmp_path / "from_local"
    report = fc.merge(BASE_ID, ADAPTER_ID, hub, device="cpu")
    fc.merge(FIXTURES / "llama" / "base", FIXTURES / "llama" / "adapter", local, device="cpu")
    _same_output(hub, local)
    assert report.base == BASE_ID and report.adapters == [ADAPTER_ID]
    assert report.tensors == {"copy": 17, "merge": 4}
    # the published shards are real files, not links into the cache
    assert not any(p.is_symlink() for p in hub.iterdir())


def test_hub_id_with_explicit_revision(hub_cache: Path, tmp_path: Path) -> None:
    for revision in ("main", commit_of(BASE_ID)):
        out = tmp_path / f"rev_{revision[:4]}"
        report = fc.merge(BASE_ID, ADAPTER_ID, out, device="cpu", revision=revision)
        assert report.tensors == {"copy": 17, "merge": 4}


def test_hub_id_colon_name_resolves_the_named_adapter(hub_cache: Path, tmp_path: Path) -> None:
    snapshot = hub_cache / f"models--{ADAPTER_ID.replace('/', '--')}" / "snapshots" / commit_of(ADAPTER_ID)
    adapter = read_adapter(f"{ADAPTER_ID}:second")
    assert adapter.folder == snapshot / "second"
    assert adapter.settings.random_loc_seed == 1234
    assert read_adapter(ADAPTER_ID, subfolder="second").folder == snapshot / "second"
    hub, local = tmp_path / "from_hub", tmp_path / "from_local"
    fc.merge(BASE_ID, f"{ADAPTER_ID}:second", hub, device="cpu")
    fc.merge(FIXTURES / "llama" / "base", f"{FIXTURES / 'llama' / 'adapter'}:second", local, device="cpu")
    _same_output(hub, local)


def test_hub_id_through_the_cli(hub_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    res = CliRunner().invoke(
        cli, ["merge", "--base", BASE_ID, "--adapter", ADAPTER_ID, "--adapter-subfolder", "second", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize(("what", "option"), [("adapter", "--adapter"), ("base model", "--base")])
def test_id_not_in_cache(hub_cache: Path, tmp_path: Path, what: str, option: str) -> None:
    msg = (
        f"org/not-cached: {what} is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
        "reached; check the path, or download it first while online (hf download org/not-cached)"
    )
    args = {"--base": BASE_ID, "--adapter": ADAPTER_ID, option: "org/not-cached"}
    with pytest.raises(fc.InputFileError) as info:
        fc.merge(args["--base"], args["--adapter"], tmp_path / "m", device="cpu")
    assert str(info.value) == msg
    res = CliRunner().invoke(cli, ["merge", *[x for kv in args.items() for x in kv], "--out", str(tmp_path / "m")])
    assert (res.exit_code, res.stdout, res.stderr) == (1, "", f"error: {msg}\n")
    assert not (tmp_path / "m").exists()


def test_id_not_in_cache_suggests_an_existing_download_command(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(fc.InputFileError) as info:
        fc.merge(BASE_ID, "org/not-cached", tmp_path / "m", device="cpu")
    assert "hf download org/not-cached" in info.value.fix


def test_env_vars_alone_are_honoured_by_a_fresh_process(tmp_path: Path) -> None:
    """No patching: HF_HOME (cache in HF_HOME/hub) and HF_HUB_OFFLINE=1 set for a new interpreter."""
    hf_home = tmp_path / "hf_home"
    make_repo(hf_home / "hub", ADAPTER_ID, FIXTURES / "llama" / "adapter", blobs=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    no_cache = {k: v for k, v in env.items() if k != "HF_HOME"} | {"HF_HUB_CACHE": str(tmp_path / "empty")}
    cmd = [sys.executable, "-m", "fourier_convert", "inspect", f"{ADAPTER_ID}:second"]
    found, missing = (
        subprocess.Popen(cmd, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for e in (env, no_cache)
    )
    out, err = found.communicate(timeout=120)
    assert found.returncode == 0, err
    assert f"adapter:          {ADAPTER_ID}:second" in out.splitlines()
    assert "random_loc_seed:  1234" in out.splitlines()
    out, err = missing.communicate(timeout=120)
    assert missing.returncode == 1
    assert err.startswith(f"error: {ADAPTER_ID}: adapter is neither a local folder nor in the Hugging Face cache")


# -- split_subfolder ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "subfolder", "expected"),
    [
        ("user/repo:second", None, ("user/repo", "second")),
        ("user/repo", None, ("user/repo", None)),
        ("user/repo", "second", ("user/repo", "second")),
        ("./adapters/run1:second", None, ("./adapters/run1", "second")),
        ("/abs/adapter:second", None, ("/abs/adapter", "second")),
        ("a:b:c", None, ("a:b", "c")),  # the last colon splits
        ("user/repo:", None, ("user/repo:", None)),  # nothing after the colon: not a split
        (":second", None, (":second", None)),  # nothing before the colon: not a split
    ],
)
def test_split_subfolder(spec: str, subfolder: str | None, expected: tuple[str, str | None]) -> None:
    assert split_subfolder(spec, subfolder) == expected


def test_split_subfolder_keeps_an_existing_path_with_a_colon(tmp_path: Path) -> None:
    odd = tmp_path / "run:1"
    odd.mkdir()
    assert split_subfolder(str(odd)) == (str(odd), None)
    assert split_subfolder(f"{odd}:second") == (str(odd), "second")


def test_explicit_subfolder_overrides_a_colon_suffix() -> None:
    assert split_subfolder("user/repo:second", "third") == ("user/repo", "third")
    adapter = FIXTURES / "llama" / "adapter"
    assert read_adapter(f"{adapter}:second", subfolder="second").folder == adapter / "second"
