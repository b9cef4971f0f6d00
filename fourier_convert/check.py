"""``to-lora --check``: run base + LoRA against base + FourierFT layer by layer, on random inputs or (with
calibration data) on the layers' real inputs.

Without calibration (:func:`check_lora_outputs`), for every adapted layer the base weight ``W`` is read (one
layer at a time, so memory does not grow with the model), the FourierFT delta is rebuilt in float64 and the
LoRA's ``lora_B @ lora_A * scale`` is formed from the tensors that were written, and both layers are applied
to the same random inputs ``x ~ N(0, I)``:

* ``output_error = ||y_lora - y_fourier|| / ||y_fourier||`` with ``y = (W + dW) x + b``: what the conversion
  does to the layer's output, base weight and biases included (a trained bias the LoRA dropped counts too);
* ``delta_error = ||(dW_lora - dW_fourier) x|| / ||dW_fourier x||``: the same for the adapter's own
  contribution (random inputs spread over all directions, so this is close to the relative Frobenius error).

Random inputs describe the weights, not the model: real activations are far from isotropic, and a LoRA fitted
to them (``--calibration``) can look worse on random inputs while following the model much better. With
calibration (:func:`check_from_calibration`) the same two errors are measured on the FourierFT model's own layer
inputs for the held-out calibration samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fourier_convert.errors import UsageError
from fourier_convert.io.adapter import KEY_PREFIX, read_adapter
from fourier_convert.io.adapter_writer import AdapterFiles
from fourier_convert.io.checkpoint import BaseCheckpoint, open_adapter_base
from fourier_convert.io.lora_adapter import parse_lora_settings
from fourier_convert.io.safetensors_file import read_torch
from fourier_convert.lora import LoraReport
from fourier_convert.maths.delta import delta_weights
from fourier_convert.maths.indices import IndexCache
from fourier_convert.plan import plan_with_orientation


@dataclass
class LayerOutputCheck:
    """One layer's output comparison.

    Attributes:
        module: Module path.
        output_error: Relative error of the layer's output (base weight and bias included).
        delta_error: Relative error of the adapter's contribution alone.
    """

    module: str
    output_error: float
    delta_error: float


@dataclass
class OutputCheck:
    """Result of :func:`check_lora_outputs`.

    Attributes:
        samples: Random inputs per layer.
        seed: Seed of the inputs.
        layers: Per-layer results (layers the LoRA leaves out have ``delta_error`` 1).
        notes: Anything the user should know about the comparison.
        inputs: ``random`` (``x ~ N(0, I)``) or ``calibration`` (held-out calibration samples run through the
            FourierFT model: each layer's real inputs; ``samples`` counts those samples).
    """

    samples: int
    seed: int
    layers: list[LayerOutputCheck]
    notes: list[str] = field(default_factory=list)
    inputs: str = "random"

    @property
    def worst_output_error(self) -> float:
        return max((x.output_error for x in self.layers), default=0.0)

    @property
    def worst_delta_error(self) -> float:
        return max((x.delta_error for x in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict with the worst errors."""
        return {
            **asdict(self),
            "worst_output_error": self.worst_output_error,
            "worst_delta_error": self.worst_delta_error,
        }

    def lines(self) -> list[str]:
        """The lines the CLI prints."""
        worst = max(self.layers, key=lambda x: x.output_error, default=None)
        where = (
            f"{self.samples} random inputs each"
            if self.inputs == "random"
            else f"the real layer inputs of {self.samples} held-out calibration samples"
        )
        head = f"check: {len(self.layers)} layers on {where}: largest layer-output error {self.worst_output_error:.3e}"
        if worst is not None:
            head += f" ({worst.module}); largest error of the adapter's own contribution {self.worst_delta_error:.3e}"
        return [head, *self.notes]


def check_lora_outputs(
    lora: AdapterFiles,
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    samples: int = 64,
    seed: int = 0,
    subfolder: str | None = None,
    allow_pickle: bool = False,
) -> OutputCheck:
    """Compare base + LoRA with base + FourierFT layer by layer on random inputs (needs the base weights).

    Args:
        lora: The converted adapter (from :func:`~fourier_convert.lora.to_lora`).
        adapter: The FourierFT adapter it was converted from.
        base: Base model with weights; default: the adapter's ``base_model_name_or_path``.
        samples: Random inputs per layer.
        seed: Seed of the inputs.
        subfolder: Named adapter inside ``adapter``.
        allow_pickle: Accept ``adapter_model.bin``.

    Returns:
        Per-layer output errors.

    Raises:
        UsageError: No base, or ``samples`` < 1.
        FourierConvertError: Invalid adapter or base.

    Example:
        >>> lora, _ = fc.to_lora("fixtures/llama/adapter", base="fixtures/llama/base", rank=1.0)  # doctest: +SKIP
        >>> result = check_lora_outputs(lora, "fixtures/llama/adapter", base="fixtures/llama/base")  # doctest: +SKIP
        >>> result.worst_output_error < 1e-6  # doctest: +SKIP
        True
    """
    if samples < 1:
        raise UsageError("--check", f"{samples} samples requested", "use at least 1")
    fourier = read_adapter(adapter, subfolder=subfolder, allow_pickle=allow_pickle)
    ckpt = open_adapter_base(base, fourier.settings.base_model_name_or_path)
    plan = plan_with_orientation(ckpt, [fourier])
    settings = parse_lora_settings(lora.config, Path("adapter_config.json (converted)"))
    rng = np.random.default_rng(seed)
    cache = IndexCache()
    results: list[LayerOutputCheck] = []
    for layer in plan.layers:
        c = layer.contributions[0]
        m, n = layer.delta_shape
        idx = torch.from_numpy(cache.get(m, n, c.seed, c.spectrum.n))
        d_fourier = delta_weights(torch.from_numpy(c.spectrum.values), idx, m, n, c.scaling, dtype=torch.float64)
        key = f"{KEY_PREFIX}{layer.module}"
        a, b = lora.tensors.get(f"{key}.lora_A.weight"), lora.tensors.get(f"{key}.lora_B.weight")
        d_lora = torch.zeros(m, n, dtype=torch.float64)
        if a is not None and b is not None:
            d_lora = (b.double() @ a.double()) * settings.scale_for(layer.module, int(a.shape[0]))
        w = read_torch(layer.weight).double()
        w = w.T if layer.conv1d else w
        x = torch.from_numpy(rng.standard_normal((n, samples)))
        base_bias = _base_bias(ckpt, layer.key)
        trained = fourier.biases.get(f"{layer.module}.bias")
        fourier_bias = trained.load().double().reshape(-1, 1) if trained is not None else base_bias
        want = (w + d_fourier) @ x + fourier_bias
        delta_diff = (d_lora - d_fourier) @ x
        diff = delta_diff + (_lora_bias(lora, layer.module, base_bias) - fourier_bias)
        own = torch.linalg.vector_norm(d_fourier @ x)
        results.append(
            LayerOutputCheck(
                layer.module,
                float(torch.linalg.vector_norm(diff) / max(float(torch.linalg.vector_norm(want)), 1e-300)),
                float(torch.linalg.vector_norm(delta_diff) / own) if own > 0 else 0.0,
            )
        )
    notes = [
        "random N(0, I) inputs describe the weights, not the model's behaviour (real activations are far from "
        "isotropic): pass --calibration DATA to check on the inputs the layers actually see"
    ]
    if fourier.head_tensors:
        notes.append("modules_to_save heads are not adapted layers and are not part of this comparison")
    return OutputCheck(samples, seed, results, notes)


def check_from_calibration(report: LoraReport) -> OutputCheck:
    """The ``--check`` figures of a calibrated conversion: every layer on its real inputs (the FourierFT model's
    activations on the held-out calibration samples), for the factors written.

    Args:
        report: A :func:`~fourier_convert.lora.to_lora` report made with calibration data.

    Returns:
        The per-layer check (``inputs`` is ``calibration``).

    Raises:
        UsageError: The report has no calibration figures (no calibration, or ``--held-out 0``).

    Example:
        >>> lora, report = fc.to_lora("./ft", base="./base", calibration="calib.txt")  # doctest: +SKIP
        >>> check_from_calibration(report).worst_delta_error  # doctest: +SKIP
    """
    cal = report.calibration
    final = cal.final if cal is not None else None
    if cal is None or final is None:
        raise UsageError(
            "--check", "there are no held-out calibration samples to check on", "use --held-out above 0 (e.g. 0.2)"
        )
    layers = [
        LayerOutputCheck(row.module, final.layers[row.module].output_error, final.layers[row.module].delta_error)
        for row in report.layers
        if row.module in final.layers
    ]
    return OutputCheck(cal.held_out_samples, cal.seed, layers, [], inputs="calibration")


def _lora_bias(lora: AdapterFiles, module: str, base_bias: torch.Tensor) -> torch.Tensor:
    """The layer's bias in the LoRA model: the carried trained bias, else the base's."""
    for key in (f"{KEY_PREFIX}{module}.base_layer.bias", f"{KEY_PREFIX}{module}.bias"):
        if key in lora.tensors:
            return lora.tensors[key].double().reshape(-1, 1)
    return base_bias


def _base_bias(ckpt: BaseCheckpoint, weight_key: str) -> torch.Tensor:
    info = ckpt.tensors.get(weight_key[: -len("weight")] + "bias")
    return read_torch(info).double().reshape(-1, 1) if info is not None else torch.zeros(1, 1, dtype=torch.float64)
