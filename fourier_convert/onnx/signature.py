"""The graph's signature for a loaded model and task, and the module that exposes it with flat inputs.

:func:`describe` looks at the model (its ``forward`` parameters, its config, and one tiny probe forward)
and returns a :class:`Signature`: the ONNX input and output names in order, the symbolic axes, and which
positions of each output are compared in validation. :class:`FlatModel` wraps the model so that
``torch.onnx.export`` sees positional tensors only: for ``causal-lm-with-past`` the flat
``past_key_values.N.key`` / ``.value`` inputs are turned into the transformers cache object inside
``forward`` and the cache the model returns is flattened into ``present.N.key`` / ``.value`` outputs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from fourier_convert.errors import ExportError, UsageError
from fourier_convert.onnx.tasks import (
    CAUSAL_LM,
    CAUSAL_LM_WITH_PAST,
    FEATURE_EXTRACTION,
    IMAGE_CLASSIFICATION,
    TEXT_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
)

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = f"{PAST} + {SEQUENCE}"

#: How an output's positions are selected for comparison: ``query`` = (batch, sequence, ...) rows whose
#: attention-mask entry (for the current tokens) is 1; ``total`` = (batch, heads, past + sequence, dim)
#: cache entries whose mask entry is 1; ``rows`` = every row.
QUERY, CACHE, ROWS = "query", "total", "rows"


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs of the exported graph.

    Attributes:
        task: The export task.
        inputs: Graph input names, in order (model inputs first, then flat past key / values).
        outputs: Graph output names, in order.
        model_inputs: The model-forward keyword of each non-past input (same order).
        model_outputs: The model-output fields exported before the present key / values.
        axes: Input or output name -> {axis index: symbolic axis name}.
        selection: Output name -> :data:`QUERY`, :data:`CACHE` or :data:`ROWS`.
        past_layers: Number of cache layers (0 unless ``causal-lm-with-past``).
        past_shape: ``(heads, head_dim)`` of every cached key and value.
        cache_kwarg: The forward keyword that takes the cache (``cache`` or ``past_key_values``).
        vocab_size: Token ids are drawn below this.
        pad_token_id: Written at padded positions.
        type_vocab_size: Token type ids range (``token_type_ids`` is an input only when >= 2).
        max_positions: Longest sequence (past included) the model accepts, when the config says.
        image_shape: ``(channels, height, width)`` for pixel inputs.
        float_dtype: dtype of the model's floating inputs and outputs.
    """

    task: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    model_inputs: tuple[str, ...]
    model_outputs: tuple[str, ...]
    axes: dict[str, dict[int, str]] = field(default_factory=dict)
    selection: dict[str, str] = field(default_factory=dict)
    past_layers: int = 0
    past_shape: tuple[int, int] = (0, 0)
    cache_kwarg: str = ""
    vocab_size: int = 0
    pad_token_id: int = 0
    type_vocab_size: int = 0
    max_positions: int | None = None
    image_shape: tuple[int, int, int] | None = None
    float_dtype: torch.dtype = torch.float32

    @property
    def is_text(self) -> bool:
        return "input_ids" in self.model_inputs

    @property
    def causal(self) -> bool:
        return self.task in (CAUSAL_LM, CAUSAL_LM_WITH_PAST)


