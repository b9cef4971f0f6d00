"""ONNX export of merged FourierFT models (``fourier-convert to-onnx``), proven equal in onnxruntime.

Modules, one job each: :mod:`.tasks` (task names, inference from ``config.architectures``),
:mod:`.signature` (graph inputs / outputs of a loaded model, the flat-input wrapper), :mod:`.inputs`
(example and validation inputs), :mod:`.models` (loading with transformers, from files or from tensors in
memory), :mod:`.proof` (base + unmerged adapter without PEFT or FFTs), :mod:`.exporter`
(``torch.onnx.export``, dynamo), :mod:`.runtime` (onnxruntime sessions, providers, optimiser),
:mod:`.compare` (masked comparisons), :mod:`.validate` (references and onnxruntime runs), :mod:`.quiet`,
:mod:`.report`, and :mod:`.pipeline` (:func:`export_onnx`, which ties them together).
"""

from typing import TYPE_CHECKING

from fourier_convert._lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__,
    globals(),
    {
        "TOLERANCES": "fourier_convert.onnx.compare",
        "CaseCheck": "fourier_convert.onnx.compare",
        "OutputDiff": "fourier_convert.onnx.compare",
        "export_onnx": "fourier_convert.onnx.pipeline",
        "OnnxReport": "fourier_convert.onnx.report",
        "TASKS": "fourier_convert.onnx.tasks",
    },
)

if TYPE_CHECKING:
    from fourier_convert.onnx.compare import TOLERANCES, CaseCheck, OutputDiff
    from fourier_convert.onnx.pipeline import export_onnx
    from fourier_convert.onnx.report import OnnxReport
    from fourier_convert.onnx.tasks import TASKS

__all__ = ["TASKS", "TOLERANCES", "CaseCheck", "OnnxReport", "OutputDiff", "export_onnx"]
