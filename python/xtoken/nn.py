"""``nn.Module`` forms of the losses (hold the projection and the options; move with ``.to()``).

A module checks the contents of its inputs (chunk ranges, W, pairs, targets) on its first call on each
device; later calls skip those checks, which on CUDA saves one host sync per op call, so a training step
runs without blocking the host (SPEC.md §6). The kernels still guard every index: a bad chunk in a later
batch gives a NaN loss instead of an error. ``xtoken.ops.set_content_check_mode("always")`` (or
``XTOKEN_CONTENT_CHECKS=always``) checks every call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import fused_linear, losses, ops
from .pieces import PieceTables
from .projection import Projection

__all__ = [
    "PKLLoss", "GOLDLoss", "HKLLoss", "ULDLoss", "KDLoss", "ChainLoss", "XTokenLoss", "LearnedProjection",
    "FusedLinearPKLLoss", "FusedLinearGOLDLoss", "FusedLinearHKLLoss", "FusedLinearULDLoss", "FusedLinearKDLoss",
    "FusedLinearChainLoss",
]  # fmt: skip


class LearnedProjection(nn.Module):
    """W with trainable values on a fixed support: X-Token's learned W (the paper's best P-KL trains W's values
    jointly with the student at lr 1e-2, the sparsity fixed). Each row's weights are a softmax of logits
    ``theta`` over the row's present slots, so every row stays stochastic whatever the updates: a row with one
    slot keeps weight 1 (and gets no gradient), an empty row stays empty.

    Pass it to :func:`xtoken.pkl_loss` or :class:`PKLLoss` in place of the :class:`Projection`: the P-KL kernels
    then also return the gradient in W's values (on the CPU and CUDA, deterministically), which autograd takes
    on to ``theta``. Only P-KL trains W; H-KL and GOLD read only W's argmax and pairs.

    Args:
        projection: the W to start from (its support, values, metadata and vocabularies). ``theta`` starts at
            ``log(val)`` on the present slots, so the module starts as exactly that W.

    Example::

        learned = xtoken.nn.LearnedProjection(W).to("cuda")
        optimizer = torch.optim.AdamW([*student.parameters()], lr=1e-4)
        optimizer.add_param_group({"params": learned.parameters(), "lr": 1e-2, "weight_decay": 0.0})
        loss = xtoken.pkl_loss(student_logits, teacher_logits, chunks, learned)
        ...
        learned.save("w_learned.safetensors")  # the same format as Projection.save
    """

    # Floor of the weights whose log initializes theta (a present slot of weight 0 starts at exp(-69)).
    _MIN_WEIGHT = 1e-30

    def __init__(self, projection: Projection) -> None:
        super().__init__()
        if not isinstance(projection, Projection):
            raise TypeError(f"projection: expected an xtoken.Projection, got {type(projection).__name__}")
        self._start = projection.to("cpu")
        self.theta = nn.Parameter(self._logits(self._start.val))

    def _logits(self, val: torch.Tensor) -> torch.Tensor:
        """``theta`` whose row softmax is ``val`` (rows summing to 1): ``log(val)`` on the present slots, 0 (unused)
        on the empty ones."""
        present = self._start.idx.to(val.device) >= 0
        return torch.where(present, val.clamp_min(self._MIN_WEIGHT).log(), val.new_zeros(()))

    @property
    def device(self) -> torch.device:
        return self.theta.device

    @property
    def student_vocab_size(self) -> int:
        return self._start.student_vocab_size

    @property
    def teacher_vocab_size(self) -> int:
        return self._start.teacher_vocab_size

    def _support(self) -> Projection:
        """The starting W on this module's device (its support and transpose, cached per device)."""
        return self._start.to(self.device)

    def weights(self) -> torch.Tensor:
        """The current values of W, ``[V_s, P]``: per row, a softmax of ``theta`` over the present slots (0 at
        empty slots; an empty row stays 0). Differentiable in ``theta``."""
        present = self._support().idx >= 0
        empty_row = ~present.any(dim=1, keepdim=True)
        # Empty rows get finite logits (then a zero mask), so that no NaN reaches theta's gradient.
        logits = torch.where(present, self.theta, float("-inf"))
        logits = torch.where(empty_row, torch.zeros_like(logits), logits)
        return torch.softmax(logits, dim=1) * present

    def forward(self) -> torch.Tensor:
        return self.weights()

    def kernel_args(self, teacher_width: int) -> tuple[torch.Tensor, ...]:
        """(idx, val, col_ptr, col_src, col_val) for the xtoken ops, with ``val`` the current (differentiable)
        values and ``col_val`` gathered from them through the transpose's slot permutation on every call, so
        that both forms of W always agree."""
        support = self._support()
        cols = support.columns(teacher_width)
        val = self.weights()
        return (support.idx, val, cols.col_ptr, cols.col_src, val.detach().reshape(-1)[cols.col_slot])

    def projection(self) -> Projection:
        """The current W as a float32 :class:`Projection` on the CPU, with the metadata and vocabularies of the W it
        started from (so its vocabulary hashes still check the tokenizers)."""
        start = self._start
        return Projection(start.idx, self.weights().detach().float().cpu(),
                          teacher_vocab_size=start.teacher_vocab_size, metadata=start.metadata,
                          vocabularies=start.vocabularies)

    def save(self, path) -> None:
        """Save the current W as :meth:`Projection.save` does (same format, hashes and metadata): a file that
        :meth:`Projection.load` and :meth:`load_values` read."""
        self.projection().save(path)

    @torch.no_grad()
    def load_values(self, projection: Projection) -> None:
        """Continue from the values of ``projection`` (e.g. a W saved by :meth:`save`), which must have this
        module's support: ``theta = log(val)`` on the present slots."""
        if not isinstance(projection, Projection):
            raise TypeError(f"projection: expected an xtoken.Projection, got {type(projection).__name__}")
        if not torch.equal(projection.idx.cpu(), self._start.idx):
            raise ValueError("projection: its support (idx) differs from this LearnedProjection's; a learned W keeps "
                             "the support it started from")
        self.theta.copy_(self._logits(projection.val.to(self.theta.device, self.theta.dtype)))

    def extra_repr(self) -> str:
        return f"V_s={self.student_vocab_size}, V_t={self.teacher_vocab_size}, top_k={self._start.top_k}"


