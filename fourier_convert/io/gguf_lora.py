"""Writing a PEFT LoRA adapter as a llama.cpp GGUF LoRA file, as llama.cpp's ``convert_lora_to_gguf.py`` does.

The file is built with the ``gguf`` package (llama.cpp's own Python writer): tensor names come from its name
tables (``blk.{i}.attn_q.weight.lora_a`` ...), the metadata is what the script writes (architecture, adapter
type, ``adapter.lora.alpha``, the name its heuristics derive from the output folder's name, quantization
version), tensors are float32 in the script's order, and q / k ``lora_B`` rows are permuted as llama.cpp's
Llama converter permutes those weights for its rotary embedding. llama.cpp scales each layer by
``alpha / rank`` with one ``alpha`` for the whole file and the rank read from each tensor: a LoRA whose config
has an ``alpha_pattern`` would be served differently, so it is refused.

Only architectures whose conversion was checked against the script are known (:data:`ARCHITECTURES`); for
others the error gives the script's command.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from fourier_convert.errors import UsageError

#: The GGUF LoRA file's name inside the adapter folder.
GGUF_NAME = "adapter_model.gguf"
#: Hugging Face architecture -> llama.cpp architecture, for those checked against convert_lora_to_gguf.py.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
_PREFIX = "base_model.model."
_SCRIPT = "python convert_lora_to_gguf.py --base BASE_FOLDER ADAPTER_FOLDER (from llama.cpp)"


@dataclass(frozen=True)
class GGUFLoraLayout:
    """What the GGUF file needs to know of the base model (its config.json); see :func:`gguf_layout`.

    Attributes:
        architecture: llama.cpp architecture (``llama``).
        n_blocks: Number of transformer blocks.
        n_head: Attention heads.
        n_head_kv: Key / value heads.
        tied_head: The base ties ``lm_head`` to the embeddings (an ``lm_head`` LoRA cannot be served).
    """

    architecture: str
    n_blocks: int
    n_head: int
    n_head_kv: int
    tied_head: bool

    @functools.cached_property
    def _names(self) -> Any:
        """gguf's tensor name table for this architecture and depth (built once: it is not cheap)."""
        gguf = _import_gguf()
        return gguf.get_tensor_name_map(_arch_enum(gguf, self.architecture), self.n_blocks)

    def tensor_name(self, module: str) -> str:
        """The GGUF name of a module's weight (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``).

        Raises:
            UsageError: llama.cpp has no tensor for this module.

        Example:
            >>> gguf_layout({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
            ...              "num_attention_heads": 2}).tensor_name("model.layers.1.mlp.down_proj")
            'blk.1.ffn_down.weight'
        """
        name = self._names.get_name(f"{module}.weight", try_suffixes=(".weight", ".bias"))
        if name is None or (module.endswith("lm_head") and self.tied_head):
            why = "ties lm_head to the embeddings" if name is not None else f"has no tensor for {module!r}"
            raise UsageError(
                "--target",
                f"llama.cpp's {self.architecture} model {why}, so a LoRA on it cannot be served",
                "leave the module out of the adapter, or use --target peft",
            )
        return str(name)


def gguf_layout(base_config: Mapping[str, Any], where: str = "config.json") -> GGUFLoraLayout:
    """Read what the GGUF LoRA file needs from the base model's config.

    Args:
        base_config: The base model's ``config.json`` contents.
        where: Its path, for messages.

    Returns:
        The layout.

    Raises:
        UsageError: The ``gguf`` package is missing, or the architecture is not one fourier-convert converts
            (the message gives llama.cpp's script to use instead).

    Example:
        >>> gguf_layout({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
        ...              "num_attention_heads": 4, "num_key_value_heads": 2}).n_head_kv
        2
    """
    _import_gguf()
    archs = base_config.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs else None
    if hf_arch not in ARCHITECTURES:
        raise UsageError(
            "--target",
            f"{where}: writing GGUF LoRA files directly knows {', '.join(sorted(ARCHITECTURES))}, not {hf_arch!r}",
            f"use --target peft and convert with {_SCRIPT}",
        )
    try:
        n_blocks = int(base_config["num_hidden_layers"])
        n_head = int(base_config["num_attention_heads"])
        n_head_kv = int(base_config.get("num_key_value_heads") or n_head)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError("--base", f"{where}: cannot read {exc} for the GGUF file", "check the base config") from None
    return GGUFLoraLayout(
        ARCHITECTURES[hf_arch], n_blocks, n_head, n_head_kv, bool(base_config.get("tie_word_embeddings", False))
    )


