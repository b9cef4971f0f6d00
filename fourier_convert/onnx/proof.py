"""The merge proof: the unmerged adapter applied to the base weights, without PEFT and without FFTs.

:func:`apply_unmerged` turns the loaded *merged* model back into "base + unmerged adapter", the way PEFT's
unmerged FourierFT forward computes: every adapted Linear / Conv1D gets its base weight back (read from
the base checkpoint) and a forward hook that adds ``x @ dW^T``; trained biases and saved heads are set from
the adapter files. The delta is never formed: :func:`delta_apply` evaluates the product from the
coefficients through the exact factorisation (docs/maths.md, fact 3)

    x @ dW^T = s / (M N) * Re( ((x @ E_v) * c) @ E_u^T ),   E_v[q, k] = exp(2 pi i v_k q / N),
                                                           E_u[p, k] = exp(2 pi i u_k p / M)

in float64, with phases reduced modulo M and N in integers. It shares no code with the merge's FFT path.
Every other tensor of the merged model is compared exactly with the base checkpoint's. Outputs of the
model before (merged) and after (unmerged) are then compared by the caller. Working in place keeps one
model in memory (plus the base copies of the adapted weights): the merged tensors are set aside, not
copied, and :meth:`Unmerged.restore` puts them back, so the same model is exported afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fourier_convert.errors import ExportError
from fourier_convert.io.adapter import FourierFTAdapter
from fourier_convert.io.checkpoint import BaseCheckpoint
from fourier_convert.io.safetensors_file import map_torch, read_torch
from fourier_convert.maths.delta import delta_apply, spectral_basis
from fourier_convert.maths.indices import spectral_indices
from fourier_convert.skeleton import build_skeleton


@dataclass
class _Term:
    values: np.ndarray
    indices: np.ndarray
    shape: tuple[int, int]
    scaling: float
    basis: tuple[torch.Tensor, torch.Tensor]


@dataclass
class Unmerged:
    """What :func:`apply_unmerged` did to the model.

    Attributes:
        hooked: Adapted modules (model names) that got their base weight and a delta hook.
        replaced: Parameters set from the adapters' trained biases / saved heads (model names).
        skipped: Adapter tensors with no place in this task's model (e.g. a head under feature-extraction).
        checked: Other tensors found equal to the base checkpoint's.
        mismatched: Other tensors that differ from the base checkpoint's (``"key -> name"``).
        unchecked: Base tensors with no 1:1 counterpart in the model (fused on load, or unused).
        handles: The forward hooks.
        saved: ``(parameter, merged data)`` for every parameter whose data was replaced.
    """

    hooked: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def restore(self) -> None:
        """Take the hooks off and give every replaced parameter its merged data back (the model is the
        merged model again, bit for bit)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for param, data in reversed(self.saved):
            param.data = data
        self.saved = []


def _lookup(names: dict[str, Any], key: str, prefix: str) -> str | None:
    """``key`` in model names, tolerating an added or missing base-model prefix (``bert.``)."""
    if key in names:
        return key
    if prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1 :] in names:
        return key[len(prefix) + 1 :]
    if prefix and f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    return None


