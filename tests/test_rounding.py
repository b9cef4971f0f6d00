"""fourier_convert.maths.rounding (torch) and rounding_numpy (the CPU merge's): one round-to-nearest-even from
float64, checked against an exact reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fourier_convert.maths.rounding import round_once, round_to_odd_float32
from fourier_convert.maths.rounding_numpy import STORAGE, finite_stored, round_into, to_float64
from fourier_convert.merging.memory import stored_to_torch
from tests.rounding_reference import nearest_even

Rounder = Callable[[torch.Tensor, torch.dtype], torch.Tensor]
ST = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}


def numpy_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rounding_numpy.round_into, as a torch function (bfloat16 bits viewed as bfloat16)."""
    out = np.empty(tuple(x.shape), dtype=STORAGE[ST[dtype]])
    round_into(x.numpy(), out, ST[dtype])
    return stored_to_torch(out)


def elementwise_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """round_once as it runs on a GPU: every element through round-to-odd."""
    return round_once(x, dtype, elementwise=True)


@pytest.fixture(params=["torch", "torch-elementwise", "numpy"])
def rounder(request: pytest.FixtureRequest) -> Rounder:
    return {"torch": round_once, "torch-elementwise": elementwise_round, "numpy": numpy_round}[request.param]


MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
NORMAL = {torch.bfloat16: (2.0**-126, 3.0e38), torch.float16: (2.0**-14, 65504.0)}


def normal(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    small, big = NORMAL[dtype]
    return (r.abs() >= small) & (r.abs() <= big)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_random_values_round_once_where_torch_rounds_twice(dtype: torch.dtype, rounder: Rounder) -> None:
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = nearest_even(x, MANTISSA[dtype])
    ok = normal(want, dtype)
    got = rounder(x, dtype).double()
    assert torch.equal(got[ok], want[ok])
    assert (x.to(dtype).double()[ok] != want[ok]).any()  # what the helper is for: torch's cast rounds twice


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_values_next_to_ties(dtype: torch.dtype, rounder: Rounder) -> None:
    """Just above, just below and exactly on the midpoint between two neighbours, at many magnitudes."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e3
    lo = x.to(dtype)
    hi = torch.nextafter(lo, torch.full_like(lo, float("inf")))
    mid = (lo.double() + hi.double()) / 2
    for eps in (2.0**-40, -(2.0**-40), 2.0**-52, 0.0):
        y = mid * (1 + eps)
        want = nearest_even(y, MANTISSA[dtype])
        ok = normal(want, dtype)
        assert torch.equal(rounder(y, dtype).double()[ok], want[ok]), eps


def test_special_values_and_float32(rounder: Rounder) -> None:
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e300, -1e300, 1e-300], dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        got = rounder(x, dtype).double()
        assert got[:4].tolist() == [0.0, -0.0, float("inf"), -float("inf")] and torch.isnan(got[4])
        assert got[5:7].tolist() == [float("inf"), -float("inf")] and got[7].item() == 0.0
        assert torch.signbit(got[1])
    y = torch.randn(1000, dtype=torch.float64)
    assert torch.equal(rounder(y, torch.float32), y.float()) and torch.equal(rounder(y, torch.float64), y)


def test_numpy_nans_stay_nans_with_their_sign() -> None:
    x = np.array([np.nan, -np.nan, np.copysign(np.nan, -1.0)])
    payload = np.array([0x7FF0000000000001, 0xFFFFFFFFFFFFFFFF], dtype=np.uint64).view(np.float64)
    out = np.empty(5, dtype=np.uint16)
    round_into(np.concatenate([x, payload]), out, "BF16")
    assert not finite_stored(out, "BF16").any()
    assert np.isnan(to_float64(out, "BF16")).all()
    assert [bool(b >> 15) for b in out] == [bool(np.signbit(v)) for v in np.concatenate([x, payload])]


def test_numpy_widening_is_exact() -> None:
    bits = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).double().numpy()
    assert np.array_equal(to_float64(bits, "BF16"), want, equal_nan=True)
    halves = bits.view(np.float16)
    assert np.array_equal(to_float64(halves, "F16"), halves.astype(np.float64), equal_nan=True)


def test_round_to_odd_truncates_and_marks_inexact() -> None:
    x = torch.tensor([1.0, 1 + 2.0**-24, 1 + 3 * 2.0**-25, -(1 + 2.0**-30), 2.0**-140], dtype=torch.float64)
    got = round_to_odd_float32(x).double().tolist()
    assert got[0] == 1.0  # exact: unchanged
    assert got[1] == 1 + 2.0**-23 and got[2] == 1 + 2.0**-23  # truncated to 1, odd bit set
    assert got[3] == -(1 + 2.0**-23)
    assert got[4] == 2.0**-140  # a float32 subnormal, exact


@pytest.mark.parametrize("elementwise", [False, True])
def test_chunks_do_not_change_the_result(elementwise: bool) -> None:
    x = torch.randn(3, 1000, dtype=torch.float64)
    chunked = round_once(x, torch.bfloat16, chunk=7, elementwise=elementwise)
    assert torch.equal(chunked, round_once(x, torch.bfloat16))
    assert chunked.shape == (3, 1000)


def test_refuses_other_dtypes() -> None:
    with pytest.raises(ValueError, match="expected float64"):
        round_once(torch.zeros(2), torch.bfloat16)
    with pytest.raises(ValueError, match=r"cannot round to torch\.int8"):
        round_once(torch.zeros(2, dtype=torch.float64), torch.int8)


def test_numpy_refuses_other_dtypes() -> None:
    with pytest.raises(ValueError, match="expected float64"):
        round_into(np.zeros(2, dtype=np.float32), np.empty(2, dtype=np.uint16), "BF16")
    with pytest.raises(ValueError, match="cannot round to I8"):
        round_into(np.zeros(2), np.empty(2, dtype=np.int8), "I8")


def test_float16_subnormals_round_once(rounder: Rounder) -> None:
    """Below float16's normal range the spacing is 2**-24: the reference is a plain half-to-even rounding."""
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2.0**-14
    ties = (torch.arange(1, 1001, dtype=torch.float64) + 0.5) * 2.0**-24  # exact midpoints, and next to them
    x = torch.cat([x, ties, ties * (1 + 2.0**-40), ties * (1 - 2.0**-40), -x[:1000]])
    want = torch.round(x / 2.0**-24) * 2.0**-24  # torch.round: half to even
    assert torch.equal(rounder(x, torch.float16).double(), want)
