"""onnxruntime: the packages, execution providers actually in use, and the transformer graph optimiser.

onnxruntime-gpu lists ``CUDAExecutionProvider`` even where the CUDA libraries are missing and then runs
on the CPU without an error, so :func:`open_session` reads ``session.get_providers()`` after creating
the session: ``cuda`` fails unless CUDA is really active; ``auto`` falls back to the CPU and says so.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fourier_convert.errors import ExportError, UsageError
from fourier_convert.onnx.quiet import quiet

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: ``config.model_type`` -> the model type of ``onnxruntime.transformers.optimizer`` whose fusions fit it.
OPTIMIZER_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "gpt2": "gpt2",
    "llama": "gpt2",
    "mistral": "gpt2",
    "qwen2": "gpt2",
    "vit": "vit",
    "deit": "vit",
}


class GraphLoadError(ExportError):
    """onnxruntime cannot create a session for the graph. ``cause`` is onnxruntime's reason on one line, with the
    graph's path left out (a temporary folder the user never sees)."""

    def __init__(self, model_path: Path, cause: str) -> None:
        super().__init__(model_path.name, f"onnxruntime cannot load the graph ({cause})")
        self.cause = cause


@dataclass
class SessionInfo:
    """An onnxruntime session and what it runs on.

    Attributes:
        session: The ``onnxruntime.InferenceSession``.
        requested: The device asked for (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        providers: Providers the session actually uses, in priority order.
        notes: Fallbacks taken (for the report).
    """

    session: Any
    requested: str
    providers: list[str]
    notes: list[str] = field(default_factory=list)