def describe(model: Any, task: str) -> Signature:
    """Build the signature of ``model`` exported for ``task``.

    Args:
        model: A loaded transformers model in eval mode (the class that ``task`` loads).
        task: One of :data:`~fourier_convert.onnx.tasks.TASKS`.

    Returns:
        The signature.

    Raises:
        UsageError: The task needs inputs the model does not take (e.g. image-classification on a text model).
        ExportError: ``causal-lm-with-past`` on a model whose cache is not a list of key / value layers.

    Example:
        >>> sig = describe(model, "causal-lm-with-past")  # doctest: +SKIP
        >>> sig.inputs[:3], sig.outputs[:2]  # doctest: +SKIP
        (('input_ids', 'attention_mask', 'position_ids'), ('logits', 'present.0.key'))
    """
    config = model.config
    params = set(inspect.signature(model.forward).parameters)
    main = str(getattr(model, "main_input_name", "input_ids"))
    vision = main == "pixel_values"
    if task == IMAGE_CLASSIFICATION and not vision:
        raise UsageError(
            "--task",
            f"image-classification needs a vision model; {type(model).__name__} takes {main}",
            "choose a text task",
        )
    if task in (TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, CAUSAL_LM, CAUSAL_LM_WITH_PAST) and main != "input_ids":
        raise UsageError(
            "--task",
            f"{task} needs a text model; {type(model).__name__} takes {main}",
            "choose image-classification or feature-extraction",
        )
    axes: dict[str, dict[int, str]] = {}
    if vision:
        names: list[str] = ["pixel_values"]
        axes["pixel_values"] = {0: BATCH}
    else:
        names = ["input_ids"]
        if "attention_mask" in params:
            names.append("attention_mask")
        type_vocab = int(getattr(config, "type_vocab_size", 0) or 0)
        if "token_type_ids" in params and type_vocab >= 2 and task not in (CAUSAL_LM, CAUSAL_LM_WITH_PAST):
            names.append("token_type_ids")
        if task in (CAUSAL_LM, CAUSAL_LM_WITH_PAST) and "position_ids" in params:
            names.append("position_ids")
        for name in names:
            axes[name] = {0: BATCH, 1: SEQUENCE}
        if task == CAUSAL_LM_WITH_PAST and "attention_mask" in names:
            axes["attention_mask"] = {0: BATCH, 1: TOTAL}
    cache_kwarg = ""
    if task == CAUSAL_LM_WITH_PAST:
        cache_kwarg = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else ""
        if not cache_kwarg:
            raise ExportError(type(model).__name__, "its forward takes no cache", "export --task causal-lm instead")
    probe = _probe(model, names, task, cache_kwarg)
    model_outputs = _model_outputs(task, probe)
    outputs = list(model_outputs)
    selection: dict[str, str] = {}
    for name in model_outputs:
        if task in (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION) or name == "pooler_output" or vision:
            selection[name], axes[name] = ROWS, {0: BATCH}  # one row per example (vision: patches, no mask)
        else:
            selection[name], axes[name] = QUERY, {0: BATCH, 1: SEQUENCE}
    past_layers, past_shape = 0, (0, 0)
    if task == CAUSAL_LM_WITH_PAST:
        pairs = cache_pairs(_output_cache(probe), where=type(model).__name__)
        past_layers = len(pairs)
        shapes = {(tuple(k.shape[1::2]), tuple(v.shape[1::2])) for k, v in pairs}
        if len(shapes) != 1 or next(iter(shapes))[0] != next(iter(shapes))[1]:
            raise ExportError(
                type(model).__name__,
                f"cache layers of different shapes {sorted(shapes)} are not supported as flat past inputs",
                "export --task causal-lm instead",
            )
        heads, head_dim = next(iter(shapes))[0]
        past_shape = (int(heads), int(head_dim))
        for i in range(past_layers):
            for kv in ("key", "value"):
                names.append(f"past_key_values.{i}.{kv}")
                axes[f"past_key_values.{i}.{kv}"] = {0: BATCH, 2: PAST}
                outputs.append(f"present.{i}.{kv}")
                axes[f"present.{i}.{kv}"] = {0: BATCH, 2: TOTAL}
                selection[f"present.{i}.{kv}"] = CACHE
    model_inputs = tuple(n for n in names if not n.startswith("past_key_values."))
    image_shape = None
    if vision:
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        image_shape = (int(getattr(config, "num_channels", 3)), h, w)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return Signature(
        task=task,
        inputs=tuple(names),
        outputs=tuple(outputs),
        model_inputs=model_inputs,
        model_outputs=tuple(model_outputs),
        axes=axes,
        selection=selection,
        past_layers=past_layers,
        past_shape=past_shape,
        cache_kwarg=cache_kwarg,
        vocab_size=int(getattr(config, "vocab_size", 0) or 0),
        pad_token_id=_pad_id(config),
        type_vocab_size=int(getattr(config, "type_vocab_size", 0) or 0),
        max_positions=_max_positions(config),
        image_shape=image_shape,
        float_dtype=dtype,
    )


