"""A small CUDA workload for compute-sanitizer: every op, forward and backward, every merge (and mixed
per-side merges), the P-KL gradient in W's values, float32 and bfloat16, odd sizes, a K = 0 call. Exits
non-zero if a result disagrees with the CPU kernel."""

import sys

import torch

import xtoken
from xtoken.testing import random_chunks, random_pairs, random_projection, random_targets


def cuda_vs_cpu(loss_fn, zs, *tensors) -> float:
    """Relative difference (max over the loss and the gradient) of loss_fn(z, *tensors) on the two devices."""
    out = {}
    for device in ("cpu", "cuda"):
        z = zs.to(device).requires_grad_()
        loss = loss_fn(z, *(t.to(device) for t in tensors))
        (2 * loss.sum()).backward()
        out[device] = (loss.detach().cpu().double(), z.grad.cpu().double())
    return max(float((out["cuda"][i] - out["cpu"][i]).norm() / out["cpu"][i].norm().clamp_min(1e-30)) for i in range(2))


def main() -> int:
    torch.manual_seed(0)
    W = random_projection(1031, 1213, exact_fraction=0.6, empty_fraction=0.05)
    pairs = random_pairs(1031, 1213, 700)
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        zs = (torch.randn(2 * 21, 1031) * 3).to(dtype)
        zt = (torch.randn(2 * 25, 1213) * 3).to(dtype)
        chunks = random_chunks(2, 21, 25, one_to_one=0.6, drop=0.15)
        ts, tt = random_targets(42, 1031), random_targets(50, 1213)
        for merge in ("first", "mean", "bayes", "logmean", xtoken.NEMO_MERGE, ("bayes", "logmean")):
            losses = {
                "pkl_loss": lambda z, zt, c, ts, tt, p: xtoken.pkl_loss(
                    z, zt, c, W, merge=merge, reduction="none", student_targets=ts, teacher_targets=tt),
                "gold_loss topk=None": lambda z, zt, c, ts, tt, p: xtoken.gold_loss(
                    z, zt, c, p, merge=merge, matched="jsd", beta=0.5, uld_topk=None, reduction="none",
                    student_targets=ts, teacher_targets=tt),
                "gold_loss topk=100": lambda z, zt, c, ts, tt, p: xtoken.gold_loss(
                    z, zt, c, p, merge=merge, uld_topk=100, reduction="none", student_targets=ts, teacher_targets=tt),
                "uld_loss topk=400": lambda z, zt, c, ts, tt, p: xtoken.uld_loss(
                    z, zt, c, merge=merge, uld_topk=400, reduction="none", student_targets=ts, teacher_targets=tt),
                "kd_loss": lambda z, zt, c, ts, tt, p: xtoken.kd_loss(
                    z, zt[:, :1031], c, merge=merge, reduction="none", student_targets=ts, teacher_targets=tt),
            }  # fmt: skip
            for name, fn in losses.items():
                err = cuda_vs_cpu(fn, zs, zt, chunks, ts, tt, pairs)
                ok = err <= tol
                failures += not ok
                print(f"{name} {dtype} {merge}: relative difference cuda vs cpu {err:.2e} {'ok' if ok else 'FAIL'}")
        grads = []
        for device in ("cpu", "cuda"):  # a learned W: the gradient in its values
            learned = xtoken.nn.LearnedProjection(W).to(device)
            loss = xtoken.pkl_loss(zs.to(device), zt.to(device), chunks.to(device), learned, merge=xtoken.NEMO_MERGE)
            loss.backward()
            grads.append(learned.theta.grad.cpu().double())
        err = float((grads[1] - grads[0]).norm() / grads[0].norm())
        failures += err > tol
        print(f"pkl_loss W gradient {dtype}: relative difference cuda vs cpu {err:.2e}")
        probs = torch.softmax(zs.float(), -1).to(dtype)
        q_cpu = xtoken.project(probs, W)
        p = probs.cuda().requires_grad_()
        q = xtoken.project(p, W)
        q.sum().backward()
        err = float((q.cpu().double() - q_cpu.double()).norm() / q_cpu.double().norm())
        failures += err > 1e-2
        print(f"project {dtype}: relative difference {err:.2e}")
    empty = torch.zeros(0, 4, dtype=torch.int32, device="cuda")
    zt = torch.randn(8, 1213, device="cuda")
    for name, fn in (("pkl_loss", lambda z: xtoken.pkl_loss(z, zt, empty, W)),
                     ("gold_loss", lambda z: xtoken.gold_loss(z, zt, empty, pairs.cuda())),
                     ("kd_loss", lambda z: xtoken.kd_loss(z, zt[:, :1031], empty))):
        z = torch.randn(8, 1031, device="cuda", requires_grad=True)
        loss = fn(z)
        loss.backward()
        bad = bool(z.grad.abs().sum() != 0) or float(loss) != 0.0
        failures += bad
        print(f"{name} K = 0: {'FAIL' if bad else 'ok'}")
    torch.cuda.synchronize()
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
