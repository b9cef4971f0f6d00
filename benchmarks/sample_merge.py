#!/usr/bin/env python
"""Where a merge's main thread spends its wall time: one merge in this process, its stack sampled every 10 ms.

Prints the merge's own phase timings, the lines of fourier_convert the main thread was in most often (waiting
included: on the copies, for the GPU, in a read), peak RSS, and how long the interpreter then takes to exit.

Usage (from the repository root, on a checkpoint built by ``benchmarks/bench_merge.py``)::

    python benchmarks/sample_merge.py bench-work/llama-7b-32L --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Runs in a child process, so that its exit can be timed from outside.
CHILD = r"""
import collections, json, os, sys, threading, time
import fourier_convert as fc
base, adapter, out, device, threads = sys.argv[1:6]
main_id = threading.main_thread().ident
package = os.path.dirname(fc.__file__)
counts = collections.Counter()
done = threading.Event()

def sample():
    while not done.is_set():
        frame = sys._current_frames().get(main_id)
        ours = []
        while frame is not None and len(ours) < 3:
            code = frame.f_code
            if code.co_filename.startswith(package):
                ours.append(f"{os.path.relpath(code.co_filename, package)}:{code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        counts[" < ".join(ours) or "(outside fourier_convert)"] += 1
        done.wait(0.01)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
report = fc.merge(base, adapter, out, device=device, threads=int(threads) or None)
seconds = time.perf_counter() - start
done.set()
sampler.join()
peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({"seconds": seconds, "timings": report.timings, "peak_kib": int(peak),
                  "total": sum(counts.values()), "samples": counts.most_common(15)}))
print(time.time(), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a folder with base/ and adapter/ (bench_merge.py's build)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="--threads of the merge (default: its own)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / "bench-work") as tmp:
        cmd = [sys.executable, "-c", CHILD, str(args.model / "base"), str(args.model / "adapter"),
               str(Path(tmp) / "merged"), args.device, str(args.threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
        ended = time.time()
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-2])
    print(f"merge {result['seconds']:.2f} s in-process; peak RSS {result['peak_kib'] // 1024} MiB; "
          f"interpreter exit {ended - float(lines[-1]):.2f} s")  # fmt: skip
    print("phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in result["timings"].items()))
    total = result["total"] or 1
    print(f"\n{'share':>6}  main thread in (innermost first; {total} samples)")
    for where, n in result["samples"]:
        print(f"{n / total:>6.1%}  {where}")


if __name__ == "__main__":
    main()
