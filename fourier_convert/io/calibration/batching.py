"""Batching calibration samples: stacking and right-padding them (:func:`collate`, :func:`batches`) and the id to pad
with (:func:`pad_token_id`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fourier_convert.io.calibration.model import config_value, has_tokenizer, load_tokenizer


def collate(samples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack samples into one batch; text samples are right-padded with ``pad_token_id`` (attention_mask 0 there).

    1-D tensors (``input_ids``, ``attention_mask``, ``token_type_ids``) are padded on the right to the longest
    sample: ``input_ids`` with ``pad_token_id``, the others with 0. Other tensors (``pixel_values``) are
    stacked and must have one shape.

    Args:
        samples: Samples with the same keys.
        pad_token_id: The id to pad ``input_ids`` with (see :func:`pad_token_id`).

    Returns:
        Key -> batched tensor (a new leading dimension).

    Raises:
        ValueError: No samples, samples with different keys, or tensors that cannot be stacked.

    Example:
        >>> a = {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1])}
        >>> b = {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1])}
        >>> batch = collate([a, b], pad_token_id=0)
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = list(samples[0])
    for i, sample in enumerate(samples):
        if set(sample) != set(keys):
            raise ValueError(f"sample {i} has keys {sorted(sample)}, sample 0 has {sorted(keys)}")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if all(v.dim() == 1 for v in values):
            length = max(int(v.shape[0]) for v in values)
            fill = pad_token_id if key == "input_ids" else 0
            batch = values[0].new_full((len(values), length), fill)
            for i, v in enumerate(values):
                batch[i, : v.shape[0]] = v
            out[key] = batch
        else:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"cannot stack {key!r} of shapes {sorted(shapes)}")
            out[key] = torch.stack(values)
    return out


def batches(
    samples: Sequence[Mapping[str, torch.Tensor]], batch_size: int, pad_token_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive batches of at most ``batch_size`` samples, in order (:func:`collate` of each).

    Args:
        samples: The samples (e.g. ``CalibrationData.train``).
        batch_size: Samples per batch (the last batch may be smaller).
        pad_token_id: The id to pad ``input_ids`` with.

    Returns:
        An iterator of batches; nothing for no samples.

    Raises:
        ValueError: ``batch_size`` < 1 (raised on the first ``next``), or as :func:`collate`.

    Example:
        >>> s = [{"input_ids": torch.tensor([1] * n), "attention_mask": torch.tensor([1] * n)} for n in (1, 2, 3)]
        >>> [b["input_ids"].shape[0] for b in batches(s, 2, pad_token_id=0)]
        [2, 1]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}, expected at least 1")
    for start in range(0, len(samples), batch_size):
        yield collate(samples[start : start + batch_size], pad_token_id)


def pad_token_id(model_folder: Path, config: Mapping[str, Any]) -> int:
    """The id to pad with: the tokenizer's pad token, else config pad_token_id, else eos, else 0 (masked out anyway).

    A tokenizer that cannot be loaded is passed over (image models have none). ``eos`` is the tokenizer's, else
    the config's (the first of a list). Config ids are also looked up in ``text_config``.

    Args:
        model_folder: The base model folder.
        config: The base model's ``config.json`` content.

    Returns:
        A non-negative token id.

    Example:
        >>> pad_token_id(Path("fixtures/llama/base"), {"pad_token_id": 3})  # doctest: +SKIP
        3
    """
    tokenizer: Any = None
    if has_tokenizer(model_folder):
        try:
            tokenizer = load_tokenizer(model_folder)
        except Exception:  # any failure: fall back to the config
            tokenizer = None
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        config_value(config, "pad_token_id"),
        getattr(tokenizer, "eos_token_id", None),
        config_value(config, "eos_token_id"),
    ):
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0
