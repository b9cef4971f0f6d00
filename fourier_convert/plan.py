"""The merge plan: what happens to every tensor, decided and validated before a byte is written.

:func:`build_plan` matches each adapter's spectra, biases and ``modules_to_save`` tensors to the base
checkpoint (through :class:`NameMap`), checks shapes, ``n <= out * in`` and that the adapted modules are
exactly the ones the config selects, and lists every output tensor with its source:

* ``copy``: untouched base tensor (byte copy),
* ``merge``: base weight plus the FourierFT delta(s),
* ``replace``: replaced by an adapter tensor (trained bias, saved head),
* ``add``: a head tensor the base lacks,
* ``cast``: untouched but converted to ``--dtype``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fourier_convert.errors import AdapterError, BaseMismatchError, UsageError
from fourier_convert.host import check_position_draw
from fourier_convert.io.adapter import FourierFTAdapter, Spectrum, StoredTensor
from fourier_convert.io.checkpoint import BaseCheckpoint
from fourier_convert.io.safetensors_file import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo
from fourier_convert.maths.indices import RANDPERM_THRESHOLD
from fourier_convert.skeleton import CONV1D, LINEAR, Skeleton, build_skeleton_bounded, scan_linear_only
from fourier_convert.targets import first_unadaptable, is_targeted


# -- names ----------------------------------------------------------------------------------------
@dataclass
class NameMap:
    """Maps tensor keys between the adapter's name space and the base checkpoint's.

    The adapter names modules as the (task) model it was trained on held them in memory; the checkpoint
    may lack or add the base-model prefix (``bert.``) or use keys transformers renames on load.

    Attributes:
        to_ckpt: Adapter-space key -> checkpoint key, for every checkpoint tensor.
        how: A short description of the mapping used (for the report).
    """

    to_ckpt: dict[str, str]
    how: str

    def find(self, key: str) -> str | None:
        return self.to_ckpt.get(key)

    def near(self, key: str) -> list[str]:
        return difflib.get_close_matches(key, list(self.to_ckpt), n=3, cutoff=0.75)


def _adapter_keys(adapters: Sequence[FourierFTAdapter]) -> list[str]:
    keys: list[str] = []
    for a in adapters:
        keys += [f"{m}.weight" for m in a.spectra]
        keys += list(a.biases) + list(a.head_tensors)
    return keys


def resolve_names(
    ckpt: BaseCheckpoint, adapters: Sequence[FourierFTAdapter], skeleton: Skeleton | None = None
) -> tuple[NameMap, list[str]]:
    """Choose the key mapping under which the most adapter keys exist in the checkpoint.

    Args:
        ckpt: The base checkpoint.
        adapters: The adapters to merge.
        skeleton: When given, transformers' own checkpoint-key renaming is tried as well.

    Returns:
        The mapping and the spectra modules it still cannot find (empty when all are found).
    """
    ckpt_keys = list(ckpt.tensors)
    bases: list[tuple[str, dict[str, str]]] = [("checkpoint names", {k: k for k in ckpt_keys})]
    if skeleton is not None and skeleton.model_keys:
        bases.append((f"transformers {skeleton.architecture} key renaming", dict(skeleton.model_keys)))
    wanted = _adapter_keys(adapters)
    spectra_keys = [f"{m}.weight" for a in adapters for m in a.spectra]
    firsts_adapter = {k.split(".", 1)[0] for k in spectra_keys if "." in k}
    best: tuple[int, NameMap] | None = None
    for label, base in bases:
        firsts_ckpt = {v.split(".", 1)[0] for v in base.values() if "." in v}
        candidates: list[tuple[str, dict[str, str]]] = [(label, {v: k for k, v in base.items()})]
        for p in sorted(firsts_adapter - firsts_ckpt):
            candidates.append((f"{label}, adapter prefix '{p}.' added", {f"{p}.{v}": k for k, v in base.items()}))
        for q in sorted(firsts_ckpt - firsts_adapter):
            stripped = {v[len(q) + 1 :]: k for k, v in base.items() if v.startswith(f"{q}.")}
            candidates.append((f"{label}, checkpoint prefix '{q}.' dropped", stripped))
        for how, mapping in candidates:
            score = sum(k in mapping for k in spectra_keys) * 1000 + sum(k in mapping for k in wanted)
            if best is None or score > best[0]:
                best = (score, NameMap(mapping, how))
    assert best is not None
    names = best[1]
    missing = [k[: -len(".weight")] for k in spectra_keys if names.find(k) is None]
    return names, missing


# -- plan -----------------------------------------------------------------------------------------
@dataclass
class Contribution:
    """One adapter's spectrum for a layer, with its effective scaling (config scaling x user weight)."""

    adapter_index: int
    spectrum: Spectrum
    scaling: float
    seed: int


