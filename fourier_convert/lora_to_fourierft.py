"""``from-lora``: the FourierFT adapter closest to a LoRA adapter, on PEFT's seeded frequency support.

For every LoRA module the delta ``dW = scale * lora_B @ lora_A`` is projected (least squares, exactly) onto
the ``n`` frequencies PEFT will place for that layer's shape and seed (:mod:`fourier_convert.maths.project`),
from FFTs of the two factors: the dense delta is never formed. The output is a PEFT FourierFT folder;
trained biases and ``modules_to_save`` heads are carried (LoRA bias ``lora_only`` -> ``fourier_only``,
``all`` -> ``all``). The report says, per layer, how much of the LoRA's delta the FourierFT adapter keeps and
the most that any FourierFT adapter could keep (the centro-symmetric part, docs/maths.md fact 1).

With calibration data (``calibration=``), the LoRA model runs on it, the Gram matrix ``X X^T`` of every adapted
layer's inputs is collected, and each layer's coefficients minimise ``||(dW_lora - dW_fourier) X||_F`` instead
(:func:`~fourier_convert.maths.project.project_lowrank_weighted`); held-out samples measure how closely the
FourierFT model follows the LoRA model with the plain and with the calibrated coefficients.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fourier_convert.calibrate.pipeline import POOR_AGREEMENT, CalibrationOptions
from fourier_convert.calibrate.reverse import FromLoraCalibration, calibrate, calibration_base, calibration_options
from fourier_convert.errors import AdapterError, BaseMismatchError, FourierConvertError, UsageError, short_repr
from fourier_convert.host import check_position_draw
from fourier_convert.io.adapter import (
    KEY_PREFIX,
    FourierFTAdapter,
    Spectrum,
    extra_tensor_keys,
    listed_modules,
    parse_settings,
)
from fourier_convert.io.adapter_writer import AdapterFiles
from fourier_convert.io.checkpoint import BaseCheckpoint, open_checkpoint
from fourier_convert.io.lora_adapter import (
    INIT_FIX,
    MAX_SCALE,
    LoraAdapterIn,
    LoraModule,
    init_peft_cannot_load,
    init_without_factors,
    read_lora_adapter,
)
from fourier_convert.io.progress import StepProgress, phase
from fourier_convert.maths.delta import delta_sq_norm
from fourier_convert.maths.indices import IndexCache
from fourier_convert.maths.project import Projection, project_lowrank
from fourier_convert.plan import MergePlan, plan_with_orientation
from fourier_convert.targets import first_unadaptable, is_targeted

#: A layer keeping less of the LoRA delta's energy than this is called out in the report.
LOW_ENERGY = 0.5
_BIAS = {"none": "none", "lora_only": "fourier_only", "all": "all"}


@dataclass
class FromLoraLayerReport:
    """One layer of a from-lora conversion.

    Attributes:
        module: Module path.
        shape: ``(out, in)`` of the delta.
        lora_rank: Rank of the LoRA factors.
        n: FourierFT coefficients written.
        energy: ``||dW_lora||_F^2``.
        retained_energy: Share of it the FourierFT delta reproduces (``||fit||^2 / ||dW||^2``).
        relative_error: ``||dW_lora - dW_fourier||_F / ||dW_lora||_F``.
        ceiling: The retained share with every frequency of the layer (its centro-symmetric part): no FourierFT
            adapter, whatever its n, does better.

    With calibration, ``retained_energy`` and ``relative_error`` describe the coefficients written, in weight space
    (``1 - ||dW_lora - dW_fourier||^2 / ||dW_lora||^2``): a calibrated fit gives up weight-space error for error on
    the inputs the layer sees (:class:`CalibratedLayer`).
    """

    module: str
    shape: tuple[int, int]
    lora_rank: int
    n: int
    energy: float
    retained_energy: float
    relative_error: float
    ceiling: float


@dataclass
class FromLoraReport:
    """The result of :func:`from_lora`.

    Attributes:
        adapter: The LoRA adapter, as given.
        layers: Per-layer results.
        parameters: FourierFT coefficients written (all layers).
        scaling: The FourierFT ``scaling`` used.
        seed: ``random_loc_seed``.
        base: The base the output was validated against (None when no base was available).
        warnings: Layers that keep little energy, and other things to know.
        calibration: With calibration data: per-layer output-space and held-out figures, and the held-out figures
            of the plain and the calibrated FourierFT model against the LoRA model (None without).
    """

    adapter: str
    layers: list[FromLoraLayerReport]
    parameters: int
    scaling: float
    seed: int
    base: str | None = None
    warnings: list[str] = field(default_factory=list)
    calibration: FromLoraCalibration | None = None

    @property
    def retained_energy(self) -> float:
        """Share of the total LoRA delta energy (all layers) the FourierFT adapter keeps."""
        total = sum(x.energy for x in self.layers)
        return sum(x.energy * x.retained_energy for x in self.layers) / total if total > 0 else 1.0

    @property
    def ceiling(self) -> float:
        """The total retained share with every frequency of every layer."""
        total = sum(x.energy for x in self.layers)
        return sum(x.energy * x.ceiling for x in self.layers) / total if total > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with the totals; ``calibration`` only when calibrated)."""
        doc = {**asdict(self), "retained_energy": self.retained_energy, "ceiling": self.ceiling}
        del doc["calibration"]
        if self.calibration is not None:
            doc["calibration"] = self.calibration.to_dict()
        return doc

    def table(self) -> str:
        """The per-layer table the CLI prints, with a total line (and the calibration figures when calibrated)."""
        cal = self.calibration
        head = f"{'module':<52} {'out x in':>11} {'r':>4} {'n':>7} {'energy':>8} {'rel.err':>8} {'ceiling':>8}"
        if cal is not None:
            head += f" {'out.plain':>9} {'out.kept':>9} {'plain err':>9} {'err':>8}"
        rows = [head]
        for x in self.layers:
            shape = f"{x.shape[0]}x{x.shape[1]}"
            row = (
                f"{x.module:<52} {shape:>11} {x.lora_rank:>4} {x.n:>7} {x.retained_energy:>8.2%} "
                f"{x.relative_error:>8.4f} {x.ceiling:>8.2%}"
            )
            fig = cal.layers.get(x.module) if cal is not None else None
            if fig is not None:
                row += (
                    f" {fig.output_kept_plain:>9.2%} {fig.output_kept:>9.2%} {_num(fig.held_out_plain):>9} "
                    f"{_num(fig.held_out_error):>8}"
                )
            rows.append(row)
        rows.append(
            f"total: {len(self.layers)} layers, {self.parameters:,} coefficients, {self.retained_energy:.2%} of the "
            f"LoRA delta energy kept (ceiling with every frequency: {self.ceiling:.2%})"
        )
        if cal is not None:
            rows.append(
                "out.plain / out.kept: share of ||dW_lora X||^2 on the calibration inputs that the plain / calibrated "
                "fit keeps; plain err / err: held-out ||(dW_fourier - dW_lora) X|| / ||dW_lora X|| (X: the LoRA "
                "model's layer inputs); energy and rel.err describe the calibrated coefficients written"
            )
            rows.extend(cal.lines())
        return "\n".join(rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def from_lora(
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    n_frequency: int = 1000,
    n_frequency_pattern: dict[str, int] | None = None,
    scaling: float = 150.0,
    seed: int = 777,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    calibration: str | Path | CalibrationOptions | None = None,
    device: str | None = None,
    progress: bool = False,
) -> tuple[AdapterFiles, FromLoraReport]:
    """Convert a PEFT LoRA adapter to the closest PEFT FourierFT adapter (least squares per layer).

    Args:
        adapter: LoRA adapter folder, ``PATH:NAME`` or hub id.
        base: Base model to validate against (headers and config only; with calibration its weights and tokenizer
            too). Default: the adapter's ``base_model_name_or_path`` when it can be found; without one the output
            is not validated (and calibration is refused).
        n_frequency: Coefficients per layer.
        n_frequency_pattern: Module-name pattern -> n, matched as PEFT's FourierFT matches it
            (``re.match(rf".*\\.{key}$", module)``).
        scaling: FourierFT ``scaling`` of the output (any non-zero value gives the same delta; it sets the
            coefficients' magnitude, which matters if you train further).
        seed: ``random_loc_seed`` of the output.
        subfolder: Named adapter inside the folder.
        allow_pickle: Accept ``adapter_model.bin``.
        calibration: Calibration data (a text / JSON Lines / safetensors file or a folder of images), or a
            :class:`~fourier_convert.calibrate.pipeline.CalibrationOptions` (its ``distill_steps`` and
            ``sequential`` do not apply here). With it, the LoRA model runs on the data and each layer's coefficients
            minimise ``||(dW_lora - dW_fourier) X||_F`` on the layer's real inputs ``X``; the report measures the
            FourierFT model against the LoRA model on held-out samples, for the plain and the calibrated fit.
        device: With calibration: where the model runs (overrides the options'; default ``auto``).
        progress: Print phases and a bar over the layers on stderr.

    Returns:
        The FourierFT adapter (call ``.save(path)``) and the report.

    Raises:
        UsageError: Bad n / scaling / seed, n larger than a layer, ``--distill`` / ``--sequential`` / a bad batch
            size in the calibration options, ``device`` without calibration, or calibration without a base.
        InputFileError: Unusable calibration data, or an ``adapter`` that is no adapter folder.
        BaseMismatchError: A module, or a ``lora_A`` / ``lora_B`` shape, that does not fit the base (checked from
            the headers, before any factor is read).
        AdapterError: Invalid or unsupported LoRA adapter (the message says what a model folder or an ONNX export
            given as ``adapter`` is), a LoRA scale beyond float32, coefficients that overflow float32, or a module of
            the base that the config selects but the adapter holds no factors for, where PEFT's delta would not be
            exactly zero (:func:`check_unfactored_modules`; where it is, a warning names such modules).
        FourierConvertError: Any other invalid input.

    Example:
        >>> fft, report = from_lora("./some-lora", base="./base", n_frequency=1000)  # doctest: +SKIP
        >>> fft.save("./fft"); print(report.table())  # doctest: +SKIP
        >>> fft, report = from_lora("./some-lora", base="./base", calibration="calib.jsonl")  # doctest: +SKIP
    """
    pattern = dict(n_frequency_pattern or {})
    for name, value in [
        ("--n-frequency", n_frequency),
        *((f"--n-frequency-pattern {k}", v) for k, v in pattern.items()),
    ]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(name, f"{value!r} is not a positive number of frequencies", "use e.g. 1000")
    if not np.isfinite(scaling) or scaling == 0:
        raise UsageError("--scaling", f"{scaling!r} is not a finite non-zero number", "use e.g. 150")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError("--seed", f"{seed!r} is not a non-negative integer", "use e.g. 777")
    options = calibration_options(calibration, device)
    lora = read_lora_adapter(adapter, subfolder=subfolder, allow_pickle=allow_pickle)  # headers: no factor read yet
    warnings: list[str] = []
    ckpt = _open_base(base, lora, warnings) if options is None else calibration_base(base, lora)

    config = _fourier_config(lora, pattern, n_frequency, scaling, seed)
    settings = parse_settings(config, Path("adapter_config.json"))
    # One placeholder coefficient per module until the fit. Named by the input's lora_A key, so that a mismatch
    # names a tensor the user has. The plan checks modules, biases and heads against the base and gives each layer's
    # base weight and orientation, against which the factors' shapes are checked before a byte of them is read.
    spectra = {
        module: Spectrum(module, "F32", mod.lora_a.key, 1, loaded=np.zeros(1)) for module, mod in lora.modules.items()
    }
    out_adapter = FourierFTAdapter(
        lora.folder, lora.label, settings, spectra, dict(lora.biases), dict(lora.head_tensors), []
    )
    plan = None
    if ckpt is not None:
        plan = plan_with_orientation(ckpt, [out_adapter])  # the output must fit the base as merge would use it
        check_factor_shapes(lora, plan)
        warnings += check_unfactored_modules(lora, ckpt, plan)
    cache = IndexCache()
    for module, mod in lora.modules.items():
        m, n_in = mod.shape
        n = settings.n_for(module)
        if n > m * n_in:
            raise UsageError(
                "--n-frequency",
                f"{module} is {m}x{n_in} = {m * n_in} positions, fewer than n = {n}",
                "lower --n-frequency or give this module a smaller n with --n-frequency-pattern",
            )
        if ckpt is None:  # with a base, the plan has checked this against the base weight
            check_position_draw(
                m,
                n_in,
                n,
                where=str(lora.files[1]),
                layer=f"{module!r} (lora_B {list(mod.lora_b.shape)} times lora_A {list(mod.lora_a.shape)})",
                fix="pass --base to check the factors against the model (factors this size are likely corrupt), "
                "or run on a machine with more memory",
            )
        cache.reserve(m, n_in, seed, n)
    phase(progress, "from-lora", f"reading the factors of {len(lora.modules)} layers")
    lora.read_factors()
    tensors: dict[str, torch.Tensor] = {}
    layers: list[FromLoraLayerReport] = []
    fits: dict[str, Projection] = {}
    phase(progress, "from-lora", "fitting the FourierFT coefficients (least squares on the spectral positions)")
    bar = StepProgress(len(lora.modules), "fit", enabled=progress)
    for step, (module, mod) in enumerate(lora.modules.items(), start=1):
        m, n_in = mod.shape
        n = settings.n_for(module)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
            fit = project_lowrank(mod.b, mod.a, mod.scale, cache.get(m, n_in, seed, n), scaling)
        fits[module] = fit
        values32 = torch.from_numpy(fit.values).float()
        _check_representable(lora, mod, fit, values32, scaling)
        tensors[f"{KEY_PREFIX}{module}.fourierft_spectrum"] = values32
        spectra[module].n = n
        spectra[module].loaded = values32.double().numpy()
        layers.append(_layer_report(module, (m, n_in), mod.rank, n, fit))
        if options is None and fit.retained < LOW_ENERGY:
            warnings.append(
                f"{module}: n={n} keeps {fit.retained:.1%} of the LoRA delta's energy "
                f"(every frequency would keep {fit.ceiling:.1%})"
            )
        bar.update(step, module.rsplit(".", 2)[-2] if "." in module else module)
    bar.close()
    extras = extra_tensor_keys(lora.biases, lora.head_tensors, lora.modules)
    tensors.update({key: t.load() for key, t in extras.items()})

    calibrated: FromLoraCalibration | None = None
    if ckpt is not None and plan is not None:
        conv1d = any(layer.conv1d for layer in plan.layers)
        if conv1d != settings.fan_in_fan_out:
            config["fan_in_fan_out"] = conv1d
        warnings += [w for w in plan.warnings if "fan_in_fan_out" not in w]
        if options is not None:
            positions = {
                module: cache.get(mod.shape[0], mod.shape[1], seed, settings.n_for(module))
                for module, mod in lora.modules.items()
            }
            weighted, calibrated = calibrate(ckpt, out_adapter, plan, lora, positions, fits, scaling, options, progress)
            for i, module in enumerate(lora.modules):
                values32 = torch.from_numpy(weighted[module].values).float()
                tensors[f"{KEY_PREFIX}{module}.fourierft_spectrum"] = values32
                layers[i] = weighted_layer_report(layers[i], fits[module], values32, positions[module], scaling)
            warnings += calibration_warnings(layers, calibrated)
    params = sum(x.n for x in layers)
    report = FromLoraReport(
        str(adapter), layers, params, scaling, seed, str(ckpt.folder) if ckpt is not None else None, warnings
    )
    report.calibration = calibrated
    if layers and calibrated is None and report.retained_energy < LOW_ENERGY:
        warnings.insert(
            0,
            f"the FourierFT adapter keeps {report.retained_energy:.1%} of the LoRA delta energy: a FourierFT delta is "
            "centro-symmetric and n coefficients span only n basis matrices; raise --n-frequency to keep more "
            f"(the ceiling with every frequency is {report.ceiling:.1%})",
        )
    sources = [lora.folder] + ([ckpt.folder] if ckpt is not None else [])
    return AdapterFiles(config, tensors, sources), report


def weighted_layer_report(
    row: FromLoraLayerReport, plain: Projection, values32: torch.Tensor, positions: np.ndarray, scaling: float
) -> FromLoraLayerReport:
    """``row`` with the weight-space figures of the coefficients written: ``||dW - fit||^2 = ||dW - P dW||^2 +
    ||P dW - fit||^2`` (``P``: the orthogonal projection onto the basis matrices, i.e. the plain fit)."""
    if plain.energy <= 0:
        return row
    off = delta_sq_norm(plain.values - values32.double().numpy(), positions, row.shape, scaling)
    error = max(0.0, plain.energy - plain.kept_energy) + off
    return replace(row, retained_energy=1.0 - error / plain.energy, relative_error=float(np.sqrt(error / plain.energy)))


def calibration_warnings(layers: list[FromLoraLayerReport], cal: FromLoraCalibration) -> list[str]:
    out: list[str] = []
    for row in layers:
        fig = cal.layers[row.module]
        if fig.output_kept < LOW_ENERGY:
            out.append(
                f"{row.module}: n={row.n} keeps {fig.output_kept:.1%} of the LoRA delta's output energy on the "
                f"calibration inputs (the plain fit {fig.output_kept_plain:.1%})"
            )
    plain, fitted = cal.stage("plain"), cal.stage("calibrated")
    if fitted is not None and fitted.agreement is not None and fitted.agreement < POOR_AGREEMENT:
        out.insert(
            0,
            f"on the held-out samples the FourierFT model predicts what the LoRA model predicts only "
            f"{fitted.agreement:.1%} of the time: raise --n-frequency, or calibrate on data like the task's inputs",
        )
    if plain is not None and fitted is not None and fitted.relative_error > plain.relative_error:
        out.append(
            "the calibrated FourierFT model follows the LoRA model less closely than the plain fit on the held-out "
            "samples (each layer is fitted on its own inputs; the errors add up differently through the model): "
            "convert without --calibration, or calibrate on more samples like the task's inputs"
        )
    return out


def check_factor_shapes(lora: LoraAdapterIn, plan: MergePlan) -> None:
    """Check every module's ``lora_A`` / ``lora_B`` shape against its base weight (headers only: nothing is read).

    PEFT's factors are ``lora_A: (r, in)`` and ``lora_B: (out, r)`` with ``(out, in)`` the layer's, for a Conv1D
    (weight stored ``(in, out)``) too.

    Raises:
        BaseMismatchError: A factor does not fit its base layer (the message names the key, the shape found and the
            shape expected).
    """
    by_module = {layer.module: layer for layer in plan.layers}
    for module, mod in lora.modules.items():
        layer = by_module.get(module)
        if layer is None:  # the plan refuses a module the base lacks
            continue
        out_dim, in_dim = layer.delta_shape
        r = mod.rank
        for t, want in ((mod.lora_a, (r, in_dim)), (mod.lora_b, (out_dim, r))):
            if tuple(t.shape) == want:
                continue
            w0, w1 = layer.weight.shape
            kind = f"a Conv1D stored in x out = {w0}x{w1}, so" if layer.conv1d else "a Linear,"
            fix = "pass the base model the adapter was trained on, or re-save the adapter with PEFT"
            if layer.orientation_source == "flag" and tuple(t.shape) in ((r, out_dim), (in_dim, r)):
                fix = (
                    f"fan_in_fan_out in adapter_config.json is {lora.settings.fan_in_fan_out} and the base has no "
                    "config.json to say whether the layer is a Conv1D; check the flag, or " + fix
                )
            raise BaseMismatchError(
                f"{lora.label}: {t.key}",
                f"shape {list(t.shape)}, expected {list(want)} for the base weight {layer.key!r} "
                f"({kind} out x in = {out_dim}x{in_dim}) at rank {r}",
                fix,
            )


def check_unfactored_modules(lora: LoraAdapterIn, ckpt: BaseCheckpoint, plan: MergePlan) -> list[str]:
    """Modules of the base that the LoRA config selects but the adapter holds no factors for (headers only).

    PEFT puts a LoRA layer on every module the config selects, and one without factors in the file keeps the factors
    it was initialised with (PEFT only warns of the missing keys): an exactly zero delta for most
    ``init_lora_weights`` values, which the conversion reproduces by leaving the module out, but not for all
    (:func:`~fourier_convert.io.lora_adapter.init_without_factors`).

    Returns:
        A warning naming such modules when PEFT's delta there is zero (else nothing).

    Raises:
        AdapterError: Such a module where PEFT's delta is not exactly zero (the message names the first); or the
            selection picks a module PEFT's LoRA cannot adapt (:func:`~fourier_convert.targets.first_unadaptable`).
    """
    s = lora.settings
    inverse = {v: k for k, v in plan.names.to_ckpt.items()}
    unadaptable = first_unadaptable(s, {inverse[k]: t.shape for k, t in ckpt.tensors.items() if k in inverse})
    if unadaptable is not None:
        raise AdapterError(
            str(lora.files[0]),
            f"target_modules selects {unadaptable[0]!r} of the base, {unadaptable[1]}: PEFT's LoRA cannot adapt it "
            "and fails to load the adapter (Target module ... is not supported)",
            "narrow target_modules to the adapted linear layers (the modules of the adapter's lora_A keys), or list "
            "the module in exclude_modules",
        )
    shapes = {
        module: (t.shape[0], t.shape[1])
        for k, t in ckpt.tensors.items()
        if k.endswith(".weight") and len(t.shape) == 2 and k in inverse
        for module in [inverse[k][: -len(".weight")]]
        if module not in lora.modules and is_targeted(s, module)
    }
    missing = sorted(shapes)
    if not missing:
        return []
    for module in missing:  # PEFT initialises these too, and fails at a rank its initialisation cannot take
        cannot = init_peft_cannot_load(s.init_lora_weights, (module, s.rank_for(module), shapes[module]))
        if cannot is not None:
            raise AdapterError(str(lora.files[0]), cannot, INIT_FIX)
    problem = init_without_factors(s.init_lora_weights)
    if problem is not None:
        others = len(missing) - 1
        more = f" (nor for {others} other selected module{'s' if others > 1 else ''})" if others else ""
        raise AdapterError(
            str(lora.files[1]),
            f"adapter_config.json selects {missing[0]!r} of the base, but the adapter holds no lora_A / lora_B for "
            f"it{more}: {problem}",
            "re-save the adapter with PEFT if the module was trained, or leave the module out of the selection in "
            "adapter_config.json (e.g. list it in exclude_modules)",
        )
    few = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    one = len(missing) == 1
    return [
        f"{len(missing)} module{'' if one else 's'} that adapter_config.json selects in the base "
        f"{'has' if one else 'have'} no lora_A / lora_B in the adapter ({few}): PEFT loads "
        f"{'it' if one else 'them'} with a zero delta (init_lora_weights={short_repr(s.init_lora_weights)} starts "
        f"one factor at zero), so the FourierFT adapter leaves {'it' if one else 'them'} unchanged too",
    ]


def _check_representable(
    lora: LoraAdapterIn, mod: LoraModule, fit: Projection, values32: torch.Tensor, scaling: float
) -> None:
    """Refuse a delta whose fit overflows: its energy in float64 or its coefficients in float32 (the file's dtype)."""
    where = str(lora.files[1])
    alpha_field = lora.settings.alpha_field(mod.module)
    scale = f"{alpha_field} / {'sqrt(r)' if lora.settings.use_rslora else 'r'} = {mod.scale:.3g}"
    if not (np.isfinite(fit.values).all() and np.isfinite(fit.energy)):
        raise AdapterError(
            where,
            f"the delta of {mod.module!r} (LoRA scale {scale}, times lora_B @ lora_A) overflows float64",
            f"check {alpha_field} in adapter_config.json and the factors",
        )
    if not bool(torch.isfinite(values32).all()):
        top = float(np.abs(fit.values).max())
        suggest = math.copysign(abs(scaling) * top / MAX_SCALE * 10, scaling)
        raise AdapterError(
            where,
            f"the FourierFT coefficients of {mod.module!r} reach {top:.3g} with --scaling {scaling:g} (LoRA scale "
            f"{scale}), beyond float32's range ({MAX_SCALE:.3g})",
            f"raise --scaling (e.g. to {suggest:.2g}; the coefficients shrink in proportion), or check {alpha_field} "
            "and the factors",
        )


def _open_base(base: str | Path | None, lora: LoraAdapterIn, warnings: list[str]) -> BaseCheckpoint | None:
    if base is not None:
        return open_checkpoint(base)
    implicit = lora.settings.base_model_name_or_path
    if not implicit:
        warnings.append("no --base given and the adapter names no base: the output was not checked against a base")
    else:
        try:
            return open_checkpoint(implicit)
        except FourierConvertError as exc:
            warnings.append(f"the adapter's base {implicit!r} could not be opened ({exc.found}): output not checked")
    random = init_without_factors(lora.settings.init_lora_weights)
    if random is not None:  # check_unfactored_modules needs the base's modules
        warnings.append(
            f"with init_lora_weights={short_repr(lora.settings.init_lora_weights)}, a module the config selects but "
            "the adapter holds no factors for gets random ones in PEFT; only a base shows whether there is one: "
            "pass --base"
        )
    return None


def _fourier_config(
    lora: LoraAdapterIn, pattern: dict[str, int], n_frequency: int, scaling: float, seed: int
) -> dict[str, Any]:
    s = lora.settings
    return {
        "peft_type": "FOURIERFT",
        "task_type": s.task_type,
        "base_model_name_or_path": s.base_model_name_or_path,
        "n_frequency": n_frequency,
        "n_frequency_pattern": pattern,
        "scaling": scaling,
        "random_loc_seed": seed,
        "fan_in_fan_out": s.fan_in_fan_out,
        "target_modules": sorted(lora.modules),
        "exclude_modules": None,
        "bias": _BIAS[s.bias],
        "modules_to_save": listed_modules(s.raw),  # PEFT adds the task_type's heads to it, as to the LoRA's
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_weights": False,
        "inference_mode": True,
    }


def _layer_report(module: str, shape: tuple[int, int], rank: int, n: int, fit: Projection) -> FromLoraLayerReport:
    return FromLoraLayerReport(module, shape, rank, n, fit.energy, fit.retained, fit.relative_error, fit.ceiling)


def parse_pattern(items: tuple[str, ...]) -> dict[str, int]:
    """``("v_proj=500", "q_proj=2000")`` -> ``{"v_proj": 500, "q_proj": 2000}``.

    Raises:
        UsageError: An item is not ``NAME=N`` with a valid regex and a positive integer.

    Example:
        >>> parse_pattern(("v_proj=500",))
        {'v_proj': 500}
    """
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            n = int(value)
            re.compile(name)
        except (ValueError, re.error):
            n = 0
        if not sep or not name or n < 1:
            raise UsageError(
                "--n-frequency-pattern", f"cannot read {item!r}", "write NAME=N, e.g. --n-frequency-pattern v_proj=500"
            )
        out[name] = n
    return out
