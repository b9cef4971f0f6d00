"""Reading a PEFT FourierFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

The reader validates the adapter on its own (without a base model): method, config fields, spectra
(1-D, finite, length consistent with ``n_frequency`` / ``n_frequency_pattern``) and classifies every
tensor key into spectra, trained biases and ``modules_to_save`` tensors. Checks against a base model live
in :mod:`fourier_convert.plan`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import warnings
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fourier_convert.errors import AdapterError, InputFileError, PickleRefusedError, short_repr
from fourier_convert.io.resolve import resolve_folder
from fourier_convert.io.safetensors_file import FLOAT_DTYPES, TensorInfo, read_header, read_numpy_float64
from fourier_convert.patterns import config_match

if TYPE_CHECKING:
    import numpy as np
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
BIAS_MODES = ("none", "all", "fourier_only")


@dataclass(frozen=True)
class FourierFTSettings:
    """The fields of a FourierFT ``adapter_config.json`` that decide the merge.

    Attributes mirror PEFT's ``FourierFTConfig``; ``modules_to_save`` is the list PEFT loads with (the config's,
    de-duplicated, as PEFT may list a head twice, and the heads of the ``task_type``: :func:`saved_modules`) and
    ``raw`` keeps the whole JSON for provenance.
    """

    n_frequency: int
    scaling: float
    random_loc_seed: int
    fan_in_fan_out: bool
    bias: str
    target_modules: list[str] | str | None
    exclude_modules: list[str] | str | None
    layers_to_transform: list[int] | int | None
    layers_pattern: list[str] | str | None
    n_frequency_pattern: dict[str, int]
    modules_to_save: list[str]
    task_type: str | None
    base_model_name_or_path: str | None
    raw: dict[str, Any] = field(repr=False)

    def n_for(self, module: str) -> int:
        """The n_frequency PEFT gives ``module`` (first matching pattern key, as PEFT matches them).

        Example:
            >>> s = FourierFTSettings(1000, 150.0, 777, False, "none", ["q_proj"], None, None, None,
            ...     {"v_proj": 30}, [], None, None, {})
            >>> s.n_for("model.layers.0.self_attn.v_proj"), s.n_for("model.layers.0.self_attn.q_proj")
            (30, 1000)
        """
        for key, n in self.n_frequency_pattern.items():
            if config_match("match", rf".*\.{key}$", module, "n_frequency_pattern", key):
                return n
        return self.n_frequency


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of the adapter: either a byte range in a safetensors file or an in-memory tensor.

    Attributes:
        key: The key as stored in the file.
        dtype: safetensors dtype string.
        shape: Shape.
        info: Location in a safetensors file (None for tensors read from a pickle).
        value: The tensor itself when read from a pickle.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    info: TensorInfo | None = None
    value: torch.Tensor | None = None

    def load(self) -> torch.Tensor:
        """The tensor on the CPU in its stored dtype."""
        if self.value is not None:
            return self.value
        from fourier_convert.io.safetensors_file import read_torch

        assert self.info is not None
        return read_torch(self.info)


@dataclass
class Spectrum:
    """One adapted module's coefficients, read from the file on first use (so a plan can refuse a spectrum too
    large for its base layer from the header alone, before reading it).

    Attributes:
        module: Module path in the adapter's name space (``base_model.model.`` stripped).
        stored_dtype: dtype the spectrum was saved in.
        key: The tensor key in the adapter file.
        n: Number of coefficients (from the header).
        source: Where the values are (a file range, or an in-memory tensor), or None when ``loaded`` is given.
        where: The adapter, as errors name it.
        loaded: The coefficients once read.
    """

    module: str
    stored_dtype: str
    key: str
    n: int
    source: StoredTensor | None = None
    where: str = ""
    loaded: np.ndarray | None = None

    @property
    def values(self) -> np.ndarray:
        """The coefficients as float64 (exact copies of the stored values), read and checked on first use.

        Raises:
            AdapterError: A coefficient is not finite.
        """
        if self.loaded is None:
            import numpy as np

            assert self.source is not None
            t = self.source
            raw = read_numpy_float64(t.info) if t.info is not None else t.value.double().numpy()  # type: ignore[union-attr]
            bad = ~np.isfinite(raw)
            if bad.any():
                i = int(np.argmax(bad))
                raise AdapterError(
                    self.where,
                    f"{t.key!r} holds {_count(int(bad.sum()), 'non-finite value')} (first at index {i}: {raw[i]})",
                    "the training diverged; use an earlier checkpoint",
                )
            _check_float32_range(raw, t.key, self.where)
            self.loaded = np.ascontiguousarray(raw)
        return self.loaded


def _check_float32_range(raw: np.ndarray, key: str, where: str) -> None:
    """Refuse a spectrum PEFT turns into inf: PEFT holds it in a float32 parameter and takes its inverse DFT in
    complex64, whose partial sums stay finite only while the coefficients' magnitudes sum within float32's range."""
    import numpy as np

    f32_max = float(np.finfo(np.float32).max)
    magnitudes = np.abs(raw)
    if magnitudes.size and float(magnitudes.max()) > f32_max:
        raise AdapterError(
            where,
            f"{key!r} holds a coefficient of {float(magnitudes.max()):.3g}, beyond float32's range ({f32_max:.3g}): "
            "PEFT loads the spectrum into a float32 parameter, where it becomes inf",
            "the training diverged; use an earlier checkpoint",
        )
    total = float(magnitudes.sum())
    if total > f32_max:
        raise AdapterError(
            where,
            f"{key!r}: its coefficients' magnitudes sum to {total:.3g}, beyond float32's range ({f32_max:.3g}): PEFT "
            "takes the inverse DFT in float32, where such a spectrum overflows to inf or NaN",
            "the training diverged; use an earlier checkpoint",
        )


@dataclass
class FourierFTAdapter:
    """A validated FourierFT adapter.

    Attributes:
        folder: The adapter folder.
        label: How to name it in messages (the user's spec).
        settings: Parsed config.
        spectra: Module path -> spectrum, in file order.
        biases: Clean parameter key (``<module>.bias``) -> trained bias (bias modes "all"/"fourier_only").
        head_tensors: Clean key -> tensor of a ``modules_to_save`` module.
        files: The files read (for provenance hashes).
    """

    folder: Path
    label: str
    settings: FourierFTSettings
    spectra: dict[str, Spectrum]
    biases: dict[str, StoredTensor]
    head_tensors: dict[str, StoredTensor]
    files: list[Path]


def read_adapter(spec: str | Path, *, subfolder: str | None = None, allow_pickle: bool = False) -> FourierFTAdapter:
    """Read and validate a FourierFT adapter.

    Args:
        spec: Local folder, ``folder:adapter_name``, or hub id.
        subfolder: Named adapter inside the folder (as PEFT saves non-default adapters).
        allow_pickle: Load ``adapter_model.bin`` (through torch's weights-only loader) when no
            safetensors file exists.

    Returns:
        The adapter with its spectra decoded and other tensors located (not read).

    Raises:
        InputFileError: Missing or unreadable files, bad JSON.
        PickleRefusedError: Only a pickle is present and ``allow_pickle`` is False.
        AdapterError: Not FourierFT, invalid config fields or tensors.

    Example:
        >>> a = read_adapter("fixtures/llama/adapter")  # doctest: +SKIP
        >>> a.settings.scaling, len(a.spectra)  # doctest: +SKIP
        (150.0, 4)
    """
    folder = resolve_folder(
        str(spec), what="adapter", subfolder=subfolder, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME]
    )
    config_path = folder / CONFIG_NAME
    if folder.is_dir() and not config_path.exists():
        not_an_adapter(folder)
    settings = parse_settings(load_json(config_path), config_path)
    weights = folder / WEIGHTS_NAME
    tensors: dict[str, StoredTensor]
    if os.path.lexists(weights):  # a FIFO, device or dangling link there is refused by read_header, not skipped
        st = read_header(weights)
        tensors = {k: StoredTensor(k, t.dtype, t.shape, info=t) for k, t in st.tensors.items()}
        files = [config_path, weights]
    elif os.path.lexists(folder / PICKLE_NAME):
        tensors = load_pickle(folder / PICKLE_NAME, allow_pickle)
        files = [config_path, folder / PICKLE_NAME]
    else:
        subs = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file()) if folder.is_dir() else []
        hint = f"; named adapters here: {', '.join(subs)} (use PATH:NAME)" if subs else ""
        raise InputFileError(str(weights), "adapter weights not found", f"check the adapter folder{hint}")
    spectra, biases, heads = _classify(tensors, settings, weights)
    label = f"{spec}:{subfolder}" if subfolder and not str(spec).endswith(f":{subfolder}") else str(spec)
    return FourierFTAdapter(folder, label, settings, spectra, biases, heads, files)


def not_an_adapter(folder: Path, kind: str = "FourierFT") -> None:
    """Raise the error for a folder without ``adapter_config.json``, saying what the folder is instead.

    Args:
        folder: The folder given as an adapter.
        kind: The adapter the command wanted (``"FourierFT"``, ``"LoRA"``), as the message names it.

    Raises:
        AdapterError: A model folder or an ONNX export.
        InputFileError: Otherwise (naming the adapter folders inside it, if any).
    """
    where = str(folder / CONFIG_NAME)
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        raise AdapterError(
            str(folder),
            f"is a model folder (config.json and weights), not a {kind} adapter",
            "pass it as --base (or --model for to-onnx), and the adapter folder as --adapter",
        )
    if (folder / "model.onnx").is_file():
        raise AdapterError(
            str(folder),
            f"is an ONNX export (model.onnx), not a {kind} adapter",
            "pass the FourierFT adapter folder the export was made from"
            if kind == "FourierFT"
            else f"pass the {kind} adapter folder itself",
        )
    inside = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
    if inside:
        raise InputFileError(
            where,
            f"file not found; adapter folders inside it: {', '.join(inside)}",
            f"pass {folder / inside[0]}, or {folder}:{inside[0]}",
        )
    raise InputFileError(where, "file not found", "check the folder")


#: Largest JSON file read (configs, model indexes): a FIFO, a device or a huge file is refused, not read.
MAX_JSON_BYTES = 64 * 1024 * 1024


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON object file with one-line errors naming the file and position.

    Only regular files of at most :data:`MAX_JSON_BYTES` are read (a FIFO would block, ``/dev/zero`` would
    never end), and JSON nested too deeply to parse is an error, not a crash.

    Raises:
        InputFileError: Missing, not a regular file, too large, unreadable, not JSON, or not an object.

    Example:
        >>> load_json(Path("fixtures/llama/adapter/adapter_config.json"))["peft_type"]
        'FOURIERFT'
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputFileError(str(path), "file not found", "check the folder") from None
    except OSError as exc:
        raise InputFileError(str(path), f"cannot be read ({exc})", "check the file") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputFileError(str(path), "is not a regular file (a folder, FIFO or device)", "pass a JSON file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise InputFileError(
                str(path), f"is larger than {MAX_JSON_BYTES // 2**20} MiB, too large for a config", "check the file"
            )
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(str(path), f"cannot be read ({exc})", "check the file") from None
    if text.startswith("\ufeff"):
        raise InputFileError(
            str(path),
            "starts with a UTF-8 byte-order mark, which the JSON readers of PEFT and transformers refuse",
            "re-save it as UTF-8 without the mark",
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            str(path), f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", "fix or re-save it"
        ) from None
    except ValueError:  # the only other ValueError json raises: an integer literal too long to convert
        raise InputFileError(
            str(path),
            f"holds an integer of more than {sys.get_int_max_str_digits():,} digits, which Python's JSON reader "
            "(PEFT's and transformers' too) refuses to convert",
            "fix the number",
        ) from None
    except RecursionError:
        raise InputFileError(str(path), "is JSON nested too deeply to read", "fix or re-save it") from None
    if not isinstance(data, dict):
        raise InputFileError(str(path), f"expected a JSON object, found {type(data).__name__}", "re-save it")
    return data


#: PEFT's ``TaskType`` values; PEFT refuses a config whose ``task_type`` is none of them (or null).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def check_task_type(cfg: dict[str, Any], where: str) -> None:
    """Refuse a ``task_type`` PEFT refuses on loading (``ValueError: Invalid task type``), so that no output carries
    it on.

    Raises:
        AdapterError: ``task_type`` is set and not one of :data:`TASK_TYPES`.

    Example:
        >>> check_task_type({"task_type": "CAUSAL_LM"}, "adapter_config.json")
    """
    task_type = cfg.get("task_type")
    if task_type is not None and task_type not in TASK_TYPES:
        raise AdapterError(
            where,
            f"task_type is {short_repr(task_type)}, which PEFT refuses on loading; it takes one of "
            f"{', '.join(TASK_TYPES)} or null",
            "fix the config",
        )


#: The heads PEFT adds to ``modules_to_save`` when it loads an adapter of these task types (``PeftModelFor*``'s
#: ``__init__`` extends the config's list, or sets it when null), so that it wraps them and loads their tensors.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def saved_modules(cfg: dict[str, Any], where: str) -> list[str]:
    """The ``modules_to_save`` PEFT loads an adapter with: the config's list (de-duplicated) and the heads its
    ``task_type`` adds (:data:`TASK_HEADS`). ``task_type`` is checked before (:func:`check_task_type`).

    Raises:
        AdapterError: ``modules_to_save`` is not a list of names (or null).

    Example:
        >>> saved_modules({"task_type": "SEQ_CLS", "modules_to_save": ["pooler"]}, "adapter_config.json")
        ['pooler', 'classifier', 'score']
    """
    mts = cfg.get("modules_to_save") or []
    if not isinstance(mts, list) or not all(isinstance(m, str) for m in mts):
        raise AdapterError(where, f"modules_to_save is {mts!r}, expected a list of names", "fix the config")
    return list(dict.fromkeys([*mts, *TASK_HEADS.get(str(cfg.get("task_type")), ())]))


def listed_modules(cfg: dict[str, Any]) -> list[str] | None:
    """The config's own ``modules_to_save`` (de-duplicated; None when empty), without the heads PEFT adds for the
    ``task_type``: what a converted adapter's config carries, so that PEFT adds them to it the same way. ``cfg``
    has passed :func:`saved_modules`.

    Example:
        >>> listed_modules({"task_type": "SEQ_CLS", "modules_to_save": ["pooler", "pooler"]})
        ['pooler']
    """
    return list(dict.fromkeys(cfg.get("modules_to_save") or [])) or None


def _names_or_regex(value: Any) -> bool:
    """A module selector as PEFT takes it: a regex string, or a list of name strings."""
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def parse_settings(cfg: dict[str, Any], path: Path) -> FourierFTSettings:
    """Validate a FourierFT adapter config dict.

    Raises:
        AdapterError: Wrong peft_type or an invalid field (named in the message).
    """
    where = str(path)
    peft_type = cfg.get("peft_type")
    if peft_type != "FOURIERFT":
        fix = "pass a FourierFT adapter"
        if peft_type == "LORA":
            fix = (
                "this is a LoRA adapter: PEFT merges it itself (merge_and_unload), and fourier-convert from-lora "
                "converts it to FourierFT"
            )
        raise AdapterError(where, f"peft_type is {peft_type!r}, expected 'FOURIERFT'", fix)

    def need_int(name: str, default: Any, minimum: int, below: int | None = None) -> int:
        value = cfg.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (below and value >= below):
            limit = f" and < {below}" if below else ""
            raise AdapterError(where, f"{name} is {value!r}, expected an integer >= {minimum}{limit}", "fix the config")
        return value

    n_frequency = need_int("n_frequency", 1000, 1)
    seed = need_int("random_loc_seed", 777, 0, 2**64)  # torch.Generator.manual_seed takes at most 64 bits
    scaling = cfg.get("scaling", 150.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise AdapterError(where, f"scaling is {scaling!r}, expected a finite number", "fix the config")
    bias = cfg.get("bias", "none")  # null, 0 or "" make PEFT fail on loading (AttributeError): refused too
    if not isinstance(bias, str) or bias not in BIAS_MODES:
        raise AdapterError(where, f"bias is {bias!r}, expected one of {', '.join(BIAS_MODES)}", "fix the config")
    check_task_type(cfg, where)
    pattern = cfg.get("n_frequency_pattern") or {}
    if not isinstance(pattern, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pattern.values()
    ):
        raise AdapterError(
            where, f"n_frequency_pattern is {pattern!r}, expected a map of name -> positive int", "fix the config"
        )
    targets = cfg.get("target_modules")
    if targets is not None and not _names_or_regex(targets):
        raise AdapterError(where, f"target_modules is {targets!r}, expected a list or a regex", "fix the config")
    for key in ("exclude_modules", "layers_pattern"):
        value = cfg.get(key)
        if value is not None and not _names_or_regex(value):
            raise AdapterError(where, f"{key} is {value!r}, expected a list of names or a regex", "fix the config")
    fan_in_fan_out = cfg.get("fan_in_fan_out", False)
    if not isinstance(fan_in_fan_out, bool):
        raise AdapterError(where, f"fan_in_fan_out is {fan_in_fan_out!r}, expected true or false", "fix the config")
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(x, int) for x in layers))
    ):
        raise AdapterError(where, f"layers_to_transform is {layers!r}, expected an int or list", "fix the config")
    mts = saved_modules(cfg, where)
    return FourierFTSettings(
        n_frequency=n_frequency,
        scaling=float(scaling),
        random_loc_seed=seed,
        fan_in_fan_out=fan_in_fan_out,
        bias=bias,
        target_modules=targets,
        exclude_modules=cfg.get("exclude_modules"),
        layers_to_transform=layers,
        layers_pattern=cfg.get("layers_pattern"),
        n_frequency_pattern={str(k): int(v) for k, v in pattern.items()},
        modules_to_save=mts,
        task_type=cfg.get("task_type"),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        raw=cfg,
    )


def load_pickle(path: Path, allow: bool) -> dict[str, StoredTensor]:
    """Load ``adapter_model.bin`` through torch's weights-only loader, if ``allow``; refuse it otherwise.

    A file in torch's zip format is memory-mapped, so that its tensors' shapes can be checked against the base
    before their data is read (a legacy, non-zip pickle is read whole). Only a regular file is opened (a FIFO
    would block, ``/dev/zero`` never end), and only a flat dict of dense CPU tensors of safetensors' dtypes is
    accepted: what PEFT's ``save_pretrained`` writes.

    Raises:
        PickleRefusedError: ``allow`` is False.
        InputFileError: The file is not a regular file, cannot be loaded weights-only, or does not hold a flat
            dict of such tensors.
    """
    if not allow:
        raise PickleRefusedError(
            str(path),
            "adapter weights are a pickle, which can run code when loaded; refused",
            "re-save the adapter with PEFT's save_pretrained(safe_serialization=True), "
            "or pass --allow-pickle to load it with torch's weights-only loader",
        )
    try:
        found = path.stat()
    except OSError as exc:
        raise InputFileError(str(path), f"cannot be read ({exc.strerror})", "check the adapter folder") from None
    if not stat.S_ISREG(found.st_mode):
        raise InputFileError(
            str(path), "is not a regular file (a folder, FIFO or device)", "re-save the adapter with PEFT"
        )
    import torch

    from fourier_convert.io.dtypes import st_dtype_or_none

    try:  # a zip-format file (torch.save's default) is memory-mapped: shapes are checked before data is read
        with warnings.catch_warnings():  # torch warns on stderr about pickles it did not write
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise InputFileError(
            str(path), f"cannot be loaded with the weights-only loader ({_load_failure(exc)})", "re-save it with PEFT"
        ) from None
    if not isinstance(data, dict):
        raise InputFileError(
            str(path), f"holds a {type(data).__name__}, not a dict of tensors", "re-save the adapter with PEFT"
        )
    tensors: dict[str, StoredTensor] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise InputFileError(str(path), f"has a key {key!r} that is not a string", "re-save the adapter with PEFT")
        if not isinstance(value, torch.Tensor):
            raise InputFileError(
                str(path), f"{key!r} is a {type(value).__name__}, not a tensor", "re-save the adapter with PEFT"
            )
        if value.layout != torch.strided:
            raise InputFileError(
                str(path), f"{key!r} is a {value.layout} tensor, not a dense one", "re-save the adapter with PEFT"
            )
        if value.device.type != "cpu":
            raise InputFileError(
                str(path),
                f"{key!r} is a tensor on the {value.device.type} device, which holds no data here",
                "re-save the adapter with PEFT",
            )
        dtype = st_dtype_or_none(value.dtype)
        if dtype is None:
            raise InputFileError(
                str(path), f"{key!r} has dtype {value.dtype}, not one a PEFT adapter holds", "re-save it with PEFT"
            )
        value = value.detach()  # an nn.Parameter loads as one
        tensors[key] = StoredTensor(key, dtype, tuple(value.shape), value=value.contiguous())
    return tensors


def _load_failure(exc: Exception) -> str:
    """The reason in torch's load error, without its advice to load with ``weights_only=False`` (which runs code)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        keep = [
            line.removeprefix(
                "Please file an issue with the following so that we can make `weights_only=True` "
                "compatible with your use case: "
            )
            for line in lines[1:]
            if not line.startswith("Check the documentation")
        ]
        keep = [line for line in keep if line]
        return " ".join(keep)[:300] or "it holds objects other than tensors"
    return lines[0][:300] if lines else type(exc).__name__


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _is_head(key: str, modules_to_save: list[str]) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save)