@dataclass
class LayerPlan:
    """One adapted weight.

    Attributes:
        module: Module path in the adapter's name space.
        key: The weight's checkpoint key.
        weight: Where the base weight is.
        contributions: The adapters' spectra for it, in order.
        conv1d: True when the module is a Conv1D (weight stored ``(in, out)``; delta added transposed).
        orientation_source: How ``conv1d`` was decided (``"skeleton"`` or ``"flag"``).
    """

    module: str
    key: str
    weight: TensorInfo
    contributions: list[Contribution]
    conv1d: bool = False
    orientation_source: str = "flag"

    @property
    def delta_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the delta: the weight's shape, reversed for Conv1D."""
        a, b = self.weight.shape
        return (b, a) if self.conv1d else (a, b)


@dataclass
class OutputTensor:
    """One tensor of the merged checkpoint and where its value comes from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    base: TensorInfo | None = None
    replacement: StoredTensor | None = None
    layer: LayerPlan | None = None

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @property
    def raw_source(self) -> TensorInfo | None:
        """A byte range that already holds this tensor's output bytes, if any."""
        if self.kind == "copy":
            return self.base
        if (
            self.kind in ("replace", "add")
            and self.replacement is not None
            and self.replacement.info is not None
            and self.replacement.dtype == self.dtype
        ):
            return self.replacement.info
        return None