class _ChecksOnce(nn.Module):
    """A loss module whose content checks run on its first call per device only (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._checked_devices: set[torch.device] = set()

    def _call_loss(self, loss: Callable[..., torch.Tensor], student_logits: torch.Tensor, *args, **kwargs):
        if torch.compiler.is_compiling():
            return loss(student_logits, *args, **kwargs)
        device = student_logits.device
        with ops.skip_content_checks(device in self._checked_devices):
            result = loss(student_logits, *args, **kwargs)
        self._checked_devices.add(device)
        return result


class PKLLoss(_ChecksOnce):
    """Module form of :func:`xtoken.pkl_loss`. W is registered as buffers, so ``.to(device)`` moves it
    and ``state_dict()`` saves it; a :class:`LearnedProjection` is held as a submodule instead, so its
    ``theta`` are parameters of the loss module. Content checks on the first call per device only (see the
    module docstring).

    Example::

        loss_fn = xtoken.nn.PKLLoss(projection, temperature=1.0).to("cuda")
        loss = loss_fn(student_logits, teacher_logits, chunks)
    """

    def __init__(self, projection, *, temperature: float = 1.0, merge="first", reduction: str = "mean") -> None:
        super().__init__()
        if not isinstance(projection, (Projection, LearnedProjection)):
            raise TypeError(f"projection: expected an xtoken.Projection or LearnedProjection, got "
                            f"{type(projection).__name__}")
        losses._check_options(temperature, merge, reduction)
        self.teacher_vocab_size = projection.teacher_vocab_size
        self.temperature = temperature
        self.merge = merge
        self.reduction = reduction
        if isinstance(projection, LearnedProjection):
            self.learned = projection
            return
        self.learned = None
        # The module's own copies: loading a state dict into it never edits the caller's W.
        self.register_buffer("proj_idx", projection.idx.clone())
        self.register_buffer("proj_val", projection.val.clone())
        self._projection = projection
        self._source = self._buffer_state()

    def _buffer_state(self) -> tuple:
        return (self.proj_idx, self.proj_val, self.proj_idx._version, self.proj_val._version)

    def projection(self):
        """The module's W on the device of its buffers (or its :class:`LearnedProjection`), rebuilt (and so
        validated) whenever the buffers were replaced (``.to()``) or edited in place (``load_state_dict``)."""
        if self.learned is not None:
            return self.learned
        state = self._buffer_state()
        if any(a is not b for a, b in zip(state[:2], self._source[:2])) or state[2:] != self._source[2:]:
            self._projection = Projection(self.proj_idx, self.proj_val, teacher_vocab_size=self.teacher_vocab_size,
                                          metadata=self._projection.metadata,
                                          vocabularies=self._projection.vocabularies)
            self._source = state
        return self._projection

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Validate W before it replaces the buffers: a W whose rows do not sum to 1 is refused, not trained on.
        idx, val = state_dict.get(prefix + "proj_idx"), state_dict.get(prefix + "proj_val")
        if idx is not None and val is not None:
            try:
                Projection(idx, val, teacher_vocab_size=self.teacher_vocab_size)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{prefix}proj_idx/{prefix}proj_val: the state dict holds an invalid W: {e}") from None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        chunks: torch.Tensor,
        student_targets: torch.Tensor | None = None,
        teacher_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._call_loss(
            losses.pkl_loss, student_logits, teacher_logits, chunks, self.projection(), temperature=self.temperature,
            merge=self.merge, reduction=self.reduction, student_targets=student_targets,
            teacher_targets=teacher_targets,
        )  # fmt: skip

    def extra_repr(self) -> str:
        V_s = self.learned.student_vocab_size if self.learned is not None else self.proj_idx.shape[0]
        return (f"V_s={V_s}, V_t={self.teacher_vocab_size}, temperature={self.temperature}, "
                f"merge={self.merge!r}, reduction={self.reduction!r}")


class _HybridLoss(_ChecksOnce):
    """The hybrid loss with its common pairs as a buffer (see :func:`xtoken.gold_loss` for the options)."""

    _pair_kind = "exact"

    def __init__(self, pairs, *, temperature: float = 1.0, merge="first", matched: str = "kl",
                 beta: float = 0.5, uld_topk: int | None = 8192, weights="adaptive", reduction: str = "mean") -> None:
        super().__init__()
        losses._check_options(temperature, merge, reduction)
        beta, uld_topk, weights = losses._check_hybrid_options(matched, beta, uld_topk, weights)
        self.register_buffer("pairs", losses._pair_table(pairs, torch.device("cpu"), self._pair_kind).clone())
        self.temperature = temperature
        self.merge = merge
        self.matched = matched
        self.beta = beta
        self.uld_topk = uld_topk
        self.weights = weights
        self.reduction = reduction

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        chunks: torch.Tensor,
        student_targets: torch.Tensor | None = None,
        teacher_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._call_loss(
            losses._hybrid_loss, student_logits, teacher_logits, chunks, self.pairs, temperature=self.temperature,
            merge=self.merge, matched=self.matched, beta=self.beta, uld_topk=self.uld_topk, weights=self.weights,
            reduction=self.reduction, student_targets=student_targets, teacher_targets=teacher_targets,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (f"pairs={self.pairs.shape[0]}, temperature={self.temperature}, merge={self.merge!r}, "
                f"matched={self.matched!r}, beta={self.beta}, uld_topk={self.uld_topk}, weights={self.weights!r}, "
                f"reduction={self.reduction!r}")


class GOLDLoss(_HybridLoss):
    """Module form of :func:`xtoken.gold_loss`. ``pairs``: an int ``[C, 2]`` table or a :class:`Projection`
    (its exact pairs), kept as a buffer.

    Example::

        loss_fn = xtoken.nn.GOLDLoss(projection, matched="jsd", beta=0.0).to("cuda")
        loss = loss_fn(student_logits, teacher_logits, chunks)
    """

    _pair_kind = "exact"


class HKLLoss(_HybridLoss):
    """Module form of :func:`xtoken.hkl_loss`. ``pairs``: an int ``[C, 2]`` table or a :class:`Projection`
    (its relaxed pairs), kept as a buffer."""

    _pair_kind = "relaxed"


class ULDLoss(_HybridLoss):
    """Module form of :func:`xtoken.uld_loss` (the hybrid loss with no pairs)."""

    def __init__(self, *, temperature: float = 1.0, merge="first", uld_topk: int | None = 8192,
                 reduction: str = "mean") -> None:
        super().__init__(torch.zeros(0, 2, dtype=torch.int32), temperature=temperature, merge=merge,
                         uld_topk=uld_topk, weights=(0.0, 1.0), reduction=reduction)


class KDLoss(_ChecksOnce):
    """Module form of :func:`xtoken.kd_loss` (same-vocabulary KD)."""

    def __init__(self, *, temperature: float = 1.0, merge="first", reduction: str = "mean") -> None:
        super().__init__()
        losses._check_options(temperature, merge, reduction)
        self.temperature = temperature
        self.merge = merge
        self.reduction = reduction

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        chunks: torch.Tensor,
        student_targets: torch.Tensor | None = None,
        teacher_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._call_loss(losses.kd_loss, student_logits, teacher_logits, chunks, temperature=self.temperature,
                               merge=self.merge, reduction=self.reduction, student_targets=student_targets,
                               teacher_targets=teacher_targets)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, merge={self.merge!r}, reduction={self.reduction!r}"


class ChainLoss(_ChecksOnce):
    """Module form of :func:`xtoken.chain_loss`. The piece tables are buffers, so ``.to(device)`` moves them and
    ``state_dict()`` saves them; the targets are required. Content checks on the first call per device only (see
    the module docstring).

    Example::

        loss_fn = xtoken.nn.ChainLoss(xtoken.PieceTables.build(llama_tok, qwen_tok)).to("cuda")
        loss = loss_fn(student_logits, teacher_logits, chunks, student_targets, teacher_targets)
    """

    def __init__(self, pieces: PieceTables, *, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if not isinstance(pieces, PieceTables):
            raise TypeError(f"pieces: expected an xtoken.PieceTables, got {type(pieces).__name__}")
        losses._check_options(temperature, "first", reduction)
        self.register_buffer("student_pieces", pieces.student)
        self.register_buffer("teacher_pieces", pieces.teacher)
        self.temperature = temperature
        self.reduction = reduction
        self._pieces = pieces

    def pieces(self) -> PieceTables:
        """The module's piece tables on the device of its buffers."""
        if self._pieces.student is not self.student_pieces or self._pieces.teacher is not self.teacher_pieces:
            self._pieces = PieceTables(self.student_pieces, self.teacher_pieces)
        return self._pieces

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        chunks: torch.Tensor,
        student_targets: torch.Tensor | None = None,
        teacher_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._call_loss(losses.chain_loss, student_logits, teacher_logits, chunks, self.pieces(),
                               temperature=self.temperature, reduction=self.reduction,
                               student_targets=student_targets, teacher_targets=teacher_targets)

    def extra_repr(self) -> str:
        mirror = self.teacher_pieces is not None
        return (f"V_s={self.student_pieces.shape[0]}, L={self.student_pieces.shape[1]}, mirror={mirror}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")


