"""The microbenchmark harness: timing, peak memory, CSV rows; and the P-KL comparison that
``xtoken bench pkl`` and ``bench/bench_pkl_loss.py`` run."""

from __future__ import annotations

import csv
import ctypes
import gc
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import reference
from .baselines import coo_transpose, nemo_style_pkl_loss
from .losses import pkl_loss
from .testing import random_chunks, random_projection

__all__ = ["Measurement", "measure", "append_csv", "run_pkl_benchmark"]

H200_COPY_BANDWIDTH = 4.3e12  # bytes/s, device-to-device copy measured on this workplace's H200s


@dataclass
class Measurement:
    op: str
    impl: str
    device: str
    dtype: str
    shape: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_mb: float
    repeats: int
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _release_freed_memory_to_os() -> None:
    # glibc raises its mmap threshold after large frees and then keeps freed blocks resident, which
    # would hide allocations from the RSS high-water mark. A fixed threshold keeps every large block an
    # mmap of its own, returned to the OS when freed.
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD = 128 KiB (fixed)
        libc.malloc_trim(0)
    except OSError:
        pass


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory of one call of ``fn`` above what was allocated before it (outputs included). On the
    CPU this reads the resident set, so call it in a process of its own (see ``_pkl_memory_probe``)."""
    gc.collect()
    if device.type == "cpu":
        _release_freed_memory_to_os()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # CPU: the resident set's high-water mark, reset just before the call (Linux clear_refs).
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return (_rss_kb("VmHWM") - before) * 1024


def measure(op: str, impl: str, fn: Callable[[], object], *, device: torch.device, dtype: torch.dtype, shape: str,
            repeats: int, warmup: int = 1, extra: dict | None = None,
            peak: Callable[[], int] | None = None) -> Measurement:
    """Time ``fn`` (median and 20/80 percentiles of ``repeats`` calls after ``warmup``) and its peak extra
    memory (``peak()`` when given, else measured here)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    peak_bytes = peak() if peak is not None else peak_extra_bytes(fn, device)
    return Measurement(op, impl, str(device), str(dtype).replace("torch.", ""), shape, statistics.median(times),
                       q[0], q[3], peak_bytes / 2**20, repeats, dict(extra or {}))


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()}"