@dataclass
class TensorGroups:
    """An adapter file's tensors sorted by role.

    Attributes:
        method: Clean key -> tensor for the method's own tensors (spectra, LoRA factors).
        biases: Clean ``<module>.bias`` key -> trained bias.
        heads: Clean key -> tensor of a ``modules_to_save`` module.
    """

    method: dict[str, StoredTensor]
    biases: dict[str, StoredTensor]
    heads: dict[str, StoredTensor]


def extra_tensor_keys(
    biases: dict[str, StoredTensor], heads: dict[str, StoredTensor], adapted: Collection[str]
) -> dict[str, StoredTensor]:
    """The PEFT keys under which trained biases and ``modules_to_save`` tensors are saved in another adapter.

    An adapted module's bias is ``<module>.base_layer.bias`` (the layer is wrapped); any other bias and every
    head tensor keep their path; all get the ``base_model.model.`` prefix.

    Args:
        biases: Clean ``<module>.bias`` -> trained bias.
        heads: Clean key -> head tensor.
        adapted: The adapted modules (clean paths).

    Returns:
        PEFT key -> tensor, biases first.

    Example:
        >>> t = StoredTensor("k", "F32", (2,))
        >>> sorted(extra_tensor_keys({"a.bias": t, "b.bias": t}, {"head.weight": t}, {"a"}))
        ['base_model.model.a.base_layer.bias', 'base_model.model.b.bias', 'base_model.model.head.weight']
    """
    out: dict[str, StoredTensor] = {}
    for clean, t in biases.items():
        module = clean[: -len(".bias")]
        out[f"{KEY_PREFIX}{module}.base_layer.bias" if module in adapted else f"{KEY_PREFIX}{clean}"] = t
    for clean, t in heads.items():
        out[f"{KEY_PREFIX}{clean}"] = t
    return out