XTOKEN_MODES = ("auto", "pkl", "hkl")


class XTokenLoss(nn.Module):
    """X-Token's loss for a projection W: P-KL (``mode="pkl"``), H-KL over W's relaxed pairs (``"hkl"``), or
    ``"auto"``: the recommendation of W's coverage audit (:meth:`Projection.audit`; P-KL when the student's
    2- and 3-digit numerals are mostly outside the exact pairs). ``self.mode`` holds the choice made.

    Args:
        projection: the :class:`Projection` W (for ``"auto"``, one built from tokenizers or loaded after).
        mode: ``"auto"``, ``"pkl"`` or ``"hkl"``.
        temperature, merge, reduction: as for :func:`xtoken.pkl_loss`.
        matched, beta, uld_topk, weights: the H-KL options (see :func:`xtoken.hkl_loss`); unused by P-KL.
    """

    def __init__(self, projection: Projection, mode: str = "auto", *, temperature: float = 1.0,
                 merge="first", reduction: str = "mean", matched: str = "kl", beta: float = 0.5,
                 uld_topk: int | None = 8192, weights="adaptive") -> None:
        super().__init__()
        if not isinstance(projection, Projection):
            raise TypeError(f"projection: expected an xtoken.Projection, got {type(projection).__name__}")
        if mode not in XTOKEN_MODES:
            raise ValueError(f"mode: expected one of {XTOKEN_MODES}, got {mode!r}")
        if mode == "auto":
            try:
                mode = projection.audit().recommendation
            except ValueError as e:
                raise ValueError(f"mode='auto' follows the coverage audit, which failed: {e}. Pass mode='pkl' or "
                                 "mode='hkl'") from None
        self.mode = mode
        if mode == "pkl":
            self.loss = PKLLoss(projection, temperature=temperature, merge=merge, reduction=reduction)
        else:
            self.loss = HKLLoss(projection, temperature=temperature, merge=merge, matched=matched, beta=beta,
                                uld_topk=uld_topk, weights=weights, reduction=reduction)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        chunks: torch.Tensor,
        student_targets: torch.Tensor | None = None,
        teacher_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.loss(student_logits, teacher_logits, chunks, student_targets, teacher_targets)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


