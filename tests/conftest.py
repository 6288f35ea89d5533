"""Shared test settings: tolerances (one place, per dtype, as SPEC.md §6 says), seeds, devices."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import xtoken  # noqa: F401  (loads the ops)

# SPEC.md §6: float32 within 1e-5 relative of the float64 reference. bf16/fp16 are checked with the
# error-ratio rule instead (see assert_close_ratio): at most 2x the error of a same-dtype PyTorch
# implementation of the formula.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}
BF16_ERROR_RATIO = 2.0

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh but reproducible seed per test: printed on failure through the test id.
    seed = int(os.environ.get("XTOKEN_TEST_SEED", "0")) + zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two on a shared machine; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare a kernel result with the float64 reference under the tolerance of ``dtype``."""
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"],
        msg=lambda m: f"{what}: {m}",
    )  # fmt: skip


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN anywhere gives inf)."""
    a, e = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def assert_close_ratio(actual, same_dtype_torch, reference, what: str = "", ratio: float = BF16_ERROR_RATIO,
                       floor: float = 1e-6) -> None:
    """Low-precision rule: the kernel's error against the float64 reference is at most ``ratio`` times the
    error of a PyTorch implementation of the same formula run in the same dtype (plus a tiny floor)."""
    err = rel_error(actual, reference)
    base = rel_error(same_dtype_torch, reference)
    assert err <= ratio * base + floor, f"{what}: kernel error {err:.3e} > {ratio} x torch same-dtype error {base:.3e}"
