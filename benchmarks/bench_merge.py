#!/usr/bin/env python
"""Benchmark ``fourier-convert merge`` against ``cp -r`` and PEFT's ``merge_and_unload`` on a 1B-class Llama.

What it does, in one run:

1. Builds (once, cached under ``--work``) a random bf16 checkpoint with TinyLlama-1.1B's shapes (hidden 2048,
   intermediate 5632, 32 heads, 4 KV heads, vocab 32000, untied embeddings, ``--layers`` decoder layers),
   tensor by tensor with seeded generators (``--build-on cuda`` draws them on the GPU) and written shard by
   shard (~1 GB each) so the full model is never in memory, plus a PEFT FourierFT adapter for it (q_proj and
   v_proj, n_frequency 1000, scaling 150). Before the big build, the same writers produce a 2-layer toy version
   that is loaded for real with ``AutoModelForCausalLM`` and ``PeftModel.from_pretrained`` to prove the
   format; tensor names and shapes are also checked against ``LlamaForCausalLM`` built on the meta device.
2. Copies the base once, untimed, so that every timed stage starts from the same (warm) page cache.
3. Times each stage as a separate subprocess: wall time, CPU time and peak RSS from ``os.wait4`` (exact for
   the child and its reaped descendants), with a ``psutil`` poll of the process tree every 20 ms as a cross
   check. Stages: ``copy`` (``cp -r``), ``copy+sync`` (``cp -r`` then ``sync``, for reference: the merge
   fsyncs its output, ``cp`` does not), ``merge-cpu`` (and ``merge-cuda`` with ``--device cuda``; both check
   config.json against the weights on every run, as a first merge into a base does), ``known-cpu`` (a base
   whose check passed before and is remembered, as in a pipeline; warmed by one untimed merge) and
   ``peft-<device>`` (load, ``PeftModel.from_pretrained``, ``merge_and_unload``, ``save_pretrained``). Each
   output is deleted and ``sync`` run between stages. Also recorded: the CPU time all other processes used
   during each stage (from ``/proc/stat``; the machine may be shared) and a hash of the measured
   fourier-convert package, taken again at the end to catch code edited mid-run.
4. Prints medians over ``--repeat`` runs, the ratios and PASS/FAIL for the targets (merge <= 1.3x copy+sync,
   >= 3.5x faster than PEFT, peak RSS <= 1 GiB; with ``--device cuda``: merge-cpu <= 1.15x and merge-cuda
   <= 1.1x copy+sync, merge-cuda never slower than merge-cpu, >= 3x faster than PEFT on the GPU), and the
   CLI's own start (``fourier-convert --help``, median of 5); ``--verify`` compares fourier-convert's merged q_proj /
   v_proj of the first and last layer with PEFT's and with a float64 reference (PEFT's formula), in bf16
   ulps, and checks that a few untouched tensors are identical.

Usage (from the repository root)::

    python benchmarks/bench_merge.py --layers 22 --verify --json bench-work/bench-22.json
    python benchmarks/bench_merge.py --layers 44 --skip-peft

Measurement note: Linux carries a parent's peak RSS into a child's ``ru_maxrss`` at ``exec`` (even through
``vfork``), so this process imports nothing heavy; building, PEFT and verification run in subprocesses of
this script (``_build``, ``_peft``, ``_verify``). The parent's own peak is printed as the floor of every
RSS figure.

Exit status: 0 when every stage ran (targets are reported, not enforced), 1 when a stage or ``--verify``
failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK = REPO_ROOT / "bench-work"

#: Bump when the generated checkpoint or adapter changes, so cached copies are rebuilt.
FORMAT_VERSION = 1
SEED = 1234
SHARD_BYTES = 1_000_000_000
WEIGHT_STD = 0.02
N_FREQUENCY = 1000
SCALING = 150.0
RANDOM_LOC_SEED = 777
TARGET_MODULES = ("q_proj", "v_proj")
POLL_SECONDS = 0.02
MIB = 1024 * 1024

#: Wall time of merge over ``cp -r`` + ``sync`` (what a writer that fsyncs its output cannot beat): <= 1.3x on
#: the 2-core CPU machine (1.1B) with ``--device cpu``; on the GPU machine (7B) <= 1.15x for merge-cpu and <= 1.1x
#: for merge-cuda, and merge-cuda never slower than merge-cpu.
TARGET_SYNC_RATIO = 1.3
TARGET_SYNC_RATIO_GPU_HOST = {"merge-cpu": 1.15, "merge-cuda": 1.1}
TARGET_PEFT_SPEEDUP = 3.5  # PEFT wall time >= 3.5x merge (CPU machine)
TARGET_PEFT_SPEEDUP_CUDA = 3.0
TARGET_RSS_MIB = 1024.0  # merge peak RSS <= 1 GiB


# --------------------------------------------------------------------------------------------------------
# Model shape and generated files (used by the ``_build`` worker)
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """Shape of the generated Llama checkpoint (defaults: TinyLlama-1.1B)."""

    layers: int
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


#: Model families the benchmark can build (``--shape``); ``--layers`` sets the depth.
SHAPES: dict[str, dict[str, int]] = {
    "1b": {},  # TinyLlama-1.1B: hidden 2048, intermediate 5632, 32 heads, 4 KV heads
    "7b": {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32},  # Llama-2-7B
}

#: Shape of the toy checkpoint used to prove the file format with transformers + PEFT.
TOY_SHAPE = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256)


def llama_config(shape: ModelShape) -> LlamaConfig:
    """The ``LlamaConfig`` written as ``config.json`` (bf16, untied embeddings)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def expected_tensors(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of ``LlamaForCausalLM``'s state dict, in the order transformers saves them."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for n in range(shape.layers):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (shape.heads * shape.head_dim, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, shape.heads * shape.head_dim)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return out


def check_against_transformers(cfg: LlamaConfig, tensors: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Raise unless ``tensors`` matches ``LlamaForCausalLM(cfg)`` built on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wanted = dict(tensors)
    if actual != wanted:
        missing = sorted(set(actual) - set(wanted))[:5]
        extra = sorted(set(wanted) - set(actual))[:5]
        shapes = [k for k in wanted if k in actual and actual[k] != wanted[k]][:5]
        raise RuntimeError(f"tensor table differs from transformers: missing {missing}, extra {extra}, shape {shapes}")


def shard_groups(
    tensors: Sequence[tuple[str, tuple[int, ...]]], limit: int, itemsize: int = 2
) -> list[list[tuple[int, str, tuple[int, ...]]]]:
    """Split tensors (keeping their index) into consecutive groups of at most ``limit`` bytes each."""
    groups: list[list[tuple[int, str, tuple[int, ...]]]] = [[]]
    size = 0
    for idx, (name, shape) in enumerate(tensors):
        nbytes = itemsize * _numel(shape)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((idx, name, shape))
        size += nbytes
    return groups


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def init_tensor(name: str, shape: tuple[int, ...], index: int, seed: int, generator: str = "cpu") -> torch.Tensor:
    """Norm weights are ones; every other tensor is N(0, 0.02) in bf16 from its own seeded generator.

    ``generator="cuda"`` draws on the GPU (a 7B build in under a minute instead of ~3.5 on the CPU); its values
    differ from the CPU generator's, so the build cache records which one made it.
    """
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator(device=generator).manual_seed(seed * 1_000_003 + index)
    drawn = torch.empty(shape, dtype=torch.bfloat16, device=generator).normal_(0.0, WEIGHT_STD, generator=gen)
    return drawn.cpu()


def write_base(folder: Path, shape: ModelShape, seed: int, generator: str = "cpu") -> dict[str, Any]:
    """Write a sharded bf16 Llama checkpoint into ``folder``, one shard (<= ~1 GB) in memory at a time."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    cfg = llama_config(shape)
    tensors = expected_tensors(shape)
    check_against_transformers(cfg, tensors)
    folder.mkdir(parents=True)
    groups = shard_groups(tensors, SHARD_BYTES)
    weight_map: dict[str, str] = {}
    total_bytes = total_params = 0
    for k, group in enumerate(groups, start=1):
        filename = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: init_tensor(name, shp, idx, seed, generator) for idx, name, shp in group}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = filename
            total_params += t.numel()
            total_bytes += t.numel() * t.element_size()
        del shard
    index = {
        "metadata": {"total_parameters": total_params, "total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.save_pretrained(str(folder))
    generation = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)  # type: ignore[no-untyped-call]
    generation.save_pretrained(str(folder))
    return {"parameters": total_params, "bytes": total_bytes, "shards": len(groups)}


def write_adapter(folder: Path, base: Path, shape: ModelShape, seed: int, n_frequency: int) -> None:
    """Write a PEFT FourierFT adapter (q_proj, v_proj) as PEFT 0.21 saves it, with seeded random spectra."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": str(base),
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": False,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "n_frequency": n_frequency,
        "n_frequency_pattern": {},
        "peft_type": "FOURIERFT",
        "random_loc_seed": RANDOM_LOC_SEED,
        "revision": None,
        "scaling": SCALING,
        "target_modules": list(TARGET_MODULES),
        "task_type": "CAUSAL_LM",
    }
    version = _version("peft")
    if version is not None:
        config["peft_version"] = version
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    spectra: dict[str, torch.Tensor] = {}
    for n in range(shape.layers):
        for j, module in enumerate(TARGET_MODULES):
            gen = torch.Generator().manual_seed(seed * 7919 + 2 * n + j + 1)
            key = f"base_model.model.model.layers.{n}.self_attn.{module}.fourierft_spectrum"
            spectra[key] = torch.randn(n_frequency, generator=gen, dtype=torch.float32)
    save_file(spectra, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def check_format_with_peft(scratch: Path, seed: int) -> None:
    """Build the toy checkpoint + adapter with the same writers and load both with transformers and PEFT.

    Raises:
        RuntimeError: Missing / unexpected / mismatched base keys, or a loaded spectrum that differs from
            the file (PEFT only warns about missing adapter keys, so this compares every spectrum).
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, adapter = scratch / "base", scratch / "adapter"
    write_base(base, TOY_SHAPE, seed)
    write_adapter(adapter, base, TOY_SHAPE, seed, n_frequency=20)
    loaded: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16, output_loading_info=True)
    model, info = loaded
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"transformers did not load the toy base cleanly: {bad}")
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    wanted = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = {
        k.replace(".fourierft_spectrum.default", ".fourierft_spectrum"): v
        for k, v in peft_model.state_dict().items()
        if "fourierft_spectrum" in k
    }
    if set(loaded) != set(wanted):
        raise RuntimeError(f"PEFT spectra keys differ: {sorted(set(loaded) ^ set(wanted))[:4]}")
    for k, v in wanted.items():
        if not torch.equal(loaded[k].float().cpu(), v):
            raise RuntimeError(f"PEFT loaded {k} with values different from the file")


# --------------------------------------------------------------------------------------------------------
# Workers (subprocesses of this script)
# --------------------------------------------------------------------------------------------------------
def worker_build(argv: Sequence[str]) -> int:
    """``_build MODEL_DIR LAYERS SEED SHAPE GENERATOR``: toy format check, then ``base/``, ``adapter/`` and
    ``stamp.json``."""
    model_dir, layers, seed, family, generator = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    model_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=model_dir, prefix="toy-") as tmp:
        check_format_with_peft(Path(tmp), seed)
    print(f"toy format check with transformers + PEFT passed ({time.perf_counter() - t0:.1f} s)", flush=True)
    for name in ("base", "adapter", "stamp.json"):
        _remove(model_dir / name)
    shape = ModelShape(layers=layers, **SHAPES[family])
    base, adapter = model_dir / "base", model_dir / "adapter"
    t1 = time.perf_counter()
    summary = write_base(base, shape, seed, generator)
    write_adapter(adapter, base.resolve(), shape, seed, N_FREQUENCY)
    summary["build_seconds"] = round(time.perf_counter() - t1, 2)
    stamp = {**_stamp_key(layers, seed, family, generator), **summary}
    (model_dir / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
    print(json.dumps(stamp), flush=True)
    return 0


def worker_peft(argv: Sequence[str]) -> int:
    """``_peft BASE ADAPTER OUT DEVICE``: the path a PEFT user takes today to get a merged checkpoint."""
    base, adapter, out, device = argv
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    if device.startswith("cuda"):
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 0


def reference_delta(spectrum: torch.Tensor, shape: tuple[int, int], seed: int, scaling: float) -> torch.Tensor:
    """PEFT's FourierFT delta (``FourierFTLayer.get_delta_weight``), computed in float64.

    Same seeded ``randperm`` locations and ``ifft2(...).real * scaling``; float64 keeps it independent of
    float32 FFT backends (torch's MKL float32 ``ifft2`` is wrong for 2048x2048 on some setups).
    """
    import torch

    m, n = shape
    flat = torch.randperm(m * n, generator=torch.Generator().manual_seed(seed))[: spectrum.numel()]
    dense = torch.zeros(m, n, dtype=torch.float64)
    dense[flat // n, flat % n] = spectrum.double()
    delta: torch.Tensor = torch.fft.ifft2(dense).real * scaling
    return delta


def nearest_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 -> bfloat16 rounded once to nearest even, computed exactly on the float64 bits (normal range):
    the two neighbours by clearing the 45 low mantissa bits, the nearer one, ties to the even one."""
    import torch

    bits = x.view(torch.int64)
    lo_bits = bits & ~((1 << 45) - 1)
    lo, hi = lo_bits.view(torch.float64), (lo_bits + (1 << 45)).view(torch.float64)
    below, above = (x - lo).abs(), (hi - x).abs()
    even = ((lo_bits >> 45) & 1) == 0
    return torch.where((below < above) | ((below == above) & even), lo, hi).to(torch.bfloat16)


def bf16_ulps(x: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|x - ref|`` in bf16 ulps at the operands' scale ``max(|ref|, |base|)``.

    The spacing is 2^(e-8) for a scale in [2^(e-1), 2^e). Measuring at the operands' scale rather than at
    ``ref`` keeps cancellation (``base + delta`` near zero, where any float32 rounding of the delta shows as
    many tiny-value ulps) from dominating the figure.
    """
    import torch

    scale = torch.maximum(ref.double().abs(), base.double().abs())
    _, exponent = torch.frexp(scale)
    ulp = torch.pow(2.0, exponent.double() - 8).clamp_min(2.0**-133)
    return (x.double() - ref.double()).abs() / ulp


def worker_verify(argv: Sequence[str]) -> int:
    """``_verify MERGED PEFT_OUT BASE ADAPTER LAYERS``: print a JSON comparison of the targeted tensors.

    For q_proj / v_proj of the first and last layer, compares fourier-convert's output with PEFT's, and
    both with the float64 reference ``bf16(base + delta)``; checks a few untouched tensors are identical.
    """
    merged, peft_out, base, adapter = (Path(a) for a in argv[:4])
    layers = int(argv[4])
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    def locate(folder: Path) -> dict[str, Path]:
        where: dict[str, Path] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                where.update(dict.fromkeys(f.keys(), path))
        return where

    def load(where: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(str(where[name]), "pt") as f:
            tensor: torch.Tensor = f.get_tensor(name)
        return tensor

    config = json.loads((adapter / "adapter_config.json").read_text())
    spectra = load_file(str(adapter / "adapter_model.safetensors"))
    maps = {"merged": locate(merged), "peft": locate(peft_out), "base": locate(base)}
    rows = []
    for layer in sorted({0, layers - 1}):
        for module in TARGET_MODULES:
            name = f"model.layers.{layer}.self_attn.{module}.weight"
            fc, pe, w = (load(maps[k], name) for k in ("merged", "peft", "base"))
            spectrum = spectra[f"base_model.model.{name.removesuffix('.weight')}.fourierft_spectrum"]
            m, n = w.shape
            delta = reference_delta(spectrum, (m, n), config["random_loc_seed"], config["scaling"])
            ref = nearest_bf16(w.double() + delta)  # rounded once (torch's own cast rounds twice)
            rows.append(
                {
                    "tensor": name,
                    "numel": w.numel(),
                    "fc_vs_peft_max_abs": float((fc.double() - pe.double()).abs().max()),
                    "fc_vs_peft_differing": int((fc != pe).sum()),
                    "fc_vs_ref_max_ulp": float(bf16_ulps(fc, ref, w).max()),
                    "fc_vs_ref_differing": int((fc != ref).sum()),
                    "peft_vs_ref_max_ulp": float(bf16_ulps(pe, ref, w).max()),
                    "peft_vs_ref_differing": int((pe != ref).sum()),
                    "fc_changed_vs_base": float((fc != w).double().mean()),
                    "peft_changed_vs_base": float((pe != w).double().mean()),
                    "ref_changed_vs_base": float((ref != w).double().mean()),
                }
            )
    untouched = ["model.layers.0.mlp.down_proj.weight", "lm_head.weight", "model.embed_tokens.weight"]
    same = {
        name: bool(
            torch.equal(load(maps["merged"], name), load(maps["base"], name))
            and torch.equal(load(maps["peft"], name), load(maps["base"], name))
        )
        for name in untouched
    }
    print(json.dumps({"targets": rows, "untouched_identical": same}))
    return 0


WORKERS: dict[str, Callable[[Sequence[str]], int]] = {
    "_build": worker_build,
    "_peft": worker_peft,
    "_verify": worker_verify,
}


# --------------------------------------------------------------------------------------------------------
# Measuring subprocesses (parent side: stdlib + optional psutil only)
# --------------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """One timed subprocess."""

    wall_s: float
    cpu_s: float
    other_cpu_s: float | None
    maxrss_mib: float
    poll_peak_mib: float | None
    returncode: int
    log: str


def busy_cpu_seconds() -> float | None:
    """Machine-wide non-idle CPU seconds so far, from ``/proc/stat`` (None where it does not exist).

    The busy time of a stage minus its child's own CPU time is what every other process (and kernel
    writeback) used meanwhile: a direct measure of how much the machine was shared during the stage.
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class TreeRssPoller(threading.Thread):
    """Samples the summed RSS of a process and its descendants every ``interval`` seconds (needs psutil)."""

    def __init__(self, pid: int, interval: float = POLL_SECONDS) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.Error):  # exited between listing and reading
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._done.wait(self.interval)

    def stop(self) -> float:
        """Stop sampling; return the peak in MiB."""
        self._done.set()
        self.join()
        return self.peak / MIB


def have_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def measure(cmd: Sequence[str], log_path: Path, env: dict[str, str]) -> Measurement:
    """Run ``cmd`` with output to ``log_path``; time it and read its peak RSS with ``os.wait4``."""
    busy0 = busy_cpu_seconds()
    with log_path.open("wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        poller = TreeRssPoller(proc.pid) if have_psutil() else None
        if poller is not None:
            poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    busy1 = busy_cpu_seconds()
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return Measurement(
        wall_s=wall,
        cpu_s=cpu,
        other_cpu_s=None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - cpu),
        maxrss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        poll_peak_mib=poller.stop() if poller is not None else None,
        returncode=proc.returncode,
        log=str(log_path),
    )


# --------------------------------------------------------------------------------------------------------
# Benchmark driver
# --------------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """A timed stage: its name, the command writing to ``out`` and its measurements over repeats."""

    name: str
    make_cmd: Callable[[Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    runs: list[Measurement] = field(default_factory=list)
    failed: bool = False

    def median(self, attr: str) -> float | None:
        values = [getattr(m, attr) for m in self.runs if getattr(m, attr) is not None]
        return statistics.median(values) if values else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def source_state() -> dict[str, Any]:
    """Which fourier-convert code is measured: git HEAD, whether the tree is dirty, a hash of the package.

    Compared before and after the run, so that a package edited while the benchmark runs is reported.
    """
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("fourier_convert")  # locates the package without importing torch
    package = Path(spec.origin).parent if spec is not None and spec.origin else None
    digest = hashlib.sha256()
    if package is not None:
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())

    def git(*cmd: str) -> str | None:
        if package is None:
            return None
        proc = subprocess.run(["git", *cmd], cwd=package, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--", ".")
    return {
        "package": str(package),
        "package_sha256": digest.hexdigest()[:16] if package is not None else None,
        "git_head": git("rev-parse", "--short", "HEAD"),
        "package_dirty": None if status is None else bool(status),
    }


def _stamp_key(layers: int, seed: int, family: str, generator: str) -> dict[str, Any]:
    return {
        "generator": generator,
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "seed": seed,
        "n_frequency": N_FREQUENCY,
        "shape": family,
    }


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _self_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _fourier_convert_cmd() -> list[str]:
    local = Path(sys.executable).parent / "fourier-convert"
    if local.exists():
        return [str(local)]
    found = shutil.which("fourier-convert")
    return [found] if found else [sys.executable, "-m", "fourier_convert"]


def _log_lines(path: str, lines: int = 40) -> list[str]:
    text = Path(path).read_text(errors="replace").replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _warnings_in(path: str) -> list[str]:
    text = Path(path).read_text(errors="replace").replace("\r", "\n")
    seen: list[str] = []
    for line in text.splitlines():
        if "warn" in line.lower() and line.strip() not in seen:
            seen.append(line.strip())
    return seen


def ensure_checkpoint(
    work: Path, layers: int, env: dict[str, str], logs: Path, family: str = "1b", generator: str = "cpu"
) -> tuple[Path, Path, dict[str, Any]]:
    """Return ``(base, adapter, stamp)``, building them in a subprocess unless a matching cache exists
    (``generator``: where the random weights are drawn, ``cpu`` or ``cuda``)."""
    model_dir = work / f"llama-{family}-{layers}L"
    stamp_path = model_dir / "stamp.json"
    if stamp_path.exists():
        stamp = json.loads(stamp_path.read_text())
        if all(stamp.get(k) == v for k, v in _stamp_key(layers, SEED, family, generator).items()):
            print(f"reusing cached checkpoint {model_dir}")
            return model_dir / "base", model_dir / "adapter", stamp
    print(
        f"building checkpoint and adapter in {model_dir} (streamed, one shard in memory at a time) ...",
        flush=True,
    )
    m = measure(_self_cmd("_build", str(model_dir), str(layers), str(SEED), family, generator), logs / "build.log", env)
    if m.returncode != 0:
        print("\n".join(_log_lines(m.log)), file=sys.stderr)
        raise SystemExit(f"building the checkpoint failed (exit {m.returncode}); log: {m.log}")
    stamp = json.loads(stamp_path.read_text())
    stamp["build_wall_s"], stamp["build_maxrss_mib"] = round(m.wall_s, 2), round(m.maxrss_mib, 1)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"built in {m.wall_s:.1f} s, builder peak RSS {m.maxrss_mib:.0f} MiB; toy PEFT format check passed")
    return model_dir / "base", model_dir / "adapter", stamp


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--layers", type=int, default=22, help="decoder layers (22 ~ 2.2 GB, 44 ~ 4.3 GB; default 22)")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default="1b", help="1b: TinyLlama-1.1B widths; 7b: Llama-2-7B widths"
    )
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache and scratch folder (default bench-work/)")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda adds a merge-cuda stage and runs PEFT on the GPU (default cpu)",
    )
    p.add_argument(
        "--build-on",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the checkpoint's random weights are drawn (cuda: a 7B build in about a minute; other values)",
    )
    p.add_argument("--skip-peft", action="store_true", help="do not run the PEFT stage")
    p.add_argument("--repeat", type=int, default=1, help="timed repeats per stage; medians are reported")
    p.add_argument("--keep", action="store_true", help="keep the outputs of the last repeat under WORK/runs/")
    p.add_argument("--verify", action="store_true", help="compare merged q_proj/v_proj with PEFT's output")
    p.add_argument("--json", type=Path, default=None, help="write machine-readable results here")
    args = p.parse_args(argv)
    if args.layers < 1 or args.repeat < 1:
        p.error("--layers and --repeat must be >= 1")
    if args.verify and args.skip_peft:
        p.error("--verify compares with PEFT's output; drop --skip-peft")
    return args


def build_stages(base: Path, adapter: Path, args: argparse.Namespace) -> list[Stage]:
    fc = _fourier_convert_cmd()

    def merge_cmd(device: str) -> Callable[[Path], list[str]]:
        return lambda out: [
            *fc,
            "merge",
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--out",
            str(out),
            "--device",
            device,
            "--quiet",
        ]

    # merge-*: the config check runs every time (FOURIER_CONVERT_CACHE="" remembers nothing), as on the first merge
    # into a base; known-cpu: the check passed before (the pipeline case), its cache warmed by an untimed merge
    every_time = {"FOURIER_CONVERT_CACHE": ""}
    stages = [
        Stage("copy", lambda out: ["cp", "-r", str(base), str(out)]),
        Stage("copy+sync", lambda out: ["sh", "-c", 'cp -r "$0" "$1" && sync', str(base), str(out)]),
        Stage("merge-cpu", merge_cmd("cpu"), every_time),
        Stage("known-cpu", merge_cmd("cpu"), {"FOURIER_CONVERT_CACHE": str(args.work.resolve() / "fit-cache")}),
    ]
    if args.device == "cuda":
        stages.append(Stage("merge-cuda", merge_cmd("cuda"), every_time))
    if not args.skip_peft:
        stages.append(
            Stage(
                f"peft-{args.device}",
                lambda out: _self_cmd("_peft", str(base), str(adapter), str(out), args.device),
            )
        )
    return stages


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(stages: list[Stage], repeat: int) -> None:
    print(
        f"\n{'stage':<11} {'wall s':>8} {'min-max s':>13} {'cpu s':>7} {'other cpu s':>11} {'peak RSS MiB':>13} "
        f"{'poll MiB':>9}"
    )
    for s in stages:
        if not s.runs:
            print(f"{s.name:<11} {'FAILED':>8}")
            continue
        walls = [m.wall_s for m in s.runs]
        spread = f"{min(walls):.2f}-{max(walls):.2f}" if repeat > 1 else ""
        print(
            f"{s.name:<11} {s.median('wall_s'):>8.2f} {spread:>13} {_fmt(s.median('cpu_s'), '.2f'):>7} "
            f"{_fmt(s.median('other_cpu_s'), '.2f'):>11} "
            f"{_fmt(s.median('maxrss_mib'), '.0f'):>13} {_fmt(s.median('poll_peak_mib'), '.0f'):>9}"
            + ("  (some runs failed)" if s.failed else "")
        )


def evaluate(stages: list[Stage], device: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Ratios of medians and the PASS/FAIL/SKIP of every target."""
    by = {s.name: s for s in stages if s.runs}
    wall = {name: s.median("wall_s") or 0.0 for name, s in by.items()}
    ratios: dict[str, float] = {}
    targets: list[dict[str, Any]] = []
    peft = f"peft-{device}"
    for merge in (n for n in by if n.startswith("merge-")):
        gpu_host = device == "cuda" or os.path.exists("/dev/nvidiactl")  # the GPU machine's targets, CPU stage too
        sync_target = TARGET_SYNC_RATIO_GPU_HOST[merge] if gpu_host else TARGET_SYNC_RATIO
        peft_target = TARGET_PEFT_SPEEDUP_CUDA if merge == "merge-cuda" else TARGET_PEFT_SPEEDUP
        if "copy" in wall:
            ratios[f"{merge}/copy"] = wall[merge] / wall["copy"]
        if "copy+sync" in wall:
            ratios[f"{merge}/copy+sync"] = wall[merge] / wall["copy+sync"]
            targets.append(
                {
                    "target": f"{merge} wall <= {sync_target}x copy+sync",
                    "value": ratios[f"{merge}/copy+sync"],
                    "unit": "x",
                    "passed": ratios[f"{merge}/copy+sync"] <= sync_target,
                }
            )
        if merge == f"merge-{device}":
            if peft in wall:
                ratios[f"{peft}/{merge}"] = wall[peft] / wall[merge]
                targets.append(
                    {
                        "target": f"{merge} >= {peft_target}x faster than {peft}",
                        "value": ratios[f"{peft}/{merge}"],
                        "unit": "x",
                        "passed": ratios[f"{peft}/{merge}"] >= peft_target,
                    }
                )
            else:
                targets.append(
                    {
                        "target": f"{merge} >= {peft_target}x faster than PEFT",
                        "value": None,
                        "unit": "x",
                        "passed": None,
                    }
                )
        rss = by[merge].median("maxrss_mib") or 0.0
        targets.append(
            {
                "target": f"{merge} peak RSS <= {TARGET_RSS_MIB:.0f} MiB",
                "value": rss,
                "unit": "MiB",
                "passed": rss <= TARGET_RSS_MIB,
            }
        )
    if "known-cpu" in wall and "copy+sync" in wall:
        ratios["known-cpu/copy+sync"] = wall["known-cpu"] / wall["copy+sync"]
    if "merge-cuda" in wall and "merge-cpu" in wall:
        ratios["merge-cuda/merge-cpu"] = wall["merge-cuda"] / wall["merge-cpu"]
        targets.append(
            {
                "target": "merge-cuda never slower than merge-cpu",
                "value": ratios["merge-cuda/merge-cpu"],
                "unit": "x",
                "passed": ratios["merge-cuda/merge-cpu"] <= 1.0,
            }
        )
    return ratios, targets


def cli_start(adapter: Path) -> list[dict[str, Any]]:
    """The CLI's own start: median wall time of 5 runs of commands that need no tensors (target < 0.5 s)."""
    rows = []
    for label, extra in (("--help", ["--help"]), ("inspect ADAPTER", ["inspect", str(adapter)])):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run([*_fourier_convert_cmd(), *extra], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "target": f"fourier-convert {label} starts in < 0.5 s",
                "value": statistics.median(times),
                "unit": " s",
                "passed": statistics.median(times) < 0.5,
            }
        )
    return rows


def run_verify(
    runs: Path, base: Path, adapter: Path, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any] | None:
    """Compare the kept merge and PEFT outputs in a ``_verify`` subprocess; print and return the result.

    PASS needs every fourier-convert element to equal the reference (bf16 of base + float64 delta, rounded
    once to nearest even) and the untouched tensors identical; PEFT's own distance to the reference is reported
    alongside.
    """
    merged, peft_out = runs / f"merge-{args.device}", runs / f"peft-{args.device}"
    verify: dict[str, Any] | None = None
    if merged.exists() and peft_out.exists():
        cmd = _self_cmd("_verify", str(merged), str(peft_out), str(base), str(adapter), str(args.layers))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode == 0:
            verify = json.loads(proc.stdout.strip().splitlines()[-1])
            print("verify (bf16; ref = bf16(base + float64 FourierFT delta)):")
            print(
                f"  {'tensor':<40} {'fc-vs-peft max|d|':>17} {'differ':>8} {'fc-vs-ref ulp':>13} "
                f"{'differ':>7} {'peft-vs-ref ulp':>15} {'differ':>8}"
            )
            for r in verify["targets"]:
                print(
                    f"  {r['tensor']:<40} {r['fc_vs_peft_max_abs']:>17.3g} {r['fc_vs_peft_differing']:>8} "
                    f"{r['fc_vs_ref_max_ulp']:>13.2f} {r['fc_vs_ref_differing']:>7} "
                    f"{r['peft_vs_ref_max_ulp']:>15.2f} {r['peft_vs_ref_differing']:>8}"
                )
            print(f"  untouched tensors identical in both outputs: {all(verify['untouched_identical'].values())}")
            differing = sum(r["fc_vs_ref_differing"] for r in verify["targets"])
            verify["passed"] = differing == 0 and all(verify["untouched_identical"].values())
            print(
                f"  {'PASS' if verify['passed'] else 'FAIL'}  every fourier-convert element is the correctly rounded "
                f"reference ({differing} differ)"
            )
            peft_worst = max(r["peft_vs_ref_max_ulp"] for r in verify["targets"])
            if peft_worst > 1.0:
                print(f"  NOTE  PEFT's output is up to {peft_worst:.0f} ulp from the reference")
        else:
            print(f"verify failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
    else:
        print("verify skipped: an output to compare is missing (a stage failed)", file=sys.stderr)
    if not args.keep:
        _remove(merged)
        _remove(peft_out)
    return verify


def write_json(
    args: argparse.Namespace,
    stamp: dict[str, Any],
    source: dict[str, Any],
    warm: Measurement,
    floor: float,
    stages: list[Stage],
    warnings: dict[str, list[str]],
    ratios: dict[str, float],
    targets: list[dict[str, Any]],
    verify: dict[str, Any] | None,
) -> None:
    """Write the machine-readable results to ``args.json``."""
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "transformers", "peft", "safetensors", "fourier-convert")},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "checkpoint": stamp,
        "fourier_convert_source": source,
        "warmup_copy_s": warm.wall_s,
        "parent_maxrss_mib": floor,
        "stages": {
            s.name: {
                "median_wall_s": s.median("wall_s"),
                "median_cpu_s": s.median("cpu_s"),
                "median_other_cpu_s": s.median("other_cpu_s"),
                "median_maxrss_mib": s.median("maxrss_mib"),
                "median_poll_peak_mib": s.median("poll_peak_mib"),
                "failed": s.failed,
                "runs": [asdict(m) for m in s.runs],
                "warnings": warnings.get(s.name, []),
            }
            for s in stages
        },
        "ratios": ratios,
        "targets": targets,
        "verify": verify,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {args.json}")


