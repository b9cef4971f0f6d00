"""Run in vLLM's own environment by serving_check.py: greedy generation with full-vocabulary log-probabilities.

Usage: python vllm_worker.py JOB.json RESULT.json

JOB: {"mode": "offline" | "server", "model": folder, "lora": folder or null, "max_lora_rank": int,
"prompts": [[token ids]], "max_tokens": int, "vocab": int, "port": int}.
RESULT: {"ok": true, "outputs": [{"tokens": [...], "logprobs": [[vocab floats], ...]}], "seconds": {...}} or
{"ok": false, "error": "..."}.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from worker_io import serve_job


def dense(entries: dict[int, float], vocab: int) -> list[float]:
    """Log-probabilities over the whole vocabulary (tokens vLLM did not return get -inf)."""
    row = [-math.inf] * vocab
    for token, value in entries.items():
        row[token] = value
    return row


def offline(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    start = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if job["lora"]:
        kwargs.update(enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=1)
    llm = LLM(
        model=job["model"],
        dtype="float32",
        max_model_len=256,
        max_logprobs=job["vocab"],
        seed=0,
        enforce_eager=True,
        **kwargs,
    )
    loaded = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=job["vocab"], ignore_eos=True)
    request = LoRARequest("fourierft", 1, job["lora"]) if job["lora"] else None
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    results = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
    outputs = []
    for result in results:
        out = result.outputs[0]
        rows = [dense({t: lp.logprob for t, lp in step.items()}, job["vocab"]) for step in out.logprobs]
        outputs.append({"tokens": list(out.token_ids), "logprobs": rows})
    end = time.perf_counter()
    return {"ok": True, "outputs": outputs, "seconds": {"load": loaded - start, "generate": end - loaded}}


def server(job: dict[str, Any]) -> dict[str, Any]:
    port = job["port"]
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        job["model"],
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--max-logprobs",
        str(job["vocab"]),
        "--seed",
        "0",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    name = job["model"]
    if job["lora"]:
        name = "fourierft"
        cmd += [
            "--enable-lora",
            "--lora-modules",
            f"{name}={job['lora']}",
            "--max-lora-rank",
            str(job["max_lora_rank"]),
        ]
    start = time.perf_counter()
    log = open(job["log"], "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                return {"ok": False, "error": f"the server exited with {proc.returncode} (log: {job['log']})"}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.perf_counter() - start > 600:
                return {"ok": False, "error": f"the server did not answer within 600 s (log: {job['log']})"}
            time.sleep(1)
        loaded = time.perf_counter()
        outputs = []
        for ids in job["prompts"]:
            body = {
                "model": name,
                "prompt": ids,
                "max_tokens": job["max_tokens"],
                "temperature": 0,
                "logprobs": job["vocab"],
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
            }
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=300) as r:
                doc = json.loads(r.read())
            choice = doc["choices"][0]["logprobs"]
            tokens = [int(t.split(":", 1)[1]) for t in choice["tokens"]]
            rows = [
                dense({int(t.split(":", 1)[1]): v for t, v in top.items()}, job["vocab"])
                for top in choice["top_logprobs"]
            ]
            outputs.append({"tokens": tokens, "logprobs": rows})
        end = time.perf_counter()
        return {"ok": True, "outputs": outputs, "seconds": {"load": loaded - start, "generate": end - loaded}}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run(job: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return offline(job) if job["mode"] == "offline" else server(job)


def main() -> None:
    serve_job(run)


if __name__ == "__main__":
    main()
