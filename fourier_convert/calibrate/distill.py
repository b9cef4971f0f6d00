"""Distillation: train only the LoRA factors so that the LoRA model's hidden states follow the FourierFT model's.

The student is the calibration model with every adapted layer in ``lora`` mode, the teacher the same model in
``fourier`` mode (one copy of the weights; only ``lora_A`` / ``lora_B`` receive gradients, nothing else in the
model changes). The loss is, averaged over the transformer layers' hidden states (the embeddings excluded), the
squared error relative to the teacher's, over real tokens only; where the adapter trains the model's head
(``modules_to_save``), the KL divergence of the output distributions is added.

Adam with a per-tensor learning rate ``lr * rms(initial tensor)`` (steps relative to each factor's own scale, so
one setting fits models of any width), cosine decay. Every ``eval_every`` steps the loss on a validation slice of
the *training* samples is measured; the best factors seen are returned, and in the second half of the steps (the
first half runs at a high learning rate and may pass through worse factors first) training stops once ``patience``
evaluations in a row bring no improvement. The held-out report split is never used here. Deterministic for a seed
on a given device. On a GPU the matrix products run in TF32 (10-bit mantissa) while distilling: the factors are
trained, not computed exactly, and the closed form before and the evaluation after run in full float32 (Gram
matrices in float64).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fourier_convert.calibrate.model import CalibModel

Batcher = Callable[[Sequence[Mapping[str, torch.Tensor]]], dict[str, torch.Tensor]]


@dataclass
class DistillResult:
    """What distillation did.

    Attributes:
        steps: Steps run (fewer than asked when it stopped early).
        best_step: Step whose factors are returned (0: the starting factors were never beaten).
        history: ``(step, validation loss)`` at each evaluation, step 0 first.
        seconds: Wall time.
        stopped_early: Whether it stopped before the steps asked for.
    """

    steps: int
    best_step: int
    history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def distill(
    model: CalibModel,
    train: Sequence[Mapping[str, torch.Tensor]],
    validation: Sequence[Mapping[str, torch.Tensor]],
    collate: Batcher,
    *,
    steps: int,
    lr: float = 0.02,
    batch_size: int = 16,
    seed: int = 0,
    head_loss: bool = False,
    eval_every: int | None = None,
    patience: int = 4,
    progress: Callable[[int, float | None], None] | None = None,
) -> DistillResult:
    """Train the model's LoRA factors (in place) to match the FourierFT model; leaves the best factors set.

    Args:
        model: The calibration model, with the starting factors set (e.g. the closed form).
        train: Samples to train on.
        validation: Samples for early stopping (may be empty: then the last factors are kept).
        collate: Turns a list of samples into a batch.
        steps: Optimiser steps (>= 1).
        lr: Learning rate, relative to each factor tensor's root-mean-square value.
        batch_size: Samples per step.
        seed: Seed of the batch order.
        head_loss: Add the KL divergence of the outputs (where the adapter trains the head).
        eval_every: Steps between validations (default: a tenth of ``steps``, at least 10).
        patience: Validations without improvement before stopping (counted in the second half of the steps).
        progress: Called with ``(step, last validation loss or None)`` after every step.

    Returns:
        A :class:`DistillResult`.

    Raises:
        ValueError: ``steps`` < 1 or no training samples.

    Example:
        >>> result = distill(model, train, val, collate, steps=300)  # doctest: +SKIP
    """
    if steps < 1 or not train:
        raise ValueError("distillation needs at least one step and one training sample")
    t0 = time.perf_counter()
    every = eval_every or max(10, steps // 10)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = [p for layer in model.layers for p in (layer.lora_a, layer.lora_b) if p.numel()]
    groups: list[dict[str, Any]] = []
    for p in params:
        p.requires_grad_(True)
        rms = float(p.detach().pow(2).mean().sqrt())
        groups.append({"params": [p], "lr": lr * (rms if rms > 0 else 1e-3)})
    opt = torch.optim.Adam(groups)
    base_lrs = [float(g["lr"]) for g in groups]
    val_batches = [collate(validation[i : i + batch_size]) for i in range(0, len(validation), batch_size)]
    with _tf32(model.device):
        return _train(
            model,
            train,
            val_batches,
            collate,
            params,
            opt,
            base_lrs,
            steps,
            batch_size,
            gen,
            head_loss,
            every,
            patience,
            progress,
            t0,
        )


@contextlib.contextmanager
def _tf32(device: torch.device) -> Iterator[None]:
    """TF32 matrix products on CUDA inside the block (restored after)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _train(
    model: CalibModel,
    train: Sequence[Mapping[str, torch.Tensor]],
    val_batches: list[dict[str, torch.Tensor]],
    collate: Batcher,
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    base_lrs: list[float],
    steps: int,
    batch_size: int,
    gen: torch.Generator,
    head_loss: bool,
    every: int,
    patience: int,
    progress: Callable[[int, float | None], None] | None,
    t0: float,
) -> DistillResult:
    def validate() -> float:
        with torch.no_grad():
            losses = [_loss(model, b, head_loss, grad=False) for b in val_batches]
        return sum(losses) / len(losses)

    result = DistillResult(steps=0, best_step=0)
    best_loss = validate() if val_batches else math.inf
    if val_batches:
        result.history.append((0, best_loss))
    best = model.factors()
    stale = 0
    model.model.train(False)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train), (min(batch_size, len(train)),), generator=gen).tolist()
        batch = collate([train[i] for i in idx])
        decay = 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * decay
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, batch, head_loss, grad=True)
        opt.step()
        result.steps = step
        last: float | None = None
        if val_batches and (step % every == 0 or step == steps):
            last = validate()
            result.history.append((step, last))
            if last < best_loss * (1 - 1e-4):
                best_loss, best, result.best_step, stale = last, model.factors(), step, 0
            elif step > steps // 2:  # the first half explores at a high learning rate: no early stop there
                stale += 1
        if progress is not None:
            progress(step, last if last is not None else loss)
        if stale >= patience:
            result.stopped_early = step < steps
            break
    for p in params:
        p.requires_grad_(False)
    if val_batches:
        model.set_factors(best)
    else:
        result.best_step = result.steps
    result.seconds = time.perf_counter() - t0
    return result