def _pad_id(config: Any) -> int:
    pad = getattr(config, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) and pad >= 0 else 0


def _max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            # RoBERTa-style models count positions from padding_idx + 1
            return value - 2 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else value
    return None


def _probe(model: Any, names: list[str], task: str, cache_kwarg: str) -> Any:
    """One forward on a (2, 3) input, to see which outputs the model returns."""
    kwargs: dict[str, Any] = {}
    dev = next(model.parameters()).device
    if names == ["pixel_values"]:
        config = model.config
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        kwargs["pixel_values"] = torch.zeros(2, int(getattr(config, "num_channels", 3)), h, w, dtype=dtype, device=dev)
    else:
        for name in names:
            kwargs[name] = torch.zeros(2, 3, dtype=torch.long, device=dev)
        kwargs["input_ids"] = torch.full((2, 3), min(3, max(0, int(model.config.vocab_size) - 1)), device=dev)
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = torch.ones(2, 3, dtype=torch.long, device=dev)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = torch.arange(3, device=dev).expand(2, 3)
    if task in (CAUSAL_LM, CAUSAL_LM_WITH_PAST):
        kwargs["use_cache"] = task == CAUSAL_LM_WITH_PAST
    with torch.no_grad():
        return model(**kwargs)


def _model_outputs(task: str, probe: Any) -> list[str]:
    if task == FEATURE_EXTRACTION:
        return [name for name in ("last_hidden_state", "pooler_output") if probe.get(name) is not None]
    if probe.get("logits") is None:
        raise ExportError(task, "the model returned no logits", "choose another --task")
    return ["logits"]


def _output_cache(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def cache_pairs(cache: Any, *, where: str = "model") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (key, value) tensors of every layer of a transformers cache (or a legacy tuple of pairs).

    Raises:
        ExportError: The cache holds no per-layer key / value tensors.

    Example:
        >>> k = torch.zeros(1, 2, 3, 4)
        >>> len(cache_pairs(((k, k), (k, k))))
        2
    """
    if cache is None:
        raise ExportError(where, "returned no cache with use_cache=True", "export --task causal-lm instead")
    if hasattr(cache, "layers"):
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    else:
        pairs = [(p[0], p[1]) for p in cache]
    if not pairs or any(not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) for k, v in pairs):
        raise ExportError(
            where,
            f"its cache ({type(cache).__name__}) is not a list of key / value tensors per layer",
            "export --task causal-lm instead",
        )
    return [(k, v) for k, v in pairs if k is not None and v is not None]


def make_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], config: Any) -> Any:
    """A transformers ``DynamicCache`` holding ``pairs`` (one (key, value) per layer)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(pairs, config=config)
    except TypeError:  # transformers 4.x: no config keyword
        return DynamicCache(pairs)


class FlatModel(torch.nn.Module):
    """``model`` with positional tensor inputs and a flat tuple of outputs, as :class:`Signature` describes.

    Example:
        >>> flat = FlatModel(model, describe(model, "causal-lm")).eval()  # doctest: +SKIP
        >>> logits, = flat(input_ids, attention_mask, position_ids)  # doctest: +SKIP
    """

    def __init__(self, model: Any, signature: Signature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sig = self.signature
        n = len(sig.model_inputs)
        kwargs: dict[str, Any] = dict(zip(sig.model_inputs, tensors[:n], strict=True))
        if sig.past_layers:
            past = tensors[n:]
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(sig.past_layers)]
            kwargs[sig.cache_kwarg] = make_cache(pairs, self.model.config)
        if sig.causal:
            kwargs["use_cache"] = bool(sig.past_layers)
        out = self.model(**kwargs)
        result = [out[name] for name in sig.model_outputs]
        if sig.past_layers:
            for key, value in cache_pairs(_output_cache(out)):
                result += [key, value]
        return tuple(result)
