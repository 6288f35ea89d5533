"""Fused linear losses: hidden states and lm_head weights in, the loss out, with no ``[N, V]`` logits.

The chunks are cut into blocks (a chunk never straddles two blocks). For each block the student's and
the teacher's logits are computed for the rows the block's chunks read (``F.linear``, so cuBLAS or
MKL/oneDNN), the loss kernel of the unfused path runs on them through a block-local chunk table, its
gradient goes back into ``grad_hidden`` rows (``dz @ W``) and into ``grad_weight`` (``dz^T h``, accumulated
over blocks), and the block is dropped. Peak extra memory is one block's logits of both sides and its
logit gradient (``block_rows x (2 V_s + V_t)`` values) plus the weight-gradient accumulator.

The gradients are computed during the forward for ``reduction="sum"`` / ``"mean"`` (the incoming gradient
is a scalar that scales them in the backward, as in Liger-Kernel's fused linear losses); for ``"none"``
the backward runs the blocks again with the incoming per-chunk gradients. With ``ce_targets`` the student's
own next-token cross-entropy uses the same logits blocks and returns as a second loss; each loss keeps its
own gradients, so they may be combined with weights known only after the forward (dynamic scaling).

Every loss kernel is one row of :data:`_KERNELS`; its op ``xtoken::fused_linear_<kernel>`` is generated from
the kernel's own schema, so a loss kernel with a new signature needs no change here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import checks
from . import ops as _ops
from .losses import _check_hybrid_options, _check_options, _chunk_table, _pair_table, _projection_args, _targets
from .pieces import PieceTables
from .reference import hybrid_weights, merge_pair

__all__ = [
    "fused_linear_pkl_loss", "fused_linear_gold_loss", "fused_linear_hkl_loss", "fused_linear_uld_loss",
    "fused_linear_kd_loss", "fused_linear_chain_loss", "fused_linear_pkl_chain_loss", "default_block_rows",
    "plan_blocks",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The loss kernels the fused path wraps: one row each.


@dataclass(frozen=True)
class _Kernel:
    """A chunked loss kernel: ``torch.ops.xtoken.<name>_fwd(student_logits, teacher_logits, chunks, *options,
    student_targets, teacher_targets) -> (losses, student_lse, teacher_lse)`` and its ``<name>_bwd``.

    ``columns``: terms per chunk (1: losses ``[K]``; more: ``[K, columns]``, weighted by the caller's
    ``term_weights``). ``teacher_rows_after``: teacher rows the kernel reads after a chunk's ``[t0, t1)``
    (a chunk's student rows are always ``[s0, s1)``). ``option_grad``: the kernel option that may receive a
    gradient (the backward then takes ``bool <option>_grad`` last and returns ``(grad_student, grad_option)``)."""

    name: str
    columns: int = 1
    teacher_rows_after: int = 0
    option_grad: str | None = None


_KERNELS = {k.name: k for k in (
    _Kernel("pkl_loss", option_grad="proj_val"),  # a learned W's values
    _Kernel("hybrid_loss", columns=2),
    _Kernel("kd_loss"),
    _Kernel("chain_loss", teacher_rows_after=1),  # the level after a 1:1 or 1:N chunk reads teacher row t1
)}  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Block plan: which rows each block computes, and its chunk table in block-local rows.


@dataclass
class _Blocks:
    student_rows: torch.Tensor  # int64, the student rows of every block, block after block
    teacher_rows: torch.Tensor  # int64, the teacher rows of every block, block after block
    chunks: torch.Tensor  # int32 [K, 4], each chunk in its block's local rows
    bounds: list[tuple[slice, slice, slice]]  # per block: its student rows, teacher rows and chunks


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[starts[i], starts[i] + lengths[i])`` for every i, concatenated."""
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(int(lengths.sum())) - offsets)


def _check_chunks(chunks: np.ndarray, N_s: int, N_t: int) -> None:
    s0, s1, t0, t1 = chunks.T
    bad = (s0 < 0) | (s1 <= s0) | (s1 > N_s) | (t0 < 0) | (t1 <= t0) | (t1 > N_t)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"chunks: row {k} = {tuple(int(v) for v in chunks[k])} is empty or outside the "
                         f"N_s = {N_s} student and N_t = {N_t} teacher rows")
    overlap = s0[1:] < s1[:-1]
    if overlap.any():
        k = int(np.flatnonzero(overlap)[0]) + 1
        raise ValueError(f"chunks: student rows must be sorted and disjoint; row {k} starts at {int(s0[k])} before "
                         f"row {k - 1} ends at {int(s1[k - 1])}")


def plan_blocks(chunks: np.ndarray, N_s: int, N_t: int, V_s: int, V_t: int, block_rows: int,
                ce_rows: np.ndarray | None = None, teacher_rows_after: int = 0) -> list[tuple[np.ndarray, ...]]:
    """Cut the chunks (int64 ``[K, 4]``, student rows sorted and disjoint) and the CE rows (bool ``[N_s]``)
    into blocks of about ``block_rows`` rows per side (``block_rows * (V_s + V_t)`` logits); a chunk never
    straddles two blocks, so a block may exceed that by one chunk. Returns per block ``(student_rows,
    teacher_rows, first_chunk, local_chunks)``: the sorted rows the block computes, the index of its first
    chunk and its chunks in block-local rows (a teacher row ``t1`` read after a chunk keeps local index
    ``local t1``)."""
    s0, s1, t0, t1 = chunks.T
    t_end = np.minimum(t1 + teacher_rows_after, N_t)
    chunk_rows = _ranges(s0, s1 - s0)
    needed = np.zeros(N_s, dtype=bool)
    needed[chunk_rows] = True
    if ce_rows is not None:
        needed |= ce_rows
    unit = np.arange(N_s)  # the first row of the chunk holding each row (the row itself outside chunks)
    unit[chunk_rows] = np.repeat(s0, s1 - s0)
    cost = needed.astype(np.int64) * V_s
    cost[s0] += (t_end - t0) * V_t
    before = np.cumsum(cost) - cost
    block_of_row = before[unit] // (max(block_rows, 1) * (V_s + V_t))
    rows = np.flatnonzero(needed)
    row_block, chunk_block = block_of_row[rows], block_of_row[s0]
    blocks = []
    for b in np.unique(row_block):
        r0, r1 = np.searchsorted(row_block, b), np.searchsorted(row_block, b, side="right")
        k0, k1 = np.searchsorted(chunk_block, b), np.searchsorted(chunk_block, b, side="right")
        student = rows[r0:r1]
        teacher = np.unique(_ranges(t0[k0:k1], t_end[k0:k1] - t0[k0:k1]))
        ls0 = np.searchsorted(student, s0[k0:k1])
        lt0 = np.searchsorted(teacher, t0[k0:k1])
        local = np.stack([ls0, ls0 + (s1 - s0)[k0:k1], lt0, lt0 + (t1 - t0)[k0:k1]], axis=1)
        blocks.append((student, teacher, int(k0), local))
    return blocks


