"""Moving weights between files and a GPU through a few small pinned host buffers.

A 7B merge sends every adapted weight to the GPU and every merged one back (2.1 GB each way for q_proj and
v_proj). Through pageable tensors each transfer needs a host copy as large as the layer (host memory grows with
the largest layer, and the copies run at a fraction of the bus's speed). Here the bytes go from the file
into one of two reused pinned buffers of :data:`STAGE_BYTES` and on to the GPU without waiting (the next part
is read while the last one crosses), and back the same way, part by part, into the output file: the host holds
the two buffers whatever the layer size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fourier_convert.io.dtypes import torch_dtype
from fourier_convert.io.safetensors_file import TensorInfo, read_into

#: Bytes per pinned buffer: large enough for the bus's full speed, small enough to keep host memory flat (a 7B
#: merge on the H200 host peaked 33 MiB lower with 8 MiB than with 16 MiB, in as much time within the noise).
STAGE_BYTES = 8 << 20

#: Receives a part of a tensor's bytes and where it starts inside the tensor.
PartSink = Callable[[memoryview, int], None]


class PinnedBuffers:
    """A ring of pinned host buffers; a buffer is handed out again only once the transfer that last used it has
    completed.

    Args:
        device: The CUDA device the transfers go to and from (their completion is tracked on its current
            stream).
        count: Buffers in the ring (two: one is filled while the other crosses the bus).
        nbytes: Size of each (default :data:`STAGE_BYTES`).

    Example:
        >>> ring = PinnedBuffers(torch.device("cuda"))  # doctest: +SKIP
        >>> weight = upload(info, ring)  # doctest: +SKIP
    """

    def __init__(self, device: torch.device, count: int = 2, nbytes: int | None = None) -> None:
        self.device, self.nbytes = device, nbytes or STAGE_BYTES
        self._buffers = [torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        self._done: list[torch.cuda.Event | None] = [None] * count
        self._next = 0

    def take(self) -> tuple[int, torch.Tensor]:
        """The next buffer (and its slot), once its last transfer has finished."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        self.wait(slot)
        return slot, self._buffers[slot]

    def sent(self, slot: int) -> None:
        """Mark that a transfer using ``slot`` was queued on the current stream."""
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        self._done[slot] = event

    def wait(self, slot: int) -> None:
        """Block until the last transfer queued for ``slot`` has finished."""
        event = self._done[slot]
        if event is not None:
            event.synchronize()
            self._done[slot] = None


def upload(info: TensorInfo, ring: PinnedBuffers) -> torch.Tensor:
    """Read a tensor from its file straight onto the ring's device, part by part through ``ring``.

    Args:
        info: The tensor in its safetensors file.
        ring: The pinned buffers to pass through (and the device they serve).

    Returns:
        The tensor on the ring's device, in its stored dtype and shape (the last part may still be in flight: later
        work on the current stream sees it complete).

    Raises:
        InputFileError: The file ends inside the tensor.

    Example:
        >>> weight = upload(ckpt.tensors["model.layers.0.self_attn.q_proj.weight"], ring)  # doctest: +SKIP
    """
    raw = torch.empty(info.nbytes, dtype=torch.uint8, device=ring.device)
    for start in range(0, info.nbytes, ring.nbytes):
        size = min(ring.nbytes, info.nbytes - start)
        slot, buffer = ring.take()
        read_into(info, buffer.numpy().data[:size], start)
        raw[start : start + size].copy_(buffer[:size], non_blocking=True)
        ring.sent(slot)
    return raw.view(torch_dtype(info.dtype)).reshape(info.shape)


def download(tensor: torch.Tensor, ring: PinnedBuffers, write: PartSink) -> None:
    """Hand a GPU tensor's bytes to ``write`` part by part, in order (each part crosses the bus while the one
    before it is written).

    Args:
        tensor: A tensor on the ring's device (its contiguous bytes are sent).
        ring: The pinned buffers to pass through.
        write: Called with each part and its offset inside the tensor (once with no bytes for an empty tensor).

    Example:
        >>> download(merged, ring, lambda part, at: writer.write_tensor(shard, name, part, at=at))  # doctest: +SKIP
    """
    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    total = flat.numel()
    if total == 0:
        write(memoryview(b""), 0)
        return
    queued: tuple[int, torch.Tensor, int, int] | None = None
    for start in range(0, total, ring.nbytes):
        size = min(ring.nbytes, total - start)
        slot, buffer = ring.take()
        buffer[:size].copy_(flat[start : start + size], non_blocking=True)
        ring.sent(slot)
        if queued is not None:
            _write_part(ring, write, *queued)
        queued = (slot, buffer, start, size)
    assert queued is not None
    _write_part(ring, write, *queued)


def _write_part(ring: PinnedBuffers, write: PartSink, slot: int, buffer: torch.Tensor, start: int, size: int) -> None:
    ring.wait(slot)
    write(buffer.numpy().data[:size], start)
