"""What this machine can give a job: memory available now, and the check that refuses a job too large for it.

Knows no files: the callers say which file or key a refused job came from.
"""

from __future__ import annotations

import os

from fourier_convert.errors import ResourceError
from fourier_convert.maths.indices import draw_bytes

_MEMINFO = "/proc/meminfo"
#: A draw this small is not checked against the memory available.
_ALWAYS_FITS = 64 * 2**20


def available_memory() -> int | None:
    """Bytes of memory a new allocation can use without swapping: ``MemAvailable`` on Linux, else physical memory.

    Returns:
        The byte count, or None where the platform tells neither.

    Example:
        >>> (available_memory() or 1) > 0
        True
    """
    try:
        with open(_MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def fmt_bytes(n: int) -> str:
    """A byte count in decimal units, as ``df`` and file managers show them.

    Example:
        >>> fmt_bytes(512), fmt_bytes(1_500_000), fmt_bytes(8 * 10**12)
        ('512 B', '1.5 MB', '8.0 TB')
    """
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def check_position_draw(out_features: int, in_features: int, n: int, *, where: str, layer: str, fix: str) -> None:
    """Refuse a layer whose spectral positions cannot be drawn in the memory this machine has available.

    PEFT draws a FourierFT layer's positions from a permutation of all ``out * in`` positions (8 bytes each) once a
    layer reaches torch's algorithm switch or more than 65,536 coefficients are kept; so does fourier-convert, to get
    the same positions. A 100,000 x 100,000 layer needs 80 GB for it.

    Args:
        out_features: Rows of the delta.
        in_features: Columns of the delta.
        n: Coefficients kept.
        where: The file or key the layer's size came from, for the message.
        layer: How the message names the layer (module and where its size comes from).
        fix: What the user can do.

    Raises:
        ResourceError: The draw needs more than the memory available now.

    Example:
        >>> check_position_draw(64, 64, 10, where="adapter_model.safetensors", layer="'q_proj'", fix="")
    """
    need = draw_bytes(out_features, in_features, n)
    if need <= _ALWAYS_FITS:  # most layers: no need to ask the kernel
        return
    have = available_memory()
    if have is None or need <= have:
        return
    raise ResourceError(
        where,
        f"{layer} is {out_features}x{in_features}: PEFT draws its spectral positions from a permutation of all "
        f"{out_features * in_features:,} positions, {fmt_bytes(need)} of memory, more than the {fmt_bytes(have)} "
        "this machine has available",
        fix,
    )
