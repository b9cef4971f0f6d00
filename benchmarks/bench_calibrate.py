#!/usr/bin/env python
"""Benchmark ``to-lora --calibration`` (closed form + distillation) on a 1.1B-shaped Llama.

What it does, in one run:

1. Builds (or reuses, cached under ``--work``) the random bf16 TinyLlama-1.1B-shaped checkpoint and its PEFT
   FourierFT adapter (q_proj and v_proj of every layer, n_frequency 1000, scaling 150) with the builder of
   ``benchmarks/bench_merge.py`` (imported, not copied), and a calibration file of ``--samples`` x ``--length``
   random token ids (``input_ids`` in a safetensors file: random weights and random tokens are fine for speed,
   not for fidelity, which docs/fidelity.md measures on a real model).
2. Times, in this process, what a user would run instead (the plain exact-SVD ``fc.to_lora(rank=8)``) and the
   calibrated conversion ``fc.to_lora(rank=8, calibration=..., distill_steps=--steps)``, and prints the phases
   (data, model load, Gram matrices, closed form, distillation, held-out evaluation), the ratio of the two, the
   peak GPU memory (``torch.cuda.max_memory_allocated``) and the peak RSS.

Usage (from the repository root, on a GPU machine)::

    python benchmarks/bench_calibrate.py --device cuda --json bench-work/bench-calibrate.json
    python benchmarks/bench_calibrate.py --device cuda --shape 7b --layers 32 --steps 0   # 7B, closed form only
    python benchmarks/bench_calibrate.py --device cpu --layers 2 --samples 16 --length 64 --steps 5   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import SHAPES, ModelShape, write_adapter, write_base

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_inputs(work: Path, family: str, layers: int, samples: int, length: int, seed: int) -> tuple[Path, Path, Path]:
    """The base, the adapter and the calibration file (built once per shape / size, then reused)."""
    import torch
    from safetensors.torch import save_file

    shape = ModelShape(layers=layers, **SHAPES[family])
    root = work / f"calib-{family}-{layers}"
    base, adapter = root / "base", root / "adapter"
    if not (base / "config.json").exists():
        write_base(base, shape, seed)
    if not (adapter / "adapter_config.json").exists():
        write_adapter(adapter, base, shape, seed, 1000)
    calib = root / f"calib-{samples}x{length}.safetensors"
    if not calib.exists():
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, shape.vocab, (samples, length), generator=gen)
        save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(calib))
    return base, adapter, calib


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="model family (bench_merge's shapes)")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-early-stop", action="store_true", help="run every step (random weights rarely improve: time them all)"
    )
    p.add_argument("--work", type=Path, default=REPO_ROOT / "bench-work")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    base, adapter, calib = build_inputs(args.work, args.shape, args.layers, args.samples, args.length, args.seed)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s: {base}, {calib.name}", flush=True)

    import torch

    import fourier_convert as fc
    from fourier_convert.calibrate.pipeline import CalibrationOptions

    t0 = time.perf_counter()
    fc.to_lora(adapter, base=base, rank=args.rank)
    plain_s = time.perf_counter() - t0

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    options = CalibrationOptions(
        path=calib,
        max_length=args.length,
        distill_steps=args.steps,
        device=args.device,
        batch_size=args.batch_size,
        seed=args.seed,
        patience=args.steps + 1 if args.no_early_stop else 4,
    )
    t0 = time.perf_counter()
    lora, report = fc.to_lora(adapter, base=base, rank=args.rank, calibration=options, progress=sys.stderr.isatty())
    calibrated_s = time.perf_counter() - t0
    cal = report.calibration
    assert cal is not None
    peak_gpu = torch.cuda.max_memory_allocated() if cuda else 0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("\n".join(cal.lines()))
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "commit": _commit(),
        "shape": args.shape,
        "layers": args.layers,
        "samples": args.samples,
        "length": args.length,
        "steps_asked": args.steps,
        "steps_run": cal.distill.steps if cal.distill else 0,
        "batch_size": args.batch_size,
        "plain_to_lora_s": plain_s,
        "calibrated_to_lora_s": calibrated_s,
        "ratio": calibrated_s / plain_s,
        "phases_s": cal.seconds,
        "gram_bytes": cal.gram_bytes,
        "peak_gpu_bytes": peak_gpu,
        "peak_rss_bytes": peak_rss,
        "stages": [
            {"stage": s.stage, "agreement": s.agreement, "relative_error": s.relative_error} for s in cal.stages
        ],
    }
    print(
        f"plain to-lora {plain_s:.1f} s; calibrated (closed form + {result['steps_run']} distillation steps) "
        f"{calibrated_s:.1f} s = {calibrated_s / plain_s:.0f}x; phases: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in cal.seconds.items())
    )
    print(
        f"peak GPU memory {peak_gpu / 2**30:.2f} GiB; peak RSS {peak_rss / 2**30:.2f} GiB; "
        f"Gram matrices {cal.gram_bytes / 2**20:.0f} MiB"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    del lora
    return 0


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
