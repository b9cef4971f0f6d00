"""``to-lora``: approximate a FourierFT adapter by a PEFT LoRA adapter through its exact spectral SVD.

Each adapted layer's delta ``dW`` (out x in) is decomposed from its coefficients
(:mod:`fourier_convert.maths.svd`, never the dense matrix), truncated to the chosen rank ``r`` (the
Eckart-Young optimum), and written as ``lora_B = U_r diag(sigma_r)`` (out x r) and ``lora_A = V_r^T``
(r x in) with ``lora_alpha = r``: PEFT's scale ``alpha / r`` is 1 and ``lora_B @ lora_A`` is the truncated
delta. Only shapes and module types are read from the base (headers and config.json), never its weights.
Trained biases and ``modules_to_save`` heads are carried (bias ``fourier_only`` -> LoRA ``lora_only``,
``all`` -> ``all``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fourier_convert.errors import UsageError
from fourier_convert.io.adapter import KEY_PREFIX, read_adapter
from fourier_convert.io.checkpoint import open_checkpoint
from fourier_convert.io.dtypes import st_dtype
from fourier_convert.io.writer import (
    CheckpointWriter,
    TensorSpec,
    layout_shards,
    refuse_input_as_output,
)
from fourier_convert.maths.indices import IndexCache
from fourier_convert.maths.svd import SpectralSVD, spectral_svd
from fourier_convert.plan import plan_with_orientation

#: A layer keeping less of its delta's energy than this is called out in the report.
LOW_ENERGY = 0.5
WEIGHTS_NAME = "adapter_model.safetensors"
_BIAS = {"none": "none", "fourier_only": "lora_only", "all": "all"}


@dataclass
class LoraLayerReport:
    """One layer of a to-lora conversion.

    Attributes:
        module: Module path.
        shape: ``(out, in)`` of the delta.
        rank: LoRA rank written.
        exact_rank: Rank of the FourierFT delta (number of non-zero singular values).
        energy: ``||dW||_F^2``.
        retained_energy: ``sum(kept sigma^2) / sum(sigma^2)``.
        relative_error: ``||dW - B A||_F / ||dW||_F``.
        largest_dropped: Largest singular value not kept (0 when nothing was dropped).
    """

    module: str
    shape: tuple[int, int]
    rank: int
    exact_rank: int
    energy: float
    retained_energy: float
    relative_error: float
    largest_dropped: float


@dataclass
class LoraReport:
    """The result of :func:`to_lora`.

    Attributes:
        adapter: The FourierFT adapter, as given.
        layers: Per-layer results.
        parameters: LoRA parameters written (A and B of every layer).
        warnings: Layers that keep little energy, and other things to know.
    """

    adapter: str
    layers: list[LoraLayerReport]
    parameters: int
    warnings: list[str] = field(default_factory=list)

    @property
    def retained_energy(self) -> float:
        """Share of the total delta energy (all layers) the LoRA keeps."""
        total = sum(x.energy for x in self.layers)
        return sum(x.energy * x.retained_energy for x in self.layers) / total if total > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with the total retained energy)."""
        return {**asdict(self), "retained_energy": self.retained_energy}

    def table(self) -> str:
        """The per-layer table the CLI prints, with a total line."""
        head = f"{'module':<52} {'out x in':>11} {'rank':>5} {'exact':>6} {'energy':>8} {'rel.err':>8} {'dropped':>9}"
        rows = [head]
        for x in self.layers:
            shape = f"{x.shape[0]}x{x.shape[1]}"
            rows.append(
                f"{x.module:<52} {shape:>11} {x.rank:>5} {x.exact_rank:>6} {x.retained_energy:>8.2%} "
                f"{x.relative_error:>8.4f} {x.largest_dropped:>9.3g}"
            )
        rows.append(
            f"total: {len(self.layers)} layers, {self.parameters:,} LoRA parameters, "
            f"{self.retained_energy:.2%} of the delta energy kept"
        )
        return "\n".join(rows)


