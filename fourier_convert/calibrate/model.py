"""The model a calibrated conversion runs: one transformers model that is, layer by layer, either the FourierFT
model (the teacher) or the LoRA model being fitted (the student).

The base is loaded with the auto class of the adapter's task, with the adapter's trained biases and heads (the
tensors :func:`fourier_convert.merge` would write, except that adapted weights stay the *base* weights). Each
adapted Linear / Conv1D is wrapped by an :class:`AdaptedLayer` that holds the dense FourierFT delta and the LoRA
factors and adds one of them to the base layer's output, as :attr:`AdaptedLayer.mode` says. One copy of the
weights serves both models; switching costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fourier_convert.errors import UsageError
from fourier_convert.io.adapter import FourierFTAdapter
from fourier_convert.io.checkpoint import BaseCheckpoint
from fourier_convert.io.safetensors_file import FLOAT_DTYPES, read_torch
from fourier_convert.maths.delta import delta_weights
from fourier_convert.maths.indices import IndexCache
from fourier_convert.merging.core import converted_value
from fourier_convert.model_config import config_from_dict
from fourier_convert.onnx.models import load_task_model
from fourier_convert.onnx.tasks import CAUSAL_LM, CAUSAL_LM_WITH_PAST, TASKS, check_task, infer_task
from fourier_convert.plan import LayerPlan, MergePlan

#: PEFT task_type -> the task whose auto class loads the model.
PEFT_TASKS = {
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "CAUSAL_LM": CAUSAL_LM,
    "FEATURE_EXTRACTION": "feature-extraction",
}

#: What an :class:`AdaptedLayer` adds to its base layer's output.
MODES = ("fourier", "lora", "base")

#: Called with (layer, input) on every forward of an adapted layer while set (see :meth:`CalibModel.tapping`).
Tap = Callable[["AdaptedLayer", torch.Tensor], None]


class AdaptedLayer(nn.Module):
    """A base Linear / Conv1D plus either its FourierFT delta or its LoRA factors.

    Args:
        base_layer: The model's own layer (its weight is the base weight).
        delta: The dense FourierFT delta ``(out, in)`` (float32, on the model's device).
        name: Module path (for reports).

    Attributes:
        mode: ``fourier`` (base + delta), ``lora`` (base + ``B A``) or ``base``.
        lora_a, lora_b: The LoRA factors (``(r, in)``, ``(out, r)``), trainable parameters; empty until set.
        tap: Called with ``(self, input)`` on every forward while not None.
    """

    delta: torch.Tensor

    def __init__(self, base_layer: nn.Module, delta: torch.Tensor, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.register_buffer("delta", delta, persistent=False)
        self.lora_a = nn.Parameter(delta.new_zeros(0, delta.shape[1]))
        self.lora_b = nn.Parameter(delta.new_zeros(delta.shape[0], 0))
        self.mode = "fourier"
        self.tap: Tap | None = None

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    def set_factors(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """Use ``B A`` (any float dtype; stored as float32 on the layer's device) as the LoRA delta."""
        dev = self.delta.device  # copies: training these must never change the tensors passed in
        self.lora_b = nn.Parameter(b.to(dev, torch.float32, copy=True).contiguous())
        self.lora_a = nn.Parameter(a.to(dev, torch.float32, copy=True).contiguous())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A detached float32 CPU copy of ``(B, A)``."""
        return self.lora_b.detach().float().cpu().clone(), self.lora_a.detach().float().cpu().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tap is not None:
            self.tap(self, x)
        y: torch.Tensor = self.base_layer(x)
        if self.mode == "fourier":
            return y + nn.functional.linear(x.to(self.delta.dtype), self.delta).to(y.dtype)
        if self.mode == "lora" and self.rank:
            h = nn.functional.linear(x.to(self.lora_a.dtype), self.lora_a)
            return y + nn.functional.linear(h, self.lora_b).to(y.dtype)
        return y


@dataclass
class CalibModel:
    """The loaded model and its adapted layers.

    Attributes:
        model: The transformers model (eval mode, frozen).
        layers: Adapted layers in model order (the order their modules appear in the model).
        task: The task it was loaded for.
        device: Where it runs.
        plans: Each layer's plan, by module path.
    """

    model: Any
    layers: list[AdaptedLayer]
    task: str
    device: torch.device
    plans: dict[str, LayerPlan]

    def set_mode(self, mode: str) -> None:
        """Put every adapted layer in ``mode`` (see :data:`MODES`)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        for layer in self.layers:
            layer.mode = mode

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        """Temporarily put every adapted layer in ``mode``."""
        before = [layer.mode for layer in self.layers]
        self.set_mode(mode)
        try:
            yield
        finally:
            for layer, m in zip(self.layers, before, strict=True):
                layer.mode = m

    @contextlib.contextmanager
    def tapping(self, tap: Tap) -> Iterator[None]:
        """Call ``tap(layer, input)`` on every adapted layer's forward inside the block."""
        for layer in self.layers:
            layer.tap = tap
        try:
            yield
        finally:
            for layer in self.layers:
                layer.tap = None

    def run(self, batch: Mapping[str, torch.Tensor], *, hidden_states: bool = False) -> Any:
        """One forward pass on ``batch`` (moved to the model's device), no cache."""
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        kwargs: dict[str, Any] = {"output_hidden_states": hidden_states, "return_dict": True}
        if self.task == CAUSAL_LM:
            kwargs["use_cache"] = False
        return self.model(**inputs, **kwargs)

    def set_factors(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Load ``module -> (B, A)`` into the layers (layers not named get rank 0)."""
        for layer in self.layers:
            b, a = factors.get(layer.name, (torch.zeros(layer.delta.shape[0], 0), torch.zeros(0, layer.delta.shape[1])))
            layer.set_factors(b, a)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's current ``(B, A)`` (float32, CPU copies)."""
        return {layer.name: layer.factors() for layer in self.layers}


def calibration_task(fourier: FourierFTAdapter, config: Mapping[str, Any] | None, task: str = "auto") -> str:
    """The task whose model class a calibrated conversion loads.

    ``auto``: the adapter's PEFT ``task_type`` when it names one, else the base's architecture (a causal LM is
    run without a cache: ``causal-lm``).

    Raises:
        UsageError: An unknown task, or none can be inferred.

    Example:
        >>> calibration_task(read_adapter("fixtures/llama/adapter"), {"architectures": ["LlamaForCausalLM"]})
        ... # doctest: +SKIP
        'causal-lm'
    """
    check_task(task)
    if task == "auto":
        peft_task = str(fourier.settings.task_type)
        task = PEFT_TASKS[peft_task] if peft_task in PEFT_TASKS else infer_task(dict(config or {}))[0]
    return CAUSAL_LM if task == CAUSAL_LM_WITH_PAST else task


def load_calib_model(
    ckpt: BaseCheckpoint,
    fourier: FourierFTAdapter,
    plan: MergePlan,
    task: str,
    device: torch.device,
    deltas: Mapping[str, torch.Tensor] | None = None,
) -> CalibModel:
    """Load the base for ``task`` with the adapter's biases and heads, and wrap every adapted layer.

    Args:
        ckpt: The base checkpoint (weights are read).
        fourier: The adapter.
        plan: Its plan against ``ckpt`` (:func:`~fourier_convert.plan.plan_with_orientation`).
        task: One of :data:`~fourier_convert.onnx.tasks.TASKS` (see :func:`calibration_task`).
        device: Where the model runs.
        deltas: Module -> the ``(out, in)`` delta its ``fourier`` mode adds, instead of the adapter's FourierFT
            deltas (``from-lora --calibration`` runs the LoRA model as the reference this way).

    Returns:
        The model in float32, frozen, in eval mode, every adapted layer in ``fourier`` mode with rank-0 LoRA.

    Raises:
        ExportError: transformers cannot build the model for the task, or weights it needs are missing.
        UsageError: An adapted module is not a Linear / Conv1D of the loaded model.

    Example:
        >>> m = load_calib_model(ckpt, adapter, plan, "causal-lm", torch.device("cpu"))  # doctest: +SKIP
    """
    assert task in TASKS
    tensors: dict[str, torch.Tensor] = {}
    for o in plan.outputs:
        if o.kind == "merge":  # adapted weights stay the base's: the delta is added by the wrapper
            assert o.base is not None
            value = read_torch(o.base)
        else:
            value = converted_value(o)
        floating = (o.base is not None and o.base.dtype in FLOAT_DTYPES) or value.is_floating_point()
        tensors[o.name] = value.float() if floating else value
    folder = Path(ckpt.folder)
    config = config_from_dict(plan.config or ckpt.config or {}, folder / "config.json")
    model = load_task_model(folder, task, dtype=torch.float32, config=config, state_dict=tensors)
    del tensors
    model.to(device)
    model.requires_grad_(False)

    cache = IndexCache()
    planned: dict[str, tuple[LayerPlan, torch.Tensor]] = {}
    for layer in plan.layers:
        if deltas is not None:
            planned[layer.module] = (layer, deltas[layer.module])
            continue
        c = layer.contributions[0]
        m, n = layer.delta_shape
        idx = torch.from_numpy(cache.get(m, n, c.seed, c.spectrum.n))
        delta = delta_weights(torch.from_numpy(c.spectrum.values), idx, m, n, c.scaling, dtype=torch.float64)
        planned[layer.module] = (layer, delta)
    return wrap_layers(model, planned, task, device)


def wrap_layers(
    model: Any, deltas: Mapping[str, tuple[LayerPlan, torch.Tensor]], task: str, device: torch.device
) -> CalibModel:
    """Wrap each adapted module of a loaded model in an :class:`AdaptedLayer` holding its dense delta.

    Args:
        model: A transformers model on ``device`` (frozen).
        deltas: Module path (the adapter's) -> (its layer plan, its ``(out, in)`` delta in any float dtype).
        task: The task it was loaded for.
        device: Where it runs.

    Returns:
        The :class:`CalibModel` (every layer in ``fourier`` mode: base + the delta given).

    Raises:
        UsageError: A module is not a Linear / Conv1D of ``model`` with the planned weight shape.

    Example:
        >>> cm = wrap_layers(model, {"model.layers.0.self_attn.q_proj": (layer, delta)}, "causal-lm", cpu)
        ... # doctest: +SKIP
    """
    wrapped: dict[str, AdaptedLayer] = {}
    plans: dict[str, LayerPlan] = {}
    for module_name, (layer, delta) in deltas.items():
        path = _module_path(model, layer)
        module = model.get_submodule(path)
        adapted = AdaptedLayer(module, delta.to(device, torch.float32), module_name)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, adapted)
        wrapped[path] = adapted
        plans[module_name] = layer
    order = [name for name, mod in model.named_modules() if isinstance(mod, AdaptedLayer)]
    return CalibModel(model, [wrapped[p] for p in order], task, device, plans)


def _module_path(model: nn.Module, layer: LayerPlan) -> str:
    """The path of ``layer``'s module in ``model`` (the adapter's path, or its checkpoint key's, with or without
    the model's base prefix)."""
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    stem = layer.key[: -len(".weight")]
    candidates = [layer.module, stem]
    if prefix:
        candidates += [f"{prefix}.{stem}", stem.removeprefix(f"{prefix}."), layer.module.removeprefix(f"{prefix}.")]
    modules = dict(model.named_modules())
    for path in candidates:
        module = modules.get(path)
        if module is None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            break
        if tuple(weight.shape) != tuple(layer.weight.shape):
            break
        return path
    raise UsageError(
        layer.module,
        f"no Linear / Conv1D module of {type(model).__name__} with the weight shape {tuple(layer.weight.shape)} "
        "was found under this name",
        "pass --task for the model class the adapter was trained on",
    )
