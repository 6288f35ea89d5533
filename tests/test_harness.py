"""The test harness and the device scripts, checked on the CPU so that the first GPU run tests the kernels and not
the harness: the helper every CUDA-vs-CPU comparison uses (a dtype change stands in for the device change), the
compute-sanitizer workload (``bench/sanitizer_case.py --device cpu``) and ``bench/device_check.sh``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import xtoken
from xtoken.testing import loss_and_grad, random_chunks, random_projection

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The environment of a script run: the xtoken this test imported first on the path."""
    package_root = str(Path(xtoken.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}


def test_loss_and_grad_gives_each_run_its_own_leaf():
    W = random_projection(37, 41)
    zs = torch.randn(12, 37, dtype=torch.float64)
    zt = torch.randn(14, 41, dtype=torch.float64)
    chunks = random_chunks(2, 6, 7, one_to_one=0.5, drop=0.0)

    def fn(z, zt, chunks):
        return xtoken.pkl_loss(z, zt.to(z.dtype), chunks, W, merge="mean", reduction="none")

    # As the CUDA tests run it once per device, here once per dtype: float64 first, where logits.to(float64) is
    # the caller's tensor itself (which must not be marked as requiring gradients), then float32, where it is a
    # copy (which must still be a leaf, with a .grad).
    (loss64, grad64), (loss32, grad32) = (
        loss_and_grad(fn, zs, zt, chunks, dtype=dtype) for dtype in (torch.float64, torch.float32)
    )
    assert not zs.requires_grad and zs.grad is None
    assert grad64.dtype == torch.float64 and grad32.dtype == torch.float32 and grad64.shape == zs.shape
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-4, atol=1e-6)
    z = zs.clone().requires_grad_()
    (2.0 * fn(z, zt, chunks).sum()).backward()  # the default incoming gradient is 2
    torch.testing.assert_close(grad64, z.grad)


def test_sanitizer_workload_runs_on_the_cpu():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitizer_case.py"), "--device", "cpu"],
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[-1] == "failures: 0"
    # 2 dtypes x (6 merges x 5 losses + project + the W gradient), 5 K = 0 calls, 7 bad inputs
    assert sum(line.endswith(" ok") for line in lines) == 2 * (6 * 5 + 2) + 5 + 7, run.stdout
    assert sum("raised" in line for line in lines) == 7  # on the CPU every bad input raises


def test_device_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "device_check.sh")], check=True)
