#!/usr/bin/env python
"""Where a merge's time goes: each phase of ``fourier-convert merge`` timed on its own, on a checkpoint built by
``benchmarks/bench_merge.py`` (default: its 1.1B build under ``bench-work/``).

Phases, each measured in isolation (so they do not add up to the merge, which overlaps them):

- ``cli start``: ``fourier-convert --help`` (Python, click, the package without torch);
- ``import torch``: a fresh interpreter importing torch;
- ``read``: reading every adapted base weight (page-cached) into a tensor;
- ``delta``: rebuilding every delta in float64 (``delta_weights``), with the merge's thread count;
- ``add + round``: widening each base weight to float64, adding its delta, rounding once to bf16;
- ``write``: writing the merged tensors' bytes to a file and ``fdatasync``;
- ``merge``: the real command, wall time, and the phase timings its own report gives.

Usage (from the repository root)::

    python benchmarks/profile_merge.py                                   # bench-work/llama-1b-22L, CPU
    python benchmarks/profile_merge.py --model bench-work/llama-7b-32L --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "bench-work" / "llama-1b-22L")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    base, adapter = args.model / "base", args.model / "adapter"
    if not base.is_dir():
        raise SystemExit(f"{base} does not exist: build it with benchmarks/bench_merge.py first")
    cli = [sys.executable, "-m", "fourier_convert"]
    rows: list[tuple[str, float, str]] = []
    rows.append(("cli start (--help)", min(wall([*cli, "--help"]) for _ in range(3)), ""))
    rows.append(("import torch", min(wall([sys.executable, "-c", "import torch"]) for _ in range(3)), ""))

    from fourier_convert.cli.main import _keep_freed_memory

    _keep_freed_memory()  # the allocator setting the CLI uses, so the phases run as they do in a merge
    import torch

    from fourier_convert.io.adapter import read_adapter
    from fourier_convert.io.checkpoint import open_checkpoint
    from fourier_convert.io.safetensors_file import read_torch
    from fourier_convert.maths.delta import delta_weights
    from fourier_convert.maths.indices import spectral_indices
    from fourier_convert.maths.rounding import round_once
    from fourier_convert.merging.core import torch_threads
    from fourier_convert.plan import plan_with_orientation

    fourier = read_adapter(adapter)
    plan = plan_with_orientation(open_checkpoint(base), [fourier])
    dev = torch.device(args.device)
    with torch_threads(None):
        threads = torch.get_num_threads()
        start = time.perf_counter()
        bases = [read_torch(layer.weight).clone() for layer in plan.layers]
        rows.append(("read adapted weights", time.perf_counter() - start, f"{len(bases)} tensors"))
        indices = {}
        for layer in plan.layers:
            c = layer.contributions[0]
            key = (*layer.delta_shape, c.seed, c.spectrum.n)
            if key not in indices:
                indices[key] = spectral_indices(*key[:2], key[3], key[2])
        deltas = []
        if dev.type == "cuda":
            torch.zeros(1, device=dev)
            torch.cuda.synchronize()
        start = time.perf_counter()
        for layer in plan.layers:
            c = layer.contributions[0]
            idx = indices[(*layer.delta_shape, c.seed, c.spectrum.n)]
            values = torch.from_numpy(c.spectrum.values)
            deltas.append(delta_weights(values, idx, *layer.delta_shape, c.scaling, dtype=torch.float64, device=dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rows.append(("delta (float64)", time.perf_counter() - start, f"{threads} threads, {args.device}"))
        start = time.perf_counter()
        merged = []
        for b, d in zip(bases, deltas, strict=True):
            d.add_(b.to(dev))
            merged.append(round_once(d, torch.bfloat16).cpu())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rows.append(("add + round once", time.perf_counter() - start, ""))
        del deltas
    with tempfile.TemporaryDirectory(dir=REPO / "bench-work") as tmp:
        start = time.perf_counter()
        with open(Path(tmp) / "w.bin", "wb") as f:
            for t in merged:
                f.write(t.view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fdatasync(f.fileno())
        nbytes = sum(t.numel() * 2 for t in merged)
        rows.append(("write + fdatasync merged", time.perf_counter() - start, f"{nbytes / 1e6:.0f} MB"))
        subprocess.run(["sync"], check=True)
        out = Path(tmp) / "merged"
        report = Path(tmp) / "r.json"
        start = time.perf_counter()
        subprocess.run([*cli, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device",
                        args.device, "-q", "--json", str(report)], check=True, cwd=REPO)  # fmt: skip
        total = time.perf_counter() - start
        timings = json.loads(report.read_text())["timings"]
        detail = ", ".join(f"{k} {v:.2f}" for k, v in timings.items())
        rows.append(("merge (the command)", total, detail))
    print(f"{'phase':<28} {'seconds':>8}  note")
    for name, seconds, note in rows:
        print(f"{name:<28} {seconds:>8.2f}  {note}")


if __name__ == "__main__":
    main()