@dataclass
class LoraAdapter:
    """A converted LoRA adapter held in memory (small: factors, biases and heads only).

    Attributes:
        config: ``adapter_config.json`` contents.
        tensors: Tensor key -> tensor, keys as PEFT saves them (``base_model.model.`` prefix).
        sources: The input folders (FourierFT adapter, base): :meth:`save` never writes over them.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    sources: list[Path] = field(default_factory=list)

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` atomically.

        Raises:
            OutputError: ``out`` exists and is not empty (without ``overwrite``), or cannot be written.
            UsageError: ``out`` is, contains, or lies inside an input folder.

        Example:
            >>> lora, report = to_lora("fixtures/llama/adapter", base="fixtures/llama/base", rank=8)  # doctest: +SKIP
            >>> lora.save("llama-lora")  # doctest: +SKIP
        """
        target = Path(out)
        refuse_input_as_output(target, self.sources)
        specs = [TensorSpec(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in self.tensors.items()]
        layouts = layout_shards([specs], names=[WEIGHTS_NAME])
        with CheckpointWriter(target, overwrite=overwrite) as writer:
            writer.begin(layouts)
            for key, value in self.tensors.items():
                flat = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                writer.write_tensor(WEIGHTS_NAME, key, memoryview(flat.data))
            writer.write_file("adapter_config.json", (json.dumps(self.config, indent=2) + "\n").encode())
            writer.commit()
        return target


def choose_rank(svd: SpectralSVD, rank: float, max_rank: int | None) -> int:
    """Rank for one layer: an int is a fixed rank, a float in (0, 1] the smallest rank keeping that
    share of the energy; both capped by ``max_rank`` and by the exact rank.

    Example:
        >>> import numpy as np
        >>> s = SpectralSVD((4, 4), np.array([3.0, 2.0, 1.0]), [], [])
        >>> choose_rank(s, 0.9, None), choose_rank(s, 2, None), choose_rank(s, 0.9, 1)
        (2, 2, 1)
    """
    exact = len(svd.values)
    if isinstance(rank, bool) or rank <= 0:
        raise UsageError("--rank", f"{rank!r} is not a positive rank or energy share", "use e.g. 8 or 0.9")
    if isinstance(rank, int):
        r = rank
    else:
        if rank > 1.0:
            raise UsageError("--rank", f"{rank} is neither an integer rank nor a share in (0, 1]", "use e.g. 8 or 0.9")
        cum = np.cumsum(svd.values**2)
        r = int(np.searchsorted(cum, rank * cum[-1] * (1 - 1e-12)) + 1) if exact else 0
    if max_rank is not None:
        r = min(r, max_rank)
    return max(0, min(r, exact))


def to_lora(
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    rank: float = 8,
    max_rank: int | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
) -> tuple[LoraAdapter, LoraReport]:
    """Convert a FourierFT adapter to a PEFT LoRA adapter with the best rank-r approximation per layer.

    Args:
        adapter: FourierFT adapter folder, ``PATH:NAME`` or hub id.
        base: Base model (only headers and config are read); default: the adapter's
            ``base_model_name_or_path``.
        rank: An int (fixed rank) or a float in (0, 1] (per-layer energy share).
        max_rank: Cap on every layer's rank.
        subfolder: Named adapter inside the folder.
        allow_pickle: Accept ``adapter_model.bin``.

    Returns:
        The LoRA adapter (call ``.save(path)``) and the report.

    Raises:
        FourierConvertError: Invalid adapter or base, bad rank.

    Example:
        >>> lora, report = to_lora("fixtures/gpt2/adapter", base="fixtures/gpt2/base", rank=8)  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    if max_rank is not None and max_rank < 1:
        raise UsageError("--max-rank", f"{max_rank} is not a positive rank", "use e.g. 16")
    fourier = read_adapter(adapter, subfolder=subfolder, allow_pickle=allow_pickle)
    base_spec = base if base is not None else fourier.settings.base_model_name_or_path
    if not base_spec:
        raise UsageError("--base", "not given and the adapter names no base_model_name_or_path", "pass --base")
    ckpt = open_checkpoint(base_spec)
    plan = plan_with_orientation(ckpt, [fourier])

    cache = IndexCache()
    tensors: dict[str, torch.Tensor] = {}
    layers: list[LoraLayerReport] = []
    ranks: dict[str, int] = {}
    warnings = list(plan.warnings)
    for layer in plan.layers:
        c = layer.contributions[0]
        m, n = layer.delta_shape
        idx = cache.get(m, n, c.seed, c.spectrum.n).numpy()
        svd = spectral_svd(c.spectrum.values, idx, (m, n), c.scaling)
        r = choose_rank(svd, rank, max_rank)
        u, v = svd.vectors(r)
        energy = svd.energy
        kept = float(np.sum(svd.values[:r] ** 2))
        retained = kept / energy if energy > 0 else 1.0
        r_out = max(r, 1)  # PEFT needs r >= 1: a zero delta becomes a rank-1 zero LoRA
        b = np.zeros((m, r_out))
        a = np.zeros((r_out, n))
        b[:, :r] = u * svd.values[:r]
        a[:r] = v.T
        key = f"{KEY_PREFIX}{layer.module}"
        tensors[f"{key}.lora_A.weight"] = torch.from_numpy(a).float()
        tensors[f"{key}.lora_B.weight"] = torch.from_numpy(b).float()
        ranks[layer.module] = r_out
        layers.append(
            LoraLayerReport(
                module=layer.module,
                shape=(m, n),
                rank=r,
                exact_rank=len(svd.values),
                energy=energy,
                retained_energy=retained,
                relative_error=float(np.sqrt(max(0.0, 1.0 - retained))),
                largest_dropped=float(svd.values[r]) if r < len(svd.values) else 0.0,
            )
        )
        if retained < LOW_ENERGY:
            warnings.append(f"{layer.module}: rank {r} keeps only {retained:.1%} of the delta's energy")
    for clean, t in fourier.biases.items():
        module = clean[: -len(".bias")]
        key = f"{KEY_PREFIX}{module}.base_layer.bias" if module in fourier.spectra else f"{KEY_PREFIX}{clean}"
        tensors[key] = t.load()
    for clean, t in fourier.head_tensors.items():
        tensors[f"{KEY_PREFIX}{clean}"] = t.load()

    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {k: r for k, r in ranks.items() if r != common}
    s = fourier.settings
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": s.task_type,
        "base_model_name_or_path": s.base_model_name_or_path,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": _BIAS[s.bias],
        "fan_in_fan_out": any(layer.conv1d for layer in plan.layers),
        "modules_to_save": s.modules_to_save or None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    params = sum(int(t.numel()) for k, t in tensors.items() if ".lora_" in k)
    total = sum(x.energy for x in layers)
    if layers and total > 0 and sum(x.energy * x.retained_energy for x in layers) / total < LOW_ENERGY:
        warnings.insert(
            0,
            "the LoRA keeps less than half of the adapter's delta energy: a FourierFT delta spreads its energy over "
            "up to 2n singular values, so a low-rank LoRA keeps only the ~r/2 largest coefficients (docs/maths.md)",
        )
    return LoraAdapter(config, tensors, [fourier.folder, ckpt.folder]), LoraReport(
        str(adapter), layers, params, warnings
    )
