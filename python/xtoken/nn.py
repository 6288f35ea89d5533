"""``nn.Module`` forms of the losses (hold the projection and the options; move with ``.to()``)."""

from __future__ import annotations

import torch
from torch import nn

from . import losses
from .projection import Projection

__all__ = ["PKLLoss", "GOLDLoss", "HKLLoss", "ULDLoss", "KDLoss", "XTokenLoss"]


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
        # The module's own copies: loading a state dict into it never edits the caller's W.
        self.register_buffer("proj_idx", projection.idx.clone())
        self.register_buffer("proj_val", projection.val.clone())
        self.teacher_vocab_size = projection.teacher_vocab_size
        self.temperature = temperature
        self.merge = merge
        self.reduction = reduction
        self._projection = projection
        self._source = self._buffer_state()

    def _buffer_state(self) -> tuple:
        return (self.proj_idx, self.proj_val, self.proj_idx._version, self.proj_val._version)

    def projection(self) -> Projection:
        """The module's W on the device of its buffers, rebuilt (and so validated) whenever the buffers were
        replaced (``.to()``) or edited in place (``load_state_dict``)."""
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
