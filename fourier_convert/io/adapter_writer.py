"""Writing a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fourier_convert.io.adapter import CONFIG_NAME, WEIGHTS_NAME
from fourier_convert.io.dtypes import st_dtype
from fourier_convert.io.gguf_lora import GGUF_NAME, GGUFLoraLayout, gguf_lora_bytes
from fourier_convert.io.writer import CheckpointWriter, TensorSpec, layout_shards, refuse_input_as_output


@dataclass
class AdapterFiles:
    """A PEFT adapter held in memory (small: factors or spectra, biases and heads only).

    Attributes:
        config: ``adapter_config.json`` contents.
        tensors: Tensor key -> tensor, keys as PEFT saves them (``base_model.model.`` prefix).
        sources: The input folders: :meth:`save` never writes over them.
        gguf: With a layout, :meth:`save` also writes the adapter as llama.cpp's GGUF LoRA file
            (``adapter_model.gguf``).
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    sources: list[Path] = field(default_factory=list)
    gguf: GGUFLoraLayout | None = None

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (and ``adapter_model.gguf`` for
        llama.cpp) atomically: all or nothing.

        Args:
            out: Output folder.
            overwrite: Replace a non-empty ``out``.

        Returns:
            The output folder.

        Raises:
            OutputError: ``out`` exists and is not empty (without ``overwrite``), or cannot be written.
            UsageError: ``out`` is, contains, or lies inside an input folder; the GGUF file cannot represent the
                adapter.

        Example:
            >>> files = AdapterFiles({"peft_type": "LORA"}, {"x": torch.zeros(2)})
            >>> files.save("/tmp/fc-doctest-adapter", overwrite=True).name
            'fc-doctest-adapter'
        """
        target = Path(out)
        refuse_input_as_output(target, self.sources)
        specs = [TensorSpec(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in self.tensors.items()]
        layouts = layout_shards([specs], names=[WEIGHTS_NAME])
        gguf = None
        if self.gguf is not None:  # built (and read back) before a byte is written
            gguf = gguf_lora_bytes(self.gguf, self.config, self.tensors, target.resolve().name)
        with CheckpointWriter(target, overwrite=overwrite) as writer:
            writer.begin(layouts)
            for key, value in self.tensors.items():
                flat = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                writer.write_tensor(WEIGHTS_NAME, key, memoryview(flat.data))
            writer.write_file(CONFIG_NAME, (json.dumps(self.config, indent=2) + "\n").encode())
            if gguf is not None:
                writer.write_file(GGUF_NAME, gguf)
            writer.commit(index=False)
        return target
