"""An independent float64 reference for FourierFT merges, written from PEFT's definition.

Deliberately shares no code with fourier_convert: indices from torch.randperm as PEFT draws them, the
dense complex spectrum, numpy's float64 ifft2, real part, times scaling; added to the base in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."


def peft_indices(out_features: int, in_features: int, n: int, seed: int) -> np.ndarray:
    perm = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return np.stack([(perm // in_features).numpy(), (perm % in_features).numpy()])


def reference_delta(values: np.ndarray, out_features: int, in_features: int, scaling: float, seed: int) -> np.ndarray:
    idx = peft_indices(out_features, in_features, len(values), seed)
    dense = np.zeros((out_features, in_features), dtype=np.complex128)
    dense[idx[0], idx[1]] = values
    return np.fft.ifft2(dense).real * scaling


def load_model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference_merge(
    base: Path, adapter: Path, conv1d_modules: set[str] | None = None, key_map: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """float64 merged tensors keyed by checkpoint name (only the tensors the adapter changes or adds).

    ``key_map`` maps adapter-space names to checkpoint names where they differ; ``conv1d_modules`` lists
    modules whose weight is stored (in, out).
    """
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    base_sd = load_model_tensors(base)
    key_map = key_map or {}
    conv1d_modules = conv1d_modules or set()
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        clean = key[len(PREFIX) :]
        if ".original_module." in clean or ".modules_to_save." in clean:
            continue  # PEFT reads a modules_to_save module's plain keys only; its wrapper copies are never used
        if clean.endswith(".fourierft_spectrum"):
            module = clean[: -len(".fourierft_spectrum")]
            wkey = key_map.get(module + ".weight", module + ".weight")
            w = base_sd[wkey].double().numpy()
            if module in conv1d_modules:
                d = reference_delta(
                    value.double().numpy(), w.shape[1], w.shape[0], cfg["scaling"], cfg["random_loc_seed"]
                ).T
            else:
                d = reference_delta(
                    value.double().numpy(), w.shape[0], w.shape[1], cfg["scaling"], cfg["random_loc_seed"]
                )
            out[wkey] = w + d
        else:
            clean = clean.replace(".base_layer.", ".")
            out[key_map.get(clean, clean)] = value.double().numpy()
    return out