def classify_tensors(
    tensors: dict[str, StoredTensor],
    *,
    is_method: Callable[[str], bool],
    method_noun: str,
    bias: str,
    modules_to_save: list[str],
    where: str,
    require_prefix: bool = False,
) -> TensorGroups:
    """Sort a PEFT adapter's tensors into the method's own, trained biases and ``modules_to_save`` heads.

    Keys lose the ``base_model.model.`` prefix; ``<module>.base_layer.bias`` becomes ``<module>.bias``;
    stale ``original_module`` copies are skipped. A ``modules_to_save`` module's tensors are read from their
    plain keys ``<module>.<param>`` only, as PEFT 0.21.2 loads them: it fails (``KeyError``) without one, and
    ignores wrapper copies ``<module>.modules_to_save[.<adapter>].<param>`` (``bias="all"`` saves them for the
    module's biases). So a copy is never read, and is refused without its plain key.

    Args:
        tensors: Stored key -> tensor.
        is_method: Whether a clean key is one of the method's tensors.
        method_noun: What those are called in messages (``"a spectrum"``).
        bias: The config's bias mode (``"none"``, ``"all"`` or ``"<method>_only"``).
        modules_to_save: The config's ``modules_to_save``.
        where: The file, for messages.
        require_prefix: Refuse keys without PEFT's ``base_model.model.`` prefix (PEFT ignores them on loading).

    Returns:
        The groups.

    Raises:
        AdapterError: A tensor that fits none of the roles, PEFT would ignore, or that is stored twice; a
            wrapper copy without its plain key; or a non-float bias / head.
    """
    method: dict[str, StoredTensor] = {}
    seen: dict[str, str] = {}
    biases: dict[str, StoredTensor] = {}
    heads: dict[str, StoredTensor] = {}
    copies: list[tuple[str, list[str]]] = []  # stored key of a modules_to_save copy, its possible plain keys
    for key, t in tensors.items():
        if require_prefix and not key.startswith(KEY_PREFIX):
            raise AdapterError(
                where,
                f"tensor {key!r} lacks PEFT's {KEY_PREFIX!r} prefix, so PEFT would ignore it",
                "re-save the adapter with PEFT (or add the prefix)",
            )
        clean = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
        if clean in seen:
            raise AdapterError(
                where, f"{seen[clean]!r} and {key!r} are one tensor stored twice", "keep one of them and re-save"
            )
        seen[clean] = key
        if ".original_module." in f".{clean}":
            continue  # stale copy of a modules_to_save module, never used
        m = re.match(r"^(?:(.*?)\.)?modules_to_save\.(.+)$", clean)
        if m:  # <module>.modules_to_save.<adapter>.<param>, or .<param> where PEFT's saving cut off the adapter name
            module, rest = f"{m.group(1)}." if m.group(1) else "", m.group(2)
            copies.append((key, [module + rest.split(".", 1)[-1], module + rest]))
            continue
        if is_method(clean):
            method[clean] = t
            continue
        if ".base_layer." in clean:
            clean = clean.replace(".base_layer.", ".")
            if not clean.endswith(".bias") or bias == "none":
                raise AdapterError(
                    where,
                    f"tensor {key!r} belongs to a base layer, which PEFT saves only as a trained bias (bias={bias!r})",
                    "re-save the adapter with PEFT",
                )
            biases[clean] = t
            continue
        if _is_head(clean, modules_to_save):
            heads[clean] = t
        elif clean.endswith(".bias") and bias == "all":
            biases[clean] = t
        else:
            raise AdapterError(
                where,
                f"tensor {key!r} has no role PEFT would load it in (not {method_noun}, not a trained bias for "
                f"bias={bias!r}, not in modules_to_save {modules_to_save})",
                "check that adapter_config.json belongs to these weights",
            )
    # PEFT 0.21.2 saves every tensor of a modules_to_save module under its plain key; bias="all" adds wrapper
    # copies of the module's biases, equal to the plain ones. On loading, PEFT reads each plain key (KeyError if it
    # is missing) into the wrapper and ignores every copy. So copies are never read, and one needs its plain key.
    for key, plains in copies:
        clean = plains[0]
        if not _is_head(clean, modules_to_save):  # no ModulesToSaveWrapper there: PEFT would ignore the tensor
            raise AdapterError(
                where,
                f"tensor {clean!r} is saved as a modules_to_save copy, but modules_to_save is {modules_to_save}, "
                "so PEFT would ignore it",
                "list the module in modules_to_save, or remove the tensor",
            )
        if not any(p in heads for p in plains):
            plain = (KEY_PREFIX if key.startswith(KEY_PREFIX) else "") + clean
            raise AdapterError(
                where,
                f"tensor {key!r} is a modules_to_save copy, which PEFT never reads: it reads {plain!r}, which the "
                "file lacks, and fails to load the adapter (KeyError)",
                f"store the tensor as {plain!r}, or re-save the adapter with PEFT",
            )
    for t in [*biases.values(), *heads.values()]:
        if t.dtype not in FLOAT_DTYPES:  # PEFT would cast it into the float parameter: a corrupt save, not a head
            raise AdapterError(
                where,
                f"tensor {t.key!r} has dtype {t.dtype}, expected a float dtype (a trained bias or a head's weights)",
                "re-save the adapter with PEFT",
            )
    return TensorGroups(method, biases, heads)


