"""``inspect``: what a FourierFT adapter holds, and with a base, what it does to it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fourier_convert.io.adapter import read_adapter

ENERGY_FRACTIONS = (0.01, 0.1, 0.5)


@dataclass
class LayerInfo:
    """One adapted module.

    Attributes:
        module: Module path.
        n: Coefficients.
        shape: ``(out, in)`` of the delta (with a base), else None.
        conv1d: Whether the delta is added transposed (with a base).
        delta_norm: Frobenius norm of the delta (with a base).
        energy_top: Share of the delta's energy held by the largest 1 %, 10 %, 50 % of coefficients.
    """

    module: str
    n: int
    shape: tuple[int, int] | None = None
    conv1d: bool | None = None
    delta_norm: float | None = None
    energy_top: dict[str, float] = field(default_factory=dict)


@dataclass
class InspectReport:
    """The result of :func:`inspect_adapter`."""

    adapter: str
    method: str
    target_modules: Any
    scaling: float
    random_loc_seed: int
    bias: str
    modules_to_save: list[str]
    task_type: str | None
    trainable_parameters: int
    layers: list[LayerInfo]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    base: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The report as terminal lines."""
        out = [
            f"adapter:          {self.adapter}",
            f"method:           {self.method}",
            f"target_modules:   {self.target_modules}",
            f"scaling:          {self.scaling}",
            f"random_loc_seed:  {self.random_loc_seed}",
            f"bias:             {self.bias}",
            f"modules_to_save:  {self.modules_to_save or '-'}",
            f"task_type:        {self.task_type or '-'}",
            f"trainable params: {self.trainable_parameters:,}",
            f"adapted layers:   {len(self.layers)}",
        ]
        with_base = any(layer.shape for layer in self.layers)
        head = f"  {'module':<56} {'n':>7}"
        if with_base:
            head += f" {'out x in':>13} {'conv1d':>6} {'||dW||_F':>10} {'top1%':>6} {'top10%':>6}"
        out.append(head)
        for layer in self.layers:
            row = f"  {layer.module:<56} {layer.n:>7}"
            if layer.shape:
                shape = f"{layer.shape[0]}x{layer.shape[1]}"
                row += (
                    f" {shape:>13} {'yes' if layer.conv1d else 'no':>6} {layer.delta_norm or 0.0:>10.4g}"
                    f" {layer.energy_top.get('1%', 0.0):>6.1%} {layer.energy_top.get('10%', 0.0):>6.1%}"
                )
            out.append(row)
        out += [f"note: {n}" for n in self.notes]
        out += [f"warning: {w}" for w in self.warnings]
        return out


def inspect_adapter(
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
) -> InspectReport:
    """Describe a FourierFT adapter; with ``base``, also shapes, delta norms and energy concentration.

    Args:
        adapter: Adapter folder, ``PATH:NAME`` or hub id.
        base: Base model folder or hub id (headers and config only are read).
        subfolder: Named adapter inside the folder.
        allow_pickle: Accept ``adapter_model.bin``.

    Returns:
        An :class:`InspectReport`.

    Raises:
        FourierConvertError: Invalid adapter or base (same checks as ``merge``).

    Example:
        >>> r = inspect_adapter("fixtures/llama/adapter", base="fixtures/llama/base")  # doctest: +SKIP
        >>> r.layers[0].n  # doctest: +SKIP
        50
    """
    a = read_adapter(adapter, subfolder=subfolder, allow_pickle=allow_pickle)
    s = a.settings
    params = sum(sp.n for sp in a.spectra.values())
    for t in {**a.biases, **a.head_tensors}.values():
        params += int(np.prod(t.shape)) if t.shape else 1
    layers = {m: LayerInfo(m, sp.n) for m, sp in a.spectra.items()}
    report = InspectReport(
        adapter=str(adapter),
        method=f"FourierFT (peft {s.raw.get('peft_version', '?')})",
        target_modules=s.target_modules,
        scaling=s.scaling,
        random_loc_seed=s.random_loc_seed,
        bias=s.bias,
        modules_to_save=s.modules_to_save,
        task_type=s.task_type,
        trainable_parameters=params,
        layers=list(layers.values()),
        base=str(base) if base is not None else None,
    )
    bf16 = [sp.key for sp in a.spectra.values() if sp.stored_dtype in ("BF16", "F16")]
    if base is None:
        if bf16:
            report.warnings.append(f"{len(bf16)} spectra saved in 16-bit floats (first: {bf16[0]})")
        return report
    # the base's shapes, deltas and energies need torch: imported only here (inspect without --base starts fast)
    from fourier_convert.io.checkpoint import open_checkpoint
    from fourier_convert.maths.delta import delta_sq_norm
    from fourier_convert.maths.indices import IndexCache
    from fourier_convert.plan import plan_with_orientation

    plan = plan_with_orientation(open_checkpoint(base), [a])
    report.warnings += plan.warnings
    report.notes += plan.notes
    cache = IndexCache()
    for layer in plan.layers:
        m, n = layer.delta_shape
        c = layer.contributions[0]
        idx = cache.get(m, n, c.seed, c.spectrum.n)
        values = c.spectrum.values
        # unscaled, then scaled once: shares do not depend on the scaling, and an absurd one (1e300) gives a
        # huge or infinite norm instead of an overflow
        total = delta_sq_norm(values, idx, (m, n), 1.0)
        info = layers[layer.module]
        info.shape, info.conv1d = (m, n), layer.conv1d
        info.delta_norm = abs(c.scaling) * float(np.sqrt(total))
        order = np.argsort(-np.abs(values))
        for frac in ENERGY_FRACTIONS:
            k = max(1, round(frac * len(values)))
            top = order[:k]
            part = delta_sq_norm(values[top], idx[:, top], (m, n), 1.0)
            info.energy_top[f"{frac:.0%}"] = part / total if total > 0 else 0.0
    return report
