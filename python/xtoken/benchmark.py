"""The microbenchmark harness: timing, peak memory, CSV rows; the P-KL comparison that ``xtoken bench pkl``
and ``bench/bench_pkl_loss.py`` run, and the GOLD comparison with TRL of ``bench/bench_gold.py``."""

from __future__ import annotations

import csv
import ctypes
import functools
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
from .baselines import (
    coo_transpose, gold_batch, nemo_style_pkl_loss, trl_chunks, trl_gold_loss, trl_uld_loss, xtoken_gold_as_trl,
)  # fmt: skip
from .losses import pkl_loss
from .testing import random_chunks, random_projection

__all__ = ["Measurement", "measure", "append_csv", "run_pkl_benchmark", "run_gold_benchmark"]

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
    CPU this reads the resident set, so call it in a process of its own (see ``peak_in_subprocess``)."""
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


def peak_in_subprocess(probe: str) -> Callable[[], int]:
    """A ``peak()`` for :func:`measure` that runs ``probe``, an expression over this module (as ``b``) that
    returns a peak in bytes, in a fresh process: the CPU high-water mark then sees that one call only."""

    def run() -> int:
        code = f"import sys, xtoken.benchmark as b; print({probe})"
        env = dict(os.environ, PYTHONWARNINGS="ignore", TRL_EXPERIMENTAL_SILENCE="1")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    return run


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
                probe = f"b._pkl_memory_probe({name!r}, {V_s}, {V_t}, {n}, {str(dtype).replace('torch.', '')!r})"
                peak = peak_in_subprocess(probe) if dev.type == "cpu" else None
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


# ------------------------------------------------------------------------------------------ GOLD vs TRL

GOLD_VOCABS = (128_256, 151_936)  # Llama-3.2 and Qwen logit widths
GOLD_PROMPTS = ("Summarize the report below.\n", "Tell the story of the landing.\n")
_GOLD_SENTENCES = (
    "The quarterly report for 2024 showed revenue of $12,345,678, up 17.5% from 2023.",
    "Analysts at Morgan Stanley said the café chain's expansion into Zürich and São Paulo was ahead of schedule.",
    "Costs rose only 3.2%, while the number of stores grew from 418 to 563 in eighteen months.",
    "In 1969, Apollo 11 landed on the Moon; about 600 million people watched the broadcast.",
    "Neil Armstrong stepped onto the surface at 02:56 UTC on 21 July, followed by Buzz Aldrin 19 minutes later.",
    "The lunar module, Eagle, carried 8,200 kg of propellant and returned 21.5 kg of rock and soil.",
    "Meanwhile, Michael Collins orbited alone in Columbia, passing behind the Moon every 2 hours.",
    "Engineers in Houston tracked telemetry from 3 ground stations: Goldstone, Madrid and Honeysuckle Creek.",
)


def gold_texts(student_tokenizer, target_tokens: int = 300) -> list[str]:
    """Two completions of about ``target_tokens`` student tokens each (the sentences in two orders)."""
    texts = []
    for order in (_GOLD_SENTENCES, _GOLD_SENTENCES[::-1]):
        text = ""
        while len(student_tokenizer.encode(text)) < target_tokens:
            text += " ".join(order) + " "
            if len(student_tokenizer.encode(text)) > target_tokens:
                words = text.split(" ")
                while len(student_tokenizer.encode(" ".join(words))) > target_tokens:
                    words.pop()
                text = " ".join(words)
                break
        texts.append(text.strip())
    return texts


@functools.cache
def _gold_vocabularies():
    """The real Llama-3.2 (student) and Qwen (teacher) tokenizers and their raw common pairs (TRL's rule)."""
    from .projection import Projection
    from .tokenizer import load_tokenizer

    student, teacher = load_tokenizer("llama3.2"), load_tokenizer("qwen")
    V_s, V_t = GOLD_VOCABS
    pairs = Projection.build(student, teacher, student_vocab_size=V_s, teacher_vocab_size=V_t).common_pairs("raw")
    return student, teacher, pairs


def _synthetic_gold_case(dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The same shapes without the tokenizers: 2 x 300 student and 2 x 340 teacher rows, ~90% 1:1 chunks, the
    raw pairs' count of random common pairs. Only xtoken can run on it (TRL needs the vocabularies)."""
    from .baselines import GoldBatch
    from .testing import random_pairs

    g = torch.Generator().manual_seed(seed)
    (V_s, V_t), B, T_s, T_t = GOLD_VOCABS, 2, 300, 340
    chunks = random_chunks(B, T_s, T_t, one_to_one=0.9, drop=0.0, generator=g)
    per_sequence = torch.bincount(chunks[:, 0].long() // T_s, minlength=B).double()
    shares = 1.0 / (B * per_sequence[chunks[:, 0].long() // T_s])
    pairs = random_pairs(V_s, V_t, 109_566, generator=g)
    sides = []
    for T, V in ((T_s, V_s), (T_t, V_t)):
        ids = torch.randint(0, V, (B, T), generator=g)
        sides.append((ids, (torch.randn(B, T, V, generator=g) * 2).to(dtype).to(device)))
    (s_ids, zs), (t_ids, zt) = sides
    none = torch.zeros(0)
    batch = GoldBatch(s_ids.to(device), t_ids.to(device), none, none, none, none, zs, zt)
    return batch, chunks.to(device), shares.to(device), pairs.to(device), 0.0


def _gold_case(dtype: torch.dtype, device: torch.device, seed: int = 0):
    student, teacher, pairs = _gold_vocabularies()
    V_s, V_t = GOLD_VOCABS
    batch = gold_batch(student, teacher, list(GOLD_PROMPTS), gold_texts(student), student_vocab_size=V_s,
                       teacher_vocab_size=V_t, dtype=dtype, device=device,
                       generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    chunks, shares = trl_chunks(batch)
    align_ms = (time.perf_counter() - t0) * 1e3
    return batch, chunks.to(device), shares.to(device), pairs.to(device), align_ms


def _gold_impls(batch, chunks, shares, pairs, with_trl: bool) -> dict:
    impls = {"xtoken": lambda z: xtoken_gold_as_trl(z, batch, chunks, shares, pairs)}
    if with_trl:
        student, teacher, _ = _gold_vocabularies()
        uld = trl_uld_loss(student, teacher, device=batch.student_logits.device)
        impls["trl"] = lambda z: trl_gold_loss(uld, batch, z)
    return impls


def _gold_memory_probe(impl: str, dtype: str) -> int:
    """Runs in a fresh process: the peak extra resident memory of one forward+backward of ``impl``."""
    try:
        batch, chunks, shares, pairs, _ = _gold_case(getattr(torch, dtype), torch.device("cpu"))
    except ImportError:
        batch, chunks, shares, pairs, _ = _synthetic_gold_case(getattr(torch, dtype), torch.device("cpu"))
    fn = _fwd_bwd(_gold_impls(batch, chunks, shares, pairs, impl == "trl")[impl], batch.student_logits)
    return peak_extra_bytes(fn, torch.device("cpu"))


def _loss_and_grad(loss_fn, zs: torch.Tensor) -> tuple[float, torch.Tensor]:
    z = zs.detach().requires_grad_()
    loss = loss_fn(z)
    loss.backward()
    return float(loss.detach()), z.grad


def _has_trl() -> bool:
    try:
        import trl.experimental.gold.gold_trainer  # noqa: F401
    except ImportError:
        return False
    return True


def run_gold_benchmark(*, device: str | None = None, csv_path: str | None = None,
                       dtypes: list[torch.dtype] | None = None, repeats: int | None = None,
                       trl_repeats: int | None = None, threads: int | None = None) -> list[Measurement]:
    """Forward+backward time and peak extra memory of GOLD's loss: TRL's ``ULDLoss`` (extended, hybrid,
    bayesian merge, beta = 0) against :func:`xtoken.gold_loss` in the configuration that reproduces it, on the
    same inputs: the real Llama-3.2 -> Qwen pair, batch 2, completions of about 300 student tokens,
    V_s = 128,256, V_t = 151,936. xtoken's chunk table is TRL's groups (built once, outside the timing).
    ``threads`` sets the CPU threads of both (torch's intra-op threads, which xtoken's OpenMP loops follow),
    here and in the memory probes."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = dtypes or [torch.float32]
    on_cpu = dev.type == "cpu"
    repeats = repeats or (5 if on_cpu else 20)
    trl_repeats = trl_repeats or (1 if on_cpu else 5)
    try:
        _gold_vocabularies()
        real = True
    except ImportError as e:
        real = False
        print(f"no real vocabularies ({e}): timing xtoken alone on synthetic chunks of the same shapes")
    with_trl = real and _has_trl()
    if real and not with_trl:
        print("TRL is not installed (pip install trl): timing xtoken alone")
    rows: list[Measurement] = []
    print(f"GOLD forward+backward on {_device_name(dev)}: TRL's ULDLoss vs xtoken.gold_loss (parity configuration)")
    for dtype in dtypes:
        batch, chunks, shares, pairs, align_ms = (_gold_case if real else _synthetic_gold_case)(dtype, dev)
        zs = batch.student_logits
        grad_mb = zs.numel() * zs.element_size() / 2**20
        B, T_s, V_s = zs.shape
        shape = (f"B={B} T_s={T_s} T_t={batch.teacher_logits.shape[1]} K={chunks.shape[0]} C={pairs.shape[0]} "
                 f"V_s={V_s} V_t={batch.teacher_logits.shape[2]}")
        impls = _gold_impls(batch, chunks, shares, pairs, with_trl)
        extra = {"align_ms": f"{align_ms:.1f}", "inputs": "llama3.2->qwen" if real else "synthetic"}
        if "trl" in impls:
            (ours, g_ours), (theirs, g_theirs) = (_loss_and_grad(impls[name], zs) for name in ("xtoken", "trl"))
            extra["rel_loss_vs_trl"] = f"{abs(ours - theirs) / abs(theirs):.1e}"
            extra["rel_grad_vs_trl"] = f"{float((g_ours - g_theirs).norm() / g_theirs.norm()):.1e}"
        results = {}
        for name, fn in impls.items():
            reps, warmup = (trl_repeats, 0 if on_cpu else 1) if name == "trl" else (repeats, 1)
            probe = f"b._gold_memory_probe({name!r}, {str(dtype).replace('torch.', '')!r})"
            peak = peak_in_subprocess(probe) if on_cpu else None
            m = measure("gold_loss", name, _fwd_bwd(fn, zs), device=dev, dtype=dtype, shape=shape, repeats=reps,
                        warmup=warmup, extra=extra, peak=peak)
            m.extra["peak_over_grad"] = f"{m.peak_extra_mb / grad_mb:.2f}"
            results[name] = m
            rows.append(m)
        print(f"{shape}, {dtype}")
        print(f"{'impl':>8} {'median ms':>11} {'p20-p80 ms':>21} {'peak MB':>9} {'x grad':>7}")
        for name, m in results.items():
            print(f"{name:>8} {m.median_ms:>11.2f} {m.p20_ms:>10.2f}-{m.p80_ms:<10.2f} {m.peak_extra_mb:>9.1f} "
                  f"{m.peak_extra_mb / grad_mb:>7.2f}")
        if with_trl:
            ours, theirs = results["xtoken"], results["trl"]
            speedup = theirs.median_ms / ours.median_ms
            memory = theirs.peak_extra_mb / max(ours.peak_extra_mb, 1e-9)
            for m in results.values():
                m.extra.update(speedup_vs_trl=f"{speedup:.1f}", memory_ratio_vs_trl=f"{memory:.2f}")
            print(f"xtoken is {speedup:.1f}x faster than TRL and needs 1/{memory:.1f} of its peak memory; "
                  f"agreement: loss {extra['rel_loss_vs_trl']}, gradient {extra['rel_grad_vs_trl']} relative")
        if real:
            print(f"(xtoken's chunk table from TRL's groups, built once outside the timing: {align_ms:.1f} ms)")
    if csv_path:
        append_csv(csv_path, rows)
        print(f"appended {len(rows)} rows to {csv_path}")
    return rows


# ------------------------------------------------------------------------------------------ fused linear

# Llama-3.2-1B student, Qwen3-4B teacher: hidden sizes and logit widths.
FUSED_LINEAR_SHAPES = {"H_s": 2048, "H_t": 2560, "V_s": 128_256, "V_t": 151_936}


def _fused_linear_case(loss: str, rows: int, dtype: torch.dtype, device: torch.device, shapes: dict, seed: int = 0):
    """Hidden states (unit scale), lm_heads (logits of standard deviation 2), a chunk table (~90% 1:1 for P-KL;
    one 1:1 chunk per row for KD, where the teacher shares the student's vocabulary) and W."""
    g = torch.Generator().manual_seed(seed)
    H_s, H_t, V_s = shapes["H_s"], shapes["H_t"], shapes["V_s"]
    V_t = V_s if loss == "kd" else shapes["V_t"]
    batch = max(1, rows // 512)
    seq = rows // batch
    if loss == "kd":
        t_seq = seq
        first = torch.arange(batch * seq, dtype=torch.int32)
        chunks = torch.stack([first, first + 1, first, first + 1], dim=1)
    else:
        t_seq = seq + seq // 8
        chunks = random_chunks(batch, seq, t_seq, one_to_one=0.9, drop=0.02, generator=g)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(device)

    hs, Ws = rand(batch * seq, H_s), rand(V_s, H_s, std=2 / H_s**0.5)
    ht, Wt = rand(batch * t_seq, H_t), rand(V_t, H_t, std=2 / H_t**0.5)
    mapping = (random_projection(V_s, V_t, generator=g).to(device),) if loss == "pkl" else ()
    return hs, Ws, ht, Wt, chunks.to(device), mapping


def _fused_linear_impls(loss: str, case, with_liger: bool, block_rows: tuple[int, ...] = ()) -> dict:
    """name -> fn(student_hidden, student_weight) -> loss, for one case: ``fused`` with the default block size,
    ``fused_b<n>`` with ``n`` rows per block."""
    from . import fused_linear, losses

    _, _, ht, Wt, chunks, mapping = case
    unfused_loss = getattr(losses, f"{loss}_loss")
    fused_loss = getattr(fused_linear, f"fused_linear_{loss}_loss")

    def unfused(hidden, weight):
        student_logits = torch.nn.functional.linear(hidden, weight)
        with torch.no_grad():
            teacher_logits = torch.nn.functional.linear(ht, Wt)
        return unfused_loss(student_logits, teacher_logits, chunks, *mapping)

    impls = {"unfused": unfused, "fused": lambda hidden, weight: fused_loss(hidden, weight, ht, Wt, chunks, *mapping)}
    for n in block_rows:
        impls[f"fused_b{n}"] = functools.partial(
            lambda hidden, weight, n: fused_loss(hidden, weight, ht, Wt, chunks, *mapping, block_rows=n), n=n)
    if with_liger:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)  # beta = 0: forward KL, as kd_loss
        impls["liger"] = lambda hidden, weight: liger(hidden, weight, ht, Wt)
    return impls


def _linear_fwd_bwd(fn, hidden: torch.Tensor, weight: torch.Tensor, last: dict) -> Callable[[], None]:
    """One forward+backward of ``fn``; keeps the loss and the weight's gradient of the last call in ``last``."""

    def run() -> None:
        last.clear()
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        last.update(loss=float(loss.detach()), grad_weight=w.grad)

    return run


def _fused_linear_process(impl: str, loss: str, rows: int, dtype: str, shapes: dict, repeats: int,
                          block_rows: tuple[int, ...] = ()) -> str:
    """Runs in a fresh process on the CPU: the peak extra resident memory of the first forward+backward of
    ``impl``, the times of ``repeats`` calls, the loss and the norm of the weight's gradient, as JSON."""
    import json

    case = _fused_linear_case(loss, rows, getattr(torch, dtype), torch.device("cpu"), shapes)
    last: dict = {}
    run = _linear_fwd_bwd(_fused_linear_impls(loss, case, False, block_rows)[impl], case[0], case[1], last)
    times = []
    peak = 0
    for i in range(repeats):
        t0 = time.perf_counter()
        if i == 0:
            peak = peak_extra_bytes(run, torch.device("cpu"))
        else:
            run()
        times.append((time.perf_counter() - t0) * 1e3)
    return json.dumps({"times": times, "peak": peak, "loss": last["loss"], "shape": _fused_linear_shape(case),
                       "grad_norm": float(last["grad_weight"].double().norm())})


def _fused_linear_shape(case) -> str:
    hs, Ws, ht, Wt, chunks, _ = case
    return (f"N_s={hs.shape[0]} N_t={ht.shape[0]} K={chunks.shape[0]} H_s={hs.shape[1]} H_t={ht.shape[1]} "
            f"V_s={Ws.shape[0]} V_t={Wt.shape[0]}")


def _in_subprocess(expression: str) -> str:
    code = f"import sys, xtoken.benchmark as b; print({expression})"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip().splitlines()[-1]


def _has_liger() -> bool:
    try:
        import liger_kernel.transformers.fused_linear_jsd  # noqa: F401
    except ImportError:
        return False
    return True


def _measure_fused_linear(loss: str, dtype: torch.dtype, dev: torch.device, rows: int, shapes: dict, repeats: int,
                          warmup: int, block_rows: tuple[int, ...]) -> tuple[dict[str, Measurement], str, float]:
    """Every implementation's Measurement on one case, its shape, and the size of the returned gradients (MB).
    On the CPU each implementation runs in a fresh process (time and resident peak of the same calls); on a
    GPU in this one. ``extra`` holds the agreement with the unfused path: loss and the norm of grad_weight
    (the tests compare whole gradients)."""
    import json

    on_cpu = dev.type == "cpu"
    case = None if on_cpu else _fused_linear_case(loss, rows, dtype, dev, shapes)
    shape = None if on_cpu else _fused_linear_shape(case)
    batch = max(1, rows // 512)
    grads_mb = (batch * (rows // batch) * shapes["H_s"] + shapes["V_s"] * shapes["H_s"]) * dtype.itemsize / 2**20
    names = ["unfused", "fused", *(f"fused_b{n}" for n in block_rows)]
    names += ["liger"] if loss == "kd" and not on_cpu and _has_liger() else []
    results, values = {}, {}
    for name in names:
        if on_cpu:
            expression = (f"b._fused_linear_process({name!r}, {loss!r}, {rows}, {str(dtype)[6:]!r}, {shapes!r}, "
                          f"{repeats}, {block_rows!r})")
            out = json.loads(_in_subprocess(expression))
            times, peak_mb, values[name] = out["times"], out["peak"] / 2**20, (out["loss"], out["grad_norm"])
            shape = out["shape"]
            q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
            m = Measurement(f"fused_linear_{loss}", name, str(dev), str(dtype)[6:], shape, statistics.median(times),
                            q[0], q[3], peak_mb, repeats, {"loss": loss})
        else:
            last: dict = {}
            fn = _fused_linear_impls(loss, case, name == "liger", block_rows)[name]
            m = measure(f"fused_linear_{loss}", name, _linear_fwd_bwd(fn, case[0], case[1], last), device=dev,
                        dtype=dtype, shape=shape, repeats=repeats, warmup=warmup, extra={"loss": loss})
            values[name] = (last["loss"], float(last["grad_weight"].double().norm()))
        # The fused path holds the gradients it returns from its start; the unfused path allocates them after it
        # freed its logits and their gradient (its peak), so its peak holds none of them.
        m.extra["beyond_grads_mb"] = f"{m.peak_extra_mb - (0 if name == 'unfused' else grads_mb):.0f}"
        results[name] = m
    for name, m in results.items():
        (l, g), (l0, g0) = values[name], values["unfused"]
        m.extra["rel_loss_vs_unfused"] = f"{abs(l - l0) / abs(l0):.1e}"
        m.extra["rel_grad_norm_vs_unfused"] = f"{abs(g - g0) / g0:.1e}"
    return results, shape, grads_mb


def run_fused_linear_benchmark(*, device: str | None = None, csv_path: str | None = None,
                               rows: int | None = None, dtypes: list[torch.dtype] | None = None,
                               losses: list[str] | None = None, shapes: dict | None = None,
                               repeats: int | None = None, warmup: int | None = None,
                               block_rows: tuple[int, ...] = ()) -> list[Measurement]:
    """Forward+backward time and peak extra memory of the fused linear losses against the unfused path
    (``F.linear`` logits of both sides into the same loss), on the same inputs: on the CPU N = 2,048 student
    rows, on a GPU N = 32,768 and, for same-vocabulary KD, Liger-Kernel's ``LigerFusedLinearJSD`` (beta = 0,
    forward KL) when it is installed; ``block_rows`` adds fused runs with those block sizes. ``beyond_grads_mb``
    is the peak beyond the gradients of the hidden states and the weight that the call returns: the fused path
    holds them from its start (peak minus their size); the unfused path allocates them only after freeing its
    logits and their gradient, so its peak holds none of them (its whole peak)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = dev.type == "cpu"
    shapes = {**FUSED_LINEAR_SHAPES, **(shapes or {})}
    rows = rows or (2048 if on_cpu else 32_768)
    dtypes = dtypes or ([torch.float32] if on_cpu else [torch.bfloat16])
    losses = losses or (["pkl"] if on_cpu else ["pkl", "kd"])
    repeats = repeats or (1 if on_cpu else 10)
    warmup = 1 if warmup is None else warmup
    results: list[Measurement] = []
    print(f"fused linear losses, forward+backward on {_device_name(dev)}: N={rows}, {shapes}")
    for loss in losses:
        for dtype in dtypes:
            measured, shape, grads_mb = _measure_fused_linear(loss, dtype, dev, rows, shapes, repeats, warmup,
                                                              tuple(block_rows))
            base = measured["unfused"]
            print(f"{loss} {str(dtype)[6:]}: {shape}; returned gradients {grads_mb:.0f} MB")
            print(f"{'impl':>8} {'median ms':>11} {'p20-p80 ms':>23} {'peak MB':>9} {'beyond grads MB':>16} "
                  f"{'time / unfused':>15} {'memory / unfused':>17}")
            for name, m in measured.items():
                beyond, base_beyond = float(m.extra["beyond_grads_mb"]), float(base.extra["beyond_grads_mb"])
                m.extra["time_vs_unfused"] = f"{m.median_ms / base.median_ms:.2f}"
                m.extra["memory_vs_unfused"] = f"{beyond / base_beyond:.3f}"
                print(f"{name:>8} {m.median_ms:>11.1f} {m.p20_ms:>11.1f}-{m.p80_ms:<11.1f} {m.peak_extra_mb:>9.0f} "
                      f"{beyond:>16.0f} {m.median_ms / base.median_ms:>15.2f} {beyond / base_beyond:>17.3f}")
                if name != "unfused":
                    print(f"{'':>8} agreement with unfused: loss {m.extra['rel_loss_vs_unfused']}, "
                          f"|grad_weight| {m.extra['rel_grad_norm_vs_unfused']} relative")
            results += measured.values()
            if csv_path:
                append_csv(csv_path, list(measured.values()))
    print("memory / unfused: peak memory beyond the inputs and the returned gradients, over the unfused path's")
    if csv_path:
        print(f"appended {len(results)} rows to {csv_path}")
    return results
