#!/usr/bin/env python
"""Where a merge's time goes: each phase of ``fourier-convert merge`` timed on its own, on a checkpoint built by
``benchmarks/bench_merge.py`` (default: its 1.1B build under ``bench-work/``).

Phases, each measured in isolation (so they do not add up to the merge, which overlaps them):

- ``cli start``: ``fourier-convert --help`` (Python, click, the package without torch);
- ``import torch``: a fresh interpreter importing torch (the CUDA path pays it; the CPU merge does not);
- ``read``: reading every adapted base weight (page-cached);
- ``--device cpu`` (the numpy merge's steps, one thread, summed over the layers): the column pass, the rows'
  ``irfft``, widening + adding + rounding once to bf16, and finding the elements next to a midpoint;
- ``--device cuda`` (torch): rebuilding every delta in float64 (``delta_weights``), then adding and rounding;
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
from typing import Any

import numpy as np

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
    from fourier_convert.io.adapter import read_adapter
    from fourier_convert.io.checkpoint import open_checkpoint
    from fourier_convert.plan import plan_with_orientation

    plan = plan_with_orientation(open_checkpoint(base), [read_adapter(adapter)])
    merged = _numpy_phases(plan, rows) if args.device == "cpu" else _torch_phases(plan, rows)
    with tempfile.TemporaryDirectory(dir=REPO / "bench-work") as tmp:
        start = time.perf_counter()
        with open(Path(tmp) / "w.bin", "wb") as f:
            for t in merged:
                f.write(t.tobytes())
            f.flush()
            os.fdatasync(f.fileno())
        nbytes = sum(t.nbytes for t in merged)
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


def _numpy_phases(plan: Any, rows: list[tuple[str, float, str]]) -> list[np.ndarray]:
    """The CPU merge's steps for every layer, one thread, each step timed and summed over the layers."""
    from fourier_convert.io.safetensors_file import read_bytes
    from fourier_convert.maths.delta_numpy import column_pass, delta_rows
    from fourier_convert.maths.indices import spectral_positions
    from fourier_convert.maths.rounding_numpy import round_into, to_float64
    from fourier_convert.merging.cpu import BLOCK_ELEMENTS
    from fourier_convert.merging.ties import near_ties, tie_width

    start = time.perf_counter()
    bases = [np.frombuffer(read_bytes(layer.weight), dtype="<u2").reshape(layer.weight.shape) for layer in plan.layers]
    rows.append(("read adapted weights", time.perf_counter() - start, f"{len(bases)} tensors"))
    spent = dict.fromkeys(["column pass", "rows (irfft)", "add + round once", "near midpoints"], 0.0)
    merged = []
    for layer, base in zip(plan.layers, bases, strict=True):
        c = layer.contributions[0]
        m, n = base.shape
        rows_out, cols_in = layer.delta_shape
        idx = spectral_positions(rows_out, cols_in, c.spectrum.n, c.seed)
        t0 = time.perf_counter()
        cp = column_pass(c.spectrum.values, idx, (m, n), c.scaling)
        spent["column pass"] += time.perf_counter() - t0
        out = np.empty((m, n), dtype=np.uint16)
        width = tie_width([(c.spectrum.values, c.scaling)], (m, n))
        step = max(1, BLOCK_ELEMENTS // n)
        for a in range(0, m, step):
            t0 = time.perf_counter()
            d = delta_rows(cp, a, min(m, a + step))
            t1 = time.perf_counter()
            x = to_float64(base[a : a + step], "BF16")
            x += d
            round_into(x, out[a : a + step], "BF16")
            t2 = time.perf_counter()
            near_ties(x, width, "BF16")
            t3 = time.perf_counter()
            spent["rows (irfft)"] += t1 - t0
            spent["add + round once"] += t2 - t1
            spent["near midpoints"] += t3 - t2
        merged.append(out)
    rows += [(name, seconds, "numpy, 1 thread") for name, seconds in spent.items()]
    return merged


def _torch_phases(plan: Any, rows: list[tuple[str, float, str]]) -> list[np.ndarray]:
    """The torch (CUDA) path's steps: float64 deltas, then add and round once."""
    import torch

    from fourier_convert.io.safetensors_file import read_torch
    from fourier_convert.maths.delta import delta_weights
    from fourier_convert.maths.indices import spectral_indices
    from fourier_convert.maths.rounding import round_once

    dev = torch.device("cuda")
    start = time.perf_counter()
    bases = [read_torch(layer.weight).clone() for layer in plan.layers]
    rows.append(("read adapted weights", time.perf_counter() - start, f"{len(bases)} tensors"))
    torch.zeros(1, device=dev)
    torch.cuda.synchronize()
    start = time.perf_counter()
    deltas = []
    for layer in plan.layers:
        c = layer.contributions[0]
        m, n = layer.delta_shape
        idx = spectral_indices(m, n, c.spectrum.n, c.seed)
        values = torch.from_numpy(c.spectrum.values)
        deltas.append(delta_weights(values, idx, m, n, c.scaling, dtype=torch.float64, device=dev))
    torch.cuda.synchronize()
    rows.append(("delta (float64)", time.perf_counter() - start, "cuda"))
    start = time.perf_counter()
    merged = []
    for b, d in zip(bases, deltas, strict=True):
        d.add_(b.to(dev))
        merged.append(round_once(d, torch.bfloat16).cpu().view(torch.int16).numpy())
    torch.cuda.synchronize()
    rows.append(("add + round once", time.perf_counter() - start, "cuda"))
    return merged


if __name__ == "__main__":
    main()
