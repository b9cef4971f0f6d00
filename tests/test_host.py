"""host: the memory a job may use, byte counts as people read them, and the position-draw check."""

from __future__ import annotations

import re

import pytest

import fourier_convert as fc
from fourier_convert.host import available_memory, check_position_draw, fmt_bytes
from fourier_convert.maths.indices import RANDPERM_THRESHOLD, draw_bytes


def test_available_memory_is_what_the_kernel_reports() -> None:
    have = available_memory()
    assert have is not None and have > 0
    with open("/proc/meminfo", encoding="ascii") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert abs(have - kib * 1024) < 2**30  # read moments apart: within 1 GiB of each other


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (1_234_567, "1.2 MB"),
        (2 * 10**9, "2.0 GB"),
        (8 * 10**15, "8000.0 TB"),
    ],
)
def test_fmt_bytes_uses_decimal_units(n: int, text: str) -> None:
    assert fmt_bytes(n) == text


def test_draw_bytes_follows_the_path_spectral_positions_takes() -> None:
    assert draw_bytes(4096, 4096, 1000) == 48 * 1000  # replayed prefix
    assert draw_bytes(4096, 4096, 70_000) == 8 * 4096 * 4096  # too many kept: the whole permutation
    side = int(RANDPERM_THRESHOLD**0.5) + 1
    assert draw_bytes(side, side, 10) == 8 * side * side  # at the algorithm switch: the whole permutation


def test_a_small_layer_passes_and_an_8_tb_draw_is_refused() -> None:
    check_position_draw(4096, 4096, 1000, where="w", layer="'q'", fix="f")
    with pytest.raises(fc.ResourceError) as info:
        check_position_draw(10**6, 10**6, 10, where="a.safetensors", layer="'q'", fix="use less")
    found = re.fullmatch(
        r"a\.safetensors: 'q' is 1000000x1000000: PEFT draws its spectral positions from a permutation of all "
        r"1,000,000,000,000 positions, 8\.0 TB of memory, more than the ([0-9.]+ [KMGT]?B) this machine has "
        r"available; use less",
        str(info.value),
    )
    assert found is not None, str(info.value)