@dataclass
class MergePlan:
    """Everything the merge will do.

    Attributes:
        outputs: Output tensors in output order (base order, new tensors last).
        layers: The adapted weights.
        names: The key mapping used.
        warnings: Things the user should know (shown on the terminal and in the report).
        notes: Informational lines (config changes, orientation source).
        config: The output ``config.json`` (None when the base has none).
        config_changed: Whether ``config`` differs from the base's.
    """

    outputs: list[OutputTensor]
    layers: list[LayerPlan]
    names: NameMap
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    config_changed: bool = False

    @property
    def bytes_total(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outputs:
            out[o.kind] = out.get(o.kind, 0) + 1
        return out


_TASK_MAPPINGS = {
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "FEATURE_EXTRACTION": "MODEL_MAPPING_NAMES",
}


#: float32's smallest normal number: a delta scale below it keeps no precision in PEFT's float32 arithmetic.
F32_TINY = 1.1754943508222875e-38


def build_plan(
    ckpt: BaseCheckpoint,
    adapters: Sequence[FourierFTAdapter],
    names: NameMap,
    *,
    weights: Sequence[float] | None = None,
    out_dtype: str | None = None,
) -> MergePlan:
    """Validate the adapters against the base and list what happens to every tensor.

    Args:
        ckpt: The base checkpoint (headers only).
        adapters: Adapters to apply, in order.
        names: Key mapping from :func:`resolve_names`.
        weights: Per-adapter multipliers of the delta (default 1.0 each).
        out_dtype: safetensors dtype for every floating tensor (None keeps each tensor's dtype).

    Returns:
        The plan; Conv1D orientation is set later by :func:`set_orientation`.

    Raises:
        BaseMismatchError: An adapted module, bias or head does not exist in the base or has another shape.
        AdapterError: The adapted modules disagree with the config's target selection.

    Example:
        >>> names, _ = resolve_names(ckpt, [adapter])  # doctest: +SKIP
        >>> plan = build_plan(ckpt, [adapter], names)  # doctest: +SKIP
        >>> plan.counts()  # doctest: +SKIP
        {'copy': 13, 'merge': 8}
    """
    mult = list(weights) if weights is not None else [1.0] * len(adapters)
    layers: dict[str, LayerPlan] = {}
    replacements: dict[str, StoredTensor] = {}
    new_tensors: dict[str, StoredTensor] = {}
    warnings: list[str] = []
    notes: list[str] = []
    inverse = {v: k for k, v in names.to_ckpt.items()}
    universe = sorted(
        inverse[k][: -len(".weight")]
        for k, t in ckpt.tensors.items()
        if k.endswith(".weight") and len(t.shape) == 2 and k in inverse
    )
    shapes = {inverse[k]: t.shape for k, t in ckpt.tensors.items() if k in inverse}
    for i, adapter in enumerate(adapters):
        s = adapter.settings
        where = adapter.label
        if s.scaling * mult[i] == 0:
            why = "scaling is 0 in its adapter_config.json" if s.scaling == 0 else "its --weight is 0"
            warnings.append(f"{where}: {why}, so its deltas are zero and it changes nothing")
        elif not math.isfinite(s.scaling * mult[i]):
            raise UsageError(
                "--weight",
                f"scaling x weight = {s.scaling:g} x {mult[i]:g} overflows for {where}",
                "pass a multiplier such as 1.0 or 0.5",
            )
        elif abs(s.scaling) < F32_TINY:
            raise AdapterError(
                where,
                f"scaling is {s.scaling:g} in its adapter_config.json, below float32's smallest normal number "
                f"({F32_TINY:.3g}): PEFT's float32 delta would vanish or keep no precision",
                "set scaling to the value the adapter was trained with",
            )
        elif abs(s.scaling * mult[i]) < F32_TINY:
            raise UsageError(
                "--weight",
                f"scaling x weight = {s.scaling:g} x {mult[i]:g} = {s.scaling * mult[i]:.3g} for {where}, below "
                f"float32's smallest normal number ({F32_TINY:.3g}): PEFT's float32 delta would vanish or keep no "
                "precision",
                "pass --weight 0 to leave the adapter out, or a multiplier such as 0.5",
            )
        for module, spec in adapter.spectra.items():
            key = names.find(f"{module}.weight")
            if key is None:
                near = names.near(f"{module}.weight")
                hint = (
                    f"near matches: {', '.join(near)}" if near else "is this the base model the adapter was trained on?"
                )
                raise BaseMismatchError(
                    f"{where}: {spec.key}", f"module {module!r} has no weight in the base checkpoint", hint
                )
            info = ckpt.tensors[key]
            if len(info.shape) != 2:
                raise BaseMismatchError(
                    f"{where}: {spec.key}",
                    f"base weight {key!r} has shape {list(info.shape)}, expected 2-D",
                    "FourierFT adapts Linear / Conv1D layers only; check the base model",
                )
            total = info.shape[0] * info.shape[1]
            if spec.n > total:
                raise BaseMismatchError(
                    f"{where}: {spec.key}",
                    f"{spec.n} coefficients but the {info.shape[0]}x{info.shape[1]} base weight {key!r} has only "
                    f"{total} positions",
                    "is this the base model the adapter was trained on?",
                )
            if info.dtype not in FLOAT_DTYPES:
                raise BaseMismatchError(key, f"base weight has dtype {info.dtype}", "merge into a float checkpoint")
            check_position_draw(
                info.shape[0],
                info.shape[1],
                spec.n,
                where=f"{where}: {spec.key}",
                layer=f"module {module!r} (base weight {key!r})",
                fix="run on a machine with more memory (PEFT needs as much to load this adapter)",
            )
            if total >= RANDPERM_THRESHOLD:
                warnings.append(
                    f"{module}: {info.shape[0]}x{info.shape[1]} = {total} positions is above torch.randperm's "
                    f"algorithm switch ({RANDPERM_THRESHOLD}); frequency positions depend on the torch version "
                    "used in training (see docs/maths.md)"
                )
            if spec.stored_dtype in ("BF16", "F16"):
                warnings.append(
                    f"{spec.key}: spectrum saved in {spec.stored_dtype}; reconstructed in float32 or better"
                )
            elif spec.stored_dtype == "F64":
                warnings.append(
                    f"{spec.key}: spectrum saved in F64; used as stored (PEFT loads it into a float32 parameter unless "
                    "the model runs in float64, which can differ in the last bits)"
                )
            layer = layers.setdefault(key, LayerPlan(module, key, info, []))
            layer.contributions.append(Contribution(i, spec, s.scaling * mult[i], s.random_loc_seed))
        _check_targets(adapter, universe, shapes)
        if s.modules_to_save:
            _check_saved_heads(adapter, [inverse[k] for k in ckpt.tensors if k in inverse])
        for clean, t in {**adapter.biases, **adapter.head_tensors}.items():
            key = names.find(clean)
            if key is None:
                if clean in adapter.head_tensors:
                    new_tensors[clean] = t
                    continue
                raise BaseMismatchError(
                    f"{where}: {t.key}",
                    f"trained bias {clean!r} has no tensor in the base checkpoint",
                    "is this the base model the adapter was trained on?",
                )
            base_shape = ckpt.tensors[key].shape
            if base_shape != t.shape:
                raise BaseMismatchError(
                    f"{where}: {t.key}",
                    f"shape {list(t.shape)} but the base tensor {key!r} is {list(base_shape)}",
                    "is this the base model the adapter was trained on?",
                )
            replacements[key] = t  # a later adapter wins
    merged_keys = set(layers) & set(replacements)
    if merged_keys:
        k = sorted(merged_keys)[0]
        raise AdapterError(k, "is both adapted and replaced by a saved tensor", "check modules_to_save")

    float_dtypes = [t.dtype for t in ckpt.tensors.values() if t.dtype in FLOAT_DTYPES]
    main_dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else "F32"

    def final_dtype(d: str) -> str:
        return out_dtype if out_dtype and d in FLOAT_DTYPES else d

    outputs: list[OutputTensor] = []
    for shard in ckpt.shards:
        for key, info in shard.tensors.items():
            dt = final_dtype(info.dtype)
            if key in layers:
                outputs.append(OutputTensor(key, dt, info.shape, "merge", base=info, layer=layers[key]))
            elif key in replacements:
                outputs.append(OutputTensor(key, dt, info.shape, "replace", base=info, replacement=replacements[key]))
            elif dt != info.dtype:
                outputs.append(OutputTensor(key, dt, info.shape, "cast", base=info))
            else:
                outputs.append(OutputTensor(key, dt, info.shape, "copy", base=info))
    for clean, t in new_tensors.items():
        dt = out_dtype or main_dtype
        outputs.append(OutputTensor(clean, dt, t.shape, "add", replacement=t))

    config = dict(ckpt.config) if ckpt.config is not None else None
    changed = False
    if new_tensors:
        config, changed = _config_for_new_head(config, adapters, new_tensors, notes)
    if out_dtype and config is not None:
        name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}[out_dtype]
        for field_name in ("torch_dtype", "dtype"):
            if field_name in config and config[field_name] != name:
                config[field_name] = name
                changed = True
    notes.append(f"names matched through {names.how}")
    for layer in layers.values():  # every layer fits its spectra: now read them (and refuse non-finite ones)
        for c in layer.contributions:
            c.spectrum.values  # noqa: B018  (reads and checks on first use)
    return MergePlan(outputs, list(layers.values()), names, warnings, notes, config, changed)