def check_device(device: str) -> str:
    """Validate ``--device``.

    Raises:
        UsageError: Not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Example:
        >>> check_device("cuda:1")
        'cuda:1'
    """
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise UsageError("--device", f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N")


def require_packages() -> dict[str, str]:
    """Import onnx, onnxscript and onnxruntime; return their versions.

    Raises:
        ExportError: One is not installed (the message names the extra to install).
    """
    versions: dict[str, str] = {}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ExportError(
                name,
                f"is not installed ({exc})",
                "pip install 'fourier-convert[onnx]' (onnxruntime-gpu) or onnx onnxscript onnxruntime",
            ) from None
        versions[name] = str(getattr(module, "__version__", "?"))
    return versions


def check_providers(device: str) -> None:
    """Fail early when ``device`` asks for CUDA and this onnxruntime offers no CUDA provider.

    Raises:
        ExportError: ``cuda`` / ``cuda:N`` without ``CUDAExecutionProvider``.
    """
    import onnxruntime as ort

    available = list(ort.get_available_providers())
    if device.startswith("cuda") and CUDA not in available:
        raise ExportError(
            "--device",
            f"{device} requested but this onnxruntime ({ort.__version__}) offers only {available}",
            "install onnxruntime-gpu (pip install 'fourier-convert[onnx]') on a machine with CUDA, or use --device cpu",
        )


def open_session(model_path: Path, device: str, *, threads: int | None = None) -> SessionInfo:
    """Create an inference session on ``device`` and check which providers it really uses.

    Args:
        model_path: ``model.onnx`` (its external data beside it).
        device: ``auto`` (CUDA when onnxruntime offers it and it works, else CPU with a note), ``cpu``,
            ``cuda`` or ``cuda:N`` (CUDA or an error).
        threads: Intra-op threads (None: onnxruntime's default).

    Returns:
        The session and its providers.

    Raises:
        GraphLoadError: onnxruntime cannot create a session for the graph.
        ExportError: CUDA requested but not offered by this onnxruntime, or not active in the session.

    Example:
        >>> info = open_session(Path("onnx-model/model.onnx"), "cpu")  # doctest: +SKIP
        >>> info.providers  # doctest: +SKIP
        ['CPUExecutionProvider']
    """
    import onnxruntime as ort

    check_providers(device)
    available = list(ort.get_available_providers())
    want_cuda = device.startswith("cuda")
    notes: list[str] = []
    use_cuda = want_cuda or (device == "auto" and CUDA in available)
    providers: list[Any] = [CPU]
    if use_cuda:
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        providers = [(CUDA, {"device_id": index}), CPU]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise GraphLoadError(model_path, load_failure(exc, model_path)) from exc
    active = list(session.get_providers())
    if use_cuda and CUDA not in active:
        if want_cuda:
            raise ExportError(
                "--device",
                f"{device} requested but the session runs on {active}: onnxruntime lists CUDA yet could not use it "
                "(CUDA / cuDNN libraries missing or mismatched?)",
                "install the CUDA and cuDNN versions this onnxruntime-gpu needs, or use --device cpu",
            )
        notes.append(f"onnxruntime lists {CUDA} but the session could not use it; validated on {active[0]}")
    return SessionInfo(session, device, active, notes)


def check_loads(model_path: Path) -> None:
    """Create (and drop) a CPU session for ``model_path``: a graph onnxruntime cannot load is never published, even
    unvalidated. Cheap next to the export: onnxruntime reads the graph and its weights once.

    Raises:
        GraphLoadError: onnxruntime cannot load it.
    """
    info = open_session(model_path, "cpu")
    del info


def onnxruntime_max_opset() -> int | None:
    """The highest default-domain opset among onnxruntime's operator schemas (None when this build does not list
    them).

    Example:
        >>> onnxruntime_max_opset() >= 18  # doctest: +SKIP
        True
    """
    try:
        from onnxruntime.capi import _pybind_state

        schemas = _pybind_state.get_all_operator_schema()
        versions = [int(s.since_version) for s in schemas if s.domain in ("", "ai.onnx")]
    except Exception:  # an onnxruntime build without the schema table, or another layout
        return None
    return max(versions) if versions else None


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : (?:Load model from .*? failed:\s*)?")


#: onnxruntime's "invalid model" text lists every input and output of the node: only its name, op and error are kept.
_ORT_NODE = re.compile(
    r'(This is an invalid model\. )In Node, \("([^"]*)", (\w+), "[^"]*", -?\d+\) : .*? , Error (.*)$'
)


def load_failure(exc: BaseException, model_path: Path) -> str:
    """onnxruntime's reason for not loading ``model_path``, on one line, without the path.

    Example:
        >>> load_failure(RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from /t/m.onnx failed:"
        ...     'This is an invalid model. In Node, ("n_7", Split, "", -1) : ("x": tensor(float),) -> ("y",) , Error '
        ...     "Unrecognized attribute: num_outputs"), Path("/t/m.onnx"))
        'INVALID_GRAPH: This is an invalid model. node n_7 (Split): Unrecognized attribute: num_outputs'
    """
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    line = _ORT_PREFIX.sub(lambda m: f"{m.group(1)}: ", line)
    line = line.replace(str(model_path), model_path.name).replace(str(model_path.parent) + os.sep, "")
    line = _ORT_NODE.sub(lambda m: f"{m.group(1)}node {m.group(2)} ({m.group(3)}): {m.group(4)}", line)
    line = line.strip()
    return line[:300] if line else type(exc).__name__


def optimize_graph(folder: Path, config: Any, *, use_gpu: bool, external_data: bool) -> str:
    """Run onnxruntime's transformer optimiser on ``folder/model.onnx``: onnxruntime's basic graph optimisations
    (``opt_level=1``: constant folding, redundant nodes; provider-independent), then its Python fusions for the
    model type (layer norms, GELU, attention where the pattern matches).

    The optimised graph replaces the exported one (and its ``model.onnx.data``). The optimiser writes an
    intermediate copy to the system temporary folder and holds the graph in memory.

    Args:
        folder: Folder holding ``model.onnx``.
        config: The model's transformers config (``model_type``, heads, hidden size).
        use_gpu: Fuse for CUDA (keeps float16 on the GPU) rather than CPU.
        external_data: Write the weights to ``model.onnx.data``.

    Returns:
        A line for the report: the optimiser model type and the fused ops, or why nothing was done.

    Raises:
        ExportError: The optimiser failed.
    """
    model_type = str(getattr(config, "model_type", ""))
    opt_type = OPTIMIZER_TYPES.get(model_type)
    if opt_type is None:
        return f"--optimize: onnxruntime's transformer optimiser has no fusions for model type {model_type!r}; skipped"
    from onnxruntime.transformers.optimizer import optimize_model

    staging = folder / ".optimized"
    staging.mkdir()
    try:
        with quiet("onnxruntime"):
            optimized = optimize_model(
                str(folder / "model.onnx"),
                model_type=opt_type,
                num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
                hidden_size=int(getattr(config, "hidden_size", 0) or 0),
                opt_level=1,
                use_gpu=use_gpu,
            )
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(
            str(staging / "model.onnx"), use_external_data_format=external_data, all_tensors_to_one_file=True
        )
        del optimized
        for name in ("model.onnx", "model.onnx.data"):
            if (folder / name).exists():
                (folder / name).unlink()
            if (staging / name).exists():
                os.replace(staging / name, folder / name)
    except Exception as exc:
        raise ExportError(
            "--optimize", f"onnxruntime's optimiser failed ({_first_line(exc)})", "export without --optimize"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    done = ", ".join(f"{k} x{v}" for k, v in sorted(fused.items())) or "no fusions matched"
    return f"--optimize: onnxruntime optimiser ({opt_type}, {'GPU' if use_gpu else 'CPU'}): {done}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__
