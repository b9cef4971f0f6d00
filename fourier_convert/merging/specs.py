"""What a merge is asked to do and what it reports, before any tensor is touched: adapter specs, the report of a
plan, its rows and layer stubs, and the merged ``config.json``. No torch here: the CLI plans a merge and starts
its byte copies while torch is still being imported."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fourier_convert.errors import UsageError
from fourier_convert.io.adapter import FourierFTAdapter
from fourier_convert.plan import LayerPlan, MergePlan, OutputTensor
from fourier_convert.report import LayerReport, MergeReport

#: Precisions a merge rebuilds and adds deltas in.
PRECISIONS = ("float32", "float64")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to merge: where it is, which named sub-adapter, and the weight of its delta."""

    path: str
    subfolder: str | None = None
    weight: float = 1.0


def check_precision(precision: str) -> str:
    """Validate ``--precision``.

    Raises:
        UsageError: Neither float64 nor float32.

    Example:
        >>> check_precision("float64")
        'float64'
    """
    if precision not in PRECISIONS:
        raise UsageError("--precision", f"unknown precision {precision!r}", "use float32 or float64")
    return precision


def plan_report(
    plan: MergePlan,
    adapters: Sequence[FourierFTAdapter],
    base: str,
    device: str,
    precision: str,
    *,
    out: str | None = None,
    dry_run: bool = False,
    shards: Sequence[str] = (),
) -> MergeReport:
    """The report of a planned merge, before any delta is rebuilt (layers, changes and timings come later)."""
    return MergeReport(
        out=out,
        dry_run=dry_run,
        device=device,
        precision=precision,
        tensors=plan.counts(),
        bytes_total=plan.bytes_total,
        bytes_changed=sum(o.nbytes for o in plan.outputs if o.raw_source is None),
        shards=list(shards),
        warnings=plan.warnings,
        notes=plan.notes,
        adapters=[a.label for a in adapters],
        base=base,
    )


def adapter_specs(adapter: Any) -> list[AdapterSpec]:
    """``adapter`` (one path / spec or a sequence of them) as a list of :class:`AdapterSpec`.

    Raises:
        UsageError: No adapter, or a weight that is not a finite number.

    Example:
        >>> [s.path for s in adapter_specs(["a", AdapterSpec("b", weight=0.5)])]
        ['a', 'b']
    """
    items = adapter if isinstance(adapter, (list, tuple)) else [adapter]
    if not items:
        raise UsageError("--adapter", "no adapter given", "pass at least one --adapter")
    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec(str(a)) for a in items]
    for s in specs:
        if not math.isfinite(s.weight):
            raise UsageError("--weight", f"{s.weight} is not a finite number", "pass a multiplier such as 1.0 or 0.5")
    return specs


def change_row(o: OutputTensor, adapters: Sequence[FourierFTAdapter]) -> dict[str, Any]:
    """One row of the report's ``changes``: what the merge does to an output tensor that is not a byte copy."""
    if o.layer is not None:
        parts = [
            f"{'delta^T (Conv1D)' if o.layer.conv1d else 'delta'} of {adapters[c.adapter_index].label} "
            f"(n={c.spectrum.n}, scaling={c.scaling:g})"
            for c in o.layer.contributions
        ]
        how = "base + " + " + ".join(parts)
    elif o.replacement is not None:
        how = f"{o.replacement.key} ({o.replacement.dtype})"
    else:
        how = f"cast from {o.base.dtype if o.base else '?'}"
    return {"name": o.name, "action": o.kind, "dtype": o.dtype, "shape": list(o.shape), "bytes": o.nbytes, "how": how}


def layer_stub(layer: LayerPlan) -> LayerReport:
    """A layer's report before its delta is rebuilt (what a dry run shows)."""
    return LayerReport(
        layer.module,
        layer.key,
        layer.delta_shape,
        layer.conv1d,
        layer.orientation_source,
        [c.spectrum.n for c in layer.contributions],
    )


def config_json(config: dict[str, Any]) -> bytes:
    """A merged ``config.json`` that differs from the base's, as written (sorted keys, indented)."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


#: A delta whose norm exceeds this multiple of its base weight's is warned about. The shipped toy fixtures
#: (64-wide layers, scaling 150) reach 13x; a 4096-wide layer with n = 1000 unit-normal coefficients, scaling
#: 150 and weights of standard deviation 0.02 gives 0.0098x (computed from the spectrum, Parseval).
LARGE_DELTA = 100.0


class NormedLayer(Protocol):
    """A layer's name with the Frobenius norms of its delta and of its base weight (a merge's layer report)."""

    @property
    def module(self) -> str: ...
    @property
    def delta_norm(self) -> float: ...
    @property
    def base_norm(self) -> float: ...


def large_delta_warnings(
    layers: Sequence[NormedLayer], fix: str = "check the adapter's scaling and --weight"
) -> list[str]:
    """A warning when a delta's norm exceeds :data:`LARGE_DELTA` times its base weight's: that points at a
    wrong ``scaling`` (or ``--weight``), even when every value stays finite.

    Args:
        layers: Each layer's norms.
        fix: What the warning tells the user to check.

    Returns:
        One warning line, or none.

    Example:
        >>> large_delta_warnings([])
        []
    """
    large = [r for r in layers if r.base_norm > 0 and r.delta_norm > LARGE_DELTA * r.base_norm]
    if not large:
        return []
    worst = max(large, key=lambda r: r.delta_norm / r.base_norm)
    return [
        f"{len(large)} layer(s) change by more than {LARGE_DELTA:g}x their own weight (largest: {worst.module}, "
        f"delta norm {worst.delta_norm:.3g} = {worst.delta_norm / worst.base_norm:.3g} x the base weight's); {fix}"
    ]