def _check_saved_heads(adapter: FourierFTAdapter, base_keys: list[str]) -> None:
    """Refuse a ``modules_to_save`` entry that names a module of the base whose tensors the adapter lacks: PEFT wraps
    that module and fails to load the adapter (``KeyError``). Every tensor under the module counts (RoBERTa's
    ``classifier`` holds ``classifier.dense`` and ``classifier.out_proj``). An entry matching no module is fine
    (PEFT's task types add heads, such as ``classifier`` and ``score``, that a model may not have)."""
    listed = adapter.settings.raw.get("modules_to_save") or []
    for entry in adapter.settings.modules_to_save:
        for key in base_keys:
            if key in adapter.head_tensors:
                continue
            parts = key.split(".")
            # PEFT's _set_trainable wraps every module whose name ends with the entry (no dot needed: 'score' wraps
            # 'xscore' too), and then wants each of its tensors from the file
            module = next((m for i in range(1, len(parts)) if (m := ".".join(parts[:i])).endswith(entry)), None)
            if module is not None:
                task = adapter.settings.task_type
                source = (
                    f"modules_to_save lists {entry!r}"
                    if entry in listed
                    else f"task_type {task} adds {entry!r} to modules_to_save (PEFT does on loading)"
                )
                raise AdapterError(
                    adapter.label,
                    f"{source}, the base's module {module!r}, but the adapter holds no {key!r}; PEFT fails to load "
                    "such an adapter (KeyError)",
                    "remove the entry from modules_to_save in adapter_config.json, or re-save the adapter with PEFT"
                    if entry in listed
                    else "save the head's tensors in the adapter (PEFT's save_pretrained does), or set task_type to "
                    "match the model",
                )