def run_benchmark(args: argparse.Namespace) -> int:
    work: Path = args.work.resolve()
    logs, runs = work / "logs", work / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    _remove(runs)
    runs.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base, adapter, stamp = ensure_checkpoint(work, args.layers, env, logs, args.shape, args.build_on)
    stages = build_stages(base, adapter, args)
    gb = stamp["bytes"] / 1e9
    print(
        f"\nLlama {args.layers} layers: {stamp['parameters'] / 1e9:.2f} B params, {gb:.2f} GB bf16 in "
        f"{stamp['shards']} shards; adapter {'+'.join(TARGET_MODULES)}, n_frequency {N_FREQUENCY}"
    )
    print(
        f"host {socket.gethostname()}, {os.cpu_count()} CPUs, torch {_version('torch')}, "
        f"fourier-convert {_version('fourier-convert')}, peft {_version('peft')}, repeats {args.repeat}"
    )
    source = {"start": source_state()}
    start = source["start"]
    print(
        f"fourier-convert code: {start['package']} at {start['git_head']}"
        f"{' + uncommitted changes' if start['package_dirty'] else ''} (package hash {start['package_sha256']})"
    )

    # Untimed warm-up: reads the whole base once so that every timed stage finds it in the page cache.
    warm_out = runs / "warmup"
    warm = measure(["cp", "-r", str(base), str(warm_out)], logs / "warmup.log", env)
    _remove(warm_out)
    os.sync()
    print(
        f"page cache: untimed warm-up copy took {warm.wall_s:.2f} s; every timed stage reads a warm cache; "
        "each output is deleted and `sync` run before the next stage"
    )

    for stage in stages:
        if stage.name == "known-cpu":  # untimed: the config check passes once and is remembered
            _remove(runs / "warmup")
            measure(stage.make_cmd(runs / "warmup"), logs / "known-warmup.log", {**env, **stage.env})
            _remove(runs / "warmup")
            os.sync()

    ok = True
    for rep in range(args.repeat):
        last = rep == args.repeat - 1
        for stage in stages:
            out = runs / stage.name
            _remove(out)
            os.sync()
            m = measure(stage.make_cmd(out), logs / f"{stage.name}-{rep + 1}.log", {**env, **stage.env})
            print(
                f"  run {rep + 1}/{args.repeat} {stage.name:<11} {m.wall_s:7.2f} s  cpu {m.cpu_s:6.2f} s  "
                f"other cpu {_fmt(m.other_cpu_s, '6.2f')} s  {m.maxrss_mib:6.0f} MiB"
                + (f"  EXIT {m.returncode}" if m.returncode else ""),
                flush=True,
            )
            if m.returncode != 0:
                ok, stage.failed = False, True
                print(f"  {stage.name} failed (exit {m.returncode}); its output, verbatim:", file=sys.stderr)
                for line in _log_lines(m.log):
                    print(f"    | {line}", file=sys.stderr)
            else:
                stage.runs.append(m)
            keep = last and (args.keep or (args.verify and stage.name.startswith(("merge-", "peft-"))))
            if not keep:
                _remove(out)
            os.sync()

    print_table(stages, args.repeat)
    ratios, targets = evaluate(stages, args.device)
    targets += cli_start(adapter)
    print("ratios (of medians): " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    print("targets:")
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[t["passed"]]
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        print(f"  {verdict}  {t['target']}  ({value})")
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"notes: peak RSS is the child's ru_maxrss (wait4); it cannot be below this process's own peak "
        f"({floor:.0f} MiB). 'poll' sums the process tree's RSS every {POLL_SECONDS * 1000:.0f} ms. "
        "merge fsyncs its output, cp does not: compare with copy+sync too. 'other cpu' is the CPU time every "
        "other process (and kernel writeback) used during the stage."
    )
    shared = [
        f"{s.name} run {i + 1} ({m.other_cpu_s:.0f} s other CPU in {m.wall_s:.0f} s)"
        for s in stages
        for i, m in enumerate(s.runs)
        # copy+sync is exempt: sync(2) hands the writeback to kernel flusher threads, which count as other.
        if s.name != "copy+sync" and m.other_cpu_s is not None and m.other_cpu_s > 0.25 * m.wall_s
    ]
    if shared:
        print("WARNING: the machine was shared while timing; wall times are inflated: " + "; ".join(shared))
    warnings = {s.name: _warnings_in(m.log) for s in stages for m in s.runs[-1:]}
    for name, lines in warnings.items():
        for line in lines[:5]:
            print(f"  {name} warning: {line[:200]}")

    verify: dict[str, Any] | None = None
    if args.verify:
        verify = run_verify(runs, base, adapter, args, env)
        ok = ok and bool(verify and verify["passed"])
    source["end"] = source_state()
    if source["end"]["package_sha256"] != start["package_sha256"]:
        print(
            "WARNING: the fourier-convert package changed while the benchmark ran "
            f"({start['package_sha256']} -> {source['end']['package_sha256']}); repeats measured different code"
        )
    if args.json is not None:
        write_json(args, stamp, source, warm, floor, stages, warnings, ratios, targets, verify)
    if not args.keep:
        _remove(runs)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, or one of the internal workers when the first argument names it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in WORKERS:
        return WORKERS[argv[0]](argv[1:])
    return run_benchmark(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
