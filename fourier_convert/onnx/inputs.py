"""Example and validation inputs: deterministic tensors for a :class:`Signature` at a given shape.

The export shape is batch 2, sequence 6 (past 4 for the cached decoder): the dynamo exporter breaks on
length-1 examples, and distinct sizes keep it from tying axes together. Validation uses at least three
other shapes, among them a padded batch (right padding for encoders, left padding for decoders, as
generation pads) and, for the cached decoder, past length 0 and > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fourier_convert.onnx.signature import Signature


@dataclass(frozen=True)
class Case:
    """One input shape.

    Attributes:
        batch: Batch size.
        seq: Current tokens per row (text only).
        past: Cached tokens per row (``causal-lm-with-past`` only).
        padding: ``None``, ``"right"`` or ``"left"``: rows after the first are shorter, padded this side.
    """

    batch: int
    seq: int = 0
    past: int = 0
    padding: str | None = None

    def label(self, with_past: bool = False) -> str:
        """Short text for reports, e.g. ``batch 3, seq 11, past 0, left-padded``."""
        parts = [f"batch {self.batch}"]
        if self.seq:
            parts.append(f"seq {self.seq}")
        if self.past or with_past:
            parts.append(f"past {self.past}")
        if self.padding:
            parts.append(f"{self.padding}-padded")
        return ", ".join(parts)


def export_case(sig: Signature) -> Case:
    """The example shape given to the exporter (batch and sequence >= 2, distinct sizes).

    Example:
        >>> export_case(Signature("image-classification", ("pixel_values",), ("logits",), ("pixel_values",),
        ...                       ("logits",)))
        Case(batch=2, seq=0, past=0, padding=None)
    """
    if not sig.is_text:
        return Case(2)
    return _fit(sig, Case(2, 6, 4 if sig.past_layers else 0))


def validation_cases(sig: Signature) -> list[Case]:
    """At least three shapes unlike the export shape, one of them a padded batch where padding applies.

    Example:
        >>> [c.label() for c in validation_cases(Signature("image-classification", ("pixel_values",),
        ...                                                ("logits",), ("pixel_values",), ("logits",)))]
        ['batch 1', 'batch 3', 'batch 4']
    """
    if not sig.is_text:
        return [Case(1), Case(3), Case(4)]
    if sig.past_layers:
        cases = [Case(2, 7, 0, "left"), Case(3, 1, 6), Case(4, 3, 5, "left")]
    elif sig.causal:
        cases = [Case(1, 9), Case(3, 11, 0, "left"), Case(4, 1)]
    else:
        cases = [Case(1, 9), Case(3, 11, 0, "right"), Case(4, 1)]
    return [_fit(sig, c) for c in cases]


def _fit(sig: Signature, case: Case) -> Case:
    """Shorten a case so that past + seq stays within the model's positions."""
    limit = sig.max_positions
    if limit is None or case.past + case.seq <= limit:
        return case
    seq = max(1, min(case.seq, limit - case.past))
    past = max(0, min(case.past, limit - seq))
    return Case(case.batch, seq, past, case.padding)


def row_lengths(case: Case) -> list[int]:
    """Unpadded tokens (past included) per row: the first row is full, later rows shorter, at least 1.

    With left padding and a past, padding stays within the past so that every current token is real.

    Example:
        >>> row_lengths(Case(3, 11, 0, "right"))
        [11, 7, 3]
    """
    total = case.past + case.seq
    if not case.padding:
        return [total] * case.batch
    step = max(1, total // case.batch + 1)
    floor = case.seq if case.past else 1
    return [max(floor, total - i * step) for i in range(case.batch)]


def make_inputs(sig: Signature, case: Case, *, seed: int = 0, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Deterministic inputs for every graph input of ``sig``, in order.

    Token ids are drawn from ``[min(4, vocab - 1), vocab)``, padded positions hold ``pad_token_id``;
    ``token_type_ids`` mark the second half of each row's real tokens as segment 1; ``position_ids`` count
    real tokens (0 at padding); past keys / values and pixels are N(0, 1) in the model's dtype.

    Example:
        >>> sig = Signature("feature-extraction", ("input_ids", "attention_mask"), ("last_hidden_state",),
        ...                 ("input_ids", "attention_mask"), ("last_hidden_state",), vocab_size=50)
        >>> ids, mask = make_inputs(sig, Case(3, 5, 0, "right"))
        >>> mask.tolist()
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    """
    g = torch.Generator().manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    if not sig.is_text:
        assert sig.image_shape is not None
        values["pixel_values"] = torch.randn(case.batch, *sig.image_shape, generator=g).to(sig.float_dtype)
        return [values[name].to(device) for name in sig.inputs]
    total = case.past + case.seq
    mask = torch.zeros(case.batch, total, dtype=torch.long)
    for row, length in enumerate(row_lengths(case)):
        if case.padding == "left":
            mask[row, total - length :] = 1
        else:
            mask[row, :length] = 1
    current = mask[:, case.past :]
    low = min(4, max(0, sig.vocab_size - 1))
    ids = torch.randint(low, max(low + 1, sig.vocab_size), (case.batch, case.seq), generator=g)
    values["input_ids"] = torch.where(current.bool(), ids, torch.full_like(ids, sig.pad_token_id))
    values["attention_mask"] = mask
    if "token_type_ids" in sig.inputs:
        rank = current.cumsum(-1)
        values["token_type_ids"] = ((rank > current.sum(-1, keepdim=True) // 2) & current.bool()).long()
    values["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, case.past :]
    heads, head_dim = sig.past_shape
    for i in range(sig.past_layers):
        for kv in ("key", "value"):
            t = torch.randn(case.batch, heads, case.past, head_dim, generator=g)
            values[f"past_key_values.{i}.{kv}"] = t.to(sig.float_dtype)
    return [values[name].to(device) for name in sig.inputs]


def query_mask(sig: Signature, inputs: list[torch.Tensor], case: Case) -> torch.Tensor:
    """(batch, past + seq) boolean mask of real tokens (all True without an attention mask or for images)."""
    if "attention_mask" in sig.inputs:
        return inputs[sig.inputs.index("attention_mask")].bool().cpu()
    return torch.ones(case.batch, case.past + case.seq, dtype=torch.bool)
