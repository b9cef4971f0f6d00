"""The merge proof: the unmerged adapter applied to the base model, without PEFT and without FFTs.

:func:`load_unmerged` loads the base model and then does what PEFT's unmerged FourierFT forward does:
trained biases and saved heads replace the base's, and each adapted Linear / Conv1D gets a forward hook
that adds ``x @ dW^T``. The delta is never formed: :func:`closed_form_apply` evaluates the product from
the coefficients through the exact factorisation (docs/maths.md, fact 3)

    x @ dW^T = s / (M N) * Re( ((x @ E_v) * c) @ E_u^T ),   E_v[q, k] = exp(2 pi i v_k q / N),
                                                           E_u[p, k] = exp(2 pi i u_k p / M)

in float64, with phases reduced modulo M and N in integers. It shares no code with the merge's FFT path,
so the outputs of the merged checkpoint (loaded by transformers) are checked against an independent route.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fourier_convert.errors import ExportError
from fourier_convert.io.adapter import FourierFTAdapter
from fourier_convert.maths.indices import spectral_indices
from fourier_convert.onnx.models import load_task_model


def closed_form_apply(
    x: torch.Tensor, values: np.ndarray, indices: np.ndarray, shape: tuple[int, int], scaling: float
) -> torch.Tensor:
    """``x @ dW^T`` for a FourierFT delta ``dW`` of shape ``(M, N) = shape``, without forming ``dW``, in float64.

    Args:
        x: ``(..., N)`` inputs.
        values: The ``n`` coefficients.
        indices: ``(2, n)`` row / column frequencies.
        shape: ``(M, N)``.
        scaling: The delta's scale.

    Returns:
        ``(..., M)`` float64.

    Example:
        >>> from fourier_convert.maths import delta_weights_numpy
        >>> idx = np.array([[1, 2], [0, 3]]); c = np.array([1.0, -2.0]); x = torch.randn(3, 4, dtype=torch.float64)
        >>> dense = torch.from_numpy(delta_weights_numpy(c, idx, 5, 4, 7.0))
        >>> torch.allclose(closed_form_apply(x, c, idx, (5, 4), 7.0), x @ dense.T)
        True
    """
    m, n = shape
    u = torch.from_numpy(np.asarray(indices[0], dtype=np.int64))
    v = torch.from_numpy(np.asarray(indices[1], dtype=np.int64))
    two_pi = 2.0 * math.pi
    phase_v = ((torch.arange(n)[:, None] * v[None, :]) % n).double() * (two_pi / n)  # (N, k)
    phase_u = ((torch.arange(m)[:, None] * u[None, :]) % m).double() * (two_pi / m)  # (M, k)
    e_v = torch.polar(torch.ones_like(phase_v), phase_v)
    e_u = torch.polar(torch.ones_like(phase_u), phase_u)
    flat = x.reshape(-1, n).to(torch.float64).to(torch.complex128)
    coeffs = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(torch.complex128)
    y = ((flat @ e_v) * coeffs) @ e_u.T
    return (y.real * (scaling / (m * n))).reshape(*x.shape[:-1], m)


@dataclass
class _Term:
    values: np.ndarray
    indices: np.ndarray
    shape: tuple[int, int]
    scaling: float


@dataclass
class Unmerged:
    """The base model with the adapters applied unmerged (hooks), and what was done.

    Attributes:
        model: The model; call :meth:`remove` to take the hooks off.
        hooked: Adapted modules (model names).
        replaced: Parameters replaced by trained biases / saved heads (model names).
        skipped: Adapter tensors with no place in this task's model (e.g. a head under feature-extraction).
    """

    model: Any
    hooked: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _lookup(names: dict[str, Any], key: str, prefix: str) -> str | None:
    """``key`` in model names, tolerating an added or missing base-model prefix (``bert.``)."""
    if key in names:
        return key
    if prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1 :] in names:
        return key[len(prefix) + 1 :]
    if prefix and f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    return None


def load_unmerged(
    base_folder: Path,
    task: str,
    config: Any,
    adapters: Sequence[FourierFTAdapter],
    weights: Sequence[float],
) -> Unmerged:
    """Load the base for ``task`` (with the merged ``config``, so heads have the trained shape) and apply the
    adapters as PEFT's unmerged forward does.

    Args:
        base_folder: The base model folder.
        task: Export task (selects the model class).
        config: transformers config of the merged model.
        adapters: The adapters, in merge order.
        weights: Each adapter's multiplier.

    Returns:
        The hooked model.

    Raises:
        ExportError: An adapted module is not a Linear / Conv1D of the expected shape in this model, or the
            base lacks weights that neither it nor the adapters provide.

    Example:
        >>> unmerged = load_unmerged(Path("base"), "causal-lm", config, [adapter], [1.0])  # doctest: +SKIP
    """
    from transformers.pytorch_utils import Conv1D

    # Parameters the adapters set may be missing from the base (a head the adapter adds).
    meta_params, prefix = _model_param_names(task, config)
    provided: set[str] = set()
    for a in adapters:
        for key in [*a.biases, *a.head_tensors]:
            found = _lookup(meta_params, key, prefix)
            if found is not None:
                provided.add(found)
    model = load_task_model(base_folder, task, config=config, provided=provided)
    result = Unmerged(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    terms: dict[str, list[_Term]] = {}
    with torch.no_grad():
        for a, weight in zip(adapters, weights, strict=True):
            for key, stored in [*a.biases.items(), *a.head_tensors.items()]:
                name = _lookup(params, key, prefix)
                if name is None:
                    result.skipped.append(key)
                    continue
                value = stored.load()
                if tuple(value.shape) != tuple(params[name].shape):
                    raise ExportError(
                        f"{a.label}: {stored.key}",
                        f"has shape {tuple(value.shape)}, the model's {name} has {tuple(params[name].shape)}",
                        "check that the adapter belongs to this base",
                    )
                params[name].copy_(value.to(params[name].dtype))
                result.replaced.append(name)
            seed = a.settings.random_loc_seed
            for module_name, spectrum in a.spectra.items():
                name = _lookup(modules, module_name, prefix)
                module = modules.get(name) if name is not None else None
                if not isinstance(module, (torch.nn.Linear, Conv1D)):
                    raise ExportError(
                        f"{a.label}: {spectrum.key}",
                        f"module {module_name} is {type(module).__name__ if module is not None else 'missing'} in "
                        f"{type(model).__name__}, expected a Linear or Conv1D",
                        "check the --task and that the adapter belongs to this base",
                    )
                assert name is not None
                rows, cols = module.weight.shape
                out_f, in_f = (cols, rows) if isinstance(module, Conv1D) else (rows, cols)
                idx = spectral_indices(out_f, in_f, spectrum.n, seed).numpy()
                scale = a.settings.scaling * weight
                terms.setdefault(name, []).append(_Term(spectrum.values, idx, (out_f, in_f), scale))
    for name, parts in terms.items():
        result.handles.append(modules[name].register_forward_hook(_hook(parts)))
        result.hooked.append(name)
    result.replaced = sorted(set(result.replaced))
    return result


def _hook(parts: list[_Term]) -> Any:
    def add_delta(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        extra = sum(closed_form_apply(x, t.values, t.indices, t.shape, t.scaling) for t in parts)
        assert isinstance(extra, torch.Tensor)
        return output + extra.to(output.dtype)

    return add_delta


def _model_param_names(task: str, config: Any) -> tuple[dict[str, Any], str]:
    """Parameter names and base-model prefix of the task's model, built on the meta device (no memory)."""
    import transformers

    from fourier_convert.onnx.tasks import AUTO_CLASSES

    auto = getattr(transformers, AUTO_CLASSES[task])
    with torch.device("meta"):
        model = auto.from_config(config)
    return dict(model.named_parameters()), str(getattr(model, "base_model_prefix", "") or "")
