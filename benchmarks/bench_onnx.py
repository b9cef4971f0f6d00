#!/usr/bin/env python
"""Benchmark ``fourier-convert to-onnx`` against a bare ``torch.onnx.export`` of the same merged model.

What it does, in one run:

1. Reuses (or builds, cached under ``--work``) the 1B-class bf16 Llama checkpoint and FourierFT adapter of
   ``bench_merge.py`` (its builder, imported, not copied; ``--layers`` sets the depth), and merges it once,
   untimed, into a float32 checkpoint (``fourier-convert merge --dtype float32``): the merged model both
   exports start from.
2. Times three stages, each as its own subprocess (wall time and peak RSS from ``os.wait4``, through
   ``bench_merge.measure``):

   - ``bare``: what a user would otherwise write: ``from_pretrained(merged, dtype=float32)``, a wrapper
     returning the logits, ``torch.onnx.export(..., dynamo=True)`` with dynamic batch / sequence axes,
     ``save(external_data=True)``. No merge, no checks.
   - ``to-onnx --model``: ``fourier-convert to-onnx --model merged`` (export + onnxruntime validation at 3
     shapes; no merge, no merge proof).
   - ``to-onnx``: ``fourier-convert to-onnx --base --adapter`` (merge + merge proof + export + validation).

3. Prints medians over ``--repeat`` runs, the ratios against ``bare`` and PASS / FAIL for the issue's
   targets: merge + proof + validation overhead <= 30 % of the bare export's time, and peak RSS <= 1.5x the
   exported (float32) weights. The ``to-onnx`` stage's own phase timings come from its ``--json`` report.

Usage (from the repository root)::

    python benchmarks/bench_onnx.py --layers 22 --json bench-work/bench-onnx-22.json     # 1.1B, float32
    python benchmarks/bench_onnx.py --layers 4                                          # quicker look

The parent process imports nothing heavy (Linux carries a parent's peak RSS into a child's ``ru_maxrss``).
Exit status: 0 when every stage ran (targets are reported, not enforced), 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench_merge as bm

TARGET_OVERHEAD = 0.30  # (to-onnx - bare) / bare
TARGET_RSS_RATIO = 1.5  # peak RSS / exported float32 weights
TASK = "causal-lm"


def worker_bare(argv: Sequence[str]) -> int:
    """``_bare MERGED OUT``: a plain dynamo export of the merged model, as a user would write it."""
    import torch
    from transformers import AutoModelForCausalLM

    merged, out = Path(argv[0]), Path(argv[1])
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).logits

    ids = torch.randint(4, model.config.vocab_size, (2, 6))
    batch, seq = torch.export.Dim("batch_size", min=1), torch.export.Dim("sequence_length", min=1)
    program = torch.onnx.export(
        Logits(model).eval(),
        (ids, torch.ones_like(ids), torch.arange(6).expand(2, 6)),
        dynamo=True,
        input_names=["input_ids", "attention_mask", "position_ids"],
        output_names=["logits"],
        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}),
    )
    assert program is not None
    out.mkdir(parents=True)
    program.save(str(out / "model.onnx"), external_data=True)
    return 0


WORKERS: dict[str, Callable[[Sequence[str]], int]] = {"_bare": worker_bare}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--layers", type=int, default=22, help="decoder layers of the 1B-shaped Llama (default 22)")
    p.add_argument("--work", type=Path, default=bm.DEFAULT_WORK, help="cache and scratch folder (default bench-work/)")
    p.add_argument("--repeat", type=int, default=1, help="timed repeats per stage; medians are reported")
    p.add_argument("--json", type=Path, default=None, help="write machine-readable results here")
    args = p.parse_args(argv)
    if args.layers < 1 or args.repeat < 1:
        p.error("--layers and --repeat must be >= 1")
    return args


def _stages(base: Path, adapter: Path, merged: Path, runs: Path) -> list[bm.Stage]:
    fc = bm._fourier_convert_cmd()

    def to_onnx(*source: str) -> Callable[[Path], list[str]]:
        return lambda out: [*fc, "to-onnx", *source, "--out", str(out), "--task", TASK, "--quiet", "--json",
                            str(runs / f"{out.name}.json")]  # fmt: skip

    return [
        bm.Stage("bare", lambda out: [sys.executable, str(Path(__file__).resolve()), "_bare", str(merged), str(out)]),
        bm.Stage("to-onnx --model", to_onnx("--model", str(merged))),
        bm.Stage("to-onnx", to_onnx("--base", str(base), "--adapter", str(adapter))),
    ]


def _out_name(stage: str) -> str:
    return stage.replace(" ", "").replace("-", "_")


def run(args: argparse.Namespace) -> int:
    work: Path = args.work.resolve()
    logs, runs = work / "logs", work / "onnx-runs"
    logs.mkdir(parents=True, exist_ok=True)
    bm._remove(runs)
    runs.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base, adapter, stamp = bm.ensure_checkpoint(work, args.layers, env, logs, "1b")
    weights = stamp["parameters"] * 4  # float32 bytes of the exported weights
    merged = runs / "merged-float32"
    prep = bm.measure(
        [*bm._fourier_convert_cmd(), "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(merged),
         "--dtype", "float32", "--quiet"],
        logs / "onnx-prepare-merge.log", env,
    )  # fmt: skip
    if prep.returncode != 0:
        raise SystemExit(f"preparing the float32 merged model failed; log: {prep.log}")
    print(
        f"Llama {args.layers} layers: {stamp['parameters'] / 1e9:.2f} B params, float32 weights "
        f"{weights / 1e9:.2f} GB; task {TASK}; host {socket.gethostname()}, {os.cpu_count()} CPUs, "
        f"torch {bm._version('torch')}, transformers {bm._version('transformers')}, onnxruntime "
        f"{bm._version('onnxruntime')}, onnxscript {bm._version('onnxscript')}; repeats {args.repeat}"
    )
    source = {"start": bm.source_state()}
    stages = _stages(base, adapter, merged, runs)
    ok = True
    for rep in range(args.repeat):
        for stage in stages:
            out = runs / _out_name(stage.name)
            bm._remove(out)
            os.sync()
            m = bm.measure(stage.make_cmd(out), logs / f"onnx-{_out_name(stage.name)}-{rep + 1}.log", env)
            print(
                f"  run {rep + 1}/{args.repeat} {stage.name:<16} {m.wall_s:8.2f} s  cpu {m.cpu_s:7.2f} s  "
                f"other cpu {bm._fmt(m.other_cpu_s, '6.2f')} s  {m.maxrss_mib:7.0f} MiB"
                + (f"  EXIT {m.returncode}" if m.returncode else ""),
                flush=True,
            )
            if m.returncode:
                ok, stage.failed = False, True
                for line in bm._log_lines(m.log):
                    print(f"    | {line}", file=sys.stderr)
            else:
                stage.runs.append(m)
            bm._remove(out)
            os.sync()
    source["end"] = bm.source_state()
    result = _evaluate(stages, weights, runs)
    _print(stages, result, weights)
    if source["end"]["package_sha256"] != source["start"]["package_sha256"]:
        print("WARNING: the fourier-convert package changed while the benchmark ran")
    if args.json is not None:
        doc = {
            "date": datetime.date.today().isoformat(),
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
            "layers": args.layers,
            "parameters": stamp["parameters"],
            "weights_float32_bytes": weights,
            "task": TASK,
            "repeat": args.repeat,
            "versions": {d: bm._version(d) for d in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")},
            "source": source,
            "prepare_merge_s": round(prep.wall_s, 2),
            "stages": {s.name: [vars(m) for m in s.runs] for s in stages},
            **result,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    bm._remove(runs)
    return 0 if ok else 1


def _evaluate(stages: list[bm.Stage], weights: int, runs: Path) -> dict[str, Any]:
    by = {s.name: s for s in stages}
    bare, full, model = (
        by["bare"].median("wall_s"),
        by["to-onnx"].median("wall_s"),
        by["to-onnx --model"].median("wall_s"),
    )
    ratios: dict[str, float] = {}
    if bare and full:
        ratios["to-onnx / bare"] = full / bare
    if bare and model:
        ratios["to-onnx --model / bare"] = model / bare
    # Per repeat, each stage against the bare export timed just before it: less exposed to the machine's drift.
    paired = {
        name: [m.wall_s / b.wall_s for m, b in zip(by[name].runs, by["bare"].runs, strict=False)]
        for name in ("to-onnx", "to-onnx --model")
    }
    cpu_ratio = (by["to-onnx"].median("cpu_s") or 0.0) / (by["bare"].median("cpu_s") or float("inf"))
    rss = {s.name: s.median("maxrss_mib") for s in stages}
    full_rss = rss.get("to-onnx")
    targets = [
        {
            "target": f"merge + proof + validation overhead <= {TARGET_OVERHEAD:.0%} of the bare export",
            "value": None if "to-onnx / bare" not in ratios else ratios["to-onnx / bare"] - 1,
            "passed": None if "to-onnx / bare" not in ratios else ratios["to-onnx / bare"] - 1 <= TARGET_OVERHEAD,
        },
        {
            "target": f"to-onnx peak RSS <= {TARGET_RSS_RATIO}x the exported float32 weights",
            "value": None if full_rss is None else full_rss * bm.MIB / weights,
            "passed": None if full_rss is None else full_rss * bm.MIB / weights <= TARGET_RSS_RATIO,
        },
    ]
    phases: dict[str, Any] = {}
    for name in ("to_onnx", "to_onnx__model"):
        path = runs / f"{name}.json"
        if path.exists():
            phases[name] = json.loads(path.read_text()).get("timings", {})
    return {
        "ratios": ratios,
        "paired_ratios": paired,
        "cpu_ratio": cpu_ratio,
        "peak_rss_mib": rss,
        "targets": targets,
        "phases": phases,
    }


def _print(stages: list[bm.Stage], result: dict[str, Any], weights: int) -> None:
    print(f"\n{'stage':<16} {'wall s':>8} {'cpu s':>8} {'peak RSS MiB':>13} {'RSS / weights':>14}")
    for s in stages:
        if not s.runs:
            print(f"{s.name:<16} {'FAILED':>8}")
            continue
        rss = s.median("maxrss_mib") or 0.0
        print(
            f"{s.name:<16} {s.median('wall_s') or 0:8.2f} {s.median('cpu_s') or 0:8.2f} {rss:13.0f} "
            f"{rss * bm.MIB / weights:14.2f}"
        )
    print("ratios (of medians): " + ", ".join(f"{k} = {v:.2f}x" for k, v in result["ratios"].items()))
    for name, values in result["paired_ratios"].items():
        print(f"{name} / bare of the same repeat: " + ", ".join(f"{v:.2f}x" for v in values))
    print(f"to-onnx / bare in CPU time (medians): {result['cpu_ratio']:.2f}x")
    for name, timings in result["phases"].items():
        print(f"{name} phases (last run): " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print("targets:")
    for t in result["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[t["passed"]]
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {verdict}  {t['target']}  ({value})")
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"notes: peak RSS is each child's ru_maxrss (wait4); this process's own peak is {floor:.0f} MiB. 'other cpu' "
        "is the CPU time every other process used during a stage."
    )
    shared = [
        f"{s.name} run {i + 1} ({m.other_cpu_s:.0f} s other CPU in {m.wall_s:.0f} s)"
        for s in stages
        for i, m in enumerate(s.runs)
        if m.other_cpu_s is not None and m.other_cpu_s > 0.25 * m.wall_s
    ]
    if shared:
        print("WARNING: the machine was shared while timing; those wall times are inflated: " + "; ".join(shared))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in WORKERS:
        return WORKERS[argv[0]](argv[1:])
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