def gguf_lora_bytes(
    layout: GGUFLoraLayout, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], folder_name: str
) -> bytes:
    """The GGUF LoRA file of a PEFT LoRA adapter, as llama.cpp's convert_lora_to_gguf.py writes it (f32).

    Args:
        layout: From :func:`gguf_layout`.
        config: The LoRA's ``adapter_config.json`` (global ``lora_alpha``, no ``alpha_pattern``).
        tensors: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` tensors only.
        folder_name: Name of the adapter folder, from which the script's heuristics derive ``general.name``.

    Returns:
        The file's bytes, read back with the ``gguf`` package's reader before they are returned.

    Raises:
        UsageError: A config or tensor llama.cpp would serve differently or reject.

    Example:
        >>> data = gguf_lora_bytes(layout, lora.config, lora.tensors, "my-lora")  # doctest: +SKIP
    """
    gguf = _import_gguf()
    if config.get("alpha_pattern") or config.get("use_rslora") or config.get("use_dora"):
        raise UsageError(
            "--target",
            "llama.cpp scales every layer by one lora_alpha / rank; this LoRA has an alpha_pattern, rsLoRA or DoRA",
            "convert with --target llama.cpp, which folds per-layer scales into lora_B",
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):  # the script reads safetensors' sorted keys, pairing A and B per module
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.startswith(_PREFIX) and key.endswith(suffix):
                pairs.setdefault(key[len(_PREFIX) : -len(suffix)], {})[part] = tensors[key]
                break
        else:
            raise UsageError(
                "--target", f"llama.cpp LoRA files hold only lora_A / lora_B tensors, not {key!r}", "use --drop-extras"
            )
    writer = gguf.GGUFWriter(path=None, arch=layout.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    for module, pair in pairs.items():
        if len(pair) != 2:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise UsageError(
                "--target", f"{module!r} has no {missing} tensor", "write both lora_A and lora_B of every module"
            )
        name = layout.tensor_name(module)
        a = pair["lora_A"].detach().to(torch.float32).numpy()
        b = pair["lora_B"].detach().to(torch.float32)
        if module.endswith(("q_proj", "k_proj")):
            b = _rope_permute(b, layout.n_head if module.endswith("q_proj") else layout.n_head_kv)
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b.numpy()))
    total = writer.get_total_parameter_count()
    meta = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), None, None, PurePath(folder_name), total[0])
    if meta.name is None:
        meta.name = folder_name
    meta.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with tempfile.TemporaryDirectory(prefix="fc-gguf-") as tmp:
        path = Path(tmp) / GGUF_NAME
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        reader = gguf.GGUFReader(path)  # never publish what llama.cpp's reader would reject
        if len(reader.tensors) != 2 * len(pairs):
            raise RuntimeError(f"the GGUF file read back holds {len(reader.tensors)} tensors, not {2 * len(pairs)}")
        del reader
        return path.read_bytes()


def _rope_permute(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Llama converter reorders q / k output rows (HF's rotary halves -> interleaved pairs)."""
    out = b.shape[0]
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape).contiguous()


def _arch_enum(gguf: Any, name: str) -> Any:
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UsageError(
            "--target",
            "llama.cpp output is written with the gguf package, which is not installed",
            "pip install 'fourier-convert[gguf]' (or: pip install gguf)",
        ) from None
    return gguf