# ---------------------------------------------------------------------------------------------
# Fused linear forms: hidden states and lm_head weights in, no [N, V] logits (xtoken.fused_linear).


class _FusedLinear:
    """What every fused linear module adds to its loss module: ``block_rows``, ``accum_dtype`` and the
    arguments of the fused functions that the loss module does not hold."""

    def _fused_setup(self, block_rows: int | None, accum_dtype: torch.dtype) -> None:
        self.block_rows = block_rows
        self.accum_dtype = accum_dtype

    def _fused_kwargs(self, student_targets, teacher_targets, student_bias, teacher_bias, ce_targets) -> dict:
        return dict(temperature=self.temperature, merge=self.merge, reduction=self.reduction,
                    student_targets=student_targets, teacher_targets=teacher_targets, student_bias=student_bias,
                    teacher_bias=teacher_bias, ce_targets=ce_targets, block_rows=self.block_rows,
                    accum_dtype=self.accum_dtype)


class FusedLinearPKLLoss(_FusedLinear, PKLLoss):
    """Module form of :func:`xtoken.fused_linear_pkl_loss`: :class:`PKLLoss` on the logits of the hidden states
    and lm_head weights given to ``forward``, computed block by block.

    Example::

        loss_fn = xtoken.nn.FusedLinearPKLLoss(projection).to("cuda")
        loss, ce = loss_fn(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, chunks,
                           ce_targets=next_tokens)
    """

    def __init__(self, projection, *, temperature: float = 1.0, merge="first",
                 reduction: str = "mean", block_rows: int | None = None,
                 accum_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(projection, temperature=temperature, merge=merge, reduction=reduction)
        self._fused_setup(block_rows, accum_dtype)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, student_targets=None,
                teacher_targets=None, *, student_bias=None, teacher_bias=None, ce_targets=None):
        return fused_linear.fused_linear_pkl_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, self.projection(),
            **self._fused_kwargs(student_targets, teacher_targets, student_bias, teacher_bias, ce_targets),
        )  # fmt: skip


