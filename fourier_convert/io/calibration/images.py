"""Reading calibration images: a folder of image files (sorted by name), prepared with the model's image processor."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fourier_convert.errors import InputFileError, first_line
from fourier_convert.io.calibration.common import CalibrationData, finish, plural, show_path
from fourier_convert.io.calibration.model import PREPROCESSOR_NAME, config_value, model_takes, quiet_transformers

#: File name suffixes (compared in lower case) read as images.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})


def read_images(
    source: Path,
    model_folder: Path,
    config: Mapping[str, Any],
    samples: int | None,
    held_out: float,
    seed: int,
    *,
    max_samples: int,
) -> CalibrationData:
    """Read a folder of images as :func:`.read_calibration` does, using at most the first ``max_samples`` by name."""
    where = show_path(source)
    folder = show_path(model_folder)
    if model_takes(model_folder, config) == "text":
        raise InputFileError(
            where,
            f"is a folder (read as images), but the model in {folder} takes text",
            "give a .txt or .jsonl file of text, or a .safetensors file of input_ids",
        )
    if not (model_folder / PREPROCESSOR_NAME).is_file():
        raise InputFileError(
            folder,
            f"has no {PREPROCESSOR_NAME}, needed to prepare images",
            f"copy the model's {PREPROCESSOR_NAME} into it, or give a .safetensors file of pixel_values",
        )
    images, others = _list_images(source)
    notes: list[str] = []
    if not images:
        raise InputFileError(
            where,
            f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            + (f"; {plural(others, 'other file')}" if others else ""),
            "put the calibration images in it, or give a text, .jsonl or .safetensors file",
        )
    if others:
        notes.append(f"{plural(others, 'file')} in {where} ignored (not an image)")
    if len(images) > max_samples:
        notes.append(f"the folder holds {len(images)} images; used the first {max_samples} by name")
        images = images[:max_samples]

    def load(wanted: list[int]) -> tuple[list[dict[str, torch.Tensor]], int, list[str]]:
        processor = _load_processor(model_folder)
        channels = config_value(config, "num_channels")
        mode = "L" if channels == 1 else "RGB"
        return [_process_image(processor, images[i], mode) for i in wanted], 0, []

    return finish(source, "images", len(images), "images", samples, held_out, seed, load, notes)


def _list_images(folder: Path) -> tuple[list[Path], int]:
    """The images in ``folder`` sorted by name (hidden files and anything but regular files left out), and how
    many other files there are."""
    images: list[Path] = []
    others = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    regular = entry.is_file()  # follows links; False for FIFOs, devices, folders
                except OSError:
                    regular = False
                if regular and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    images.append(Path(entry.path))
                elif regular:
                    others += 1
    except OSError as exc:
        raise InputFileError(
            show_path(folder), f"cannot be listed ({first_line(exc)})", "check its permissions"
        ) from None
    return sorted(images, key=lambda p: p.name), others


def _load_processor(model_folder: Path) -> Any:
    try:
        from transformers import AutoImageProcessor

        with quiet_transformers():
            return AutoImageProcessor.from_pretrained(str(model_folder), local_files_only=True)  # type: ignore[no-untyped-call]
    except Exception as exc:  # transformers raises many types for a broken config or a missing package
        raise InputFileError(
            show_path(model_folder),
            f"its image processor cannot be loaded ({first_line(exc)})",
            f"check {PREPROCESSOR_NAME}, or give a .safetensors file of pixel_values",
        ) from None


def _process_image(processor: Any, path: Path, mode: str) -> dict[str, torch.Tensor]:
    where = show_path(path)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        raise InputFileError(where, "reading images needs the Pillow package", "pip install pillow") from None
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert(mode)
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise InputFileError(
            where, f"cannot be read as an image ({first_line(exc)})", "replace or remove the file"
        ) from None
    try:
        with quiet_transformers():
            pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    except Exception as exc:  # processors raise many types for odd sizes or modes
        raise InputFileError(
            where, f"the image processor fails on it ({first_line(exc)})", "replace or remove the file"
        ) from None
    pixels = torch.as_tensor(pixels)
    if pixels.dim() != 4 or pixels.shape[0] != 1 or not pixels.is_floating_point():
        raise InputFileError(
            where,
            f"the image processor gives pixel_values of shape {list(pixels.shape)} ({pixels.dtype}) for it",
            "give a .safetensors file of pixel_values",
        )
    return {"pixel_values": pixels[0].to(torch.float32).contiguous()}
