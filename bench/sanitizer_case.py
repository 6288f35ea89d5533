"""A small workload for compute-sanitizer (bench/device_check.sh runs it under memcheck, racecheck and initcheck):
every op, forward and backward, every merge (and mixed per-side merges), the P-KL gradient in W's values, float32 and bfloat16, odd sizes, a K = 0 call, and bad inputs with
the content checks skipped (the kernels' guards: NaN, never an out-of-bounds access). Every result is compared
with the CPU kernel's; exits non-zero on a disagreement.

    python bench/sanitizer_case.py                 # on the GPU
    python bench/sanitizer_case.py --device cpu    # the same workload on the CPU (tests/test_harness.py runs it)
    python bench/sanitizer_case.py --quick         # float32 and one merge only (for the slow racecheck)

On the CPU the content checks always run, so there the bad inputs must raise instead.
"""

import argparse
import sys

import torch

import xtoken
from xtoken.ops import skip_content_checks
from xtoken.testing import loss_and_grad, random_chunks, random_pairs, random_projection, random_targets

V_S, V_T, V_KD = 1031, 1213, 1031  # KD shares the student's vocabulary: the teacher logits' first V_KD columns


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def losses(W, pairs, merge):
    """name -> loss_fn(z, zt, chunks, student_targets, teacher_targets)."""
    return {
        "pkl_loss": lambda z, zt, c, ts, tt: xtoken.pkl_loss(
            z, zt, c, W, merge=merge, reduction="none", student_targets=ts, teacher_targets=tt),
        "gold_loss topk=None": lambda z, zt, c, ts, tt: xtoken.gold_loss(
            z, zt, c, pairs.to(z.device), merge=merge, matched="jsd", beta=0.5, uld_topk=None, reduction="none",
            student_targets=ts, teacher_targets=tt),
        "gold_loss topk=100": lambda z, zt, c, ts, tt: xtoken.gold_loss(
            z, zt, c, pairs.to(z.device), merge=merge, uld_topk=100, reduction="none", student_targets=ts,
            teacher_targets=tt),
        "uld_loss topk=400": lambda z, zt, c, ts, tt: xtoken.uld_loss(
            z, zt, c, merge=merge, uld_topk=400, reduction="none", student_targets=ts, teacher_targets=tt),
        "kd_loss": lambda z, zt, c, ts, tt: xtoken.kd_loss(
            z, zt[:, :V_KD], c, merge=merge, reduction="none", student_targets=ts,
            teacher_targets=None if tt is None else tt % V_KD),
    }  # fmt: skip


