"""``nn.Module`` forms of the losses (hold the projection and the options; move with ``.to()``)."""

from __future__ import annotations

import torch
from torch import nn

from . import fused_linear, losses
from .projection import Projection

__all__ = [
    "PKLLoss", "GOLDLoss", "HKLLoss", "ULDLoss", "KDLoss", "XTokenLoss", "FusedLinearPKLLoss", "FusedLinearGOLDLoss",
    "FusedLinearHKLLoss", "FusedLinearULDLoss", "FusedLinearKDLoss",
]  # fmt: skip


class PKLLoss(nn.Module):
    """Module form of :func:`xtoken.pkl_loss`. W is registered as buffers, so ``.to(device)`` moves it
    and ``state_dict()`` saves it.

    Example::

        loss_fn = xtoken.nn.PKLLoss(projection, temperature=1.0).to("cuda")
        loss = loss_fn(student_logits, teacher_logits, chunks)
    """

    def __init__(
        self, projection: Projection, *, temperature: float = 1.0, merge: str = "first", reduction: str = "mean"
    ) -> None:
        super().__init__()
        if not isinstance(projection, Projection):
            raise TypeError(f"projection: expected an xtoken.Projection, got {type(projection).__name__}")
        losses._check_options(temperature, merge, reduction)
        self.register_buffer("proj_idx", projection.idx)
        self.register_buffer("proj_val", projection.val)
        self.teacher_vocab_size = projection.teacher_vocab_size
        self.temperature = temperature
        self.merge = merge
        self.reduction = reduction
        self._projection = projection

    def projection(self) -> Projection:
        """The module's W on the device of its buffers."""
        if self._projection.idx is not self.proj_idx or self._projection.val is not self.proj_val:
            self._projection = Projection(self.proj_idx, self.proj_val, teacher_vocab_size=self.teacher_vocab_size)
        return self._projection

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        chunks: torch.Tensor,
        student_targets: torch.Tensor | None = None,
        teacher_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return losses.pkl_loss(
            student_logits, teacher_logits, chunks, self.projection(), temperature=self.temperature,
            merge=self.merge, reduction=self.reduction, student_targets=student_targets,
            teacher_targets=teacher_targets,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (f"V_s={self.proj_idx.shape[0]}, V_t={self.teacher_vocab_size}, temperature={self.temperature}, "
                f"merge={self.merge!r}, reduction={self.reduction!r}")


class _HybridLoss(nn.Module):
    """The hybrid loss with its common pairs as a buffer (see :func:`xtoken.gold_loss` for the options)."""

    _pair_kind = "exact"

    def __init__(self, pairs, *, temperature: float = 1.0, merge: str = "first", matched: str = "kl",
                 beta: float = 0.5, uld_topk: int | None = 8192, weights="adaptive", reduction: str = "mean") -> None:
        super().__init__()
        losses._check_options(temperature, merge, reduction)
        losses._check_hybrid_options(matched, beta, uld_topk, weights)
        self.register_buffer("pairs", losses._pair_table(pairs, torch.device("cpu"), self._pair_kind).contiguous())
        self.temperature = temperature
        self.merge = merge
        self.matched = matched
        self.beta = beta
        self.uld_topk = uld_topk
        self.weights = weights if isinstance(weights, str) else tuple(float(w) for w in weights)
        self.reduction = reduction

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        chunks: torch.Tensor,
        student_targets: torch.Tensor | None = None,
        teacher_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return losses._hybrid_loss(
            student_logits, teacher_logits, chunks, self.pairs, temperature=self.temperature, merge=self.merge,
            matched=self.matched, beta=self.beta, uld_topk=self.uld_topk, weights=self.weights,
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

    def __init__(self, *, temperature: float = 1.0, merge: str = "first", uld_topk: int | None = 8192,
                 reduction: str = "mean") -> None:
        super().__init__(torch.zeros(0, 2, dtype=torch.int32), temperature=temperature, merge=merge,
                         uld_topk=uld_topk, weights=(0.0, 1.0), reduction=reduction)


class KDLoss(nn.Module):
    """Module form of :func:`xtoken.kd_loss` (same-vocabulary KD)."""

    def __init__(self, *, temperature: float = 1.0, merge: str = "first", reduction: str = "mean") -> None:
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
        return losses.kd_loss(student_logits, teacher_logits, chunks, temperature=self.temperature, merge=self.merge,
                              reduction=self.reduction, student_targets=student_targets,
                              teacher_targets=teacher_targets)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, merge={self.merge!r}, reduction={self.reduction!r}"


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
                 merge: str = "first", reduction: str = "mean", matched: str = "kl", beta: float = 0.5,
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

    def __init__(self, projection: Projection, *, temperature: float = 1.0, merge: str = "first",
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

    def __init__(self, *, temperature: float = 1.0, merge: str = "first", uld_topk: int | None = 8192,
                 reduction: str = "mean", block_rows: int | None = None,
                 accum_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(torch.zeros(0, 2, dtype=torch.int32), temperature=temperature, merge=merge,
                         uld_topk=uld_topk, weights=(0.0, 1.0), reduction=reduction, block_rows=block_rows,
                         accum_dtype=accum_dtype)


class FusedLinearKDLoss(_FusedLinear, KDLoss):
    """Module form of :func:`xtoken.fused_linear_kd_loss` (same-vocabulary KD)."""

    def __init__(self, *, temperature: float = 1.0, merge: str = "first", reduction: str = "mean",
                 block_rows: int | None = None, accum_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(temperature=temperature, merge=merge, reduction=reduction)
        self._fused_setup(block_rows, accum_dtype)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, student_targets=None,
                teacher_targets=None, *, student_bias=None, teacher_bias=None, ce_targets=None):
        return fused_linear.fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, chunks,
            **self._fused_kwargs(student_targets, teacher_targets, student_bias, teacher_bias, ce_targets),
        )  # fmt: skip