def _classify(
    tensors: dict[str, StoredTensor], settings: FourierFTSettings, weights: Path
) -> tuple[dict[str, Spectrum], dict[str, StoredTensor], dict[str, StoredTensor]]:
    where = str(weights)
    groups = classify_tensors(
        tensors,
        is_method=lambda k: k.endswith(".fourierft_spectrum"),
        method_noun="a spectrum",
        bias=settings.bias,
        modules_to_save=settings.modules_to_save,
        where=where,
        require_prefix=True,
    )
    spectra: dict[str, Spectrum] = {}
    for clean, t in groups.method.items():
        module = clean[: -len(".fourierft_spectrum")]
        spectra[module] = _read_spectrum(module, t, settings, where)
    if not spectra:
        raise AdapterError(where, "holds no fourierft_spectrum tensors", "check that this is a FourierFT adapter")
    if settings.bias == "fourier_only":
        stray = [k for k in groups.biases if k[: -len(".bias")] not in spectra]
        if stray:
            raise AdapterError(
                where, f"bias='fourier_only' but {stray[0]!r} belongs to no adapted module", "fix the config"
            )
    return spectra, groups.biases, groups.heads


def _read_spectrum(module: str, t: StoredTensor, settings: FourierFTSettings, where: str) -> Spectrum:
    """A spectrum checked from its header (shape, dtype, n against the config); its values are read on first
    use (:attr:`Spectrum.values`)."""
    if len(t.shape) != 1:
        raise AdapterError(where, f"{t.key!r} has shape {list(t.shape)}, expected 1-D", "re-save the adapter")
    if t.dtype not in FLOAT_DTYPES:
        raise AdapterError(where, f"{t.key!r} has dtype {t.dtype}, expected a float dtype", "re-save the adapter")
    n_expected = settings.n_for(module)
    if t.shape[0] != n_expected:
        raise AdapterError(
            where,
            f"{t.key!r} has {t.shape[0]} coefficients but the config gives this module n_frequency={n_expected}",
            "check n_frequency / n_frequency_pattern in adapter_config.json",
        )
    return Spectrum(module, t.dtype, t.key, int(t.shape[0]), t, where)