def _check_targets(adapter: FourierFTAdapter, universe: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
    s = adapter.settings
    unadaptable = first_unadaptable(s, shapes)
    if unadaptable is not None:
        raise AdapterError(
            adapter.label,
            f"target_modules selects {unadaptable[0]!r} of the base, {unadaptable[1]}: PEFT's FourierFT cannot adapt "
            "it and fails to load the adapter (Target module ... is not supported)",
            "narrow target_modules in adapter_config.json to the adapted linear layers (the modules of the "
            "adapter's spectra), or list the module in exclude_modules",
        )
    expected = {m for m in universe if is_targeted(s, m)}
    have = set(adapter.spectra)
    missing = sorted(expected - have)
    if missing:
        raise AdapterError(
            f"{adapter.label}",
            f"config selects {len(expected)} modules but {len(missing)} of them "
            f"{'has' if len(missing) == 1 else 'have'} no spectrum (first: {missing[0]!r})",
            "the adapter file is incomplete or does not belong to this config/base; re-save it with PEFT",
        )
    extra = sorted(have - expected)
    if extra:
        raise AdapterError(
            f"{adapter.label}",
            f"spectrum for {extra[0]!r}, which target_modules / exclude_modules / layers_to_transform do not select",
            "check that adapter_config.json belongs to these weights",
        )


def _config_for_new_head(
    config: dict[str, Any] | None,
    adapters: Sequence[FourierFTAdapter],
    new: dict[str, StoredTensor],
    notes: list[str],
) -> tuple[dict[str, Any] | None, bool]:
    task = next((a.settings.task_type for a in reversed(adapters) if a.settings.task_type), None)
    heads = sorted(new)
    if config is None:
        notes.append(f"added head tensors {heads} (the base has no config.json to update)")
        return None, False
    config = dict(config)
    model_type = config.get("model_type")
    arch = None
    if task in _TASK_MAPPINGS and model_type:
        from transformers.models.auto import modeling_auto

        arch = getattr(modeling_auto, _TASK_MAPPINGS[task]).get(model_type)
    if arch:
        config["architectures"] = [arch]
    matrices = [(k, t.shape[0]) for k, t in new.items() if k.endswith(".weight") and len(t.shape) == 2]
    hidden = config.get("hidden_size")
    if task in ("SEQ_CLS", "TOKEN_CLS") and matrices:
        outs = [rows for _, rows in matrices if rows != hidden] or [rows for _, rows in matrices]
        num_labels = min(outs)
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        config.pop("num_labels", None)
        notes.append(
            f"config.json: architectures={config.get('architectures')}, num_labels={num_labels} "
            f"(the adapter adds {heads})"
        )
    else:
        notes.append(f"config.json: architectures={config.get('architectures')} (the adapter adds {heads})")
    return config, True


def guess_orientation(plan: MergePlan, adapters: Sequence[FourierFTAdapter]) -> None:
    """Provisional orientation from the adapters' ``fan_in_fan_out`` flags, to start work before the
    skeleton is ready; :func:`set_orientation` decides for good."""
    for layer in plan.layers:
        layer.conv1d = any(adapters[c.adapter_index].settings.fan_in_fan_out for c in layer.contributions)
        layer.orientation_source = "flag"


def set_orientation(
    plan: MergePlan, skeleton: Skeleton | None, adapters: Sequence[FourierFTAdapter], why: str
) -> list[LayerPlan]:
    """Decide per layer whether it is a Conv1D, from the skeleton when there is one, else from the flag.

    Warns (in ``plan.warnings``) when an adapter's ``fan_in_fan_out`` flag disagrees with the module type,
    and when the flag had to be used.

    Returns:
        The layers whose orientation differs from what they held before the call.

    Raises:
        BaseMismatchError: An adapted module is neither a Linear nor a Conv1D (an Embedding, say): PEFT's
            FourierFT adapts only those two, and refuses such an adapter.
    """
    disagree: list[str] = []
    used_flag: list[str] = []
    flipped: list[LayerPlan] = []
    for layer in plan.layers:
        before = layer.conv1d
        kind = None
        if skeleton is not None:
            kind = skeleton.module_type(layer.module) or skeleton.module_type(layer.key[: -len(".weight")])
        flags = {adapters[c.adapter_index].settings.fan_in_fan_out for c in layer.contributions}
        if kind is not None and kind not in (LINEAR, CONV1D):
            assert skeleton is not None
            where = skeleton.embedding_source if skeleton.default_type is not None else skeleton.source
            raise BaseMismatchError(
                layer.key,
                f"the adapter has a spectrum for {layer.module}, which is {_article(kind)} {kind} in the base model "
                f"({where}); PEFT's FourierFT adapts only Linear and Conv1D modules and refuses this adapter",
                "remove that spectrum from the adapter, or check that this is the base model it was trained on",
            )
        if kind in (LINEAR, CONV1D):
            layer.conv1d = kind == CONV1D
            layer.orientation_source = (
                "skeleton" if skeleton is not None and skeleton.default_type is None else "source"
            )
            if flags != {layer.conv1d}:
                disagree.append(layer.module)
        else:
            layer.conv1d = any(flags)
            layer.orientation_source = "flag"
            used_flag.append(layer.module)
        if layer.conv1d != before:
            flipped.append(layer)
    if disagree:
        assert skeleton is not None  # a disagreement needs a module type
        plan.warnings.append(
            f"fan_in_fan_out in adapter_config.json disagrees with the module type for {len(disagree)} module(s) "
            f"(first: {disagree[0]}); used the module type from the {skeleton.source} (PEFT rewrites this flag "
            "per module)"
        )
    if used_flag:
        reason = why or "module type unknown"
        plan.warnings.append(
            f"orientation of {len(used_flag)} module(s) taken from fan_in_fan_out ({reason}); "
            "a Conv1D model merged with the wrong flag gives a transposed delta"
        )
    elif plan.layers and skeleton is not None:
        plan.notes.append(f"orientation (Linear / Conv1D) decided from the {skeleton.source}")
    return flipped


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def plan_with_orientation(
    ckpt: BaseCheckpoint,
    adapters: Sequence[FourierFTAdapter],
    *,
    weights: Sequence[float] | None = None,
    out_dtype: str | None = None,
) -> MergePlan:
    """Validate and plan ``adapters`` against ``ckpt`` with every layer's orientation decided.

    For callers that need shapes and module types before doing anything (``inspect``, ``to-lora``,
    ``merge_in_memory``): the model skeleton is built at once (``merge`` builds it in the background
    instead). ``weights`` and ``out_dtype`` are passed to :func:`build_plan`.

    Example:
        >>> plan = plan_with_orientation(open_checkpoint("fixtures/gpt2/base"), [adapter])  # doctest: +SKIP
        >>> all(layer.conv1d for layer in plan.layers)  # doctest: +SKIP
        True
    """
    names, missing = resolve_names(ckpt, adapters)
    skeleton, why = None, "the base has no config.json"
    if ckpt.config is not None:
        skeleton = None if missing else scan_linear_only(ckpt.config)
        if skeleton is None:
            skeleton, why = build_skeleton_bounded(ckpt.config, ckpt.tensors)
        if missing:
            names, missing = resolve_names(ckpt, adapters, skeleton)
    plan = build_plan(ckpt, adapters, names, weights=weights, out_dtype=out_dtype)
    set_orientation(plan, skeleton, adapters, why)
    return plan
