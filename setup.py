"""Build xtoken's C++/CUDA extension.

The CPU kernels are always built. The CUDA kernels are compiled whenever a CUDA toolkit and a CUDA
build of torch are present, even with no GPU visible; ``XTOKEN_BUILD_CUDA=0`` or ``=1`` forces either
way (``=1`` fails loudly when the toolkit or a CUDA torch is missing).

CUDA architectures: ``TORCH_CUDA_ARCH_LIST`` when set (e.g. ``9.0``, as CI does); otherwise the visible
GPUs' (torch's own detection, with PTX of the newest); with no GPU visible, PORTABLE_CUDA_ARCHS as far as
this nvcc supports them, with PTX of the newest. The library records what it was built for
(``xtoken.ops.cuda_architectures()``).
"""

import glob
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_cuda_home() -> None:
    # torch guesses CUDA_HOME from the nvcc on PATH, which is a wrapper script on some machines;
    # prefer the standard toolkit folder when the user set nothing.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        if os.path.exists("/usr/local/cuda/include/cuda_runtime.h"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


_default_cuda_home()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda() -> bool:
    flag = os.environ.get("XTOKEN_BUILD_CUDA", "auto").strip().lower()
    home = cpp_extension.CUDA_HOME
    has_toolkit = home is not None and all(
        os.path.exists(os.path.join(home, p)) for p in ("bin/nvcc", "include/cuda_runtime.h")
    )
    torch_has_cuda = torch.version.cuda is not None
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        if not (has_toolkit and torch_has_cuda):
            raise RuntimeError(
                "XTOKEN_BUILD_CUDA=1 but no CUDA build is possible: "
                f"CUDA_HOME={cpp_extension.CUDA_HOME!r} (nvcc found: {has_toolkit}), "
                f"torch.version.cuda={torch.version.cuda!r}"
            )
        return True
    return has_toolkit and torch_has_cuda


def _wheel_cuda_includes(cuda_home: str) -> list:
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "include", "cusparse.h"))
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "*", "include", "cusparse.h"))
    return [os.path.dirname(os.path.abspath(found[0]))] if found else []


# With no GPU visible and no TORCH_CUDA_ARCH_LIST: machine code for Ampere (A100; A10, A40, RTX 30), Ada (L40S,
# RTX 40), Hopper (H100, H200) and Blackwell (B200, B300; Thor; RTX 50, RTX PRO), which a GPU of the same major
# version and an equal or higher minor one runs, plus PTX of the newest for later GPUs.
PORTABLE_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "11.0", "12.0")


def _cuda_arch_flags() -> list:
    """The -gencode flags of the CUDA build, passed to nvcc explicitly (torch then adds none of its own), so they
    are exactly what the library holds."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return cpp_extension._get_cuda_arch_flags()
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    archs = [a.replace(".", "") for a in PORTABLE_CUDA_ARCHS if "compute_" + a.replace(".", "") in listed]
    if not archs:
        raise RuntimeError(f"{nvcc} supports none of {PORTABLE_CUDA_ARCHS}; set TORCH_CUDA_ARCH_LIST")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _cuda_targets(arch_flags: list) -> str:
    """The targets of -gencode flags, e.g. 'compute_90,sm_80,sm_90' (machine code sm_XX, PTX compute_XX)."""
    return ",".join(sorted(set(re.findall(r"code=((?:sm|compute)_\w+)", " ".join(arch_flags)))))


def _cpu_arch_flags() -> list:
    """x86-64-v3 (AVX2, FMA, F16C) code for the CPU kernels when the build machine has it, which is where
    `pip install .` runs them. XTOKEN_CPU_ARCH=baseline builds portable x86-64 code instead."""
    choice = os.environ.get("XTOKEN_CPU_ARCH", "auto").strip().lower()
    if choice == "baseline":
        return []
    if choice not in ("auto", "x86-64-v3"):
        raise RuntimeError(f"XTOKEN_CPU_ARCH must be auto, x86-64-v3 or baseline, got {choice!r}")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if choice == "x86-64-v3" or {"avx2", "fma", "f16c", "bmi2"} <= set(flags):
        return ["-march=x86-64-v3"]
    return []


def _extension():
    with_cuda = _want_cuda()
    sources = [os.path.join("csrc", "xtoken.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "common", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math"] + _cpu_arch_flags()
    define_macros = []
    extra_link_args = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "xtoken._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    # torch's CUDA headers include the cuBLAS/cuSPARSE headers; a minimal toolkit lacks them, but the
    # nvidia-* wheels that come with a CUDA build of torch ship them.
    include_dirs += _wheel_cuda_includes(cpp_extension.CUDA_HOME)
    arch_flags = _cuda_arch_flags()
    cxx.append(f"-DXTOKEN_CUDA_ARCHS={_cuda_targets(arch_flags)}")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = opt + arch_flags + [
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    ]
    return cpp_extension.CUDAExtension(
        "xtoken._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros + [("XTOKEN_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=extra_link_args,
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