def append_csv(path: str, rows: list[Measurement]) -> None:
    """Append rows (with commit, torch version and device name) to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = ["timestamp", "commit", "torch", "device_name", "op", "impl", "device", "dtype", "shape", "median_ms",
              "p20_ms", "p80_ms", "peak_extra_mb", "repeats", "extra"]
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        stamp, commit = time.strftime("%Y-%m-%dT%H:%M:%S"), _commit()
        for row in rows:
            record = asdict(row)
            record["extra"] = ";".join(f"{k}={v}" for k, v in row.extra.items())
            record.update(timestamp=stamp, commit=commit, torch=torch.__version__,
                          device_name=_device_name(torch.device(row.device)))
            writer.writerow(record)


# ------------------------------------------------------------------------------------------ P-KL


def _pkl_case(V_s: int, V_t: int, rows: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = random_projection(V_s, V_t, generator=g)
    batch = max(1, rows // 512)
    seq = rows // batch
    chunks = random_chunks(batch, seq, seq + seq // 8, one_to_one=0.9, drop=0.02, generator=g)
    zs = (torch.randn(batch * seq, V_s, generator=g) * 2).to(dtype).to(device)
    zt = (torch.randn(batch * (seq + seq // 8), V_t, generator=g) * 2).to(dtype).to(device)
    return zs, zt, chunks.to(device), W.to(device)


def _pkl_impls(zs, zt, chunks, W, with_reference: bool) -> dict:
    W_coo = coo_transpose(W, zs.device)
    W.columns(zt.shape[1])
    impls = {
        "xtoken": lambda z: pkl_loss(z, zt, chunks, W),
        "nemo": lambda z: nemo_style_pkl_loss(z, zt, chunks, W_coo),
    }
    if with_reference:
        impls["reference"] = lambda z: reference.pkl_loss(z, zt, chunks.cpu(), W.idx.cpu(), W.val.cpu())
    return impls


def _pkl_memory_probe(impl: str, V_s: int, V_t: int, rows: int, dtype: str) -> int:
    """Runs in a fresh process: the peak extra resident memory of one forward+backward of ``impl``."""
    zs, zt, chunks, W = _pkl_case(V_s, V_t, rows, getattr(torch, dtype), torch.device("cpu"))
    fn = _fwd_bwd(_pkl_impls(zs, zt, chunks, W, impl == "reference")[impl], zs)
    return peak_extra_bytes(fn, torch.device("cpu"))


def _cpu_peak_in_subprocess(impl: str, V_s: int, V_t: int, rows: int, dtype: torch.dtype) -> Callable[[], int]:
    def probe() -> int:
        code = ("import sys, xtoken.benchmark as b; "
                f"print(b._pkl_memory_probe({impl!r}, {V_s}, {V_t}, {rows}, {str(dtype).replace('torch.', '')!r}))")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    return probe


def _fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], zs: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        z = zs.detach().requires_grad_()
        loss = loss_fn(z)
        loss.backward()
        return z.grad

    return run


def run_pkl_benchmark(*, quick: bool = False, device: str | None = None, csv_path: str | None = None,
                      sizes: list[int] | None = None, dtypes: list[torch.dtype] | None = None,
                      with_reference: bool = True, reference_max_rows: int = 256) -> list[Measurement]:
    """Forward+backward time and peak extra memory of P-KL: the xtoken kernel, the float64 reference and a
    NeMo-RL-style baseline (float32 softmax, COO sparse.mm, log, KL), on the same inputs. The reference
    (a Python loop over chunks in float64) runs up to ``reference_max_rows`` rows: at 1,024 rows of the
    full vocabularies it takes over 10 minutes and about 10 GB on 2 cores."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quick:
        V_s, V_t = 32_000, 38_000
        sizes = sizes or [128]
        dtypes = dtypes or [torch.float32]
    else:
        V_s, V_t = 128_256, 151_936
        sizes = sizes or [256, 1024]
        dtypes = dtypes or [torch.float32, torch.bfloat16]
    repeats = 3 if dev.type == "cpu" else 20
    rows: list[Measurement] = []
    print(f"P-KL forward+backward on {_device_name(dev)}, V_s={V_s}, V_t={V_t}, ~90% 1:1 chunks")
    header = f"{'rows':>6} {'dtype':>9} {'impl':>10} {'median ms':>10} {'p20-p80 ms':>15} {'peak MB':>9} " \
             f"{'x grad':>7} {'speedup':>8}"
    print(header)
    for n in sizes:
        for dtype in dtypes:
            zs, zt, chunks, W = _pkl_case(V_s, V_t, n, dtype, dev)
            grad_mb = zs.numel() * zs.element_size() / 2**20
            shape = f"N={zs.shape[0]} K={chunks.shape[0]} V_s={V_s} V_t={V_t}"
            impls = _pkl_impls(zs, zt, chunks, W, with_reference and n <= reference_max_rows)
            ours, theirs = float(impls["xtoken"](zs)), float(impls["nemo"](zs))
            agree = abs(ours - theirs) / max(abs(theirs), 1e-30)
            results = {}
            for name, fn in impls.items():
                reps = 1 if name == "reference" else repeats
                peak = _cpu_peak_in_subprocess(name, V_s, V_t, n, dtype) if dev.type == "cpu" else None
                m = measure("pkl_loss", name, _fwd_bwd(fn, zs), device=dev, dtype=dtype, shape=shape, repeats=reps,
                            warmup=0 if name == "reference" else 1, extra={"agreement_vs_nemo": f"{agree:.1e}"},
                            peak=peak)
                m.extra["peak_over_grad"] = f"{m.peak_extra_mb / grad_mb:.2f}"
                if dev.type == "cuda":
                    minimal = (zs.numel() + zs.numel()) * zs.element_size() + zt.numel() * zt.element_size()
                    m.extra["achieved_TBps"] = f"{minimal / (m.median_ms * 1e-3) / 1e12:.2f}"
                    m.extra["pct_of_4.3TBps"] = f"{100 * minimal / (m.median_ms * 1e-3) / H200_COPY_BANDWIDTH:.0f}"
                results[name] = m
                rows.append(m)
            for name, m in results.items():
                speed = results[name].median_ms / results["xtoken"].median_ms
                print(f"{n:>6} {m.dtype:>9} {name:>10} {m.median_ms:>10.2f} {m.p20_ms:>7.2f}-{m.p80_ms:<7.2f} "
                      f"{m.peak_extra_mb:>9.1f} {m.peak_extra_mb / grad_mb:>7.2f} {speed:>7.1f}x")
            print(f"{'':>6} loss agreement xtoken vs nemo-style: {agree:.1e} relative")
            if csv_path:
                append_csv(csv_path, list(results.values()))
    print("speedup = that implementation's time / xtoken's time; x grad = peak extra memory / gradient size")
    if csv_path:
        print(f"appended {len(rows)} rows to {csv_path}")
    return rows