class _FusedLinearHybrid(_FusedLinear, _HybridLoss):
    def __init__(self, pairs, *, block_rows: int | None = None, accum_dtype: torch.dtype = torch.float32,
                 **options) -> None:
        super().__init__(pairs, **options)
        self._fused_setup(block_rows, accum_dtype)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, student_targets=None,
                teacher_targets=None, *, student_bias=None, teacher_bias=None, ce_targets=None):
        return fused_linear._fused_hybrid(
            student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, self.pairs, matched=self.matched,
            beta=self.beta, uld_topk=self.uld_topk, weights=self.weights,
            **self._fused_kwargs(student_targets, teacher_targets, student_bias, teacher_bias, ce_targets),
        )  # fmt: skip


class FusedLinearGOLDLoss(_FusedLinearHybrid):
    """Module form of :func:`xtoken.fused_linear_gold_loss` (options as :class:`GOLDLoss`, plus ``block_rows`` and
    ``accum_dtype``)."""

    _pair_kind = "exact"


class FusedLinearHKLLoss(_FusedLinearHybrid):
    """Module form of :func:`xtoken.fused_linear_hkl_loss` (options as :class:`HKLLoss`, plus ``block_rows`` and
    ``accum_dtype``)."""

    _pair_kind = "relaxed"


