"""A copy of a checkpoint with every floating tensor in one dtype, written tensor by tensor.

transformers converts a checkpoint to another dtype with the whole source mapped next to the converted
model (a bfloat16 source loaded as float32: about 1.5x the float32 size); a file already in the wanted dtype
is mapped without a copy. So a checkpoint that must run in another dtype is first staged here, with one
tensor in memory at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fourier_convert.io.checkpoint import BaseCheckpoint
from fourier_convert.io.safetensors_file import FLOAT_DTYPES, read_torch
from fourier_convert.io.writer import CheckpointWriter, TensorSpec, layout_shards

#: torch dtype -> safetensors dtype of the staged copy.
STAGED = {torch.float32: "F32", torch.float16: "F16"}


def needs_copy(ckpt: BaseCheckpoint, dtype: torch.dtype) -> bool:
    """Whether any floating tensor of ``ckpt`` is stored in another dtype than ``dtype``.

    Example:
        >>> needs_copy(open_checkpoint("fixtures/llama/base"), torch.float32)  # doctest: +SKIP
        False
    """
    return any(t.dtype in FLOAT_DTYPES and t.dtype != STAGED[dtype] for t in ckpt.tensors.values())


def write_copy(ckpt: BaseCheckpoint, dest: Path, dtype: torch.dtype) -> Path:
    """Write ``ckpt`` with every floating tensor in ``dtype`` (float32 or float16) to the new folder ``dest``
    (atomically).

    Shards keep their tensors (standard file names, with an index when there are several); the config and
    other small files are copied.

    Args:
        ckpt: The checkpoint.
        dest: A folder that does not exist yet.
        dtype: ``torch.float32`` or ``torch.float16``.

    Returns:
        ``dest``.

    Raises:
        DiskSpaceError: Not enough space for the copy.
        OutputError: ``dest`` cannot be written.

    Example:
        >>> write_copy(open_checkpoint("bf16-model"), Path("/tmp/f32-model"), torch.float32)  # doctest: +SKIP
        PosixPath('/tmp/f32-model')
    """
    target = STAGED[dtype]
    groups = [
        [
            TensorSpec(
                name,
                target if ckpt.tensors[name].dtype in FLOAT_DTYPES else ckpt.tensors[name].dtype,
                ckpt.tensors[name].shape,
            )
            for name in shard.tensors
        ]
        for shard in ckpt.shards
    ]
    layouts = layout_shards(groups)
    with CheckpointWriter(dest, durable=False) as writer:  # scratch, loaded at once and deleted: no fsync
        writer.begin(layouts, extra_bytes=sum(p.stat().st_size for p in ckpt.aux_files))
        for layout in layouts:
            for spec in layout.specs:
                tensor = read_torch(ckpt.tensors[spec.name])
                if spec.dtype == target:
                    tensor = tensor.to(dtype)
                flat = tensor.contiguous().reshape(-1)
                writer.write_tensor(layout.filename, spec.name, memoryview(flat.view(torch.uint8).numpy().data))
                del tensor, flat
        for path in ckpt.aux_files:
            writer.copy_file(path)
        writer.commit(index_metadata=ckpt.index_metadata)
    return dest
