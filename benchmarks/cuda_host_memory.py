#!/usr/bin/env python
"""Where the CUDA merge's host memory goes: RSS after ``import torch``, after the CUDA context, and after the first
use of each kind of CUDA kernel the merge runs (on tiny tensors), then a whole CUDA merge of a test fixture.

CUDA loads kernels lazily, and each kind first used adds host memory (tens of MB for some); the merge's own data
adds only its pinned buffers. docs/benchmarks.md (session 7) has the figures from the H200 host.

Usage (from the repository root, on a machine with a CUDA GPU)::

    python benchmarks/cuda_host_memory.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> int:
    """This process's resident set, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def probe() -> list[tuple[str, int]]:
    """RSS after each step, in this process."""
    rows = [("start", rss_mib())]
    import torch

    from fourier_convert.maths.rounding import round_once

    rows.append(("import torch", rss_mib()))
    dev = torch.device("cuda")
    torch.zeros(1, device=dev)
    torch.cuda.synchronize()
    rows.append(("CUDA context", rss_mib()))

    def step(name: str, fn: Callable[[], object]) -> None:
        fn()
        torch.cuda.synchronize()
        rows.append((name, rss_mib()))

    x = torch.randn(64, 64, dtype=torch.float64, device=dev)
    i = torch.arange(64, device=dev)
    b = x.to(torch.bfloat16)
    c128 = torch.complex128
    step("irfft (complex128)", lambda: torch.fft.irfft(torch.zeros(2, 8, 33, dtype=c128, device=dev), n=64, dim=2))
    step("arange, cat, %", lambda: torch.cat([i, (-i) % 64]))
    step("polar", lambda: torch.polar(torch.full_like(x[0], 1.0), x[0]))
    step("gather", lambda: x[0][(i[:, None] * i[None, :]) % 64])
    ones = torch.ones(1, 8, 5, dtype=c128, device=dev)
    step("index_add_", lambda: torch.zeros(1, 8, 33, dtype=c128, device=dev).index_add_(2, i[:5] % 33, ones))
    step("sum, isfinite", lambda: bool(torch.isfinite(x.sum())))
    step("add (float64 + bf16)", lambda: x.clone().add_(b))
    step("round_once to bf16", lambda: round_once(x, torch.bfloat16))
    step("compare, nonzero", lambda: (b.view(torch.int16) != b.view(torch.int16)).reshape(-1).nonzero())
    step("index_put", lambda: b.view(-1).__setitem__(i, b.view(-1)[i]))
    step("linalg.vector_norm (not used)", lambda: torch.linalg.vector_norm(x))
    step("where, nextafter (not used)", lambda: torch.where(x > 0, torch.nextafter(x, x.new_zeros(())), x))
    return rows


def fixture_merge() -> int:
    """Peak RSS (MiB) of a process that merges the llama test fixture on the GPU."""
    code = (
        "import sys, fourier_convert as fc\n"
        "fc.merge(sys.argv[1] + '/base', sys.argv[1] + '/adapter', sys.argv[2], device='cuda')\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", code, str(REPO / "fixtures" / "llama"), str(Path(tmp) / "m")],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
    return int(out.stdout.split()[-1]) // 1024


def main() -> None:
    previous = 0
    print(f"{'step':<32} {'RSS MiB':>8} {'added':>6}")
    for name, rss in probe():
        print(f"{name:<32} {rss:>8} {rss - previous:>+6}")
        previous = rss
    print(f"\nCUDA merge of fixtures/llama, peak RSS: {fixture_merge()} MiB")


if __name__ == "__main__":
    main()
