"""What both serving workers share: read the job, run it, write the result (an error is a result too).

Imported by path (the workers run in the stacks' own environments, where fourier-convert is not installed;
Python puts the script's folder first on ``sys.path``).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any


def serve_job(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """``python WORKER.py JOB.json RESULT.json``: run ``run(job)`` and write its result, or the error."""
    with open(sys.argv[1]) as f:
        job = json.loads(f.read())
    try:
        result = run(job)
    except Exception as exc:  # reported to serving_check.py, which prints the table
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
