"""``to-lora``: approximate a FourierFT adapter by a PEFT LoRA adapter through its exact spectral SVD.

Each adapted layer's delta ``dW`` (out x in) is decomposed from its coefficients
(:mod:`fourier_convert.maths.svd`, never the dense matrix), truncated to the chosen rank ``r`` (the
Eckart-Young optimum), and written as ``lora_B = U_r diag(sigma_r)`` (out x r) and ``lora_A = V_r^T``
(r x in) with ``lora_alpha = r``: PEFT's scale ``alpha / r`` is 1 and ``lora_B @ lora_A`` is the truncated
delta. Only shapes and module types are read from the base (headers and config.json), never its weights.

Ranks: fixed, per-layer energy share, or a parameter budget (:mod:`fourier_convert.maths.ranks`); every layer
keeps its own rank (``rank_pattern``) unless ``uniform_rank`` pads all to one. Targets:

- ``peft``: ``rank_pattern`` / ``alpha_pattern`` (scale 1 on every layer); trained biases and
  ``modules_to_save`` heads carried (bias ``fourier_only`` -> LoRA ``lora_only``, ``all`` -> ``all``).
- ``vllm``: the same patterns, which vLLM reads; only ``lora_A`` / ``lora_B``; the report names the
  ``--max-lora-rank`` to serve it with (the smallest value vLLM allows at or above the largest rank).
- ``llama.cpp``: one ``lora_alpha`` (llama.cpp scales each tensor by ``alpha / its rank`` and ignores
  patterns), so each layer's ``alpha / r`` is folded into its ``lora_B``; only ``lora_A`` / ``lora_B``; the
  folder also holds the GGUF LoRA file (:mod:`fourier_convert.io.gguf_lora`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fourier_convert.calibrate.pipeline import CalibrationOptions, CalibrationReport, CalibrationSession, open_session
from fourier_convert.errors import AdapterError, UsageError, printable
from fourier_convert.io.adapter import (
    KEY_PREFIX,
    TASK_HEADS,
    FourierFTAdapter,
    extra_tensor_keys,
    listed_modules,
    read_adapter,
)
from fourier_convert.io.adapter_writer import AdapterFiles
from fourier_convert.io.checkpoint import open_adapter_base
from fourier_convert.io.gguf_lora import GGUFLoraLayout, gguf_layout
from fourier_convert.io.progress import StepProgress, phase
from fourier_convert.io.safetensors_file import float_norm
from fourier_convert.maths.delta import delta_sq_norm
from fourier_convert.maths.indices import IndexCache
from fourier_convert.maths.ranks import VLLM_RANKS, allocate_budget, choose_rank
from fourier_convert.maths.svd import SpectralSVD, spectral_svd
from fourier_convert.merging.specs import large_delta_warnings
from fourier_convert.plan import LayerPlan, MergePlan, plan_with_orientation
from fourier_convert.serving import LORA_TARGETS

#: A layer keeping less of its delta's energy than this is called out in the report.
LOW_ENERGY = 0.5
TARGETS = LORA_TARGETS
_BIAS = {"none": "none", "fourier_only": "lora_only", "all": "all"}

#: The in-memory LoRA adapter :func:`to_lora` returns (``.save(path)`` writes it).
LoraAdapter = AdapterFiles


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
        output_kept: With calibration: share of ``||dW X||^2`` on the fit inputs that the closed form at this
            rank keeps (the output-space counterpart of ``retained_energy``).
        held_out_svd: With calibration: held-out ``||(B A - dW) X|| / ||dW X||`` of the plain SVD at this rank.
        held_out_error: With calibration: the same for the factors written.

    With calibration, ``retained_energy`` and ``relative_error`` describe the factors written, in weight space
    (a calibrated LoRA gives up weight-space error for error on the inputs the layer sees).
    """

    module: str
    shape: tuple[int, int]
    rank: int
    exact_rank: int
    energy: float
    retained_energy: float
    relative_error: float
    largest_dropped: float
    output_kept: float | None = None
    held_out_svd: float | None = None
    held_out_error: float | None = None


