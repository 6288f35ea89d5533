"""xtoken: cross-tokenizer knowledge distillation for PyTorch.

Fused C++/CUDA kernels for the X-Token losses (P-KL, H-KL) and their baselines, the projection W
between two vocabularies, and exact span alignment. See README.md and SPEC.md.
"""

from . import nn, ops, reference
from .align import AlignedBatch, AlignedCollator, align_spans, align_texts
from .chat import align_conversations
from .distill import DistillationCollator, Teacher
from .fused_linear import (
    fused_linear_chain_loss, fused_linear_gold_loss, fused_linear_hkl_loss, fused_linear_kd_loss,
    fused_linear_pkl_chain_loss, fused_linear_pkl_loss, fused_linear_uld_loss,
)  # fmt: skip
from .losses import chain_loss, gold_loss, hkl_loss, kd_loss, pkl_chain_loss, pkl_loss, project, uld_loss
from .pieces import PieceTables
from .projection import Projection
from .reference import NEMO_MERGE

__version__ = "0.1.0"

__all__ = [
    "Projection", "NEMO_MERGE", "PieceTables", "pkl_loss", "gold_loss", "hkl_loss", "uld_loss", "kd_loss",
    "chain_loss", "pkl_chain_loss", "project", "nn", "ops", "reference", "__version__", "AlignedBatch",
    "AlignedCollator", "align_spans", "align_texts", "align_conversations",
    "DistillationCollator", "DistillationTrainer", "Teacher",
    "fused_linear_pkl_loss", "fused_linear_gold_loss", "fused_linear_hkl_loss", "fused_linear_uld_loss",
    "fused_linear_kd_loss", "fused_linear_chain_loss", "fused_linear_pkl_chain_loss",
]  # fmt: skip


def __getattr__(name: str):
    # The trainer imports transformers, which plain loss users need not install.
    if name == "DistillationTrainer":
        from .trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module 'xtoken' has no attribute {name!r}")