class FusedLinearULDLoss(_FusedLinearHybrid):
    """Module form of :func:`xtoken.fused_linear_uld_loss` (the hybrid loss with no pairs)."""

    def __init__(self, *, temperature: float = 1.0, merge="first", uld_topk: int | None = 8192,
                 reduction: str = "mean", block_rows: int | None = None,
                 accum_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(torch.zeros(0, 2, dtype=torch.int32), temperature=temperature, merge=merge,
                         uld_topk=uld_topk, weights=(0.0, 1.0), reduction=reduction, block_rows=block_rows,
                         accum_dtype=accum_dtype)


class FusedLinearKDLoss(_FusedLinear, KDLoss):
    """Module form of :func:`xtoken.fused_linear_kd_loss` (same-vocabulary KD)."""

    def __init__(self, *, temperature: float = 1.0, merge="first", reduction: str = "mean",
                 block_rows: int | None = None, accum_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(temperature=temperature, merge=merge, reduction=reduction)
        self._fused_setup(block_rows, accum_dtype)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, student_targets=None,
                teacher_targets=None, *, student_bias=None, teacher_bias=None, ce_targets=None):
        return fused_linear.fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, chunks,
            **self._fused_kwargs(student_targets, teacher_targets, student_bias, teacher_bias, ce_targets),
        )  # fmt: skip


class FusedLinearChainLoss(_FusedLinear, ChainLoss):
    """Module form of :func:`xtoken.fused_linear_chain_loss` (options as :class:`ChainLoss`, plus ``block_rows``
    and ``accum_dtype``); the targets are required."""

    merge = "first"

    def __init__(self, pieces: PieceTables, *, temperature: float = 1.0, reduction: str = "mean",
                 block_rows: int | None = None, accum_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(pieces, temperature=temperature, reduction=reduction)
        self._fused_setup(block_rows, accum_dtype)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, student_targets=None,
                teacher_targets=None, *, student_bias=None, teacher_bias=None, ce_targets=None):
        return fused_linear.fused_linear_chain_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, self.pieces(),
            **self._fused_kwargs(student_targets, teacher_targets, student_bias, teacher_bias, ce_targets),
        )  # fmt: skip
