"""A small CUDA workload for compute-sanitizer: every op, forward and backward, every merge, float32 and
bfloat16, odd sizes, a K = 0 call. Exits non-zero if a result disagrees with the CPU kernel."""

import sys

import torch

import xtoken
from xtoken.testing import random_chunks, random_projection, random_targets


def main() -> int:
    torch.manual_seed(0)
    W = random_projection(1031, 1213, exact_fraction=0.6, empty_fraction=0.05)
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        zs = (torch.randn(2 * 21, 1031) * 3).to(dtype)
        zt = (torch.randn(2 * 25, 1213) * 3).to(dtype)
        chunks = random_chunks(2, 21, 25, one_to_one=0.6, drop=0.15)
        ts, tt = random_targets(42, 1031), random_targets(50, 1213)
        for merge in ("first", "mean", "bayes"):
            out = {}
            for device in ("cpu", "cuda"):
                z = zs.to(device).requires_grad_()
                loss = xtoken.pkl_loss(z, zt.to(device), chunks.to(device), W, merge=merge, reduction="none",
                                       student_targets=ts.to(device), teacher_targets=tt.to(device))
                (2 * loss.sum()).backward()
                out[device] = (loss.detach().cpu().double(), z.grad.cpu().double())
            err = max(float((out["cuda"][i] - out["cpu"][i]).norm() / out["cpu"][i].norm()) for i in range(2))
            ok = err <= (1e-5 if dtype == torch.float32 else 1e-2)
            failures += not ok
            print(f"pkl_loss {dtype} {merge}: relative difference cuda vs cpu {err:.2e} {'ok' if ok else 'FAIL'}")
        probs = torch.softmax(zs.float(), -1).to(dtype)
        q_cpu = xtoken.project(probs, W)
        p = probs.cuda().requires_grad_()
        q = xtoken.project(p, W)
        q.sum().backward()
        err = float((q.cpu().double() - q_cpu.double()).norm() / q_cpu.double().norm())
        failures += err > 1e-2
        print(f"project {dtype}: relative difference {err:.2e}")
    z = torch.randn(8, 1031, device="cuda", requires_grad=True)
    empty = torch.zeros(0, 4, dtype=torch.int32, device="cuda")
    loss = xtoken.pkl_loss(z, torch.randn(8, 1213, device="cuda"), empty, W)
    loss.backward()
    failures += bool(z.grad.abs().sum() != 0) or float(loss) != 0.0
    torch.cuda.synchronize()
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
