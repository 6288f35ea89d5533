"""``nn.Module`` forms of the losses (hold the projection and the options; move with ``.to()``)."""

from __future__ import annotations

import torch
from torch import nn

from . import losses
from .projection import Projection

__all__ = ["PKLLoss"]


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
