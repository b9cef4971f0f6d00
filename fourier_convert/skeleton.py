"""The base model's skeleton: module types and checkpoint-key renaming, from transformers on the meta device.

Building the model class from ``config.json`` on the ``meta`` device costs no memory and tells two things
the checkpoint alone cannot:

* which adapted modules are ``Conv1D`` (weight stored ``(in, out)``, delta added transposed): square
  Conv1D weights make this impossible to infer from shapes, and PEFT's saved ``fan_in_fan_out`` flag is
  unreliable for mixed targets;
* how checkpoint keys map to the in-memory module names the adapter was trained with (transformers 5
  renames some on load, e.g. ViT's ``encoder.layer.N.attention.attention.query`` ->
  ``layers.N.attention.q_proj``), through transformers' own conversion mapping.

Importing transformers' modeling code costs seconds of CPU (about 5 s on a 2-core machine), more than the
rest of a 1B merge. When only the orientation is needed, :func:`scan_linear_only` first reads the
architecture's modeling source as text, without importing it: a model whose modeling file (and the files
of the sibling models it imports from) never names ``Conv1D`` and composes no sub-model through
``AutoModel`` has no ``Conv1D`` module, so every adapted module is a Linear.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourier_convert.model_config import base_model_in_child, check_weights_fit

LINEAR = "linear"
CONV1D = "conv1d"


@dataclass
class Skeleton:
    """What the meta-device model says about the base.

    Attributes:
        architecture: The class that was built.
        base_model_prefix: Its ``base_model_prefix`` (``"model"``, ``"bert"``...).
        module_types: In-memory module name -> ``"linear"``, ``"conv1d"`` or another class name.
        model_keys: Checkpoint key -> in-memory parameter name (only keys transformers renames 1:1).
        fused_keys: Checkpoint keys that transformers merges or splits on load (not 1:1).
        default_type: Type of every module not in ``module_types`` (a source scan's verdict), or None.
        source: How the types were found (``"model skeleton"`` or the source scan's reason).
        embedding_names: With a source scan's verdict: attribute names the modeling source assigns an
            ``nn.Embedding`` (a module whose last name is one of them is an ``"Embedding"``).
        embedding_source: Where ``embedding_names`` were read (named when an adapted module is one of them).
    """

    architecture: str
    base_model_prefix: str
    module_types: dict[str, str]
    model_keys: dict[str, str] = field(default_factory=dict)
    fused_keys: set[str] = field(default_factory=set)
    default_type: str | None = None
    source: str = "model skeleton"
    embedding_names: frozenset[str] = frozenset()
    embedding_source: str = ""

    def module_type(self, name: str) -> str | None:
        """Type of module ``name``, tolerating an added or missing ``base_model_prefix``."""
        if self.default_type is not None:
            if name.rsplit(".", 1)[-1] in self.embedding_names:
                return "Embedding"
            return self.module_types.get(name, self.default_type)
        if name in self.module_types:
            return self.module_types[name]
        prefix = f"{self.base_model_prefix}." if self.base_model_prefix else ""
        if prefix and name.startswith(prefix) and name[len(prefix) :] in self.module_types:
            return self.module_types[name[len(prefix) :]]
        if prefix and f"{prefix}{name}" in self.module_types:
            return self.module_types[f"{prefix}{name}"]
        return None


def scan_linear_only(config: dict[str, Any]) -> Skeleton | None:
    """Prove from transformers' source text, without importing it, that the model has no ``Conv1D``.

    Args:
        config: The base's ``config.json``.

    Returns:
        A skeleton that types every module ``"linear"`` when the proof holds, else None (build the real
        skeleton then): custom code (``auto_map``), an unknown ``model_type``, a modeling file (or a sibling
        model file it imports from) that names ``Conv1D`` or composes sub-models with ``AutoModel``.

    Example:
        >>> scan_linear_only({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).module_type("q_proj")
        'linear'
        >>> scan_linear_only({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}) is None
        True
    """
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if config.get("auto_map") or not isinstance(model_type, str) or not archs:
        return None
    if re.fullmatch(r"[A-Za-z0-9_-]+", model_type) is None:  # a name, never a path ('..', '/', surrogates)
        return None
    spec = importlib.util.find_spec("transformers")  # locates the package without importing it
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    models = root / "models"
    todo = [model_type.replace("-", "_")]
    seen: set[str] = set()
    embeddings: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = models / name / f"modeling_{name}.py"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return None
        if "Conv1D" in text or "AutoModel" in text:
            return None
        todo += re.findall(r"from \.\.(\w+)\.modeling_\w+ import", text)
        embeddings.update(re.findall(r"self\.(\w+)\s*=\s*nn\.Embedding\(", text))
    version = _installed_version()
    files = ", ".join(f"modeling_{n}.py" for n in sorted(seen))
    return Skeleton(
        str(archs[0]),
        "",
        {},
        default_type=LINEAR,
        source=f"transformers {version} source ({files}: no Conv1D, every module is a Linear)",
        embedding_names=frozenset(embeddings),
        embedding_source=f"an nn.Embedding attribute in transformers {version}'s {files}",
    )


def _installed_version() -> str:
    from importlib import metadata  # reads the installed metadata; transformers is not imported

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "?"


def build_skeleton(config: dict[str, Any], checkpoint_keys: Iterable[str]) -> tuple[Skeleton | None, str]:
    """Build the model named by ``config["architectures"][0]`` on the meta device.

    Args:
        config: The base's ``config.json``.
        checkpoint_keys: Tensor keys of the base checkpoint (to compute transformers' renaming).

    Returns:
        ``(skeleton, "")`` or ``(None, reason)`` when transformers cannot build it (unknown
        architecture, custom code); callers then fall back to the adapter's flag and say why.

    Example:
        >>> sk, why = build_skeleton(config, keys)  # doctest: +SKIP
        >>> sk.module_type("transformer.h.0.attn.c_attn")  # doctest: +SKIP
        'conv1d'
    """
    archs = config.get("architectures") or []
    if not archs:
        return None, "config.json names no architecture"
    arch = str(archs[0])
    keys = list(checkpoint_keys)
    try:
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D

        cls = getattr(transformers, arch, None)
        if cls is None:
            return None, f"transformers {transformers.__version__} has no class {arch}"
        cfg = cls.config_class.from_dict(dict(config))
        with torch.device("meta"):
            model = cls(cfg)
    except Exception as exc:  # any failure here only means "no skeleton"; the caller says so
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"transformers could not build {arch} ({first[:120]})"
    types: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            types[name] = CONV1D
        elif isinstance(module, torch.nn.Linear):
            types[name] = LINEAR
        else:
            types[name] = type(module).__name__
    skeleton = Skeleton(arch, str(getattr(model, "base_model_prefix", "") or ""), types)
    _add_renaming(skeleton, model, keys)
    return skeleton, ""


def build_skeleton_bounded(config: dict[str, Any], checkpoint_keys: Iterable[str]) -> tuple[Skeleton | None, str]:
    """:func:`build_skeleton` in a child process bounded in time and memory
    (:func:`~fourier_convert.model_config.base_model_in_child`), unless this process has imported transformers
    already (then here: no import to wait for). A config can make transformers build for any time and memory
    (num_labels of 6 million: 78 s and 4.4 GB).

    Example:
        >>> sk, why = build_skeleton_bounded(config, keys)  # doctest: +SKIP
    """
    if "transformers" in sys.modules:
        return build_skeleton(config, checkpoint_keys)
    _, fields, why = base_model_in_child(None, (config, list(checkpoint_keys)))
    return (None if fields is None else skeleton_from_fields(fields)), why


def skeleton_fields(skeleton: Skeleton) -> dict[str, Any]:
    """A skeleton as JSON-ready fields (sets as sorted lists), as the config check's child sends it back.

    Example:
        >>> skeleton_from_fields(skeleton_fields(Skeleton("X", "model", {"q": LINEAR}))).module_type("q")
        'linear'
    """
    fields = dataclasses.asdict(skeleton)
    fields["fused_keys"] = sorted(skeleton.fused_keys)
    fields["embedding_names"] = sorted(skeleton.embedding_names)
    return fields


def skeleton_from_fields(fields: Mapping[str, Any]) -> Skeleton:
    """The skeleton :func:`skeleton_fields` describes."""
    return Skeleton(
        **{
            **fields,
            "fused_keys": set(fields.get("fused_keys", ())),
            "embedding_names": frozenset(fields.get("embedding_names", ())),
        }
    )


def _add_renaming(skeleton: Skeleton, model: Any, checkpoint_keys: Iterable[str]) -> None:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x: checkpoint keys are the module names
        return
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    for key in checkpoint_keys:
        renamed, converter = rename_source_key(key, renamings, converters, skeleton.base_model_prefix, meta)
        if converter is not None:
            skeleton.fused_keys.add(key)
        else:
            skeleton.model_keys[key] = renamed


class BaseModelJob:
    """transformers' modeling code (seconds to import) run in a background thread while other work goes on: the
    model skeleton, when asked for, then the check that the ``config.json`` to be published fits the weights
    published with it (:func:`~fourier_convert.model_config.check_weights_fit`). Both run in a child process,
    bounded in time and memory (:func:`~fourier_convert.model_config.base_model_in_child`), unless this one has
    imported transformers already. :meth:`result` waits for both.

    Args:
        config: The base's ``config.json`` (the skeleton is built from it).
        checkpoint_keys: Tensor keys of the base checkpoint.
        build: Build the skeleton (the source scan could not settle the module types).
        fit: ``(config, shapes, source)``: the config to be published, the published tensors' shapes, and the
            file named in messages; None skips the check (it passed before).
        on_fit: Called (in the job's thread) when the check ran and passed.

    Example:
        >>> job = BaseModelJob(config, keys, build=False, fit=(config, shapes, path))  # doctest: +SKIP
        >>> skeleton, why, unchecked = job.result()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: dict[str, Any],
        checkpoint_keys: Iterable[str],
        *,
        build: bool,
        fit: tuple[Mapping[str, Any], Mapping[str, Sequence[int]], Path] | None,
        on_fit: Callable[[], None] | None = None,
    ) -> None:
        self.build = build
        self._config = config
        self._keys = list(checkpoint_keys)
        self._fit = fit
        self._on_fit = on_fit
        self._children: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._result: tuple[Skeleton | None, str, str] = (None, "the skeleton was not built", "")
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fourier-convert-base-model", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if "transformers" not in sys.modules:
                # a child process imports it (so that this process, the merge, keeps its GIL) and builds the
                # models, bounded in time and memory
                build = (self._config, self._keys) if self.build else None
                unchecked, fields, why = base_model_in_child(self._fit, build, children=self._children, stop=self._stop)
                skeleton = None if fields is None else skeleton_from_fields(fields)
                if self.build and skeleton is None and not why:
                    why = "the skeleton was not built"
            else:  # imported already (a Python session): no import to wait for
                skeleton, why = build_skeleton(self._config, self._keys) if self.build else (None, "")
                unchecked = check_weights_fit(*self._fit) if self._fit is not None else ""
            if self._fit is not None and not unchecked and self._on_fit is not None:
                self._on_fit()
            self._result = (skeleton, why, unchecked)
        except BaseException as exc:  # raised in the caller's thread by result()
            self._error = exc

    def cancel(self) -> None:
        """Stop waiting for the job: a check's child process still running is killed (nothing is remembered). The
        thread itself, a daemon, ends with the process. Harmless once the job has finished.

        Example:
            >>> job.cancel()  # doctest: +SKIP
        """
        self._stop.set()
        for child in list(self._children):
            if child.poll() is None:
                child.kill()

    def result(self) -> tuple[Skeleton | None, str, str]:
        """Wait for the job.

        Returns:
            ``(skeleton, why, unchecked)``: the skeleton (None when not asked for or not built) and why not;
            ``unchecked`` is why the config could not be checked, ``""`` when it was (or was not asked for).

        Raises:
            InputFileError: The config does not fit the weights (see ``check_weights_fit``).
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