def check(name: str, ok: bool, detail: str = "") -> int:
    print(f"{name}: {detail} {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


def valid_inputs(device: str, dtypes, merges, W, pairs) -> int:
    failures = 0
    for dtype in dtypes:
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        zs = (torch.randn(2 * 21, V_S) * 3).to(dtype)
        zt = (torch.randn(2 * 25, V_T) * 3).to(dtype)
        chunks = random_chunks(2, 21, 25, one_to_one=0.6, drop=0.15)
        ts, tt = random_targets(42, V_S), random_targets(50, V_T)
        for merge in merges:
            for name, fn in losses(W, pairs, merge).items():
                cpu = loss_and_grad(fn, zs, zt, chunks, ts, tt, device="cpu")
                dev = loss_and_grad(fn, zs, zt, chunks, ts, tt, device=device)
                err = max(rel(dev[0], cpu[0]), rel(dev[1], cpu[1]))
                failures += check(f"{name} {dtype} {merge}", err <= tol, f"relative difference {err:.2e}")
        probs = torch.softmax(zs.float(), -1).to(dtype)
        cpu = loss_and_grad(lambda p: xtoken.project(p, W), probs, device="cpu")
        dev = loss_and_grad(lambda p: xtoken.project(p, W), probs, device=device)
        err = max(rel(dev[0], cpu[0]), rel(dev[1], cpu[1]))
        failures += check(f"project {dtype}", err <= tol, f"relative difference {err:.2e}")
    return failures


def learned_projection(device: str, dtypes, W) -> int:
    """P-KL's gradient in a learned W's values (NeMo's merge), device against CPU."""
    failures = 0
    for dtype in dtypes:
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        zs = (torch.randn(2 * 21, V_S) * 3).to(dtype)
        zt = (torch.randn(2 * 25, V_T) * 3).to(dtype)
        chunks = random_chunks(2, 21, 25, one_to_one=0.6, drop=0.15)
        grads = []
        for dev in ("cpu", device):
            learned = xtoken.nn.LearnedProjection(W).to(dev)
            loss = xtoken.pkl_loss(zs.to(dev), zt.to(dev), chunks.to(dev), learned, merge=xtoken.NEMO_MERGE)
            loss.backward()
            grads.append(learned.theta.grad.cpu())
        err = rel(grads[1], grads[0])
        failures += check(f"pkl_loss W gradient {dtype}", err <= tol, f"relative difference {err:.2e}")
    return failures


def no_chunks(device: str, W, pairs) -> int:
    failures = 0
    empty = torch.zeros(0, 4, dtype=torch.int32)
    zt = torch.randn(8, V_T)
    for name, fn in losses(W, pairs, "first").items():
        loss, grad = loss_and_grad(fn, torch.randn(8, V_S), zt, empty, None, None, device=device)
        failures += check(f"{name} K = 0", loss.shape[0] == 0 and not grad.any())
    return failures


def bad_inputs(device: str, W, pairs) -> int:
    """Bad chunks, W and targets with the content checks skipped. On the GPU the kernels' guards give NaN for
    an invalid chunk (its loss and its gradient rows) and leave the other chunks exact; nothing is read or
    written out of bounds (memcheck says so). On the CPU the checks run anyway: every case must raise."""
    failures = 0
    zs, zt = torch.randn(2 * 21, V_S) * 3, torch.randn(2 * 25, V_T) * 3
    chunks = random_chunks(2, 21, 25, one_to_one=0.6, drop=0.15)
    ts, tt = random_targets(42, V_S), random_targets(50, V_T)
    bad = chunks.clone()
    bad[3, 3] = zt.shape[0] + 7  # teacher rows past the end
    bad[5, 0], bad[5, 1] = bad[5, 1], bad[5, 0]  # empty (reversed) student rows
    keep = torch.ones(chunks.shape[0], dtype=torch.bool)
    keep[[3, 5]] = False
    cols = W.columns(V_T)
    col_ptr = cols.col_ptr.clone()
    col_ptr[7], col_ptr[200] = 2**31 - 1, -5  # column ranges past both ends of the transpose
    bad_W = (W.idx, W.val, col_ptr, cols.col_src, cols.col_val)
    bad_ts = ts.clone()
    bad_ts[chunks[:, 0].long()] = V_S + 11  # the first prefix target of every chunk out of range (bayes)
    cases = {
        "pkl_loss bad chunks": lambda z, c: xtoken.pkl_loss(z, zt.to(z.device), c, W, merge="mean", reduction="none"),
        "gold_loss bad chunks": lambda z, c: xtoken.gold_loss(z, zt.to(z.device), c, pairs.to(z.device),
                                                              uld_topk=100, reduction="none"),
        "kd_loss bad chunks": lambda z, c: xtoken.kd_loss(z, zt[:, :V_KD].to(z.device), c, reduction="none"),
    }
    bayes = {  # the chunks with two or more student rows read a bad target: a NaN loss
        "pkl_loss bad bayes targets": lambda z, c: xtoken.pkl_loss(
            z, zt.to(z.device), c, W, merge="bayes", reduction="none", student_targets=bad_ts.to(z.device),
            teacher_targets=tt.to(z.device)),
        "kd_loss bad bayes targets": lambda z, c: xtoken.kd_loss(
            z, zt[:, :V_KD].to(z.device), c, merge="bayes", reduction="none", student_targets=bad_ts.to(z.device),
            teacher_targets=tt.to(z.device) % V_KD),
    }
    for name, fn in cases.items():
        if device == "cpu":
            failures += raises(name, lambda: loss_and_grad(fn, zs, bad))
            continue
        with skip_content_checks():
            loss, grad = loss_and_grad(fn, zs, bad, device=device)
        expected, expected_grad = loss_and_grad(fn, zs, chunks[keep])
        rows = torch.zeros(zs.shape[0], dtype=torch.bool)
        for s0, s1, _, _ in bad[~keep].tolist():
            rows[max(s0, 0):max(min(s1, zs.shape[0]), 0)] = True
        nan_ok = bool(loss[~keep].isnan().all()) and bool(grad[rows].isnan().all())
        err = max(rel(loss[keep], expected), rel(grad[~rows], expected_grad[~rows]))
        failures += check(name, nan_ok and err <= 1e-5, f"NaN where invalid: {nan_ok}, elsewhere {err:.2e}")
    raw = {
        "project bad col_ptr": lambda: torch.ops.xtoken.project_fwd(torch.rand(4, V_S).to(device),
                                                                     *(t.to(device) for t in bad_W)),
        "pkl_loss bad col_ptr": lambda: torch.ops.xtoken.pkl_loss_fwd(
            zs.to(device), zt.to(device), chunks.to(device), *(t.to(device) for t in bad_W), 1.0, "first", "first", None, None),
    }
    for name, fn in bayes.items():
        if device == "cpu":
            failures += raises(name, lambda: loss_and_grad(fn, zs, chunks))
            continue
        with skip_content_checks():
            loss, grad = loss_and_grad(fn, zs, chunks, device=device)
        multi = chunks[:, 1] - chunks[:, 0] > 1
        rows = torch.zeros(zs.shape[0], dtype=torch.bool)
        for s0, s1, _, _ in chunks[multi].tolist():
            rows[s0:s1] = True
        ok = bool(loss[multi].isnan().all() and loss[~multi].isfinite().all() and grad[~rows].isfinite().all())
        failures += check(name, ok, "NaN exactly where a target is bad:")
    for name, fn in raw.items():
        if device == "cpu":
            failures += raises(name, fn)
            continue
        with skip_content_checks():
            fn()
        torch.cuda.synchronize()
        failures += check(name, True, "ran")
    return failures


def raises(name: str, fn) -> int:
    try:
        fn()
    except RuntimeError as e:
        return check(name, True, f"raised ({str(e).splitlines()[0][:60]}...)")
    return check(name, False, "did not raise")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="float32 and merge='mean' only")
    args = parser.parse_args()
    torch.manual_seed(0)
    W = random_projection(V_S, V_T, exact_fraction=0.6, empty_fraction=0.05)
    pairs = random_pairs(V_S, V_T, 700)
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    merges = ("mean",) if args.quick else ("first", "mean", "bayes", "logmean", xtoken.NEMO_MERGE, ("bayes", "logmean"))
    failures = valid_inputs(args.device, dtypes, merges, W, pairs)
    failures += learned_projection(args.device, dtypes, W)
    failures += no_chunks(args.device, W, pairs)
    failures += bad_inputs(args.device, W, pairs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
