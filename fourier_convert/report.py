"""Reports returned by the library and printed / saved by the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """What happened to one adapted weight.

    Attributes:
        module: Module path (adapter name space).
        key: Checkpoint key of the weight.
        shape: ``(out, in)`` of the delta.
        conv1d: Whether the delta was added transposed (Conv1D).
        orientation: ``"skeleton"`` (transformers' meta-device model), ``"source"`` (a scan of the
            modeling source proved there is no Conv1D) or ``"flag"`` (the adapter's fan_in_fan_out).
        n: Coefficients per adapter, in adapter order.
        backend: The reconstruction that passed its check: ``"torch-<device>"`` (e.g. ``"torch-cpu"``,
            ``"torch-cuda"``), ``"torch-<device>-float64"`` with ``--precision float64``, or a fallback
            (``"torch-cpu-float64-1thread"``, ``"numpy-float64"``).
        checked_entries: Entries compared against the float64 closed form.
        max_abs_error: Largest difference found.
        tolerance: The bound it had to stay within.
        delta_norm: Frobenius norm of the summed delta.
        base_norm: Frobenius norm of the base weight (a delta much larger than it is reported as a warning).
        near_ties: Merged elements within the FFT's error of a rounding midpoint of the output dtype, taken
            from the float64 closed form instead (so every backend writes the same bits; docs/maths.md).
    """

    module: str
    key: str
    shape: tuple[int, int]
    conv1d: bool
    orientation: str
    n: list[int]
    backend: str = ""
    checked_entries: int = 0
    max_abs_error: float = 0.0
    tolerance: float = 0.0
    delta_norm: float = 0.0
    base_norm: float = 0.0
    near_ties: int = 0


@dataclass
class MergeReport:
    """The result of :func:`fourier_convert.merge`.

    Attributes:
        out: The published folder (None for a dry run).
        dry_run: Whether anything was written.
        device: Where deltas were computed.
        precision: ``"float32"`` or ``"float64"``.
        tensors: Output tensors per action (``copy``, ``merge``, ``replace``, ``add``, ``cast``).
        bytes_total: Bytes of tensor data in the output.
        bytes_changed: Bytes of tensors that were computed (merged, cast, or replaced with a dtype change);
            replacements copied as bytes and untouched tensors are not counted.
        shards: Output weight files.
        layers: Per adapted weight results.
        warnings: Things to look at.
        notes: Informational lines.
        seconds: Wall time.
        fallbacks: Layers whose first backend failed its check and were recomputed.
        adapters: The adapters, as given.
        base: The base, as given.
        timings: Seconds spent per phase (validate_and_plan, deltas_and_merge, skeleton_wait, copy_wait,
            fsync_and_publish); the byte copy runs in the background during the middle phases.
        changes: Every output tensor that is not a plain byte copy: ``name``, ``action`` (merge, replace,
            add, cast), ``dtype``, ``shape``, ``bytes`` and ``how``.
    """

    out: str | None
    dry_run: bool
    device: str
    precision: str
    tensors: dict[str, int]
    bytes_total: int
    bytes_changed: int
    shards: list[str]
    layers: list[LayerReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    base: str = ""
    changes: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    def summary(self) -> list[str]:
        """Short human-readable lines for the terminal."""
        verb = "would write" if self.dry_run else "wrote"
        lines = [
            f"{verb} {self.bytes_total / 1e6:.1f} MB in {len(self.shards)} file(s)"
            + (f" to {self.out}" if self.out else ""),
            "tensors: " + ", ".join(f"{v} {k}" for k, v in sorted(self.tensors.items())),
        ]
        if self.layers and not self.dry_run:
            worst = max(self.layers, key=lambda r: r.max_abs_error / r.tolerance if r.tolerance else 0.0)
            fewest = min(r.checked_entries for r in self.layers)
            noun = "delta" if len(self.layers) == 1 else "deltas"
            lines.append(
                f"{len(self.layers)} {noun} rebuilt on {self.device} ({self.precision}), each checked at "
                f">= {fewest} entries against float64; worst error {worst.max_abs_error:.2e} "
                f"(tolerance {worst.tolerance:.2e})"
            )
        if not self.dry_run:
            phases = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in self.timings.items())
            lines.append(f"took {self.seconds:.2f} s" + (f" ({phases})" if phases else ""))
        return lines