def _device_blocks(plan: list[tuple[np.ndarray, ...]], device: torch.device) -> _Blocks:
    """The plan on ``device``: three host-to-device copies, then views per block."""
    bounds, s, t = [], 0, 0
    for student, teacher, k0, local in plan:
        bounds.append((slice(s, s + len(student)), slice(t, t + len(teacher)), slice(k0, k0 + len(local))))
        s, t = s + len(student), t + len(teacher)

    def cat(arrays, dtype, shape):
        return torch.from_numpy(np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)).to(device)

    return _Blocks(
        cat([p[0] for p in plan], np.int64, (0,)), cat([p[1] for p in plan], np.int64, (0,)),
        cat([p[3] for p in plan], np.int32, (0, 4)).reshape(-1, 4), bounds,
    )  # fmt: skip


def default_block_rows(rows: int, student_vocab: int, teacher_vocab: int, student_hidden: int) -> int:
    """Rows per block when none is given: a multiple of 32 near ``rows / 10`` (a block holds its rows' logits
    of both sides and their gradient, as the unfused path holds every row's, so a block takes about a tenth
    of the unfused path's memory; the issue's target is at most an eighth), at least 64 (GEMMs need rows to
    be efficient) and at most the power of two that keeps one block's logits and logit gradient,
    ``block_rows x (2 V_s + V_t)`` values, within the size of the student's lm_head (``V_s x H_s``)."""
    cap = max(64, 1 << int(math.log2(max(1, student_vocab * student_hidden // (2 * student_vocab + teacher_vocab)))))
    wanted = 32 * round(rows / 10 / 32)
    return int(min(max(64, wanted), cap))


# ---------------------------------------------------------------------------------------------
# The ops: schema, fake, implementation, autograd.

_HEAD = ("Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_hidden, "
         "Tensor teacher_weight, Tensor? teacher_bias, Tensor chunks")
_TAIL = ("Tensor? student_targets, Tensor? teacher_targets, Tensor? ce_targets, float[] term_weights, str reduction, "
         "int block_rows, ScalarType accum_dtype, bool[] needs_grad, Tensor? grad_losses, Tensor? grad_ce")
_RETURNS = ("(Tensor loss, Tensor ce_loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias, "
            "Tensor grad_option, Tensor ce_grad_hidden, Tensor ce_grad_weight, Tensor ce_grad_bias, "
            "Tensor ce_grad_option)")
_N_HEAD, _N_TAIL = 7, 10
_N_GRADS = 4  # per loss: grad_hidden, grad_weight, grad_bias and the kernel option's (needs_grad has one each)


@dataclass(frozen=True)
class _Op:
    kernel: _Kernel
    options: int  # how many of the kernel's own arguments sit between chunks and the targets
    temperature: int  # the index of "temperature" among them
    option_grad: int | None  # the index of the option that may receive a gradient


_OPS: dict[str, _Op] = {}


def _schema_arguments(schema: torch._C.FunctionSchema) -> list[str]:
    """The declarations ("Type name") of a schema's arguments, as written in it."""
    text = str(schema)
    inside = text[text.index("(") + 1 : text.index(") ->")]
    parts, depth, start = [], 0, 0
    for i, c in enumerate(inside):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(inside[start:i].strip())
            start = i + 1
    return parts + [inside[start:].strip()]


def _define(kernel: _Kernel, lib: torch.library.Library) -> None:
    schema = getattr(torch.ops.xtoken, f"{kernel.name}_fwd").default._schema
    names = [a.name for a in schema.arguments]
    if names[:3] != ["student_logits", "teacher_logits", "chunks"] or names[-2:] != ["student_targets",
                                                                                       "teacher_targets"]:
        raise RuntimeError(f"xtoken::{kernel.name}_fwd: the fused path expects (student_logits, teacher_logits, "
                           f"chunks, ..., student_targets, teacher_targets), got {names}")
    options = _schema_arguments(schema)[3:-2]
    op = f"fused_linear_{kernel.name}"
    lib.define(f"{op}({_HEAD}, {', '.join(options)}, {_TAIL}) -> {_RETURNS}")
    option_grad = None if kernel.option_grad is None else names[3:-2].index(kernel.option_grad)
    _OPS[op] = _Op(kernel, len(options), names[3:-2].index("temperature"), option_grad)
    qualname = f"xtoken::{op}"
    torch.library.impl(qualname, "CompositeExplicitAutograd", lib=lib)(functools.partial(_forward, op))
    torch.library.register_fake(qualname, functools.partial(_fake, op), lib=lib)
    torch.library.register_autograd(qualname, functools.partial(_backward, op),
                                    setup_context=functools.partial(_setup, op), lib=lib)


@dataclass
class _Call:
    """The arguments of one call of a fused op, by name."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: torch.Tensor | None
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    teacher_bias: torch.Tensor | None
    chunks: torch.Tensor
    options: tuple
    student_targets: torch.Tensor | None
    teacher_targets: torch.Tensor | None
    ce_targets: torch.Tensor | None
    term_weights: list[float]
    reduction: str
    block_rows: int
    accum_dtype: torch.dtype
    needs_grad: list[bool]
    grad_losses: torch.Tensor | None
    grad_ce: torch.Tensor | None

    @classmethod
    def parse(cls, op: str, args: tuple) -> "_Call":
        m = _OPS[op].options
        head, options, tail = args[:_N_HEAD], tuple(args[_N_HEAD : _N_HEAD + m]), args[_N_HEAD + m :]
        return cls(*head, options, *tail)

    def args(self) -> tuple:
        return (self.student_hidden, self.student_weight, self.student_bias, self.teacher_hidden,
                self.teacher_weight, self.teacher_bias, self.chunks, *self.options, self.student_targets,
                self.teacher_targets, self.ce_targets, self.term_weights, self.reduction, self.block_rows,
                self.accum_dtype, self.needs_grad, self.grad_losses, self.grad_ce)

    @property
    def gradient_mode(self) -> bool:
        """Called by the backward of ``reduction="none"``: gradients for the given per-chunk/per-row grads."""
        return self.grad_losses is not None

    @property
    def precompute(self) -> bool:
        """A forward that computes the gradients of its (scalar) losses as it goes."""
        return not self.gradient_mode and self.reduction != "none" and any(self.needs_grad)


def _grad_shapes(c: _Call, op: str, distillation: bool = True) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of (grad_hidden, grad_weight, grad_bias, grad_option) for one loss (``distillation``
    False: the CE, which reads no option); (0,) shapes mark 'not computed'."""
    acc = _ops._accumulate_dtype(c.student_hidden.dtype)
    weight_acc = torch.float64 if c.student_weight.dtype == torch.float64 else c.accum_dtype
    index = _OPS[op].option_grad
    option = None if index is None else c.options[index]
    wanted = [c.needs_grad[0], c.needs_grad[1], c.needs_grad[2] and c.student_bias is not None,
              distillation and option is not None and c.needs_grad[3]]
    shapes = [tuple(c.student_hidden.shape), tuple(c.student_weight.shape), (c.student_weight.shape[0],),
              (0,) if option is None else tuple(option.shape)]
    dtypes = (acc, weight_acc, acc, acc if option is None else option.dtype)
    return [(shape if want else (0,), dtype) for want, shape, dtype in zip(wanted, shapes, dtypes)]


def _output_shapes(c: _Call, op: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
    acc = _ops._accumulate_dtype(c.student_hidden.dtype)
    none = c.reduction == "none"
    loss = ((c.chunks.shape[0],) if none else (), acc)
    ce = ((c.student_hidden.shape[0],) if none and c.ce_targets is not None else (), acc)
    empty = [((0,), acc)] * _N_GRADS
    if c.gradient_mode:
        return [loss, ce, *_grad_shapes(c, op), *empty]
    if c.precompute:
        return [loss, ce, *_grad_shapes(c, op), *(_grad_shapes(c, op, False) if c.ce_targets is not None else empty)]
    return [loss, ce, *empty, *empty]


def _fake(op: str, *args):
    # As every xtoken fake kernel: all tensor arguments on one device (a meta tensor mixed with real ones raises).
    names = [a.name for a in getattr(torch.ops.xtoken, op).default._schema.arguments]
    checks.same_device({n: a for n, a in zip(names, args) if isinstance(a, torch.Tensor)}, op)
    c = _Call.parse(op, args)
    return tuple(c.student_hidden.new_empty(shape, dtype=dtype) for shape, dtype in _output_shapes(c, op))


class _Gradients:
    """grad_hidden, grad_weight, grad_bias and grad_option of one loss, accumulated block by block."""

    def __init__(self, c: _Call, op: str, distillation: bool = True) -> None:
        dev = c.student_hidden.device
        self.tensors = [torch.zeros(shape, dtype=dtype, device=dev) for shape, dtype in _grad_shapes(c, op, distillation)]
        self.wanted = [t.numel() > 0 for t in self.tensors]

    def add(self, dz: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> None:
        """A block's logit gradient ``dz [n, V_s]`` for its student ``rows`` (``hidden`` = those rows)."""
        grad_hidden, grad_weight, grad_bias, _ = self.tensors
        if self.wanted[0]:  # each row belongs to one block: written once, no accumulation across blocks
            grad_hidden.index_copy_(0, rows, _row_gemm(dz, weight).to(grad_hidden.dtype))
        if self.wanted[1]:
            _addmm_into(grad_weight, dz.t(), hidden)
        if self.wanted[2]:
            grad_bias.add_(dz.sum(0, dtype=grad_bias.dtype))


@functools.cache
def _native_cpu_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for GEMMs in ``dtype`` (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16)."""

    def has(name: str) -> bool:
        return bool(getattr(torch.cpu, name, lambda: False)())

    if dtype == torch.bfloat16:
        return has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported")
    if dtype == torch.float16:
        return has("_is_amx_fp16_supported")
    return True


def _cpu_slabs(t: torch.Tensor) -> bool:
    """Whether a block's products in ``t``'s dtype are formed on the CPU in float32 slabs of the vocabulary
    (:func:`_vocab_slabs`): the logits in float32 (see :func:`_logits`), and every product in bf16/fp16 on a
    CPU without instructions for them, where ATen's GEMMs in those dtypes are slow (on a 2-core AVX2 AMD EPYC,
    bf16: 10-19 GF/s for the logits and 0.3 GF/s for ``dz @ W``, against 54 GF/s for the same product upcast
    slab by slab). A bf16/fp16 product of two values is exact in float32, and the slabs sum in float32, as a
    GEMM with float32 accumulation does; the logits are rounded to the hidden states' dtype as ``F.linear``
    returns them."""
    if t.device.type != "cpu":
        return False
    return t.dtype == torch.float32 or (t.dtype in (torch.bfloat16, torch.float16) and not _native_cpu_gemm(t.dtype))


# Vocabulary rows per slab of a CPU block product: 2,048 rows of a 2,048-wide head are 16 MB, and a slab of the
# logits (2,048 x block rows) is transposed into the block while still in cache.
_VOCAB_SLAB = 2048


def _vocab_slabs(V: int):
    """The slices ``[v0, v1)`` of ``_VOCAB_SLAB`` vocabulary rows (the last one shorter) that cover ``V``."""
    return (slice(v0, min(V, v0 + _VOCAB_SLAB)) for v0 in range(0, V, _VOCAB_SLAB))


def _row_gemm(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows @ weight`` for a block's logit gradient ``rows [n, V]`` and an lm_head ``weight [V, H]``.

    On the CPU in float32, MKL is slow when the few block rows are the GEMM's outer operand and the wide weight
    the packed one (1.3x to 2x the time per row of a 2,048-row GEMM on a 2-core AMD EPYC), so the product is
    computed transposed, ``(weight^T @ rows^T)^T``, and returned as that view. In bf16/fp16 on a CPU without
    GEMMs for them (:func:`_cpu_slabs`), slab by slab in float32 into a float32 result. Elsewhere (cuBLAS, CPUs
    with bf16 GEMMs) the plain product."""
    if rows.device.type == "cpu" and rows.dtype == torch.float32:
        return torch.mm(weight.t(), rows.t()).t()
    if _cpu_slabs(rows):
        out = rows.new_zeros((rows.shape[0], weight.shape[1]), dtype=torch.float32)
        for v in _vocab_slabs(weight.shape[0]):
            out.addmm_(rows[:, v].float(), weight[v].float())
        return out
    return torch.mm(rows, weight)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(hidden, weight, bias)`` for a block of rows, row-major (the loss kernels read rows).

    On the CPU in float32 the product is formed slab by slab of the vocabulary, ``weight[v0:v1] @ hidden^T``
    (the weight as MKL's fast wide outer operand), each slab transposed into its columns of the block while
    in cache: on a 2-core AMD EPYC at the Llama-3.2-1B head (128,256 x 2,048) that took 634 ms for 128 rows
    against 850 ms for the whole product transposed at once (1,072 against 1,655 ms for 224 rows; medians of
    five, interleaved in one process), and the transposed copy held is a slab's, not the block's. bf16/fp16
    on a CPU without GEMMs for them take the same path in float32 (:func:`_cpu_slabs`), each slab rounded to
    the block's dtype with its bias added. Elsewhere (cuBLAS, CPUs with bf16 GEMMs) ``F.linear``."""
    if not _cpu_slabs(hidden):
        return F.linear(hidden, weight, bias)
    logits = hidden.new_empty((hidden.shape[0], weight.shape[0]))
    rows = hidden.float()
    for v in _vocab_slabs(weight.shape[0]):
        slab = torch.mm(weight[v].float(), rows.t())
        if bias is not None:
            slab.add_(bias[v].float().unsqueeze(1))
        logits[:, v].copy_(slab.t())
    return logits


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for the weight gradient ``acc [V, H]``, ``a = dz^T [V, n]`` and ``b`` the block's hidden
    rows ``[n, H]``, with ``acc`` possibly wider than ``a`` and ``b`` (float32 accumulation of bf16/fp16)."""
    half = acc.dtype in (torch.bfloat16, torch.float16)
    if acc.device.type == "cpu" and (a.dtype != acc.dtype or (half and _cpu_slabs(acc))):
        # No mixed-dtype GEMM on the CPU, and none in bf16/fp16 worth the name without instructions for them
        # (see _cpu_slabs): products in float32 (or acc's wider dtype) slab by slab of the vocabulary, each added
        # into its rows of acc (rounded to acc's dtype there when acc is bf16/fp16): no float32 copy of a block.
        compute = torch.float32 if half else acc.dtype
        rows = b.to(compute)
        for v in _vocab_slabs(acc.shape[0]):
            if half:
                acc[v].add_(torch.mm(a[v].to(compute), rows))
            else:
                acc[v].addmm_(a[v].to(compute), rows)
    elif a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


def _ce_block(logits: torch.Tensor, targets: torch.Tensor, coefficient: torch.Tensor | None, acc: torch.dtype):
    """Cross-entropy of each row of a logits block at its target (0 where the target is negative), and, when
    ``coefficient`` (per row) is given, its gradient ``coefficient * (softmax - onehot)`` in the logits' dtype,
    formed in place of ``logits`` (the caller drops the block's logits after this: no second block-sized
    buffer)."""
    z = logits.to(acc)  # the block itself when it is in acc's dtype
    valid = targets >= 0
    index = targets.clamp_min(0).unsqueeze(1)
    lse = torch.logsumexp(z, dim=1)
    losses = torch.where(valid, lse - z.gather(1, index).squeeze(1), 0)
    if coefficient is None:
        return losses, None
    grad = z.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, index, -valid.to(acc).unsqueeze(1))
    grad.mul_(torch.where(valid, coefficient, 0).unsqueeze(1))
    return losses, (grad if grad.dtype == logits.dtype else logits.copy_(grad))


def _forward(op: str, *args):
    c = _Call.parse(op, args)
    # The public functions apply autocast to the inputs, as F.linear would; inside, every dtype is explicit.
    with torch.autocast(c.student_hidden.device.type, enabled=False):
        return _run_blocks(op, c)


def _run_blocks(op: str, c: _Call):
    spec = _OPS[op]
    kernel = spec.kernel
    fwd = getattr(torch.ops.xtoken, f"{kernel.name}_fwd")
    bwd = getattr(torch.ops.xtoken, f"{kernel.name}_bwd")
    hs_all, W_s, b_s = c.student_hidden, c.student_weight, c.student_bias
    ht_all, W_t, b_t = c.teacher_hidden, c.teacher_weight, c.teacher_bias
    device, acc = hs_all.device, _ops._accumulate_dtype(hs_all.dtype)
    (N_s, _), (N_t, _), V_s, V_t = hs_all.shape, ht_all.shape, W_s.shape[0], W_t.shape[0]
    K = c.chunks.shape[0]

    host_chunks = c.chunks.cpu().numpy().astype(np.int64).reshape(-1, 4)
    _check_chunks(host_chunks, N_s, N_t)
    ce_rows, ce_count = None, 0
    if c.ce_targets is not None:
        host_ce = c.ce_targets.cpu().numpy()
        if (host_ce >= V_s).any():
            raise ValueError(f"ce_targets: expected ids below the student vocabulary V_s = {V_s} (or < 0 to "
                             f"ignore a row), got {int(host_ce.max())}")
        ce_rows = host_ce >= 0
        ce_count = int(ce_rows.sum())
    blocks = _device_blocks(
        plan_blocks(host_chunks, N_s, N_t, V_s, V_t, c.block_rows, ce_rows, kernel.teacher_rows_after), device
    )

    tau = float(c.options[spec.temperature])
    weights = torch.tensor(c.term_weights, dtype=acc, device=device) * tau**2
    with_grads = c.gradient_mode or c.precompute
    separate_ce = c.precompute and c.ce_targets is not None
    grads = _Gradients(c, op) if with_grads else None
    ce_grads = _Gradients(c, op, False) if separate_ce else None
    option_grad = () if spec.option_grad is None else (grads is not None and grads.wanted[3],)
    # d loss / d terms of each chunk (x tau^2 and the term weights below), and d loss / d ce of each row.
    if c.gradient_mode:
        chunk_scale = c.grad_losses.to(acc)
        row_scale = c.grad_ce.to(acc) if c.ce_targets is not None else None
    else:
        chunk_scale = torch.full((K,), 1.0 / max(K, 1) if c.reduction == "mean" else 1.0, dtype=acc, device=device)
        row_scale = torch.full((N_s,), 1.0 / max(ce_count, 1) if c.reduction == "mean" else 1.0, dtype=acc,
                               device=device)

    terms = torch.zeros((K, kernel.columns), dtype=acc, device=device)
    ce_losses = torch.zeros((N_s,), dtype=acc, device=device)
    for rows_s, rows_t, chunk_slice in blocks.bounds:
        student_rows, teacher_rows = blocks.student_rows[rows_s], blocks.teacher_rows[rows_t]
        hidden = hs_all.index_select(0, student_rows)
        zs = _logits(hidden, W_s, b_s)
        dz = dz_ce = None
        if chunk_slice.stop > chunk_slice.start:
            local = blocks.chunks[chunk_slice]
            zt = _logits(ht_all.index_select(0, teacher_rows), W_t, b_t).to(zs.dtype)
            targets = (
                None if c.student_targets is None else c.student_targets.index_select(0, student_rows),
                None if c.teacher_targets is None else c.teacher_targets.index_select(0, teacher_rows),
            )
            block_terms, lse_s, lse_t = fwd(zs, zt, local, *c.options, *targets)
            terms[chunk_slice] = block_terms.reshape(-1, kernel.columns).to(acc)
            if with_grads:
                grad_terms = chunk_scale[chunk_slice].unsqueeze(1) * weights
                grad_terms = grad_terms.reshape(block_terms.shape).to(block_terms.dtype)
                dz = bwd(grad_terms, zs, zt, local, *c.options, *targets, lse_s, lse_t, *option_grad)
                if option_grad:  # (grad_student, grad_option): the option's gradient summed over the blocks
                    dz, block_option_grad = dz
                    if option_grad[0]:
                        grads.tensors[3].add_(block_option_grad)
            del zt
        if c.ce_targets is not None:
            ce_targets = c.ce_targets.index_select(0, student_rows)
            scale = row_scale.index_select(0, student_rows) if with_grads else None
            block_ce, dz_ce = _ce_block(zs, ce_targets, scale, acc)
            ce_losses.index_copy_(0, student_rows, block_ce)
        del zs
        if separate_ce:
            for part, gradients in ((dz, grads), (dz_ce, ce_grads)):
                if part is not None:
                    gradients.add(part, hidden, student_rows, W_s)
        elif with_grads:
            total = dz if dz_ce is None else dz_ce if dz is None else dz.add_(dz_ce)
            if total is not None:
                grads.add(total, hidden, student_rows, W_s)
            del total
        del dz, dz_ce  # before the next block's logits: one block's buffers at a time

    chunk_losses = (terms * weights).sum(1)
    if c.reduction == "none":
        loss, ce = chunk_losses, (ce_losses if c.ce_targets is not None else ce_losses.new_zeros(()))
    else:
        loss, ce = chunk_losses.sum(), ce_losses.sum()
        if c.reduction == "mean":
            loss, ce = loss / max(K, 1), ce / max(ce_count, 1)
    outputs = [loss, ce]
    for gradients in (grads, ce_grads):
        outputs += gradients.tensors if gradients is not None else [hs_all.new_empty((0,), dtype=acc) for _ in range(_N_GRADS)]
    return tuple(outputs)


def _setup(op: str, ctx, inputs, output) -> None:
    c = _Call.parse(op, inputs)
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)  # no zero gradient of a weight's size for the gradient outputs
    ctx.op, ctx.precompute = op, c.precompute
    index = _OPS[op].option_grad
    ctx.dtypes = (c.student_hidden.dtype, c.student_weight.dtype,
                  None if c.student_bias is None else c.student_bias.dtype,
                  None if index is None else c.options[index].dtype)
    ctx.has_ce = c.ce_targets is not None
    if c.precompute:
        # Held by ctx, not saved for backward: the backward drops them, so that autograd can hand the weight-sized
        # gradient to .grad without copying it (it copies a gradient that a saved tensor still references).
        ctx.precomputed = list(output[2:])
    elif c.reduction == "none" and any(c.needs_grad):
        tensors = [(i, a) for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.tensor_positions = [i for i, _ in tensors]
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.save_for_backward(*(a for _, a in tensors))


def _backward(op: str, ctx, grad_loss, grad_ce, *_unused):
    n_inputs = _N_HEAD + _OPS[op].options + _N_TAIL
    if grad_loss is None and grad_ce is None:
        return (None,) * n_inputs
    if grad_loss is None or grad_ce is None:  # an output that the loss does not use
        zero = (grad_ce if grad_loss is None else grad_loss).new_zeros(())
        grad_loss = zero if grad_loss is None else grad_loss
        grad_ce = zero if grad_ce is None else grad_ce
    if ctx.precompute:
        # Eager autograd scales the precomputed gradients in place, so that a weight-sized gradient is not
        # copied once more; traced graphs (torch.compile) get the out-of-place form and plan their memory
        # themselves.
        in_place = type(grad_loss) is torch.Tensor
        if ctx.precomputed is None:
            raise RuntimeError(
                "a fused linear loss with reduction='sum' or 'mean' computes its gradients in the forward and "
                "hands them over in the backward, so it supports one backward per forward (no retain_graph=True "
                "reuse); call the loss again, or use reduction='none'"
            )
        grads, ce_grads = ctx.precomputed[:_N_GRADS], (ctx.precomputed[_N_GRADS:] if ctx.has_ce else None)
        ctx.precomputed = None
        for i, g in enumerate(grads):
            if g.numel() == 0:
                grads[i] = None
                continue
            g = g.mul_(grad_loss.to(g.dtype)) if in_place else g * grad_loss.to(g.dtype)
            if ce_grads is not None and ce_grads[i].numel() > 0:
                scale = grad_ce.to(g.dtype)
                g = g.addcmul_(ce_grads[i], scale) if in_place else g + ce_grads[i] * scale
            grads[i] = g
    elif hasattr(ctx, "tensor_positions"):
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[i] = t
        c = _Call.parse(op, tuple(args))
        c.grad_losses = grad_loss.expand(c.chunks.shape[0])
        c.grad_ce = grad_ce.expand(c.student_hidden.shape[0]) if ctx.has_ce else None
        grads = list(getattr(torch.ops.xtoken, op)(*c.args())[2 : 2 + _N_GRADS])
        grads = [None if g.numel() == 0 else g for g in grads]
    else:
        grads = [None] * _N_GRADS
    grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
    result = [*grads[:3], *([None] * (n_inputs - 3))]
    if _OPS[op].option_grad is not None:
        result[_N_HEAD + _OPS[op].option_grad] = grads[3]
    return tuple(result)


_LIB = torch.library.Library("xtoken", "FRAGMENT")
for _kernel in _KERNELS.values():
    _define(_kernel, _LIB)


# ---------------------------------------------------------------------------------------------
# The public functions.


def _check_weight(weight, name: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}: expected the lm_head weight [V, H], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")


def _linear_side(hidden, weight, bias, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    for value, name in ((hidden, "hidden"), (weight, "weight")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{side}_{name}: expected a tensor, got {type(value).__name__}")
    if not hidden.dtype.is_floating_point or hidden.dim() not in (2, 3):
        raise ValueError(f"{side}_hidden: expected floating [N, H] or [B, T, H] hidden states, got "
                         f"{hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{side}_weight: expected the lm_head weight [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{side}_weight: hidden size {weight.shape[1]} does not match {side}_hidden's "
                         f"{hidden.shape[-1]}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{side}_weight: expected the dtype and device of {side}_hidden ({hidden.dtype}, "
                         f"{hidden.device}), got {weight.dtype}, {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"{side}_bias: expected None or a [{weight.shape[0]}] tensor, got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"{side}_bias: expected the dtype and device of {side}_weight")
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias


def _fused(kernel: str, student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, options, *,
           student_bias, teacher_bias, reduction, student_targets, teacher_targets, ce_targets, block_rows,
           accum_dtype, term_weights=(1.0,)):
    hs, W_s, b_s = _linear_side(student_hidden, student_weight, student_bias, "student")
    ht, W_t, b_t = _linear_side(teacher_hidden, teacher_weight, teacher_bias, "teacher")
    if ht.device != hs.device:
        raise ValueError(f"teacher_hidden: expected the device of student_hidden ({hs.device}), got {ht.device}")
    if block_rows is None:
        block_rows = default_block_rows(hs.shape[0], W_s.shape[0], W_t.shape[0], W_s.shape[1])
    else:
        block_rows = checks.count(block_rows, "block_rows", minimum=1)
    if not (isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point):
        raise ValueError(f"accum_dtype: expected a floating torch.dtype, got {accum_dtype!r}")
    ce = _targets(ce_targets, "ce_targets", hs.device)
    if ce is not None and ce.shape[0] != hs.shape[0]:
        raise ValueError(f"ce_targets: expected one target per student row ({hs.shape[0]}), got {ce.shape[0]}")
    if torch.is_autocast_enabled(hs.device.type):  # the logits in the autocast dtype, as F.linear computes them
        dtype = torch.get_autocast_dtype(hs.device.type)
        hs, W_s, ht, W_t = (t.to(dtype) for t in (hs, W_s, ht, W_t))
        b_s, b_t = (None if b is None else b.to(dtype) for b in (b_s, b_t))
    grad_enabled = torch.is_grad_enabled()
    index = _OPS[f"fused_linear_{kernel}"].option_grad
    option = None if index is None else options[index]
    needs_grad = [grad_enabled and t is not None and t.requires_grad for t in (hs, W_s, b_s, option)]
    op = getattr(torch.ops.xtoken, f"fused_linear_{kernel}")
    out = op(
        hs, W_s, b_s, ht.detach(), W_t.detach(), None if b_t is None else b_t.detach(),
        _chunk_table(chunks, hs.device), *options, _targets(student_targets, "student_targets", hs.device),
        _targets(teacher_targets, "teacher_targets", hs.device), ce, [float(w) for w in term_weights], reduction,
        int(block_rows), accum_dtype, needs_grad, None, None,
    )  # fmt: skip
    return (out[0], out[1]) if ce is not None else out[0]


_ARGS = """
    Args:
        student_hidden: the student's last hidden states ``[N_s, H_s]`` or ``[B, T_s, H_s]`` (rows flattened
            ``b * T_s + j``), float32, bfloat16 or float16. Receives a gradient.
        student_weight: the student's lm_head weight ``[V_s, H_s]`` (V_s the logit width, padding rows
            included), the dtype of ``student_hidden``. Receives a gradient.
        teacher_hidden, teacher_weight: the same for the teacher (``[N_t, H_t]``, ``[V_t, H_t]``); they may
            have another dtype than the student's (the teacher's logits are cast to the student's, as the
            unfused trainer does). No gradient: the teacher side is computed as under ``torch.no_grad``.
        chunks: int32 ``[K, 4]`` rows ``(s0, s1, t0, t1)`` over the flattened rows, student rows sorted and
            disjoint (see :func:`xtoken.pkl_loss`).{mapping}
        student_bias, teacher_bias: the lm_heads' biases ``[V]``, or None.
        temperature, merge, reduction, student_targets, teacher_targets: as for :func:`xtoken.{unfused}`.{options}
        ce_targets: int64 ``[N_s]`` (or ``[B, T_s]``), the student's own next token of each row (negative,
            e.g. -100, where there is none): adds the student's cross-entropy (at temperature 1, reduced by
            ``reduction``: summed, averaged over the rows with a target, or per row) computed on the same
            logits blocks, returned as a second loss.
        block_rows: rows per block of each side (:func:`default_block_rows` when None). A chunk never
            straddles two blocks, so a block may hold one chunk more.
        accum_dtype: the dtype ``grad_weight`` is accumulated in across blocks (float32 by default; the
            weight's dtype saves memory for bf16/fp16 weights at the cost of one rounding per block, as
            Liger-Kernel's default does).

    Returns:
        The loss as :func:`xtoken.{unfused}` returns it for logits ``F.linear(hidden, weight, bias)``
        (the logits blocks are computed in the hidden states' dtype, as the unfused model does); with
        ``ce_targets``, the pair ``(loss, ce_loss)``.
"""


def fused_linear_pkl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chunks: torch.Tensor,
    projection,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    merge="first",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    ce_targets: torch.Tensor | None = None,
    block_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
):
    """:func:`xtoken.pkl_loss` of the logits ``hidden @ weight^T (+ bias)`` of both sides, computed block by
    block without materializing them."""
    _check_options(temperature, merge, reduction)
    _check_weight(teacher_weight, "teacher_weight")
    options = (*_projection_args(projection, teacher_weight.device, teacher_weight.shape[0]), float(temperature),
               *merge_pair(merge))
    return _fused(
        "pkl_loss", student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, options,
        student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction, student_targets=student_targets,
        teacher_targets=teacher_targets, ce_targets=ce_targets, block_rows=block_rows, accum_dtype=accum_dtype,
    )  # fmt: skip


def _fused_hybrid(student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, pairs, *, temperature,
                  merge, matched, beta, uld_topk, weights, **kwargs):
    _check_options(temperature, merge, kwargs["reduction"])
    beta, uld_topk, weights = _check_hybrid_options(matched, beta, uld_topk, weights)
    _check_weight(teacher_weight, "teacher_weight")
    options = (pairs, float(temperature), *merge_pair(merge), matched, beta, uld_topk)
    term_weights = hybrid_weights(weights, pairs.shape[0], teacher_weight.shape[0])
    return _fused("hybrid_loss", student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, options,
                  term_weights=term_weights, **kwargs)


def fused_linear_gold_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chunks: torch.Tensor,
    pairs,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    merge="first",
    matched: str = "kl",
    beta: float = 0.5,
    uld_topk: int | None = 8192,
    weights="adaptive",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    ce_targets: torch.Tensor | None = None,
    block_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
):
    """:func:`xtoken.gold_loss` of the logits ``hidden @ weight^T (+ bias)`` of both sides, computed block by
    block without materializing them."""
    return _fused_hybrid(
        student_hidden, student_weight, teacher_hidden, teacher_weight, chunks,
        _pair_table(pairs, student_weight.device, "exact"), temperature=temperature, merge=merge, matched=matched,
        beta=beta, uld_topk=uld_topk, weights=weights, student_bias=student_bias, teacher_bias=teacher_bias,
        reduction=reduction, student_targets=student_targets, teacher_targets=teacher_targets, ce_targets=ce_targets,
        block_rows=block_rows, accum_dtype=accum_dtype,
    )  # fmt: skip


def fused_linear_hkl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chunks: torch.Tensor,
    pairs,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    merge="first",
    matched: str = "kl",
    beta: float = 0.5,
    uld_topk: int | None = 8192,
    weights="adaptive",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    ce_targets: torch.Tensor | None = None,
    block_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
):
    """:func:`xtoken.hkl_loss` of the logits ``hidden @ weight^T (+ bias)`` of both sides, computed block by
    block without materializing them."""
    return _fused_hybrid(
        student_hidden, student_weight, teacher_hidden, teacher_weight, chunks,
        _pair_table(pairs, student_weight.device, "relaxed"), temperature=temperature, merge=merge,
        matched=matched, beta=beta, uld_topk=uld_topk, weights=weights, student_bias=student_bias,
        teacher_bias=teacher_bias, reduction=reduction, student_targets=student_targets,
        teacher_targets=teacher_targets, ce_targets=ce_targets, block_rows=block_rows, accum_dtype=accum_dtype,
    )  # fmt: skip


def fused_linear_uld_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chunks: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    merge="first",
    uld_topk: int | None = 8192,
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    ce_targets: torch.Tensor | None = None,
    block_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
):
    """:func:`xtoken.uld_loss` of the logits ``hidden @ weight^T (+ bias)`` of both sides, computed block by
    block without materializing them."""
    return _fused_hybrid(
        student_hidden, student_weight, teacher_hidden, teacher_weight, chunks,
        torch.zeros(0, 2, dtype=torch.int32, device=student_weight.device), temperature=temperature, merge=merge,
        matched="kl", beta=0.5, uld_topk=uld_topk, weights=(0.0, 1.0), student_bias=student_bias,
        teacher_bias=teacher_bias, reduction=reduction, student_targets=student_targets,
        teacher_targets=teacher_targets, ce_targets=ce_targets, block_rows=block_rows, accum_dtype=accum_dtype,
    )  # fmt: skip


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chunks: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    merge="first",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    ce_targets: torch.Tensor | None = None,
    block_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
):
    """:func:`xtoken.kd_loss` (same vocabulary) of the logits ``hidden @ weight^T (+ bias)`` of both sides,
    computed block by block without materializing them."""
    _check_options(temperature, merge, reduction)
    return _fused(
        "kd_loss", student_hidden, student_weight, teacher_hidden, teacher_weight, chunks,
        (float(temperature), *merge_pair(merge)), student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction,
        student_targets=student_targets, teacher_targets=teacher_targets, ce_targets=ce_targets,
        block_rows=block_rows, accum_dtype=accum_dtype,
    )  # fmt: skip


def fused_linear_chain_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chunks: torch.Tensor,
    pieces: PieceTables,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    merge="first",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    ce_targets: torch.Tensor | None = None,
    block_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
):
    """:func:`xtoken.chain_loss` of the logits ``hidden @ weight^T (+ bias)`` of both sides, computed block by
    block without materializing them. A block's teacher rows include row ``t1`` after each of its 1:1 and 1:N
    chunks (the chain's level after the chunk reads it)."""
    _check_options(temperature, merge, reduction)
    if merge_pair(merge) != ("first", "first"):
        raise ValueError(f"merge: the chain loss reads every row of a chunk itself; expected 'first', got {merge!r}")
    if not isinstance(pieces, PieceTables):
        raise TypeError(f"pieces: expected an xtoken.PieceTables, got {type(pieces).__name__}")
    if student_targets is None or teacher_targets is None:
        raise ValueError("fused_linear_chain_loss needs student_targets and teacher_targets (the realized pieces it "
                         "conditions on)")
    _check_weight(student_weight, "student_weight")
    _check_weight(teacher_weight, "teacher_weight")
    tables = pieces.to(student_weight.device)
    options = (*tables.kernel_args(student_weight.shape[0], teacher_weight.shape[0]), float(temperature))
    return _fused(
        "chain_loss", student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, options,
        student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction, student_targets=student_targets,
        teacher_targets=teacher_targets, ce_targets=ce_targets, block_rows=block_rows, accum_dtype=accum_dtype,
    )  # fmt: skip


def fused_linear_pkl_chain_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    chunks: torch.Tensor,
    projection,
    pieces: PieceTables,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    merge="first",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    ce_targets: torch.Tensor | None = None,
    block_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
):
    """:func:`xtoken.pkl_chain_loss` (P-KL on the 1:1 chunks, the chain KL on the others) of the logits
    ``hidden @ weight^T (+ bias)`` of both sides, without materializing them: :func:`fused_linear_pkl_loss` on
    the 1:1 chunks (with the CE, when ``ce_targets`` are given) and :func:`fused_linear_chain_loss` on the
    others. The two sets of chunks read disjoint student rows, so the two calls compute each row's logits once
    (but the rows of the chain's chunks that have a CE target, twice). ``merge`` is P-KL's."""
    _check_options(temperature, merge, reduction)
    if not isinstance(student_hidden, torch.Tensor):
        raise TypeError(f"student_hidden: expected a tensor, got {type(student_hidden).__name__}")
    table = _chunk_table(chunks, student_hidden.device)
    one_to_one = (table[:, 1] - table[:, 0] == 1) & (table[:, 3] - table[:, 2] == 1)
    parts = one_to_one.nonzero().squeeze(1), (~one_to_one).nonzero().squeeze(1)
    inner = "none" if reduction == "none" else "sum"
    common = dict(student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature, reduction=inner,
                  student_targets=student_targets, teacher_targets=teacher_targets, block_rows=block_rows,
                  accum_dtype=accum_dtype)
    pkl = fused_linear_pkl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, table[parts[0]],
                                projection, merge=merge, ce_targets=ce_targets, **common)
    pkl, ce = pkl if ce_targets is not None else (pkl, None)
    chain = fused_linear_chain_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, table[parts[1]],
                                    pieces, **common)
    if reduction == "none":
        loss = pkl.new_zeros(table.shape[0]).index_copy(0, parts[0], pkl).index_copy(0, parts[1], chain)
    else:
        loss = pkl + chain
        if reduction == "mean":
            loss = loss / max(table.shape[0], 1)
            if ce is not None:
                ce = ce / (_targets(ce_targets, "ce_targets", ce.device) >= 0).sum().clamp_min(1)
    return loss if ce is None else (loss, ce)


_MAPPINGS = {
    "pkl": ("\n        projection: the :class:`Projection` W with ``V_s`` rows, or a :class:`xtoken.nn.LearnedProjection` (its "
            "\n            values then receive a gradient too, summed over the blocks).", "pkl_loss", ""),
    "gold": ("\n        pairs: the exact common pairs (an int ``[C, 2]`` table or a :class:`Projection`).", "gold_loss",
             "\n        matched, beta, uld_topk, weights: as for :func:`xtoken.gold_loss`."),
    "hkl": ("\n        pairs: the relaxed common pairs (an int ``[C, 2]`` table or a :class:`Projection`).", "hkl_loss",
            "\n        matched, beta, uld_topk, weights: as for :func:`xtoken.hkl_loss`."),
    "uld": ("", "uld_loss", "\n        uld_topk: as for :func:`xtoken.uld_loss`."),
    "kd": ("", "kd_loss", ""),
    "chain": ("\n        pieces: the :class:`xtoken.PieceTables` of the two tokenizers.", "chain_loss", ""),
}
for _name, (_mapping, _unfused, _options) in _MAPPINGS.items():
    _function = globals()[f"fused_linear_{_name}_loss"]
    if _function.__doc__ is not None:  # None under python -OO
        _function.__doc__ += _ARGS.format(mapping=_mapping, unfused=_unfused, options=_options)
