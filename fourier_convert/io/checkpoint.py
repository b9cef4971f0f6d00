"""Opening a Hugging Face model folder for streaming: headers only, no tensor data.

Supports ``model.safetensors`` and sharded ``model-XXXXX-of-YYYYY.safetensors`` with
``model.safetensors.index.json``. Pickled weights (``pytorch_model.bin``) are refused with the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourier_convert.errors import BaseMismatchError, FourierConvertError, InputFileError, UsageError
from fourier_convert.io.adapter import load_json
from fourier_convert.io.resolve import resolve_folder
from fourier_convert.io.safetensors_file import SafetensorsFile, TensorInfo, read_header

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: What is fetched of a base from the hub: safetensors weights, configs, tokenizer and processor files.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".data")
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json", "tf_model.h5.index.json")


@dataclass
class BaseCheckpoint:
    """A base model folder, located but not loaded.

    Attributes:
        folder: The folder.
        config: ``config.json`` contents, or None when the folder has none.
        shards: Parsed headers of the weight files, in index order.
        tensors: Tensor name -> location, over all shards.
        index_metadata: Extra ``metadata`` fields of the index (``total_size`` excluded).
        aux_files: Other top-level files to carry to the output (tokenizer, generation config...).
    """

    folder: Path
    config: dict[str, Any] | None
    shards: list[SafetensorsFile]
    tensors: dict[str, TensorInfo]
    index_metadata: dict[str, Any] = field(default_factory=dict)
    aux_files: list[Path] = field(default_factory=list)

    @property
    def sharded(self) -> bool:
        return (self.folder / INDEX_NAME).is_file()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(spec: str | Path, *, revision: str | None = None) -> BaseCheckpoint:
    """Locate and validate the weights of a Hugging Face model folder or hub id.

    Args:
        spec: Local folder or hub id.
        revision: Hub revision.

    Returns:
        The checkpoint with every shard header parsed.

    Raises:
        InputFileError: No safetensors weights, pickled weights only, a broken index or shard.

    Example:
        >>> ck = open_checkpoint("fixtures/llama/base")  # doctest: +SKIP
        >>> len(ck.shards) > 1  # doctest: +SKIP
        True
    """
    folder = resolve_folder(str(spec), what="base model", revision=revision, allow_patterns=HUB_PATTERNS)
    config_path = folder / "config.json"
    # Present means present: a FIFO, device or dangling link under a weights or config name is refused by its
    # reader, never taken for a missing file.
    config = load_json(config_path) if os.path.lexists(config_path) else None
    index_path = folder / INDEX_NAME
    shards: list[SafetensorsFile] = []
    tensors: dict[str, TensorInfo] = {}
    index_metadata: dict[str, Any] = {}
    if os.path.lexists(index_path) and os.path.lexists(folder / SINGLE_NAME):
        raise InputFileError(
            str(folder),
            f"holds both {SINGLE_NAME} and {INDEX_NAME}: transformers loads {SINGLE_NAME} and ignores the shards, "
            "so which weights are meant is unclear",
            "remove the stale one",
        )
    if os.path.lexists(index_path):
        index = load_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputFileError(str(index_path), "has no weight_map", "re-save the model with save_pretrained")
        for name, filename in weight_map.items():
            if not isinstance(filename, str) or filename in ("", ".", "..") or Path(filename).name != filename:
                raise InputFileError(
                    str(index_path),
                    f"maps {name!r} to {filename!r}, expected the name of a .safetensors file in {folder}",
                    "re-save the model with save_pretrained",
                )
        metadata = index.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InputFileError(
                str(index_path),
                f"metadata is {metadata!r}, expected a JSON object",
                "re-save the model with save_pretrained",
            )
        index_metadata = {k: v for k, v in metadata.items() if k != "total_size"}
        for filename in sorted(set(weight_map.values())):
            shard_path = folder / str(filename)
            if not os.path.lexists(shard_path):
                raise InputFileError(str(shard_path), f"listed in {INDEX_NAME} but missing", "re-download the model")
            shards.append(read_header(shard_path))
        for shard in shards:
            for name, info in shard.tensors.items():
                if name in tensors:
                    raise InputFileError(
                        str(shard.path),
                        f"tensor {name!r} is also stored in {tensors[name].path.name}",
                        "re-save the model",
                    )
                tensors[name] = info
        for name, filename in weight_map.items():
            located = tensors.get(name)
            if located is None or located.path.name != filename:
                raise InputFileError(
                    str(index_path),
                    f"maps {name!r} to {filename} but that shard does not hold it",
                    "re-save the model with save_pretrained",
                )
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            raise InputFileError(
                str(index_path),
                f"does not list {unlisted[0]!r}, stored in {tensors[unlisted[0]].path.name}",
                "re-save the model with save_pretrained",
            )
    elif os.path.lexists(folder / SINGLE_NAME):
        shard = read_header(folder / SINGLE_NAME)
        shards.append(shard)
        tensors = dict(shard.tensors)
    else:
        pickles = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
        if pickles:
            raise InputFileError(
                str(folder / pickles[0]),
                "base weights are pickles, which can run code when loaded and cannot be streamed",
                "convert them once: AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)",
            )
        if (folder / "model.onnx").is_file():
            raise InputFileError(
                str(folder),
                "is an ONNX export (model.onnx), not a Hugging Face model with safetensors weights",
                "pass the model folder the export was made from",
            )
        if (folder / "adapter_config.json").is_file():
            raise InputFileError(
                str(folder),
                "is a PEFT adapter folder (adapter_config.json), not a base model",
                "pass it as --adapter and the model it was trained on as --base",
            )
        _refuse_parent_folder(folder)
        raise InputFileError(str(folder), f"no {SINGLE_NAME} or {INDEX_NAME} found", "pass a Hugging Face model folder")
    aux = sorted(
        p
        for p in folder.iterdir()
        if not p.is_dir()
        and not p.name.startswith(".")
        and not p.name.endswith(_WEIGHT_SUFFIXES)
        and p.name not in _WEIGHT_INDEXES
    )
    for path in aux:
        if not path.is_file():  # copied to the output: a FIFO would block the copy, a device never end
            raise InputFileError(
                str(path),
                "is not a regular file (a FIFO, a device or a dangling link) and would be copied to the output",
                "replace it with the real file or remove it",
            )
        _refuse_outside_link(path, folder)
    if config is not None:
        _check_config_fields(config, config_path)
        _check_layer_count(config, list(tensors), config_path)
    return BaseCheckpoint(folder, config, shards, tensors, index_metadata, aux)


#: Config keys that give a model's number of layers (a model skeleton is built with that many).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _check_config_fields(config: dict[str, Any], where: Path) -> None:
    """The config fields every command reads to find the model class hold what transformers expects.

    Raises:
        InputFileError: ``architectures`` is not a list of class names, or ``model_type`` not a string.
    """
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) and a for a in archs)):
        raise InputFileError(
            str(where),
            f"architectures is {archs!r}, expected a list of model class names",
            'fix config.json (for example "architectures": ["LlamaForCausalLM"])',
        )
    model_type = config.get("model_type")
    if model_type is not None and not (isinstance(model_type, str) and model_type):
        raise InputFileError(
            str(where),
            f'model_type is {model_type!r}, expected a name such as "llama"',
            "fix config.json, or use the config.json that came with these weights",
        )


def _check_layer_count(config: dict[str, Any], keys: list[str], where: Path) -> None:
    """Refuse a config that claims far more layers than the weights hold: building that many modules on the meta
    device did not finish in 40 s for 200,000 GPT-2 blocks whose weights hold two. Shared-layer models (ALBERT:
    12 layers, one stored) stay well inside the margin.

    Raises:
        InputFileError: A layer count that is not a whole number >= 0 (a string, a float, -1).
        BaseMismatchError: More than 64 x the stored layers + 64.
    """
    indices = [int(m.group(1)) for k in keys for m in [re.search(r"\.(\d+)\.", k)] if m]
    stored = max(indices) + 1 if indices else 0
    for name in LAYER_COUNT_KEYS:
        claimed = config.get(name)
        if name in config and (isinstance(claimed, bool) or not isinstance(claimed, int) or claimed < 0):
            raise InputFileError(
                str(where),
                f"{name} is {claimed!r}, expected a whole number of layers (transformers cannot build the model)",
                "pass the config.json that belongs to these weights",
            )
        if isinstance(claimed, int) and not isinstance(claimed, bool) and claimed > 64 * stored + 64:
            raise BaseMismatchError(
                str(where),
                f"{name} is {claimed}, but the checkpoint's weights hold {stored} layer(s)",
                "pass the config.json that belongs to these weights",
            )


def _refuse_parent_folder(folder: Path) -> None:
    """A folder with no weights of its own that holds model or adapter folders (say ``base/`` and ``adapter/``):
    name them and what to pass.

    Raises:
        InputFileError: ``folder`` is such a folder (nothing is raised otherwise).
    """
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_dir())
        models = [p.name for p in entries if (p / "config.json").is_file() and _has_weights(p)]
        adapters = [p.name for p in entries if (p / "adapter_config.json").is_file()]
    except OSError:  # unreadable: the caller's message stands
        return
    if not models and not adapters:
        return
    kinds = [("model folder", models), ("adapter folder", adapters)]
    inside = " and ".join(
        f"the {kind}{'s' if len(names) > 1 else ''} {', '.join(names)}" for kind, names in kinds if names
    )
    if models and adapters:
        fix = f"pass {folder / models[0]} as the base model and {folder / adapters[0]} as the adapter"
    elif models:
        fix = f"pass the model folder, such as {folder / models[0]}"
    else:
        fix = f"pass {folder / adapters[0]} as the adapter and the model it was trained on as the base"
    raise InputFileError(
        str(folder), f"is not a model folder (no {SINGLE_NAME} or {INDEX_NAME}); it holds {inside}", fix
    )


def _has_weights(folder: Path) -> bool:
    return (folder / SINGLE_NAME).is_file() or (folder / INDEX_NAME).is_file()


def _refuse_outside_link(path: Path, folder: Path) -> None:
    """The small files are copied into the output: a link to a file outside the model (say, a key file) would be
    published with it. Links inside the folder, and a Hugging Face cache's snapshot -> blob links, are fine.

    Raises:
        InputFileError: ``path`` is a link leading outside the model.
    """
    if not path.is_symlink():
        return
    target = path.resolve()
    root = folder.resolve()
    repo = root.parent.parent  # a hub cache: models--org--name/snapshots/<rev>/f -> ../../blobs/<hash>
    if root.parent.name == "snapshots" and repo.name.startswith("models--") and target.is_relative_to(repo / "blobs"):
        return
    if not target.is_relative_to(root):
        raise InputFileError(
            str(path),
            f"is a link to {target}, outside the model folder, and would be copied into the output",
            "copy the file into the model folder, or remove the link",
        )


def open_adapter_base(base: str | Path | None, named_by_adapter: str | None) -> BaseCheckpoint:
    """The base to convert against: ``base`` when given, else the adapter's ``base_model_name_or_path``.

    Raises:
        UsageError: Neither is there.
        FourierConvertError: The base cannot be opened (as :func:`open_checkpoint`).

    Example:
        >>> open_adapter_base(None, "fixtures/llama/base").folder.name  # doctest: +SKIP
        'base'
    """
    if base is not None:
        return open_checkpoint(base)
    if not named_by_adapter:
        raise UsageError("--base", "not given and the adapter names no base_model_name_or_path", "pass --base")
    try:
        return open_checkpoint(named_by_adapter)
    except FourierConvertError as exc:  # say where the path came from, and how to give another
        raise type(exc)(
            exc.where,
            f"{exc.found} (the base named by the adapter's base_model_name_or_path; no --base was given)",
            "pass --base with the base model's folder or hub id",
        ) from None
