"""Run in llama-cpp-python's environment by serving_check.py: greedy generation with full logits.

Usage: python llama_worker.py JOB.json RESULT.json

JOB: {"model": GGUF file, "lora": GGUF LoRA file or null, "prompts": [[token ids]], "max_tokens": int,
"kv_cache": "f32" | "f16"}.
RESULT: {"ok": true, "outputs": [{"tokens": [...], "logits": [[vocab floats], ...]}], "seconds": {...}} or
{"ok": false, "error": "..."}.
"""

from __future__ import annotations

import time
from typing import Any

from worker_io import serve_job

GGML_TYPE = {"f32": 0, "f16": 1}


def run(job: dict[str, Any]) -> dict[str, Any]:
    from llama_cpp import Llama

    start = time.perf_counter()
    kwargs: dict[str, Any] = {"lora_path": job["lora"]} if job["lora"] else {}
    llm = Llama(
        model_path=job["model"],
        n_ctx=256,
        n_batch=256,
        n_threads=2,
        logits_all=True,
        type_k=GGML_TYPE[job["kv_cache"]],
        type_v=GGML_TYPE[job["kv_cache"]],
        seed=0,
        verbose=False,
        **kwargs,
    )
    loaded = time.perf_counter()
    outputs = []
    for ids in job["prompts"]:
        llm.reset()
        llm.eval(ids)
        tokens: list[int] = []
        rows: list[list[float]] = []
        for _ in range(job["max_tokens"]):
            logits = [float(x) for x in llm.scores[llm.n_tokens - 1]]
            token = max(range(len(logits)), key=logits.__getitem__)
            rows.append(logits)
            tokens.append(token)
            llm.eval([token])
        outputs.append({"tokens": tokens, "logits": rows})
    end = time.perf_counter()
    return {"ok": True, "outputs": outputs, "seconds": {"load": loaded - start, "generate": end - loaded}}


def main() -> None:
    serve_job(run)


if __name__ == "__main__":
    main()