@dataclass
class LoraReport:
    """The result of :func:`to_lora`.

    Attributes:
        adapter: The FourierFT adapter, as given.
        layers: Per-layer results (layers of rank 0 included; they are left out of the LoRA).
        parameters: LoRA parameters written (A and B of every layer, zero padding included).
        target: ``peft``, ``vllm`` or ``llama.cpp``.
        uniform_rank: With ``uniform_rank``: the one rank every tensor has (smaller layers zero-padded), else None.
        max_lora_rank: ``vllm``: the ``--max-lora-rank`` to serve the adapter with, else None.
        budget: The parameter budget asked for, if any.
        budget_bound: With a budget: no choice of ranks within it keeps more energy than this share.
        dropped: Trained biases / heads the target cannot carry and ``drop_extras`` left out (keys).
        warnings: Layers that keep little energy, and other things to know.
        calibration: What calibration did and the held-out figures of every stage (None without calibration).
    """

    adapter: str
    layers: list[LoraLayerReport]
    parameters: int
    target: str = "peft"
    uniform_rank: int | None = None
    max_lora_rank: int | None = None
    budget: int | None = None
    budget_bound: float | None = None
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calibration: CalibrationReport | None = None

    @property
    def retained_energy(self) -> float:
        """Share of the total delta energy (all layers) the LoRA keeps."""
        total = sum(x.energy for x in self.layers)
        return sum(x.energy * x.retained_energy for x in self.layers) / total if total > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with the total retained energy)."""
        doc = {**asdict(self), "retained_energy": self.retained_energy}
        if self.calibration is not None:
            doc["calibration"] = self.calibration.to_dict()
        return doc

    def table(self) -> str:
        """The per-layer table the CLI prints, with a total line."""
        calibrated = self.calibration is not None
        head = f"{'module':<52} {'out x in':>11} {'rank':>5} {'exact':>6} {'energy':>8} {'rel.err':>8}"
        head += f" {'out.kept':>8} {'svd err':>8} {'err':>8}" if calibrated else f" {'dropped':>9}"
        rows = [head]
        for x in self.layers:
            shape = f"{x.shape[0]}x{x.shape[1]}"
            row = (
                f"{printable(x.module):<52} {shape:>11} {x.rank:>5} {x.exact_rank:>6} {x.retained_energy:>8.2%} "
                f"{x.relative_error:>8.4f}"
            )
            if calibrated:
                row += f" {_pct(x.output_kept):>8} {_num(x.held_out_svd):>8} {_num(x.held_out_error):>8}"
            else:
                row += f" {x.largest_dropped:>9.3g}"
            rows.append(row)
        total = (
            f"total: {len(self.layers)} layers, {self.parameters:,} LoRA parameters, "
            f"{self.retained_energy:.2%} of the delta energy kept"
        )
        if self.uniform_rank is not None:
            total += f"; uniform rank {self.uniform_rank} (smaller layers zero-padded)"
        if self.max_lora_rank is not None:
            total += f"; serve with vLLM's --max-lora-rank {self.max_lora_rank}"
        if self.budget is not None and self.budget_bound is not None:
            total += f"; budget {self.budget:,} (no allocation within it keeps more than {self.budget_bound:.2%})"
        rows.append(total)
        if self.calibration is not None:
            rows.append(
                "out.kept: share of ||dW X|| kept on the calibration inputs; svd err / err: held-out "
                "||(BA - dW) X|| / ||dW X|| of the plain SVD and of the LoRA written (X: the FourierFT model's "
                "layer inputs)"
            )
            rows.extend(self.calibration.lines())
        return "\n".join(rows)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def to_lora(
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    rank: float | None = None,
    max_rank: int | None = None,
    param_budget: int | None = None,
    target: str = "peft",
    uniform_rank: bool = False,
    drop_extras: bool = False,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    calibration: str | Path | CalibrationOptions | None = None,
    distill_steps: int | None = None,
    sequential: bool | None = None,
    device: str | None = None,
    progress: bool = False,
) -> tuple[AdapterFiles, LoraReport]:
    """Convert a FourierFT adapter to a LoRA adapter: the best rank-r approximation per layer, in weight space
    (exact SVD) or, with calibration data, where the model is used.

    Args:
        adapter: FourierFT adapter folder, ``PATH:NAME`` or hub id.
        base: Base model (without calibration only headers and config are read); default: the adapter's
            ``base_model_name_or_path``.
        rank: An int (fixed rank) or a float in (0, 1] (per-layer energy share; with calibration, the share of
            the layer's output energy on the calibration inputs); default 8 unless ``param_budget`` is given.
        max_rank: Cap on every layer's rank.
        param_budget: Choose per-layer ranks keeping the most total energy (with calibration: output energy)
            for at most this many LoRA parameters (``sum r * (out + in)``); excludes ``rank``.
        target: ``peft`` (default), ``vllm`` (only lora_A / lora_B, rank patterns) or ``llama.cpp`` (only
            lora_A / lora_B, one alpha, and a GGUF LoRA file beside the PEFT files).
        uniform_rank: Pad every layer with zeros to one rank (for ``vllm``: one of the ranks it allows), for
            stacks that need a single rank; default: each layer keeps its own.
        drop_extras: For ``vllm`` / ``llama.cpp``: leave out trained biases and heads instead of refusing
            (they are listed in ``report.dropped``).
        subfolder: Named adapter inside the folder.
        allow_pickle: Accept ``adapter_model.bin``.
        calibration: Calibration data (a text / JSON Lines / safetensors file or a folder of images), or a
            :class:`~fourier_convert.calibrate.pipeline.CalibrationOptions` for every setting. With it, each
            layer's factors minimise the error of its output on the FourierFT model's real layer inputs, and
            the report measures the LoRA model against the FourierFT model on held-out samples.
        distill_steps: With calibration: distillation steps after the closed form (overrides the options').
        sequential: With calibration: the sequential closed form (overrides the options').
        device: With calibration: where the model runs (overrides the options'; default ``auto``).
        progress: Print phases and progress bars on stderr.

    Returns:
        The LoRA adapter (call ``.save(path)``) and the report.

    Raises:
        UsageError: Bad rank / budget / target, extras the target cannot carry without ``drop_extras``, a base
            architecture the GGUF writer does not know (``llama.cpp``), or a calibration-only option without
            calibration data.
        InputFileError: Unusable calibration data.
        FourierConvertError: Invalid adapter or base.

    Example:
        >>> lora, report = to_lora("fixtures/gpt2/adapter", base="fixtures/gpt2/base", rank=8)  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
        >>> lora, report = to_lora("./ft", base="./base", rank=8, calibration="calib.jsonl", distill_steps=300)
        ... # doctest: +SKIP
    """
    if target not in TARGETS:
        raise UsageError("--target", f"unknown target {target!r}", f"use one of {', '.join(TARGETS)}")
    if max_rank is not None and max_rank < 1:
        raise UsageError("--max-rank", f"{max_rank} is not a positive rank", "use e.g. 16")
    if param_budget is not None:
        if rank is not None:
            raise UsageError("--param-budget", "given together with --rank", "give one of --rank and --param-budget")
        if isinstance(param_budget, bool) or param_budget < 1:
            raise UsageError("--param-budget", f"{param_budget!r} is not a positive count", "use e.g. 1000000")
    elif rank is None:
        rank = 8
    options = calibration_options(calibration, distill_steps, sequential, device)
    fourier = read_adapter(adapter, subfolder=subfolder, allow_pickle=allow_pickle)
    dropped = _extras(fourier, target, drop_extras)
    ckpt = open_adapter_base(base, fourier.settings.base_model_name_or_path)
    plan = plan_with_orientation(ckpt, [fourier])
    layout: GGUFLoraLayout | None = None
    if target == "llama.cpp":  # refuse an architecture llama.cpp's files cannot name before any work
        layout = gguf_layout(ckpt.config or {}, str(ckpt.folder / "config.json"))
        for layer in plan.layers:
            layout.tensor_name(layer.module)

    cache = IndexCache()
    norms = _delta_norms(plan, cache)  # refuses a delta float32 factors cannot hold, before any SVD
    svds: list[SpectralSVD] = []
    # The per-component SVDs are small (a few hundred rows at most): BLAS threads cost more than they give
    # there, and oversubscribed cores make them 10x slower (measured on 2 cores).
    phase(progress, "to-lora", f"factorising {len(plan.layers)} layer deltas (exact SVD from the spectrum)")
    bar = StepProgress(len(plan.layers), "svd", enabled=progress)
    with threadpool_limits(limits=1, user_api="blas"):
        for i, layer in enumerate(plan.layers):
            c = layer.contributions[0]
            m, n = layer.delta_shape
            idx = cache.get(m, n, c.seed, c.spectrum.n)
            svds.append(spectral_svd(c.spectrum.values, idx, (m, n), c.scaling))
            bar.update(i + 1, layer.module.rsplit(".", 2)[-2] if "." in layer.module else layer.module)
    bar.close()
    session: CalibrationSession | None = None
    values = [s.values for s in svds]
    if options is not None:
        exact = {layer.module: len(s.values) for layer, s in zip(plan.layers, svds, strict=True)}
        session = open_session(ckpt, fourier, plan, options, exact, progress=progress)
        values = [session.output_values(layer.module) for layer in plan.layers]
    ranks, uniform, bound = _ranks(values, plan.layers, rank, max_rank, param_budget, target, uniform_rank)

    plain: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, svd, r in zip(plan.layers, svds, ranks, strict=True):
        if r > 0:
            u, v = svd.vectors(r)
            plain[layer.module] = (torch.from_numpy(u * svd.values[:r]).float(), torch.from_numpy(v.T).float())
    factors = plain
    if session is not None:
        factors = session.fit({layer.module: r for layer, r in zip(plan.layers, ranks, strict=True)}, plain)

    tensors: dict[str, torch.Tensor] = {}
    layers: list[LoraLayerReport] = []
    written: dict[str, int] = {}
    warnings = list(plan.warnings) + large_delta_warnings(norms, "check the adapter's scaling")
    for layer, svd, r in zip(plan.layers, svds, ranks, strict=True):
        report = _layer_report(layer, svd, r)
        layers.append(report)
        if r == 0:
            why = "its delta is zero" if not len(svd.values) else "the budget gives it rank 0"
            warnings.append(f"{layer.module}: left out of the LoRA ({why})")
            continue
        width = uniform if uniform is not None else r
        b_r, a_r = factors[layer.module]
        b = torch.zeros(layer.delta_shape[0], width)
        a = torch.zeros(width, layer.delta_shape[1])
        b[:, :r] = b_r
        a[:r] = a_r
        key = f"{KEY_PREFIX}{layer.module}"
        tensors[f"{key}.lora_A.weight"] = a
        tensors[f"{key}.lora_B.weight"] = b
        written[layer.module] = width
        if session is None and report.retained_energy < LOW_ENERGY:
            warnings.append(f"{layer.module}: rank {r} keeps only {report.retained_energy:.1%} of the delta's energy")
    if not written:
        raise UsageError(
            "--rank" if param_budget is None else "--param-budget",
            "every layer got rank 0, so the LoRA would be empty",
            "raise the rank or the budget",
        )
    if not dropped:
        extras = extra_tensor_keys(fourier.biases, fourier.head_tensors, fourier.spectra)
        tensors.update({key: t.load() for key, t in extras.items()})
    else:
        warnings.append(
            f"{len(dropped)} trained tensor(s) the {target} target cannot carry were left out (first: {dropped[0]}): "
            "the LoRA model differs from the FourierFT model there"
        )
        if session is not None:
            warnings.append("the calibration figures are measured with those tensors; the LoRA as written lacks them")

    config = _lora_config(fourier, plan.layers, written, target, carry_extras=not dropped)
    if target == "llama.cpp":
        _fold_scales(tensors, written, config["lora_alpha"])
    params = sum(int(t.numel()) for k, t in tensors.items() if ".lora_" in k)
    result = LoraReport(str(adapter), layers, params, target, uniform, None, param_budget, bound, dropped, warnings)
    if target == "vllm":
        result.max_lora_rank = min(w for w in VLLM_RANKS if w >= max(written.values()))
    if session is not None:
        _calibrated_rows(result, session, factors)
    elif layers and result.retained_energy < LOW_ENERGY:
        warnings.insert(
            0,
            "the LoRA keeps less than half of the adapter's delta energy: a FourierFT delta spreads its energy over "
            "up to 2n singular values, so a low-rank LoRA keeps only the ~r/2 largest coefficients (docs/maths.md); "
            "--calibration fits the LoRA where the model is used instead (docs/to-lora.md)",
        )
    return AdapterFiles(config, tensors, [fourier.folder, ckpt.folder], layout), result


def calibration_options(
    calibration: str | Path | CalibrationOptions | None,
    distill_steps: int | None = None,
    sequential: bool | None = None,
    device: str | None = None,
) -> CalibrationOptions | None:
    """The calibration options :func:`to_lora` uses, or None without calibration data.

    Raises:
        UsageError: A calibration-only setting without calibration data.

    Example:
        >>> calibration_options("calib.txt", distill_steps=300).distill_steps
        300
    """
    if calibration is None:
        for flag, given in (("--distill", distill_steps), ("--sequential", sequential), ("--device", device)):
            if given:
                raise UsageError(flag, "has no effect without --calibration", "pass --calibration DATA as well")
        return None
    options = calibration if isinstance(calibration, CalibrationOptions) else CalibrationOptions(path=calibration)
    changes: dict[str, Any] = {}
    if distill_steps is not None:
        changes["distill_steps"] = distill_steps
    if sequential is not None:
        changes["sequential"] = sequential
    if device is not None:
        changes["device"] = device
    return replace(options, **changes) if changes else options


def _calibrated_rows(
    result: LoraReport, session: CalibrationSession, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Fill the calibrated columns of every layer row, the weight-space figures of the factors written, and the
    report's calibration part."""
    cal = session.report
    result.calibration = cal
    result.warnings.extend(cal.warnings)
    first = cal.stages[0].layers if cal.stages else {}
    last = cal.final.layers if cal.final is not None else {}
    deltas = {layer.name: layer.delta for layer in session.model.layers}
    for row in result.layers:
        row.output_kept = cal.output_kept.get(row.module)
        row.held_out_svd = first[row.module].delta_error if row.module in first else None
        row.held_out_error = last[row.module].delta_error if row.module in last else None
        if row.module in factors and row.energy > 0:
            b, a = factors[row.module]
            d = deltas[row.module].double()  # where the model runs: no dense copy back to the CPU
            ba = b.to(d.device, torch.float64) @ a.to(d.device, torch.float64)
            rel = float(torch.linalg.matrix_norm(d - ba) / torch.linalg.matrix_norm(d))
            row.relative_error = rel
            row.retained_energy = max(0.0, 1.0 - rel**2)


@dataclass(frozen=True)
class _Norms:
    module: str
    delta_norm: float
    base_norm: float


#: Largest float32 value: the LoRA factors' dtype. A delta whose norm exceeds it cannot be factorised into them.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _delta_norms(plan: MergePlan, cache: IndexCache) -> list[_Norms]:
    """Each layer's delta norm (from the spectrum, Parseval) and base weight norm.

    Raises:
        AdapterError: A delta too large for float32 factors (an absurd ``scaling``: 1e300 overflowed the SVD).
    """
    found = []
    for layer in plan.layers:
        c = layer.contributions[0]
        m, n = layer.delta_shape
        unscaled = delta_sq_norm(c.spectrum.values, cache.get(m, n, c.seed, c.spectrum.n), (m, n), 1.0)
        norm = abs(c.scaling) * math.sqrt(unscaled)
        if not norm <= _FLOAT32_MAX:
            raise AdapterError(
                layer.module,
                f"scaling {c.scaling:g} makes its delta {norm:.3g} in Frobenius norm, beyond float32's range (the "
                "LoRA factors' dtype)",
                "check the adapter's scaling",
            )
        found.append(_Norms(layer.module, norm, float_norm(layer.weight)))
    return found


def _extras(fourier: FourierFTAdapter, target: str, drop: bool) -> list[str]:
    """Keys of trained biases and heads the target cannot carry (empty for ``peft``); refuse unless ``drop``."""
    if target == "peft":
        return []
    extras = sorted(fourier.biases) + sorted(fourier.head_tensors)
    if extras and not drop:
        parts = []
        if fourier.biases:
            parts.append(f"{len(fourier.biases)} trained bias(es) (bias={fourier.settings.bias!r})")
        if fourier.head_tensors:
            parts.append(f"modules_to_save {fourier.settings.modules_to_save}")
        raise UsageError(
            "--target",
            f"{target} loads only lora_A / lora_B tensors, so {' and '.join(parts)} of {fourier.label} would be lost",
            "use --target peft, or pass --drop-extras to convert without them (the report lists what is lost)",
        )
    return extras


def _ranks(
    values: list[np.ndarray],
    layers: list[LayerPlan],
    rank: float | None,
    max_rank: int | None,
    budget: int | None,
    target: str,
    uniform: bool,
) -> tuple[list[int], int | None, float | None]:
    """Per-layer ranks from each layer's singular values (descending, at most its exact rank), the one padded
    width with ``uniform`` (else None), and the budget's bound as a share of the total energy."""
    costs = [sum(layer.delta_shape) for layer in layers]
    bound: float | None = None
    if budget is None:
        assert rank is not None
        try:
            ranks = [choose_rank(v, rank, max_rank) for v in values]
        except ValueError as exc:
            raise UsageError("--rank", str(exc), "use e.g. 8 or 0.9") from None
    elif not uniform:
        alloc = allocate_budget(values, costs, budget, max_rank)
        total = sum(float(np.sum(np.asarray(v, dtype=np.float64) ** 2)) for v in values)
        ranks, bound = alloc.ranks, alloc.upper_bound / total if total > 0 else 1.0
    else:
        # one width for every layer: the largest allowed width whose padded tensors fit the budget
        allowed = [w for w in _widths(target, max(len(v) for v in values)) if max_rank is None or w <= max_rank]
        fitting = [w for w in allowed if w * sum(costs) <= budget]
        if not fitting:
            raise UsageError(
                "--param-budget",
                f"{budget:,} parameters do not fit even rank {allowed[0] if allowed else 1} on every layer "
                f"({(allowed[0] if allowed else 1) * sum(costs):,} needed) with --uniform-rank",
                "raise the budget or leave out --uniform-rank",
            )
        ranks = [min(max(fitting), len(v)) for v in values]
    top = max(ranks)
    if target == "vllm" and top > VLLM_RANKS[-1]:
        raise UsageError(
            "--rank",
            f"a layer needs rank {top}, above vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}",
            "lower --rank or --max-rank",
        )
    if not uniform:
        return ranks, None, bound
    return ranks, min(w for w in _widths(target, top) if w >= top), bound


def _widths(target: str, top: int) -> list[int]:
    return list(VLLM_RANKS) if target == "vllm" else list(range(1, max(top, 1) + 1))


def _fold_scales(tensors: dict[str, torch.Tensor], ranks: dict[str, int], alpha: int) -> None:
    """llama.cpp scales every layer by ``alpha / rank`` with one ``alpha``: fold ``rank / alpha`` into each
    layer's ``lora_B`` so that every layer's product is still ``B A``."""
    for module, r in ranks.items():
        if r != alpha:
            key = f"{KEY_PREFIX}{module}.lora_B.weight"
            tensors[key] = tensors[key] * (r / alpha)


def _layer_report(layer: LayerPlan, svd: SpectralSVD, r: int) -> LoraLayerReport:
    energy = svd.energy
    retained = float(np.sum(svd.values[:r] ** 2)) / energy if energy > 0 else 1.0
    return LoraLayerReport(
        module=layer.module,
        shape=layer.delta_shape,
        rank=r,
        exact_rank=len(svd.values),
        energy=energy,
        retained_energy=retained,
        relative_error=float(np.sqrt(max(0.0, 1.0 - retained))),
        largest_dropped=float(svd.values[r]) if r < len(svd.values) else 0.0,
    )


def _lora_config(
    fourier: FourierFTAdapter, layers: list[LayerPlan], ranks: dict[str, int], target: str, *, carry_extras: bool
) -> dict[str, Any]:
    s = fourier.settings
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {k: r for k, r in ranks.items() if r != common}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        # without the heads, a task type whose heads PEFT adds on loading would make it look for them (KeyError)
        "task_type": s.task_type if carry_extras or s.task_type not in TASK_HEADS else None,
        "base_model_name_or_path": s.base_model_name_or_path,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": _BIAS[s.bias] if carry_extras else "none",
        "fan_in_fan_out": any(layer.conv1d for layer in layers if layer.module in ranks),
        "modules_to_save": listed_modules(s.raw) if carry_extras else None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if target == "llama.cpp":  # one alpha for all layers; the rank of each is read from its tensors
        config["alpha_pattern"] = {}
    return config
