"""transformers' view of a model folder's ``config.json``: the config it builds, the model it describes on the meta
device, and whether that model takes the folder's weights.

``from_pretrained`` refuses a folder whose config disagrees with its weights (a hidden size, vocabulary or head
count the tensors do not have; 0 attention heads; a value of the wrong type), and fills layers the weights lack
with random values. This module finds both before any work: the model is built on the meta device (no memory,
no initialisation) and its parameter shapes compared with the tensors'. ``merge`` runs :func:`check_weights_fit`
on the folder it is about to publish; ``to-onnx`` checks the model of its task.

torch and transformers are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fourier_convert.errors import ExportError, InputFileError, first_line, printable, short_repr

#: Top-level config counts that transformers divides by or sizes every layer with: 0 or less is refused here,
#: as transformers' own messages say nothing useful (0 heads: "integer division or modulo by zero").
POSITIVE_COUNTS = (
    "hidden_size",
    "n_embd",
    "d_model",
    "num_attention_heads",
    "num_key_value_heads",
    "n_head",
    "num_heads",
)
#: The fix of every error about a config.json that transformers cannot build, or that does not fit the weights.
CONFIG_FIX = "the config does not match the weights: check config.json"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at ERROR, no progress bars, and Python warnings ignored (torch warns on stderr, in
    two lines, when a config makes a zero-element tensor)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def config_from_dict(config: Mapping[str, Any], source: Path) -> Any:
    """A transformers config from ``config.json``'s content (e.g. a merge's changed config); ``source`` names
    the file in errors.

    Raises:
        ExportError: transformers does not know the ``model_type``.
        InputFileError: A count of :data:`POSITIVE_COUNTS` is 0 or less, or transformers refuses the values.

    Example:
        >>> config_from_dict({"model_type": "bert", "hidden_size": 32}, Path("config.json")).hidden_size
        32
    """
    from transformers import CONFIG_MAPPING

    model_type = str(config.get("model_type", ""))
    if not model_type:
        raise ExportError(str(source), "is missing or has no model_type", "export a transformers model folder")
    if model_type not in CONFIG_MAPPING:
        raise ExportError(
            str(source), f"model_type {model_type!r} is not known to this transformers", "upgrade transformers"
        )
    for key in POSITIVE_COUNTS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise InputFileError(str(source), f"{key} is {value}, expected a positive integer", CONFIG_FIX)
    try:
        with quiet_transformers():
            return CONFIG_MAPPING[model_type].from_dict(dict(config))
    except Exception as exc:  # the config class's own validation: ValueError, TypeError, strict-dataclass errors...
        raise InputFileError(
            str(source), f"transformers cannot build a {model_type} config from it ({reported(exc)})", CONFIG_FIX
        ) from exc


def reported(exc: BaseException) -> str:
    """What transformers said: the first line of ``exc`` (escaped, as :func:`first_line`), or of its cause when
    that line only announces the details (huggingface_hub's strict dataclass errors: ``Validation error for
    field 'vocab_size':``, the reason on the next line and in the cause).

    Example:
        >>> reported(ValueError("The hidden size (64) is not a multiple of the number of attention heads (3)."))
        'The hidden size (64) is not a multiple of the number of attention heads (3).'
        >>> reported(KeyError("gelu_fast2"))
        "it knows no value 'gelu_fast2'"
    """
    said = first_line(exc)
    if said.endswith(":") and exc.__cause__ is not None:
        return first_line(exc.__cause__)
    if isinstance(exc, KeyError):  # a value looked up in one of transformers' tables ({"silu": ...}[hidden_act])
        return f"it knows no value {said}"
    return said


def check_shapes(model: Any, shapes: Mapping[str, Sequence[int]], config_path: Path) -> None:
    """Refuse weights whose shapes differ from ``model``'s (built from ``config_path`` on the meta device).

    Tensors are matched by name, with or without the model's ``base_model_prefix``; names only one side has
    (heads of another task, renamed legacy keys) are left to transformers.

    Raises:
        InputFileError: A tensor's shape differs (the first one named, with how many others differ).

    Example:
        >>> check_shapes(build_on_meta(folder, "causal-lm", config), shapes, folder / "config.json")  # doctest: +SKIP
    """
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    n_built, n_held = _layer_count(model.state_dict()), _layer_count(shapes)
    if n_built and n_held and n_built != n_held:  # extra layers would be "weights the checkpoint lacks", a task error
        raise InputFileError(
            str(config_path),
            f"{type(model).__name__} built from it has {n_built} layers, the weights hold {n_held}",
            CONFIG_FIX,
        )
    differ: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, value in model.state_dict().items():
        stored = shapes.get(key)
        if stored is None and prefix:
            other = key[len(prefix) + 1 :] if key.startswith(f"{prefix}.") else f"{prefix}.{key}"
            stored = shapes.get(other)
        if stored is not None and tuple(stored) != tuple(value.shape):
            differ.append((key, tuple(value.shape), tuple(stored)))
    if differ:
        key, wanted, held = differ[0]
        more = f" ({len(differ) - 1} more tensor(s) differ)" if len(differ) > 1 else ""
        raise InputFileError(
            str(config_path),
            f"{type(model).__name__} built from it has {key} of shape {list(wanted)}, the weights hold "
            f"{list(held)}{more}",
            CONFIG_FIX,
        )


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def _layer_count(names: Iterable[str]) -> int:
    """How many numbered layers (``layers.N.``, ``layer.N.``, ``h.N.``, ``blocks.N.``) the names hold: 1 + the
    largest N, or 0."""
    found = [int(m.group(1)) for name in names if (m := _LAYER_INDEX.search(name))]
    return max(found) + 1 if found else 0


#: config.json fields that choose kernels, not shapes: left out of the model :func:`meta_model` builds.
_KERNEL_FIELDS = ("attn_implementation", "_attn_implementation", "experts_implementation", "_experts_implementation")


def meta_model(config: Mapping[str, Any], source: Path) -> tuple[Any | None, str]:
    """The model ``config`` describes, built on the meta device: the class ``architectures`` names (as pipelines
    load it), or transformers' base ``AutoModel`` of the ``model_type`` when it names none that takes this config.

    Args:
        config: The content of ``config.json``.
        source: That file, for messages.

    Returns:
        ``(model, "")``, or ``(None, why)`` when transformers cannot describe the model: custom code
        (``auto_map``, never run here), no or an unknown ``model_type``, or modeling code that needs a package
        that is not installed.

    Raises:
        InputFileError: transformers refuses the config's values or cannot build the model from them.

    Example:
        >>> import json
        >>> model, why = meta_model(json.loads(Path("fixtures/llama/base/config.json").read_text()), Path("c.json"))
        >>> type(model).__name__, why
        ('LlamaForCausalLM', '')
    """
    if config.get("auto_map"):
        return None, "it names custom code (auto_map), which fourier-convert does not run"
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return None, "it has no model_type"
    try:
        import torch
        import transformers
    except Exception as exc:  # a broken installation
        return None, f"transformers cannot be imported here ({reported(exc)})"
    if model_type not in transformers.CONFIG_MAPPING:
        return None, f"model_type {model_type!r} is not known to transformers {transformers.__version__}"
    # the attention kernel changes no tensor's shape, and one that is not installed here (flash_attention_2) made
    # transformers refuse to build the model: the check was skipped
    config = {k: v for k, v in config.items() if k not in _KERNEL_FIELDS}
    try:
        hf_config = config_from_dict(config, source)
    except InputFileError as exc:
        if isinstance(exc.__cause__, ImportError):  # a config class that needs another package (timm_wrapper: timm)
            return None, f"{_NEEDS_PACKAGE} ({reported(exc.__cause__)})"
        raise
    archs = config.get("architectures")
    named = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    cls = getattr(transformers, named, None) if named else None
    config_class = getattr(cls, "config_class", None)  # transformers' base classes hold None there
    takes = isinstance(cls, type) and isinstance(config_class, type) and isinstance(hf_config, config_class)
    try:  # import the modeling code first: failing there is this Python's problem, not the config's
        _ = cls if takes else transformers.MODEL_MAPPING[type(hf_config)]
    except KeyError:  # no base model for this config class: AutoModel says so below
        pass
    except ImportError as exc:  # modeling code that needs another package
        return None, f"{_NEEDS_PACKAGE} ({reported(exc)})"
    except Exception as exc:  # e.g. Python's -OO, whose stripped docstrings transformers' modeling code rejects
        return None, f"transformers cannot import its {model_type} modeling code here ({reported(exc)})"
    try:
        with quiet_transformers(), torch.device("meta"):
            model = cls(hf_config) if takes and cls is not None else transformers.AutoModel.from_config(hf_config)  # type: ignore[no-untyped-call]
    except ImportError as exc:  # modeling code that needs another package
        return None, f"{_NEEDS_PACKAGE} ({reported(exc)})"
    except Exception as exc:  # whatever the modeling code raises on the config's values
        built = named if takes else f"the {model_type} model"
        raise InputFileError(
            str(source), f"transformers cannot build {built} from it ({reported(exc)})", CONFIG_FIX
        ) from exc
    return model, ""


def check_weights_fit(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], source: Path) -> str:
    """Refuse a ``config.json`` that transformers cannot load ``shapes`` (the folder's tensors) with.

    The model of :func:`meta_model` must hold tensors of these names (with or without its
    ``base_model_prefix``), the same number of layers, and the same shape wherever a name is shared.

    Args:
        config: The content of ``config.json``.
        shapes: Tensor name -> shape, of the weights published with it.
        source: That file, for messages.

    Returns:
        ``""`` when checked, or why transformers cannot tell (see :func:`meta_model`).

    Raises:
        InputFileError: The config is refused (:func:`meta_model`), or does not fit the weights.

    Example:
        >>> import json
        >>> config = json.loads(Path("fixtures/llama/base/config.json").read_text())
        >>> check_weights_fit({**config, "vocab_size": 300}, {"lm_head.weight": (256, 64)}, Path("config.json"))
        Traceback (most recent call last):
        fourier_convert.errors.InputFileError: config.json: LlamaForCausalLM built from it has lm_head.weight of \
shape [300, 64], the weights hold [256, 64]; the config does not match the weights: check config.json
    """
    model, why = meta_model(config, source)
    if model is None:
        return why
    check_shapes(model, shapes, source)
    built = model.state_dict()
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    variants = set(built)
    if prefix:  # a base model's weights under a head model's names, or the other way round
        variants |= {f"{prefix}.{k}" for k in built} | {
            k[len(prefix) + 1 :] for k in built if k.startswith(f"{prefix}.")
        }
    if built and shapes and not variants.intersection(shapes):
        first = next(iter(shapes))
        raise InputFileError(
            str(source),
            f"{type(model).__name__} built from it has none of the weights' {len(shapes)} tensor names "
            f"(first: {short_repr(first, 80)})",
            CONFIG_FIX,
        )
    return ""


class CheckCancelled(Exception):
    """:func:`check_weights_fit_in_child` was told to stop: its verdict is not wanted (the merge failed or was
    interrupted)."""


#: Packages transformers imports whenever they are installed (image, video and audio processing, scikit-learn's
#: metrics, scipy's optimisers) that no model needs to be built on the meta device. The check's child hides them
#: from transformers: with torchvision and scikit-learn installed, importing transformers' Llama code took 16.5 s
#: on the GPU host, 3.9 s of it for torchvision (which imports ``torch._dynamo``).
OPTIONAL_PACKAGES = ("torchvision", "torchaudio", "sklearn", "scipy", "timm", "av", "cv2", "librosa", "PIL")
#: How :func:`meta_model` starts the reason for a model whose modeling code needs a package that is missing.
_NEEDS_PACKAGE = "transformers cannot build it here"


def check_weights_fit_in_child(
    config: Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]],
    source: Path,
    *,
    children: list[subprocess.Popen[bytes]] | None = None,
    stop: threading.Event | None = None,
) -> str:
    """:func:`check_weights_fit` in a child Python process (:func:`base_model_in_child` without a skeleton).

    Returns:
        As :func:`check_weights_fit`, or why the child gave no verdict.

    Raises:
        InputFileError: As :func:`check_weights_fit`.
        CheckCancelled: ``stop`` was set.

    Example:
        >>> check_weights_fit_in_child(config, shapes, Path("base/config.json"))  # doctest: +SKIP
        ''
    """
    return base_model_in_child((config, shapes, source), None, children=children, stop=stop)[0]


def base_model_in_child(
    fit: tuple[Mapping[str, Any], Mapping[str, Sequence[int]], Path] | None,
    build: tuple[Mapping[str, Any], list[str]] | None,
    *,
    children: list[subprocess.Popen[bytes]] | None = None,
    stop: threading.Event | None = None,
) -> tuple[str, dict[str, Any] | None, str]:
    """:func:`check_weights_fit` and the model skeleton (``fourier_convert.skeleton.build_skeleton``) in a child
    Python process: importing torch and transformers' modeling code takes seconds of CPU, which a thread of this
    process would hold the GIL for (measured on a 2-core machine: a 1.1B merge took 5.9 s with the check in a
    thread, 1.9 s beside a child importing them), and building a model can take any time and memory the config
    asks for. Call it from a background thread; it waits for the child.

    The child reads the inputs as JSON on stdin and writes its verdict as JSON on stdout. For a check alone it
    hides :data:`OPTIONAL_PACKAGES` from transformers; where transformers then cannot build the config or the
    model (the modeling code may need one of them), a second child that hides nothing checks again. The child ends
    with this process (even one killed outright), and is stopped past :data:`CHECK_SECONDS` or
    :data:`CHECK_BYTES`: the config is then left unchecked and the skeleton not built, and the result says why.
    So is it when the child ends without a verdict (killed from outside, or a Python that cannot import
    transformers, as under ``-OO``); only when no child can start does the work run in this process.

    Args:
        fit: ``(config, shapes, source)`` for :func:`check_weights_fit`, or None (no check).
        build: ``(config, checkpoint keys)`` for the skeleton, or None (none wanted).
        children: Each child is added here once started (so that the caller can kill it, see ``stop``).
        stop: Set by the caller (who then kills the children) when the verdict is no longer wanted.

    Returns:
        ``(unchecked, skeleton, why)``: as :func:`check_weights_fit` (``""`` without ``fit``), or why the child gave
        no verdict; the skeleton's fields (``fourier_convert.skeleton.skeleton_fields``) or None, and why not.

    Raises:
        InputFileError: As :func:`check_weights_fit`.
        CheckCancelled: ``stop`` was set.

    Example:
        >>> unchecked, fields, why = base_model_in_child((config, shapes, path), (config, keys))  # doctest: +SKIP
    """
    import json
    import sys

    package_root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {package_root!r}); from fourier_convert.model_config import _child; _child()"
    )
    request: dict[str, Any] = {
        "fit": None if fit is None else {
            "config": fit[0], "shapes": {k: list(v) for k, v in fit[1].items()}, "source": str(fit[2])
        },
        "build": None if build is None else {"config": build[0], "keys": list(build[1])},
    }  # fmt: skip
    for hide in (True, False) if build is None else (False,):  # a skeleton is built as in this process
        request["hide"] = hide
        if stop is not None and stop.is_set():
            raise CheckCancelled()
        try:
            child = subprocess.Popen(  # -P: the working folder (perhaps the base, --base .) is not on its path
                [sys.executable, "-P", "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError:  # no child can start: done here
            return _base_model_here(fit, build)
        if children is not None:
            children.append(child)
        if stop is not None and stop.is_set():  # stopped while it started: the caller's kill may have missed it
            child.kill()
        out, err, over = _wait_bounded(child, json.dumps(request).encode(), stop)
        if stop is not None and stop.is_set():
            raise CheckCancelled()
        if not over:
            try:
                verdict = json.loads(out) if child.returncode == 0 else None
            except ValueError:
                verdict = None
            if isinstance(verdict, dict) and verdict.get("retry") is True and hide:
                continue  # the model needs a hidden package
            if isinstance(verdict, dict) and isinstance(verdict.get("refused"), list) and len(verdict["refused"]) == 3:
                raise InputFileError(*(str(part) for part in verdict["refused"]))
            if isinstance(verdict, dict) and isinstance(verdict.get("unchecked"), str):
                fields = verdict.get("skeleton")
                return str(verdict["unchecked"]), fields if isinstance(fields, dict) else None, str(verdict.get("why"))
            # killed from outside, or an error of the child's own (this Python cannot import transformers): the
            # same build here would only fail or be killed again, in this process
            said = err.decode(errors="replace").strip().splitlines()
            why = printable(said[-1]) if said else f"exit status {child.returncode}"
            over = f"the check's process ended without a verdict ({short_repr(why, 200)})"
        return (over if fit is not None else ""), None, over
    return "the check's process gave no verdict", None, "the check's process gave no verdict"  # not reached


def _base_model_here(
    fit: tuple[Mapping[str, Any], Mapping[str, Sequence[int]], Path] | None,
    build: tuple[Mapping[str, Any], list[str]] | None,
) -> tuple[str, dict[str, Any] | None, str]:
    """What :func:`base_model_in_child`'s child does, in this process."""
    from fourier_convert.skeleton import build_skeleton, skeleton_fields

    fields, why = None, ""
    if build is not None:
        skeleton, why = build_skeleton(dict(build[0]), build[1])
        fields = None if skeleton is None else skeleton_fields(skeleton)
    return ("" if fit is None else check_weights_fit(*fit)), fields, why


#: The longest the check's child may take: it took 4.2 s on a 2-core machine and 16.5 s on a GPU host whose torch
#: is slow to import; a config that makes transformers build for longer (a videomae with image_size 2000 and
#: patch_size 1 took 20 s here, growing as its square) is left unchecked.
CHECK_SECONDS = 120.0
#: The most memory (resident) the check's child may use: about 930 MiB with a CUDA build of torch; num_labels of
#: 3 million took 2.4 GiB, and memory grows with it.
CHECK_BYTES = 4 << 30


def _wait_bounded(
    child: subprocess.Popen[bytes], request: bytes, stop: threading.Event | None
) -> tuple[bytes, bytes, str]:
    """Send ``request`` to the check's child and wait for it, killing it past :data:`CHECK_SECONDS` or
    :data:`CHECK_BYTES` (then the third item says why), or when ``stop`` is set."""
    import time

    start, sent = time.monotonic(), False
    while True:
        try:
            out, err = child.communicate(None if sent else request, timeout=0.2)
            return out, err, ""
        except subprocess.TimeoutExpired:
            sent = True
        except BaseException:  # Ctrl-C in the waiting thread: the child's work is not wanted
            child.kill()
            raise
        over = ""
        if time.monotonic() - start > CHECK_SECONDS:
            over = f"transformers took longer than {CHECK_SECONDS:.0f} s to build the model it describes"
        elif _resident_bytes(child.pid) > CHECK_BYTES:
            over = f"transformers needed more than {CHECK_BYTES / 2**30:.3g} GiB to build the model it describes"
        if over or (stop is not None and stop.is_set()):
            child.kill()
            child.communicate()
            return b"", b"", over and f"{over} (stopped)"


def _resident_bytes(pid: int) -> int:
    """A process's resident memory, from ``/proc`` (0 where that cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _child() -> None:
    """The child of :func:`base_model_in_child`: stdin -> verdict on stdout (``{"unchecked": why, "skeleton":
    fields or null, "why": why not built}``, ``{"refused": [where, found, fix]}``, or ``{"retry": true}`` when
    hidden packages are needed)."""
    import json
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C reaches the parent too: this process just ends
    parent = os.getppid()
    try:  # end with the parent, even one killed outright (SIGKILL): Linux's PR_SET_PDEATHSIG (1)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:  # the parent ended before that took effect
        os._exit(1)
    request = json.loads(sys.stdin.buffer.read())
    hide = request.get("hide") is True
    if hide:
        for name in OPTIONAL_PACKAGES:  # transformers asks importlib.util.find_spec, which then answers None
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    fit, build = request.get("fit"), request.get("build")
    try:
        why, fields, not_built = _base_model_here(
            None if fit is None else (fit["config"], fit["shapes"], Path(fit["source"])),
            None if build is None else (build["config"], build["keys"]),
        )
        needs = hide and why.startswith(_NEEDS_PACKAGE)
        verdict: dict[str, Any] = {"retry": True} if needs else {"unchecked": why, "skeleton": fields, "why": not_built}
    except InputFileError as exc:
        # transformers failing to build the config or model may be for want of a hidden package: asked again
        built = exc.found.startswith("transformers cannot build")
        verdict = {"retry": True} if hide and built else {"refused": [exc.where, exc.found, exc.fix]}
    sys.stdout.write(json.dumps(verdict))
