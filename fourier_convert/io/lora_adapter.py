"""Reading a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

Only plain LoRA on linear layers (``nn.Linear`` and GPT-2 ``Conv1D``) is accepted: the delta of module ``m``
is ``scale_m * lora_B @ lora_A`` (``(out, in)``) with ``scale_m = alpha_m / r_m`` (``alpha_m / sqrt(r_m)`` with
rsLoRA), ``r_m`` and ``alpha_m`` from ``rank_pattern`` / ``alpha_pattern`` as PEFT matches them. Variants that
change this maths (DoRA, KaSA, BD-LoRA, Arrow, ``lora_bias``, embedding or convolution LoRA, ...) are refused with the
reason, and so are factors of a module the config does not select (PEFT puts no LoRA layer there and ignores them).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fourier_convert.errors import AdapterError, InputFileError, short_repr
from fourier_convert.io.adapter import (
    CONFIG_NAME,
    KEY_PREFIX,
    PICKLE_NAME,
    WEIGHTS_NAME,
    StoredTensor,
    check_task_type,
    classify_tensors,
    load_json,
    load_pickle,
    not_an_adapter,
    saved_modules,
)
from fourier_convert.io.resolve import resolve_folder
from fourier_convert.io.safetensors_file import FLOAT_DTYPES, read_header, read_numpy_float64
from fourier_convert.patterns import config_match
from fourier_convert.targets import is_targeted

LORA_BIAS_MODES = ("none", "all", "lora_only")
#: Largest LoRA scale accepted: PEFT multiplies the factors' product by the scale in the layer's dtype, and a larger
#: scale is infinite in float32 (and bfloat16), so the delta would be too.
MAX_SCALE = float(np.finfo(np.float32).max)
_MERGE_INSTEAD = "convert a plain LoRA adapter (merge this one with PEFT instead)"
_NO_MERGE_EITHER = "convert a plain LoRA adapter (PEFT cannot merge this one either)"
#: Config fields whose truthy values (PEFT tests them for truth) change the delta or the model, with why each is
#: refused and the fix.
_REFUSED: dict[str, tuple[str, str]] = {
    "use_dora": (
        "DoRA rescales every column of W + delta by a learned magnitude, which no additive delta represents",
        _MERGE_INSTEAD,
    ),
    "lora_bias": ("lora_bias adds a bias to lora_B, which FourierFT cannot represent", _MERGE_INSTEAD),
    "layer_replication": ("layer_replication duplicates base layers, which changes the model itself", _MERGE_INSTEAD),
    "target_parameters": (
        "target_parameters adapts raw parameters (e.g. MoE experts), not linear layers",
        _MERGE_INSTEAD,
    ),
    "use_qalora": ("QA-LoRA pools the input groups, which changes the maths of the delta", _MERGE_INSTEAD),
    "alora_invocation_tokens": (
        "aLoRA activates only after invocation tokens, which a static delta cannot do",
        _NO_MERGE_EITHER,
    ),
    "trainable_token_indices": (
        "trainable tokens change embedding rows, which FourierFT cannot represent",
        _MERGE_INSTEAD,
    ),
    "megatron_config": ("Megatron-parallel LoRA layers are not plain linear layers", _MERGE_INSTEAD),
}
#: Sub-configs that make every LoRA layer a variant once set: PEFT turns any map (even ``{}``) into a config object,
#: which is true, and refuses any other value but null on loading.
#: ``init_lora_weights`` values whose initialisation PEFT re-runs on the base weights when loading (checked on the
#: llama fixture: q_proj's base weight moved by up to 0.04): PiSSA, OLoRA, CorDA, LoftQ.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

_REFUSED_VARIANTS: dict[str, tuple[str, str]] = {
    "kasa_config": (
        "KaSA drops the base weight's r smallest singular directions and puts a learned diagonal (lora_diag) between "
        "lora_A and lora_B, so the delta is not scale * lora_B @ lora_A",
        _MERGE_INSTEAD,
    ),
    "use_bdlora": (
        "BD-LoRA stores lora_A or lora_B as the blocks of a block-diagonal matrix, not as the factor itself",
        _MERGE_INSTEAD,
    ),
    "arrow_config": (
        "Arrow routes every token through the top-k of several LoRA experts, which no single static delta represents",
        _NO_MERGE_EITHER,
    ),
}
#: Sub-configs accepted as maps (or null): they decide only the initialisation (EVA, CorDA, LoRA-GA) or training
#: (VeLoRA's backward pass, MonteCLoRA's sampling), and PEFT's delta stays ``scale * lora_B @ lora_A``. PEFT refuses
#: any other value on loading (MonteCLoRA: any other true value).
_ACCEPTED_SUBCONFIGS = ("eva_config", "corda_config", "lora_ga_config", "velora_config", "monteclora_config")
#: Training-only state PEFT saves beside the factors of a VeLoRA / MonteCLoRA layer and never uses outside training:
#: skipped when the config holds the sub-config and the module has factors.
_TRAINING_STATE: dict[str, re.Pattern[str]] = {
    "velora_config": re.compile(r"^(.*)\.lora_velora_embed$"),
    "monteclora_config": re.compile(r"^(.*)\.lora_monteclora_sampler\.[^.]+$"),
}
#: ``target_modules`` shorthand PEFT expands against the base model (case-insensitive).
_ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraSettings:
    """The fields of a LoRA ``adapter_config.json`` that decide the delta.

    Attributes:
        r: Default rank.
        lora_alpha: Default alpha.
        rank_pattern: Module pattern -> rank.
        alpha_pattern: Module pattern -> alpha.
        use_rslora: Scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
        fan_in_fan_out: The config's flag (True for GPT-2 style Conv1D targets).
        bias: ``"none"``, ``"all"`` or ``"lora_only"``.
        modules_to_save: Head names, as PEFT loads them (with the ``task_type``'s heads; ``saved_modules``).
        task_type: PEFT task type.
        base_model_name_or_path: The base the adapter was trained on.
        raw: The whole JSON.
        target_modules: Names (suffixes) or a regex of the modules PEFT adapts.
        exclude_modules: Names (suffixes) or a regex of modules PEFT never adapts.
        layers_to_transform: Layer indices PEFT adapts (with a list of ``target_modules``).
        layers_pattern: Name(s) of the layer list whose index ``layers_to_transform`` reads.
    """

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    fan_in_fan_out: bool
    bias: str
    modules_to_save: list[str]
    task_type: str | None
    base_model_name_or_path: str | None
    raw: dict[str, Any] = field(repr=False)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def alpha_for(self, module: str) -> float:
        """``alpha`` PEFT gives ``module`` (first ``alpha_pattern`` key matching its name's end).

        Example:
            >>> s = LoraSettings(8, 16.0, {}, {"v_proj": 4.0}, False, False, "none", [], None, None, {})
            >>> s.alpha_for("model.layers.0.self_attn.v_proj"), s.alpha_for("model.layers.0.self_attn.q_proj")
            (4.0, 16.0)
        """
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def rank_for(self, module: str) -> int:
        """The rank the config gives ``module`` (``rank_pattern`` first, as PEFT matches it)."""
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def scale_for(self, module: str, rank: int) -> float:
        """PEFT's LoRA scale for ``module`` with factors of rank ``rank``."""
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @property
    def init_lora_weights(self) -> Any:
        """The config's ``init_lora_weights`` (PEFT's default, True, when the field is absent)."""
        return self.raw.get("init_lora_weights", True)

    def alpha_field(self, module: str) -> str:
        """The config field that gives ``module`` its alpha (``lora_alpha`` or ``alpha_pattern['KEY']``), for
        messages."""
        key = _pattern_key(self.alpha_pattern, module)
        return f"alpha_pattern[{key!r}]" if key is not None else "lora_alpha"


def init_without_factors(init: Any) -> str | None:
    """What PEFT does, under ``init_lora_weights=init``, to a module it selects but finds no factors for, when that is
    not "an exactly zero delta" (None then). PEFT loads such an adapter (it only warns of the missing keys) and keeps
    the LoRA layer it initialised there.

    As PEFT 0.21.2's ``LoraLayer.update_layer`` initialises a Linear / Conv1D layer on loading (measured on the llama
    fixture): True, ``"gaussian"``, ``"eva"`` and ``"lora_ga"`` (no gradients when loading) start ``lora_B`` at zero,
    ``"mica"`` ``lora_A``: the delta is exactly 0. A false value keeps both factors' random ``nn.Linear`` start (a
    delta of about 0.3 at r=2); ``"orthogonal"`` draws both at random, their product zero only up to rounding (about
    1e-8, different on every load). ``init`` is a value :func:`parse_lora_settings` accepts: those PEFT cannot load
    (:func:`init_peft_cannot_load`) and PiSSA, OLoRA, CorDA and LoftQ (:data:`_BASE_CHANGING_INITS`) are refused
    before.

    Returns:
        None for an exactly zero delta, else a clause about the module (``it``) for a message.

    Example:
        >>> init_without_factors(True) is None, init_without_factors("Gaussian") is None
        (True, True)
        >>> init_without_factors(False)[:60]
        'PEFT would initialise it randomly when loading the adapter ('
    """
    value = f"init_lora_weights={short_repr(init)}"
    if init == "orthogonal":
        return (
            f"PEFT would initialise it randomly when loading the adapter ({value}: random factors whose product is "
            "zero only up to rounding, different on every load)"
        )
    if not init:
        return f"PEFT would initialise it randomly when loading the adapter ({value}), so PEFT's delta there is random"
    return None


def init_peft_cannot_load(init: Any, at: tuple[str, int, tuple[int, int]] | None = None) -> str | None:
    """What is wrong, as the start of a message, when PEFT 0.21.2 fails to load an adapter with
    ``init_lora_weights=init`` (with ``at``, ``(module, rank, weight shape)``, at that module: the checks that need
    its rank and shape), else None. It fails whether or not the file holds the module's factors.

    Measured with ``PeftModel.from_pretrained`` on the llama fixture: PEFT loads True, any false value (false, null,
    0, "", [], {}: no initialisation), ``"gaussian"`` and ``"mica"`` in any case, ``"eva"``, ``"lora_ga"`` and
    ``"orthogonal"``. It runs the PiSSA, OLoRA, CorDA and LoftQ values on the base weights (or fails: ``"corda"``
    wants ``preprocess_corda``, ``"loftq"`` a full ``loftq_config``); they pass here, to be refused after
    (:data:`_BASE_CHANGING_INITS`): ``"olora"`` in any case, ``"loftq"``, ``"pissa"``, ``"pissa_niter_N"`` (N read by
    ``int()``, even -1), strings starting with ``"corda"``. Any other string ("bogus", "EVA", "true", "pissa_x")
    fails with a ValueError ("Unknown initialization ..."), any other true value (1, 1.5, [1], {"a": 1}) with an
    AttributeError (no ``.lower()``). ``"orthogonal"`` also fails at a module of odd rank, be it ``r`` or its
    ``rank_pattern`` value (an odd ``r`` that ``rank_pattern`` overrides everywhere loads), and ``"mica"`` at a
    module whose rank exceeds min(out, in).

    Example:
        >>> init_peft_cannot_load("Gaussian") is None, init_peft_cannot_load(None) is None
        (True, True)
        >>> init_peft_cannot_load("") is None  # false: PEFT loads it
        True
        >>> init_peft_cannot_load("EVA")
        "init_lora_weights is 'EVA': PEFT fails to load the adapter with it (an initialisation it does not know)"
    """
    found = f"init_lora_weights is {short_repr(init)}"
    if isinstance(init, str) and init:  # "" is a false value: no initialisation, as false
        _, sep, niter = init.partition("_niter_")
        known = (
            init.lower() in ("gaussian", "mica", "olora")
            or init in ("eva", "lora_ga", "orthogonal", "loftq", "pissa")
            or init.startswith("corda")
            or (init.startswith("pissa") and bool(sep) and re.fullmatch(r"\s*[-+]?\d+(_\d+)*\s*", niter) is not None)
        )
    else:
        known = init is True or not init
    if not known:
        return f"{found}: PEFT fails to load the adapter with it (an initialisation it does not know)"
    if at is None:
        return None
    module, rank, shape = at
    where = f"{found} and {module!r} has rank {rank}"
    if init == "orthogonal" and rank % 2:
        return f"{where}: PEFT fails to load the adapter (its orthogonal initialisation needs an even rank)"
    if isinstance(init, str) and init.lower() == "mica" and rank > min(shape):
        return (
            f"{where}, more than min(out, in) = {min(shape)}: PEFT fails to load the adapter (MiCA takes lora_B "
            "from r of the base weight's singular vectors)"
        )
    return None


#: The fix for an ``init_lora_weights`` PEFT cannot load.
INIT_FIX = "set init_lora_weights to true (it only sets the factors PEFT starts from, which the saved ones replace)"


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # PEFT's get_pattern_key: a key matches when it (as a regex) matches a dotted suffix of the module name
    for key in patterns:
        if config_match("match", rf"(.*\.)?({key})$", module, "rank_pattern / alpha_pattern", key):
            return key
    return None


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module, located from the file's header: its factors are read (and checked) on first use, so
    that their shapes can be checked against a base model before any tensor data is read.

    Attributes:
        module: Module path (``base_model.model.`` stripped).
        lora_a: ``lora_A.weight`` as stored, ``(r, in)``.
        lora_b: ``lora_B.weight`` as stored, ``(out, r)``.
        scale: PEFT's scale for this module.
        where: The adapter weights file, as errors name it.
    """

    module: str
    lora_a: StoredTensor
    lora_b: StoredTensor
    scale: float
    where: str = ""

    @property
    def dtype(self) -> str:
        """The factors' stored dtype."""
        return self.lora_a.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the delta (from the header)."""
        return int(self.lora_b.shape[0]), int(self.lora_a.shape[1])

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @cached_property
    def a(self) -> np.ndarray:
        """``lora_A.weight`` as float64, ``(r, in)`` (read on first use).

        Raises:
            AdapterError: A value is not finite.
        """
        return _factor_values(self.lora_a, self.where)

    @cached_property
    def b(self) -> np.ndarray:
        """``lora_B.weight`` as float64, ``(out, r)`` (read on first use).

        Raises:
            AdapterError: A value is not finite.
        """
        return _factor_values(self.lora_b, self.where)


@dataclass
class LoraAdapterIn:
    """A validated PEFT LoRA adapter, read for conversion.

    Attributes:
        folder: The adapter folder.
        label: The user's spec, for messages.
        settings: Parsed config.
        modules: Module path -> factors, in file order.
        biases: Clean ``<module>.bias`` -> trained bias.
        head_tensors: Clean key -> ``modules_to_save`` tensor.
        files: Files read.
    """

    folder: Path
    label: str
    settings: LoraSettings
    modules: dict[str, LoraModule]
    biases: dict[str, StoredTensor]
    head_tensors: dict[str, StoredTensor]
    files: list[Path]

    def read_factors(self) -> None:
        """Read every module's factors now (they are otherwise read on first use).

        Raises:
            AdapterError: A factor holds a non-finite value.
        """
        for mod in self.modules.values():
            mod.a  # noqa: B018  (reads and checks on first use)
            mod.b  # noqa: B018


def parse_lora_settings(cfg: dict[str, Any], path: Path) -> LoraSettings:
    """Validate a LoRA adapter config dict.

    Raises:
        AdapterError: Not LoRA, a variant that changes the maths, a sub-config, selection or ``init_lora_weights``
            PEFT refuses or fails on in loading, ``target_modules`` unset or ``all-linear`` (only the base model
            resolves them), or an invalid field (named in the message).

    Example:
        >>> cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
        >>> parse_lora_settings(cfg, Path("a.json")).scale_for("model.layers.0.q_proj", 8)
        2.0
    """
    where = str(path)
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        fix = "pass a LoRA adapter"
        if peft_type == "FOURIERFT":
            fix = "this is already a FourierFT adapter (to-lora converts the other way)"
        raise AdapterError(where, f"peft_type is {peft_type!r}, expected 'LORA'", fix)
    for name, (why, fix) in _REFUSED.items():
        value = cfg.get(name)
        if value:
            raise AdapterError(where, f"{name} is {short_repr(value)}: {why}", fix)
    for name, (why, fix) in _REFUSED_VARIANTS.items():
        value = cfg.get(name)
        if isinstance(value, dict):
            raise AdapterError(where, f"{name} is {short_repr(value)}: {why}", fix)
        if value is not None:
            raise AdapterError(where, _not_a_map(name, value), "fix the config")
    for name in _ACCEPTED_SUBCONFIGS:
        value = cfg.get(name)
        if value is not None and not isinstance(value, dict) and (value or name != "monteclora_config"):
            raise AdapterError(where, _not_a_map(name, value), "fix the config")
    init = cfg.get("init_lora_weights")
    problem = init_peft_cannot_load(init)
    if problem is not None:
        raise AdapterError(where, problem, INIT_FIX)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(
            where,
            f"init_lora_weights is {short_repr(init)}: PEFT runs this initialisation again on the base weights when it "
            "loads the adapter (the base becomes W - scale * B0 @ A0), so the adapter's delta against the original "
            "base is not scale * lora_B @ lora_A",
            "re-save it with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...), which turns it "
            "into a plain LoRA",
        )
    targets, exclude, layers, layers_pattern = _parse_selection(cfg, where)
    r = cfg.get("r", 8)
    if not _is_rank(r):
        raise AdapterError(where, f"r is {short_repr(r)}, expected an integer >= 1", "fix the config")
    alpha = cfg.get("lora_alpha", 8)
    if not _is_finite_number(alpha):
        raise AdapterError(where, f"lora_alpha is {short_repr(alpha)}, expected a finite number", "fix the config")
    ranks = cfg.get("rank_pattern") or {}
    alphas = cfg.get("alpha_pattern") or {}
    if not isinstance(ranks, dict):
        raise AdapterError(
            where, f"rank_pattern is {short_repr(ranks)}, expected a map of name -> int", "fix the config"
        )
    for key, value in ranks.items():
        if not _is_rank(value):
            raise AdapterError(
                where, f"rank_pattern[{key!r}] is {short_repr(value)}, expected an integer >= 1", "fix the config"
            )
    if not isinstance(alphas, dict):
        raise AdapterError(
            where, f"alpha_pattern is {short_repr(alphas)}, expected a map of name -> number", "fix the config"
        )
    for key, value in alphas.items():
        if not _is_finite_number(value):
            raise AdapterError(
                where, f"alpha_pattern[{key!r}] is {short_repr(value)}, expected a finite number", "fix the config"
            )
    bias = cfg.get("bias", "none")  # null, 0 or "" make PEFT fail on loading: refused too
    if not isinstance(bias, str) or bias not in LORA_BIAS_MODES:
        raise AdapterError(where, f"bias is {bias!r}, expected one of {', '.join(LORA_BIAS_MODES)}", "fix the config")
    check_task_type(cfg, where)
    mts = saved_modules(cfg, where)
    return LoraSettings(
        r=r,
        lora_alpha=float(alpha),
        rank_pattern={str(k): int(v) for k, v in ranks.items()},
        alpha_pattern={str(k): float(v) for k, v in alphas.items()},
        use_rslora=bool(cfg.get("use_rslora", False)),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        bias=bias,
        modules_to_save=mts,
        task_type=cfg.get("task_type"),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        raw=cfg,
        target_modules=targets,
        exclude_modules=exclude,
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
    )


def _not_a_map(name: str, value: Any) -> str:
    return f"{name} is {short_repr(value)}, which PEFT refuses on loading: it takes a map or null"


def _parse_selection(
    cfg: dict[str, Any], where: str
) -> tuple[list[str] | str, list[str] | str | None, list[int] | int | None, list[str] | str | None]:
    """``target_modules``, ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern``, checked as PEFT's
    ``LoraConfig`` checks them on loading; and a ``target_modules`` that only the base model resolves (unset, or
    ``all-linear``) is refused, since which modules it selects cannot be checked from the adapter.

    Raises:
        AdapterError: A field of the wrong type, a combination PEFT refuses, or ``target_modules`` unset or
            ``all-linear``.
    """
    names = "set target_modules in adapter_config.json to the adapted modules' names, as PEFT's save_pretrained writes"
    if "target_modules" not in cfg or cfg["target_modules"] is None:
        raise AdapterError(
            where,
            "target_modules is not set, so PEFT adapts the default modules of the base model's type, which the adapter "
            "does not say",
            names,
        )
    targets = cfg["target_modules"]
    if not _names_or_regex(targets):
        raise AdapterError(
            where, f"target_modules is {short_repr(targets)}, expected a list or a regex", "fix the config"
        )
    if isinstance(targets, str) and targets.lower() == _ALL_LINEAR:
        raise AdapterError(
            where,
            f"target_modules is {short_repr(targets)}, which PEFT expands against the base model when it loads the "
            "adapter (every linear layer but the output layer)",
            names,
        )
    for name in ("exclude_modules", "layers_pattern"):
        value = cfg.get(name)
        if value is not None and not _names_or_regex(value):
            raise AdapterError(
                where, f"{name} is {short_repr(value)}, expected a list of names or a regex", "fix the config"
            )
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(x, int) for x in layers))
    ):
        raise AdapterError(
            where, f"layers_to_transform is {short_repr(layers)}, expected an int or list", "fix the config"
        )
    pattern = cfg.get("layers_pattern")
    if isinstance(targets, str):
        for name, value in (("layers_to_transform", layers), ("layers_pattern", pattern)):
            if value is not None:
                raise AdapterError(
                    where,
                    f"{name} is {short_repr(value)} with target_modules a regex ({short_repr(targets)}), which PEFT "
                    "refuses on loading",
                    f"remove {name}, or make target_modules a list of names",
                )
    if pattern and layers is None:
        raise AdapterError(
            where,
            f"layers_pattern is {short_repr(pattern)} without layers_to_transform, which PEFT refuses on loading",
            "set layers_to_transform, or remove layers_pattern",
        )
    return targets, cfg.get("exclude_modules"), layers, pattern


def _names_or_regex(value: Any) -> bool:
    """A module selector as PEFT takes it: a regex string, or a list of name strings."""
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_finite_number(value: Any) -> bool:
    """An int or float that is finite as a float (``10**400`` is an int that no float holds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


_FACTOR = re.compile(r"^(.*)\.lora_(A|B)\.weight$")
_UNSUPPORTED = (
    ("lora_embedding_A", "embedding LoRA (lora_embedding_A / B): FourierFT adapts linear layers only"),
    ("lora_embedding_B", "embedding LoRA (lora_embedding_A / B): FourierFT adapts linear layers only"),
    ("lora_magnitude_vector", "a DoRA magnitude vector: DoRA cannot be represented by an additive delta"),
)


def read_lora_adapter(spec: str | Path, *, subfolder: str | None = None, allow_pickle: bool = False) -> LoraAdapterIn:
    """Read and validate a PEFT LoRA adapter for conversion.

    Args:
        spec: Local folder, ``folder:adapter_name``, or hub id.
        subfolder: Named adapter inside the folder.
        allow_pickle: Load ``adapter_model.bin`` through torch's weights-only loader.

    Returns:
        The adapter with its factors and other tensors located from the header, not read: call
        :meth:`LoraAdapterIn.read_factors` (or use ``module.a`` / ``module.b``) once their shapes are checked
        against the base.

    Raises:
        InputFileError: Missing or unreadable files, bad JSON, or a folder holding adapters rather than one.
        PickleRefusedError: Only a pickle is present and ``allow_pickle`` is False.
        AdapterError: Not LoRA (a model folder or an ONNX export: the message says which), a refused variant,
            a key without PEFT's ``base_model.model.`` prefix, factors of a module the config does not select,
            invalid factor shapes or ranks, or a scale beyond float32.

    Example:
        >>> lora = read_lora_adapter("my-lora")  # doctest: +SKIP
        >>> sorted(lora.modules)[:1]  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj']
    """
    folder = resolve_folder(
        str(spec), what="adapter", subfolder=subfolder, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME]
    )
    config_path = folder / CONFIG_NAME
    if folder.is_dir() and not config_path.exists():
        not_an_adapter(folder, "LoRA")
    settings = parse_lora_settings(load_json(config_path), config_path)
    weights = folder / WEIGHTS_NAME
    if os.path.lexists(weights):  # a FIFO, device or dangling link there is refused by read_header, not skipped
        header = read_header(weights)
        tensors = {k: StoredTensor(k, t.dtype, t.shape, info=t) for k, t in header.tensors.items()}
        files = [config_path, weights]
    elif os.path.lexists(folder / PICKLE_NAME):
        tensors = load_pickle(folder / PICKLE_NAME, allow_pickle)
        files = [config_path, folder / PICKLE_NAME]
    else:
        raise InputFileError(str(weights), "adapter weights not found", "check the adapter folder")
    where = str(files[1])
    for key in tensors:
        for marker, what in _UNSUPPORTED:
            if marker in key:
                raise AdapterError(where, f"{key!r} is {what}", "convert a plain LoRA adapter on linear layers")
    groups = classify_tensors(
        _without_training_state(tensors, settings),
        is_method=lambda k: _FACTOR.match(k) is not None,
        method_noun="a lora_A / lora_B factor",
        bias=settings.bias,
        modules_to_save=settings.modules_to_save,
        where=where,
        require_prefix=True,
    )
    _check_selected(groups.method, settings, where)
    modules = _pair_factors(groups.method, settings, where, str(config_path))
    if settings.bias == "lora_only":
        stray = [k for k in groups.biases if k[: -len(".bias")] not in modules]
        if stray:
            raise AdapterError(
                where, f"bias='lora_only' but {stray[0]!r} belongs to no adapted module", "fix the config"
            )
    label = f"{spec}:{subfolder}" if subfolder and not str(spec).endswith(f":{subfolder}") else str(spec)
    return LoraAdapterIn(folder, label, settings, modules, groups.biases, groups.heads, files)


def _without_training_state(tensors: dict[str, StoredTensor], settings: LoraSettings) -> dict[str, StoredTensor]:
    """``tensors`` less the training-only state (:data:`_TRAINING_STATE`) of the variants the config sets, for modules
    that have factors; any other such tensor stays, for :func:`classify_tensors` to refuse."""
    patterns = [p for name, p in _TRAINING_STATE.items() if isinstance(settings.raw.get(name), dict)]
    if not patterns:
        return tensors
    factored = {m.group(1) for key in tensors if (m := _FACTOR.match(key)) is not None}
    kept: dict[str, StoredTensor] = {}
    for key, t in tensors.items():
        found = [m.group(1) for p in patterns if (m := p.match(key)) is not None]
        if not (key.startswith(KEY_PREFIX) and found and found[0] in factored):
            kept[key] = t
    return kept


def _check_selected(factors: dict[str, StoredTensor], settings: LoraSettings, where: str) -> None:
    """Refuse a factor of a module the config does not select: PEFT creates no LoRA layer there, so it ignores the
    factor. Modules are selected as PEFT selects them (:func:`fourier_convert.targets.is_targeted`).

    Raises:
        AdapterError: Naming the first such factor (file order), the config field that leaves its module out, and
            the fix.
    """
    for clean, t in factors.items():
        m = _FACTOR.match(clean)
        assert m is not None
        module = m.group(1)
        if is_targeted(settings, module):
            continue
        found, fix = _why_not_selected(settings, module)
        raise AdapterError(
            where,
            f"tensor {t.key!r} is a factor of {module!r}, {found}, so PEFT puts no LoRA layer there and ignores it",
            f"{fix} in adapter_config.json if the module was trained, or remove its factors",
        )


def _why_not_selected(selection: LoraSettings, module: str) -> tuple[str, str]:
    """Which config field leaves ``module`` out (for the message), decided by asking :func:`is_targeted` again
    without ``exclude_modules`` / ``modules_to_save``, then without ``layers_to_transform``."""
    unexcluded = replace(selection, exclude_modules=None, modules_to_save=[])
    if is_targeted(unexcluded, module):
        if selection.exclude_modules and not is_targeted(replace(selection, modules_to_save=[]), module):
            regex = isinstance(selection.exclude_modules, str)
            return (
                f"which exclude_modules {short_repr(selection.exclude_modules)} excludes",
                "make exclude_modules not match the module" if regex else "remove the module from exclude_modules",
            )
        return (
            f"which modules_to_save {short_repr(selection.modules_to_save)} lists (PEFT saves that module whole "
            "instead)",
            "remove the module from modules_to_save",
        )
    if is_targeted(replace(unexcluded, layers_to_transform=None), module):
        layers = f"layers_to_transform {short_repr(selection.layers_to_transform)}"
        fix = "add its layer to layers_to_transform"
        if selection.layers_pattern:
            layers += f" with layers_pattern {short_repr(selection.layers_pattern)}"
            fix += " (or fix layers_pattern)"
        return f"which {layers} does not select", fix
    targets = selection.target_modules
    if isinstance(targets, str):
        return (
            f"which target_modules {short_repr(targets)} (a regex matched against the whole name) does not select",
            "make target_modules match the module",
        )
    return f"which target_modules {short_repr(targets)} does not select", "add the module to target_modules"


def _factor_values(t: StoredTensor, where: str) -> np.ndarray:
    if t.info is not None:
        arr = read_numpy_float64(t.info).reshape(t.shape)
    else:
        assert t.value is not None
        arr = t.value.double().numpy()
    bad = ~np.isfinite(arr)
    if bad.any():
        raise AdapterError(where, f"{t.key!r} holds {int(bad.sum())} non-finite value(s)", "use a sound checkpoint")
    return arr


def _pair_factors(
    factors: dict[str, StoredTensor], settings: LoraSettings, where: str, config_where: str
) -> dict[str, LoraModule]:
    """Pair each module's factors and check, from their shapes alone (no tensor data is read), that they are 2-D
    float matrices of one rank, the rank the config gives, and that PEFT's scale for them is finite in float32."""
    halves: dict[str, dict[str, StoredTensor]] = {}
    for clean, t in factors.items():
        m = _FACTOR.match(clean)
        assert m is not None
        halves.setdefault(m.group(1), {})[m.group(2)] = t
    modules: dict[str, LoraModule] = {}
    for module, pair in halves.items():
        missing = {"A", "B"} - set(pair)
        if missing:
            raise AdapterError(
                where, f"module {module!r} has no lora_{missing.pop()}.weight", "re-save the adapter with PEFT"
            )
        ta, tb = pair["A"], pair["B"]
        for t in (ta, tb):
            if t.dtype not in FLOAT_DTYPES:
                raise AdapterError(where, f"{t.key!r} has dtype {t.dtype}, expected a float dtype", "re-save it")
            if len(t.shape) != 2:
                raise AdapterError(
                    where,
                    f"{t.key!r} has shape {list(t.shape)}, expected 2-D (a convolution LoRA?)",
                    "convert a LoRA on linear layers",
                )
        r = ta.shape[0]
        if tb.shape[1] != r:
            raise AdapterError(
                where,
                f"{module!r}: lora_A is {list(ta.shape)} but lora_B is {list(tb.shape)} (ranks differ)",
                "re-save the adapter with PEFT",
            )
        if settings.rank_for(module) != r:
            raise AdapterError(
                where,
                f"{module!r}: the factors have rank {r} but the config gives rank {settings.rank_for(module)}",
                "check r / rank_pattern in adapter_config.json",
            )
        scale = settings.scale_for(module, r)
        if not abs(scale) <= MAX_SCALE:
            field_name = settings.alpha_field(module)
            divisor = "sqrt(r)" if settings.use_rslora else "r"
            raise AdapterError(
                config_where,
                f"{field_name} is {settings.alpha_for(module):g}: the LoRA scale {field_name} / {divisor} = "
                f"{scale:.3g} of {module!r} (rank {r}) is beyond float32's range ({MAX_SCALE:.3g}), where PEFT "
                "computes the delta",
                f"set {field_name} to the value the adapter was trained with",
            )
        modules[module] = LoraModule(module, ta, tb, scale, where)
        problem = init_peft_cannot_load(settings.init_lora_weights, (module, r, modules[module].shape))
        if problem is not None:
            raise AdapterError(config_where, problem, INIT_FIX)
    if not modules:
        raise AdapterError(where, "holds no lora_A / lora_B tensors", "check that this is a LoRA adapter")
    return modules
