"""The documented examples that run on the fixtures give the output the docs show.

- Python examples of docs/api.md followed by an output block: run in order in one namespace (from the
  repository root, ``/tmp/`` paths moved into a temporary folder); their printed output must equal the block.
- Console examples (``$ fourier-convert ...`` then its output) whose inputs are fixtures, or outputs of the
  commands before them in the same block: run in a temporary folder; the output must match the block, where a
  ``...`` line stands for any lines, and times, tiny float errors and the transformers version may differ.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from fourier_convert.cli.main import cli

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def python_examples() -> list[tuple[int, str, str]]:
    """(block number, code, documented output) of docs/api.md's examples that show their output."""
    blocks = FENCE.findall((DOCS / "api.md").read_text())
    found = []
    for i, (lang, body) in enumerate(blocks[:-1]):
        after_lang, after = blocks[i + 1]
        if lang == "python" and after_lang in ("", "text"):
            found.append((i, body, after))
    return found


def test_api_examples_print_what_the_docs_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = python_examples()
    assert len(examples) >= 10  # the examples are found (a broken pattern would pass vacuously)
    monkeypatch.chdir(REPO)
    scratch = f"{tmp_path}/"
    namespace: dict[str, object] = {}
    for i, code, shown in examples:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace("/tmp/", scratch), f"docs/api.md block {i}", "exec"), namespace)
        assert out.getvalue().strip() == shown.replace("/tmp/", scratch).strip(), f"docs/api.md block {i}"


def _normalise(line: str) -> str:
    line = re.sub(r"\b\d+\.\d+ s\b", "<seconds>", line)
    line = re.sub(r"\b\d\.\d+e-1\d\b", "<tiny>", line)  # float64 rounding errors, platform-dependent
    return re.sub(r"transformers \d+\.\d+\.\d+", "transformers <version>", line).rstrip()


def _matches(shown: list[str], got: list[str]) -> bool:
    """``got`` against ``shown``, where a ``...`` line of ``shown`` stands for any number of lines."""
    if not shown:
        return not got
    if shown[0].strip() == "...":
        return any(_matches(shown[1:], got[k:]) for k in range(len(got) + 1))
    return bool(got) and _normalise(shown[0]) == _normalise(got[0]) and _matches(shown[1:], got[1:])


def console_examples() -> list[tuple[str, list[list[str]], list[str]]]:
    """(where, commands, output lines) of the console examples that run on the fixtures alone."""
    found = []
    for doc in sorted(DOCS.glob("*.md")):
        for lang, body in FENCE.findall(doc.read_text()):
            lines = body.rstrip("\n").split("\n")
            commands = [shlex.split(line[2:]) for line in lines if line.startswith("$ fourier-convert ")]
            if lang not in ("", "text") or not commands or not lines[0].startswith("$ "):
                continue
            made: set[str] = set()
            runnable = True
            for argv in commands:
                paths = [argv[k + 1] for k, a in enumerate(argv[:-1]) if a in ("--base", "--adapter", "--model")]
                paths += [a for a in argv[2:3] if argv[1] == "inspect"]
                if any(not (p.startswith("fixtures/") or p in made) for p in paths) or "#" in argv:
                    runnable = False
                made.update(argv[k + 1] for k, a in enumerate(argv[:-1]) if a == "--out")
            output = [line for line in lines if not line.startswith("$ ")]
            if runnable and output:
                found.append((f"{doc.name}: {lines[0][2:60]}", [argv[1:] for argv in commands], output))
    return found


@pytest.mark.parametrize("example", console_examples(), ids=lambda e: e[0])
def test_console_examples_print_what_the_docs_show(
    example: tuple[str, list[list[str]], list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where, commands, shown = example
    os.symlink(REPO / "fixtures", tmp_path / "fixtures")
    monkeypatch.chdir(tmp_path)
    got: list[str] = []
    for argv in commands:
        res = CliRunner().invoke(cli, argv)
        assert res.exit_code == 0, (where, res.output)
        got = res.stdout.rstrip("\n").split("\n")  # the block shows the last command's output
    assert _matches(shown, got), (where, shown, got)


def test_console_examples_are_found() -> None:
    """The examples the README and the docs show on the fixtures are among those run above."""
    names = {where.split(":")[0] for where, _, _ in console_examples()}
    assert {"merge.md", "from-lora.md"} <= names, names
