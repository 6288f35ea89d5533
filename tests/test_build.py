"""The build: which kernels the extension registered."""

import os

import torch

import xtoken


def test_cpu_kernels_registered():
    for name in xtoken.ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"xtoken::{name}", "CPU"), name


def test_cuda_build_registers_every_cuda_kernel():
    # Fails when the package was built with CUDA (or CUDA was asked for) but some op has no CUDA kernel.
    wanted = os.environ.get("XTOKEN_BUILD_CUDA", "") == "1"
    if not (xtoken.ops.built_with_cuda() or wanted):
        return
    assert xtoken.ops.built_with_cuda(), "XTOKEN_BUILD_CUDA=1 but the extension was built without CUDA"
    missing = [name for name, ok in xtoken.ops.cuda_kernels_registered().items() if not ok]
    assert not missing, f"no CUDA kernel registered for {missing}"