def _loss(model: CalibModel, batch: Mapping[str, torch.Tensor], head_loss: bool, *, grad: bool) -> float:
    """Teacher forward (no grad), student forward, loss; backward when ``grad``. Returns the loss value."""
    mask = batch.get("attention_mask")
    with torch.no_grad(), model.mode("fourier"):
        teacher = model.run(batch, hidden_states=True)
    with torch.set_grad_enabled(grad), model.mode("lora"):
        student = model.run(batch, hidden_states=True)
        loss = hidden_state_loss(teacher.hidden_states, student.hidden_states, mask)
        if head_loss:
            loss = loss + _kl(teacher, student, mask)
    if grad:
        loss.backward()  # type: ignore[no-untyped-call]
    return float(loss.detach())


def hidden_state_loss(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over hidden states 1.. (the embeddings' output, index 0, is left out) of
    ``||student - teacher||^2 / ||teacher||^2`` over real tokens.

    Example:
        >>> t = [torch.ones(1, 2, 3), torch.ones(1, 2, 3)]
        >>> float(hidden_state_loss(t, [t[0], 2 * t[1]], None))
        1.0
    """
    terms = []
    for t, s in zip(teacher[1:], student[1:], strict=True):
        diff = (s - t.to(s.dtype)) ** 2
        ref = t.to(s.dtype) ** 2
        if mask is not None and t.ndim == 3 and t.shape[:2] == mask.shape:
            keep = mask.to(t.device).to(s.dtype)[..., None]
            diff, ref = diff * keep, ref * keep
        terms.append(diff.sum() / ref.sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def _kl(teacher: Any, student: Any, mask: torch.Tensor | None) -> torch.Tensor:
    t = getattr(teacher, "logits", None)
    s = getattr(student, "logits", None)
    if not isinstance(t, torch.Tensor) or not isinstance(s, torch.Tensor) or t.shape[-1] < 2:
        return torch.zeros((), device=s.device if isinstance(s, torch.Tensor) else None)
    log_p = torch.log_softmax(t.float(), -1)
    log_q = torch.log_softmax(s.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None and kl.shape == mask.shape:
        keep = mask.to(kl.device).float()
        return (kl * keep).sum() / keep.sum().clamp_min(1)
    return kl.mean()
