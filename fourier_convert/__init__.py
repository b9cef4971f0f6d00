"""fourier-convert: exact, streaming conversion of PEFT FourierFT adapters.

Example:
    >>> import fourier_convert as fc
    >>> report = fc.merge(base="./base", adapter="./adapter", out="./merged", device="auto")  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from fourier_convert._lazy import lazy_attributes
from fourier_convert.errors import (
    AdapterError,
    BaseMismatchError,
    DiskSpaceError,
    ExportError,
    FourierConvertError,
    InputFileError,
    OnnxValidationError,
    OutputError,
    PickleRefusedError,
    ResourceError,
    UsageError,
    VerificationError,
)

#: Public names that need torch (and more): imported on first use, so that ``import fourier_convert`` is cheap.
_LAZY = {
    "AdapterFiles": "fourier_convert.io.adapter_writer",
    "AdapterSpec": "fourier_convert.merging.specs",
    "CalibrationOptions": "fourier_convert.calibrate.pipeline",
    "CalibrationReport": "fourier_convert.calibrate.pipeline",
    "FourierFTAdapter": "fourier_convert.io.adapter",
    "FromLoraReport": "fourier_convert.lora_to_fourierft",
    "InspectReport": "fourier_convert.inspect",
    "LayerReport": "fourier_convert.report",
    "LoraAdapter": "fourier_convert.lora",
    "LoraReport": "fourier_convert.lora",
    "MergeReport": "fourier_convert.report",
    "MergedState": "fourier_convert.merging.memory",
    "OnnxReport": "fourier_convert.onnx",
    "OutputCheck": "fourier_convert.check",
    "check_from_calibration": "fourier_convert.check",
    "check_lora_outputs": "fourier_convert.check",
    "export_onnx": "fourier_convert.onnx",
    "from_lora": "fourier_convert.lora_to_fourierft",
    "inspect_adapter": "fourier_convert.inspect",
    "merge": "fourier_convert.merging.folder",
    "merge_in_memory": "fourier_convert.merging.memory",
    "read_adapter": "fourier_convert.io.adapter",
    "to_lora": "fourier_convert.lora",
}
__getattr__ = lazy_attributes(__name__, globals(), _LAZY)


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from fourier_convert.calibrate.pipeline import CalibrationOptions, CalibrationReport
    from fourier_convert.check import OutputCheck, check_from_calibration, check_lora_outputs
    from fourier_convert.inspect import InspectReport, inspect_adapter
    from fourier_convert.io.adapter import FourierFTAdapter, read_adapter
    from fourier_convert.io.adapter_writer import AdapterFiles
    from fourier_convert.lora import LoraAdapter, LoraReport, to_lora
    from fourier_convert.lora_to_fourierft import FromLoraReport, from_lora
    from fourier_convert.merging.folder import merge
    from fourier_convert.merging.memory import MergedState, merge_in_memory
    from fourier_convert.merging.specs import AdapterSpec
    from fourier_convert.onnx import OnnxReport, export_onnx
    from fourier_convert.report import LayerReport, MergeReport

__all__ = [
    "AdapterError",
    "AdapterFiles",
    "AdapterSpec",
    "BaseMismatchError",
    "CalibrationOptions",
    "CalibrationReport",
    "DiskSpaceError",
    "ExportError",
    "FourierConvertError",
    "FourierFTAdapter",
    "FromLoraReport",
    "InputFileError",
    "InspectReport",
    "LayerReport",
    "LoraAdapter",
    "LoraReport",
    "MergeReport",
    "MergedState",
    "OnnxReport",
    "OnnxValidationError",
    "OutputCheck",
    "OutputError",
    "PickleRefusedError",
    "ResourceError",
    "UsageError",
    "VerificationError",
    "__version__",
    "check_from_calibration",
    "check_lora_outputs",
    "export_onnx",
    "from_lora",
    "inspect_adapter",
    "merge",
    "merge_in_memory",
    "read_adapter",
    "to_lora",
]