def apply_unmerged(
    model: Any,
    base: BaseCheckpoint,
    layers: Sequence[tuple[str, str]],
    adapters: Sequence[FourierFTAdapter],
    weights: Sequence[float],
) -> Unmerged:
    """Turn a loaded merged model, in place, into the base model with the adapters applied unmerged.

    Args:
        model: The merged model (float32), as transformers loaded it for the export task.
        base: The base checkpoint the adapters were merged into.
        layers: ``(module, checkpoint key)`` of every adapted weight (the merge report's layers).
        adapters: The adapters, in merge order.
        weights: Each adapter's multiplier.

    Returns:
        What was done; ``mismatched`` lists tensors that differ from the base (the merge is then wrong).

    Raises:
        ExportError: An adapted module is not a Linear / Conv1D of the base weight's shape in this model.

    Example:
        >>> done = apply_unmerged(model, open_checkpoint("base"), [(l.module, l.key) for l in merged.layers],
        ...                       [adapter], [1.0])  # doctest: +SKIP
        >>> done.restore()  # doctest: +SKIP
    """
    from transformers.pytorch_utils import Conv1D

    prefix = str(getattr(model, "base_model_prefix", "") or "")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    result = Unmerged()
    terms: dict[str, list[_Term]] = {}
    bases: dict[tuple[int, int, int, int], tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor]]] = {}
    adapted_keys = {key for _, key in layers}
    with torch.no_grad():
        for module_name, key in layers:
            name = _lookup(modules, module_name, prefix)
            module = modules.get(name) if name is not None else None
            if not isinstance(module, (torch.nn.Linear, Conv1D)):
                raise ExportError(
                    module_name,
                    f"is {type(module).__name__ if module is not None else 'missing'} in {type(model).__name__}, "
                    "expected a Linear or Conv1D",
                    "check the --task and that the adapter belongs to this base",
                )
            weight = read_torch(base.tensors[key])
            if tuple(weight.shape) != tuple(module.weight.shape):
                raise ExportError(
                    key,
                    f"base shape {tuple(weight.shape)} differs from the model's {tuple(module.weight.shape)} "
                    "(transformers transforms this weight on load)",
                    "merge with fourier-convert merge and export the merged folder with --model (no merge proof)",
                )
            result.saved.append((module.weight, module.weight.data))
            module.weight.data = weight.to(module.weight.dtype)
        for a, weight_mult in zip(adapters, weights, strict=True):
            for key, stored in [*a.biases.items(), *a.head_tensors.items()]:
                found = _lookup(params, key, prefix)
                if found is None:
                    result.skipped.append(key)
                    continue
                value = stored.load()
                if tuple(value.shape) != tuple(params[found].shape):
                    raise ExportError(
                        f"{a.label}: {stored.key}",
                        f"has shape {tuple(value.shape)}, the model's {found} has {tuple(params[found].shape)}",
                        "check that the adapter belongs to this base",
                    )
                result.saved.append((params[found], params[found].data))
                params[found].data = value.to(params[found].dtype)
                result.replaced.append(found)
            seed = a.settings.random_loc_seed
            for module_name, spectrum in a.spectra.items():
                name = _lookup(modules, module_name, prefix)
                module = modules.get(name) if name is not None else None
                if name is None or not isinstance(module, (torch.nn.Linear, Conv1D)):
                    raise ExportError(
                        f"{a.label}: {spectrum.key}",
                        f"module {module_name} is not a Linear / Conv1D in {type(model).__name__}",
                        "check the --task and that the adapter belongs to this base",
                    )
                rows, cols = module.weight.shape
                out_f, in_f = (cols, rows) if isinstance(module, Conv1D) else (rows, cols)
                where = (out_f, in_f, spectrum.n, seed)
                if where not in bases:  # layers of one shape share their positions, hence their basis
                    idx = spectral_indices(out_f, in_f, spectrum.n, seed).numpy()
                    bases[where] = (idx, spectral_basis(idx, (out_f, in_f)))
                idx, basis = bases[where]
                terms.setdefault(name, []).append(
                    _Term(spectrum.values, idx, (out_f, in_f), a.settings.scaling * weight_mult, basis)
                )
        result.replaced = sorted(set(result.replaced))
        _check_untouched(model, base, adapted_keys, set(result.replaced), prefix, result)
    for name, parts in terms.items():
        result.handles.append(modules[name].register_forward_hook(_hook(parts)))
        result.hooked.append(name)
    return result


def _check_untouched(
    model: Any, base: BaseCheckpoint, adapted: set[str], replaced: set[str], prefix: str, result: Unmerged
) -> None:
    """Compare every tensor the merge should have copied with the base checkpoint's, bit for bit."""
    state = model.state_dict(keep_vars=True)
    mapping: dict[str, str] = {}
    fused: set[str] = set()
    if base.config is not None:
        skeleton, _ = build_skeleton(base.config, base.tensors)
        if skeleton is not None:
            mapping, fused = skeleton.model_keys, skeleton.fused_keys
    for key, info in base.tensors.items():
        if key in adapted:
            continue
        name = None if key in fused else _lookup(state, mapping.get(key, key), prefix)
        if name is None:
            result.unchecked.append(key)
            continue
        if name in replaced:
            continue
        if same_values(map_torch(info), state[name].detach()):  # read in place, not copied
            result.checked += 1
        else:
            result.mismatched.append(f"{key} -> {name}")


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_values(stored: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``value`` is exactly ``stored`` converted to ``value``'s dtype, compared bit for bit (NaNs too).

    bfloat16 -> float32 is a 16-bit shift, so that pair is compared without converting: the float32 high
    halves must be the bfloat16 bits and the low halves zero.

    Example:
        >>> same_values(torch.tensor([1.5, -2.0], dtype=torch.bfloat16), torch.tensor([1.5, -2.0]))
        True
        >>> same_values(torch.tensor([1.5], dtype=torch.bfloat16), torch.tensor([1.5 + 2**-20]))
        False
    """
    if tuple(stored.shape) != tuple(value.shape):
        return False
    if not (stored.is_floating_point() and value.is_floating_point()):
        return torch.equal(stored.to(value.dtype), value)
    if stored.dtype != value.dtype:
        if stored.dtype == torch.bfloat16 and value.dtype == torch.float32 and sys.byteorder == "little":
            halves = value.contiguous().view(torch.int16).reshape(-1, 2)  # [low, high] per float32
            return torch.equal(halves[:, 1], stored.reshape(-1).view(torch.int16)) and not bool(halves[:, 0].any())
        stored = stored.to(value.dtype)
    bits = _BITS[value.element_size()]
    return torch.equal(stored.contiguous().view(bits), value.contiguous().view(bits))


def _hook(parts: list[_Term]) -> Any:
    def add_delta(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        extra = sum(delta_apply(x, t.values, t.indices, t.shape, t.scaling, t.basis) for t in parts)
        assert isinstance(extra, torch.Tensor)
        return output + extra.to(output.dtype)

    return add_delta
