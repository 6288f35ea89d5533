"""The build: which kernels the extension registered, and which GPU architectures the library holds."""

import os
import re
import shutil
import subprocess

import pytest
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


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or Triton's NVIDIA backend (which ships one)."""
    toolkit = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [shutil.which("cuobjdump"), os.path.join(toolkit, "bin", "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_library_holds_the_cuda_architectures_it_was_built_for():
    # A GPU runs the library only if it holds machine code for its architecture (or PTX of an older one): what the
    # build compiled (setup.py: TORCH_CUDA_ARCH_LIST, else the visible GPUs', else a portable list) must be there.
    if not xtoken.ops.built_with_cuda():
        assert xtoken.ops.cuda_architectures() == []
        pytest.skip("a CPU-only build")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) on this machine")
    library = xtoken._C.__file__
    elf = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    machine_code = set(re.findall(r"\.(sm_\w+)\.cubin", elf))
    ptx_code = {"compute_" + arch[len("sm_"):] for arch in re.findall(r"\.(sm_\w+)\.ptx", ptx)}
    asked = set(xtoken.ops.cuda_architectures())
    assert asked, "a CUDA build that records no architecture"
    assert machine_code | ptx_code == asked, (elf, ptx)
    if torch.cuda.is_available():  # this GPU runs machine code of its major version up to its own minor, or PTX
        major, minor = torch.cuda.get_device_capability()

        def version(arch: str) -> tuple[int, int]:
            digits = re.match(r"\d+", arch.split("_")[1]).group()
            return int(digits[:-1]), int(digits[-1])

        runs = [a for a in machine_code if version(a)[0] == major and version(a)[1] <= minor and a[-1].isdigit()]
        runs += [a for a in ptx_code if version(a) <= (major, minor)]
        assert runs, f"nothing in {sorted(asked)} runs on compute capability {major}.{minor}"
