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

from . import losses, ops
from .pieces import PieceTables
from .projection import Projection

__all__ = ["PKLLoss", "GOLDLoss", "HKLLoss", "ULDLoss", "KDLoss", "ChainLoss", "XTokenLoss"]


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
    and ``state_dict()`` saves it. Content checks on the first call per device only (see the module
    docstring).

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
        return self._call_loss(
            losses.pkl_loss, student_logits, teacher_logits, chunks, self.projection(), temperature=self.temperature,
            merge=self.merge, reduction=self.reduction, student_targets=student_targets,
            teacher_targets=teacher_targets,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (f"V_s={self.proj_idx.shape[0]}, V_t={self.teacher_vocab_size}, temperature={self.temperature}, "
                f"merge={self.merge!r}, reduction={self.reduction!r}")


class _HybridLoss(_ChecksOnce):
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

    def __init__(self, *, temperature: float = 1.0, merge: str = "first", uld_topk: int | None = 8192,
                 reduction: str = "mean") -> None:
        super().__init__(torch.zeros(0, 2, dtype=torch.int32), temperature=temperature, merge=merge,
                         uld_topk=uld_topk, weights=(0.0, 1.0), reduction=reduction)


class KDLoss(_ChecksOnce):
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
