"""Distillation from one or more teachers (SPEC.md §4, last part): the teacher description, the loss
registry, the collator that aligns a text batch for every teacher, and the CE + KD combination.

These pieces have no dependency on ``transformers``; :class:`xtoken.DistillationTrainer` (``trainer.py``)
puts them into a ``transformers.Trainer``, and a hand-written training loop can use them directly::

    teacher = xtoken.Teacher(qwen, qwen_tokenizer, projection=W, loss="auto", weight=1.0)
    collate = xtoken.DistillationCollator(llama_tokenizer, [teacher], max_length=2048)
    batch = collate(texts)
    # student logits, then per teacher: xtoken.distill.teacher_loss(...) with reduction="sum"
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import fused_linear, losses
from . import checks
from .align import (
    CHUNK_SHAPES,
    AlignStats,
    KeptEncodings,
    _max_length,
    _check_kept_texts,
    _pad,
    align_spans,
    as_span_tokenizer,
    example_texts,
)
from .chat import (
    ChatTemplate,
    Conversation,
    _align_sides,
    _check_train_on,
    _encode_side,
    _message_starts,
    render_prompts,
)
from .pieces import PieceTables
from .nn import LearnedProjection
from .projection import Projection
from .tokenizer import load_tokenizer

__all__ = [
    "LOSS_NAMES",
    "CHUNK_STAT_NAMES",
    "Teacher",
    "PreparedTeacher",
    "DistillationCollator",
    "chunk_stats_summary",
    "combine_ce_kd",
    "dynamic_scale",
    "prepare_teachers",
    "teacher_loss",
    "fused_teacher_loss",
    "linear_head",
    "hidden_states_as_logits",
]

# ---------------------------------------------------------------------------------------------
# The loss registry: name -> what the loss reads besides the logits and chunks, and its function.


@dataclass(frozen=True)
class _LossEntry:
    """``mapping(projection, student_tokenizer, teacher_tokenizer, student_vocab_size)`` makes, once per
    teacher, what the loss reads besides logits and chunks (W, the common pairs, the piece tables, or
    nothing); ``function`` is the functional loss, called as
    ``function(student_logits, teacher_logits, chunks[, mapping], **options)``, and ``fused`` its fused linear
    form, ``fused(student_hidden, student_weight, teacher_hidden, teacher_weight, chunks[, mapping], **options)``."""

    function: Callable[..., torch.Tensor]
    mapping: Callable[..., Any]
    fused: Callable[..., Any]


def _projection(projection: Projection | None, *context: Any) -> Projection:
    if projection is None:
        raise ValueError("needs a projection W (Projection.build(student_tokenizer, teacher_tokenizer))")
    return projection


def _pairs(kind: str) -> Callable[..., torch.Tensor]:
    def pairs(projection: Projection | None, *context: Any) -> torch.Tensor:
        return _projection(projection).common_pairs(kind)

    return pairs


def _nothing(projection: Projection | None, *context: Any) -> None:
    return None


def _piece_tables(projection: Projection | None, student: Any, teacher: Any, student_vocab_size: int | None):
    if teacher is None:
        raise ValueError("needs the teacher's tokenizer (the piece tables spell each vocabulary in the other)")
    return PieceTables.build(student, teacher, student_vocab_size=student_vocab_size)


def _projection_and_pieces(projection: Projection | None, *context: Any) -> tuple[Projection, PieceTables]:
    return _projection(projection), _piece_tables(projection, *context)


def _pkl_chain(student_logits, teacher_logits, chunks, mapping, **options) -> torch.Tensor:
    return losses.pkl_chain_loss(student_logits, teacher_logits, chunks, *mapping, **options)


def _fused_pkl_chain(student_hidden, student_weight, teacher_hidden, teacher_weight, chunks, mapping, **options):
    return fused_linear.fused_linear_pkl_chain_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                    chunks, *mapping, **options)


_LOSSES: dict[str, _LossEntry] = {
    # X-Token projection KL through W
    "pkl": _LossEntry(losses.pkl_loss, _projection, fused_linear.fused_linear_pkl_loss),
    # X-Token hybrid on W's relaxed pairs
    "hkl": _LossEntry(losses.hkl_loss, _pairs("relaxed"), fused_linear.fused_linear_hkl_loss),
    # GOLD: hybrid on exact string matches
    "gold": _LossEntry(losses.gold_loss, _pairs("exact"), fused_linear.fused_linear_gold_loss),
    # ULD: sorted L1 over the full vocabularies
    "uld": _LossEntry(losses.uld_loss, _nothing, fused_linear.fused_linear_uld_loss),
    # plain KD from a teacher with the student's tokenizer
    "kd": _LossEntry(losses.kd_loss, _nothing, fused_linear.fused_linear_kd_loss),
    # chain KL along the realized pieces
    "chain": _LossEntry(losses.chain_loss, _piece_tables, fused_linear.fused_linear_chain_loss),
    # P-KL on 1:1 chunks, chain KL on the rest
    "pkl+chain": _LossEntry(_pkl_chain, _projection_and_pieces, _fused_pkl_chain),
}
LOSS_NAMES = (*_LOSSES, "auto")
"""What a teacher's ``loss`` may be: a loss name, or ``"auto"`` (the coverage audit's recommendation for
a teacher with a projection, ``"kd"`` for a same-tokenizer teacher)."""


# ---------------------------------------------------------------------------------------------
# Teachers


@dataclass
class Teacher:
    """One teacher of a distillation run.

    Args:
        model: a causal LM whose forward takes ``input_ids`` and ``attention_mask`` and returns ``.logits``
            (``[B, T, V_t]``). It runs in eval mode without gradients.
        tokenizer: its tokenizer (a Hugging Face fast tokenizer, a ``tokenizers.Tokenizer``, a path or a
            built-in name); ``None`` means the student's tokenizer.
        projection: W from the student vocabulary to this teacher's (:meth:`Projection.build`); ``None``
            for a teacher with the student's vocabulary.
        loss: ``"pkl"``, ``"hkl"``, ``"gold"``, ``"uld"``, ``"kd"``, ``"chain"``, ``"pkl+chain"`` or ``"auto"``:
            the coverage audit's choice when there is a projection (``"pkl+chain"`` where the teacher splits
            the student's packed numerals, else ``"hkl"``: :attr:`ProjectionAudit.teacher_loss`), ``"kd"`` when
            there is none.
        weight: alpha_m, the teacher's static weight in ``L_kd_total = sum_m alpha_m L_m``.
        dtype: the dtype the teacher runs in (e.g. ``torch.bfloat16``); ``None`` keeps the model's. Its
            logits are cast to the student logits' dtype for the loss.
        temperature, merge: as in :func:`xtoken.pkl_loss` (SPEC.md §3, §4); ``merge`` is one name for both
            sides or a pair ``(student_merge, teacher_merge)``, e.g. ``xtoken.NEMO_MERGE`` (NeMo-RL's pooling).
        options: further keyword arguments of the loss (``matched``, ``beta``, ``uld_topk``, ``weights``
            for the hybrid losses).
        name: the name the logs use (default ``teacher<i>``, ``i`` its position in the run).
        chat_template: how this teacher renders conversations (:class:`xtoken.chat.ChatTemplate`'s
            ``template``: a Jinja string, a name in ``xtoken.chat.CHAT_TEMPLATES`` or a callable); ``None``: its
            tokenizer's own template (the student's for a teacher with the student's tokenizer).
        learn_projection: train W's values jointly with the student (X-Token's learned W; P-KL only, the support
            fixed, each row kept stochastic: :class:`xtoken.nn.LearnedProjection`). The trainer gives them their
            own optimizer group and saves the learned W with every checkpoint.
        projection_lr: the learning rate of W's values (the paper's 1e-2), under the run's schedule.
    """

    model: torch.nn.Module
    tokenizer: Any = None
    projection: Projection | None = None
    loss: str = "auto"
    weight: float = 1.0
    dtype: torch.dtype | None = None
    temperature: float = 1.0
    merge: str | tuple[str, str] = "first"
    options: dict[str, Any] | None = None
    name: str | None = None
    chat_template: Any = None
    learn_projection: bool = False
    projection_lr: float = 1e-2

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"Teacher.model: expected a torch.nn.Module, got {type(self.model).__name__}")
        if self.projection is not None and not isinstance(self.projection, Projection):
            raise TypeError(
                f"Teacher.projection: expected an xtoken.Projection or None, got {type(self.projection).__name__}"
            )
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"Teacher.loss: expected one of {LOSS_NAMES}, got {self.loss!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"Teacher.weight: expected a finite number >= 0, got {self.weight!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"Teacher.dtype: expected a floating torch.dtype or None, got {self.dtype!r}")
        losses._check_options(self.temperature, self.merge, "sum")
        if not isinstance(self.learn_projection, bool):
            raise TypeError(f"Teacher.learn_projection: expected a bool, got {self.learn_projection!r}")
        if not (isinstance(self.projection_lr, (int, float)) and math.isfinite(self.projection_lr)
                and self.projection_lr > 0):
            raise ValueError(f"Teacher.projection_lr: expected a finite number > 0, got {self.projection_lr!r}")

    def resolved_loss(self) -> str:
        """The loss this teacher uses: ``loss``, or for ``"auto"`` the coverage audit's choice
        (:attr:`ProjectionAudit.teacher_loss`: P-KL + chain KL where the teacher splits what the student packs,
        H-KL otherwise; ``"kd"`` without a projection)."""
        if self.loss != "auto":
            return self.loss
        if self.projection is None:
            return "kd"
        if self.projection.vocabularies is None:
            raise ValueError(
                "Teacher.loss='auto' audits W's coverage, which needs a W built from tokenizers "
                "(Projection.build or Projection.load of a built W); name the loss instead"
            )
        return self.projection.audit().teacher_loss


@dataclass(frozen=True)
class PreparedTeacher:
    """A teacher ready for the loss: its name, resolved loss and what that loss reads (``mapping``: W, a
    :class:`xtoken.nn.LearnedProjection` for a teacher with ``learn_projection``, the common pairs, or None)."""

    teacher: Teacher
    name: str
    loss: str
    mapping: Any

    @property
    def weight(self) -> float:
        return float(self.teacher.weight)


def prepare_teachers(
    teachers: Teacher | Sequence[Teacher], student_tokenizer: Any, student_vocab_size: int | None = None
) -> list[PreparedTeacher]:
    """Check the teachers against the student and resolve their losses. ``"kd"`` needs the student's
    vocabulary; ``"uld"`` needs no W; the other losses need a W, built for this student and teacher
    tokenizer when W records them. ``student_vocab_size`` (the student's logit width) pads W with empty
    rows for a padded lm_head."""
    if isinstance(teachers, Teacher):
        teachers = [teachers]
    teachers = list(teachers)
    if not all(isinstance(t, Teacher) for t in teachers):
        raise TypeError("teachers: expected xtoken.Teacher objects")
    student = load_tokenizer(student_tokenizer)
    prepared, names = [], set()
    for i, teacher in enumerate(teachers):
        name = teacher.name or f"teacher{i}"
        if name in names:
            raise ValueError(f"teachers: two teachers are named {name!r}; names must be unique (they key the logs)")
        names.add(name)
        loss = teacher.resolved_loss()
        where = f"teacher {name!r} (loss {loss!r})"
        if loss == "kd" and teacher.tokenizer is not None and load_tokenizer(teacher.tokenizer).vocab_hash != student.vocab_hash:
            raise ValueError(f"{where}: KD needs the student's vocabulary; give a projection and another loss")
        projection = teacher.projection
        if projection is None and loss not in ("kd", "uld", "chain"):
            raise ValueError(
                f"{where}: no projection was given; this loss needs "
                "Projection.build(student_tokenizer, teacher_tokenizer)"
            )
        if projection is not None:
            if "student_vocab_hash" in projection.metadata:
                projection.check_tokenizers(student, student if teacher.tokenizer is None else teacher.tokenizer)
            if student_vocab_size is not None and student_vocab_size > projection.student_vocab_size:
                projection = projection.pad_to(student_vocab_size)
        try:
            teacher_tokenizer = None if teacher.tokenizer is None else load_tokenizer(teacher.tokenizer)
            mapping = _LOSSES[loss].mapping(projection, student, teacher_tokenizer, student_vocab_size)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if teacher.learn_projection:
            if loss != "pkl":
                raise ValueError(
                    f"{where}: learn_projection trains W's values through P-KL's gradient; {loss!r} reads no W values "
                    "that could learn (H-KL and GOLD use only W's largest weight per row and its pairs). Use "
                    "loss='pkl' or learn_projection=False"
                )
            mapping = LearnedProjection(mapping)
        prepared.append(PreparedTeacher(teacher, name, loss, mapping))
    return prepared


def teacher_loss(
    prepared: PreparedTeacher,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    *,
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """The teacher's distillation loss on one batch (SPEC.md §4), ``reduction="sum"`` by default so that
    the caller divides by the global chunk count. Teacher logits are cast to the student logits' dtype."""
    teacher = prepared.teacher
    mapping = () if prepared.mapping is None else (prepared.mapping,)
    return _LOSSES[prepared.loss].function(
        student_logits, teacher_logits.to(student_logits.dtype), chunks, *mapping,
        temperature=teacher.temperature, merge=teacher.merge, reduction=reduction,
        student_targets=student_targets, teacher_targets=teacher_targets, **(teacher.options or {}),
    )  # fmt: skip


def fused_teacher_loss(
    prepared: PreparedTeacher,
    student_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Linear,
    chunks: torch.Tensor,
    *,
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    ce_targets: torch.Tensor | None = None,
    reduction: str = "sum",
):
    """:func:`teacher_loss` of the logits ``head(hidden)`` of both sides, without materializing them
    (:mod:`xtoken.fused_linear`); with ``ce_targets``, ``(loss, ce_loss)``: the student's cross-entropy
    computed on the same logits blocks."""
    teacher = prepared.teacher
    mapping = () if prepared.mapping is None else (prepared.mapping,)
    return _LOSSES[prepared.loss].fused(
        student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, chunks, *mapping,
        student_bias=student_head.bias, teacher_bias=teacher_head.bias, temperature=teacher.temperature,
        merge=teacher.merge, reduction=reduction, student_targets=student_targets, teacher_targets=teacher_targets,
        ce_targets=ce_targets, **(teacher.options or {}),
    )  # fmt: skip


# Config fields of Hugging Face models whose lm_head output is transformed before it becomes the logits
# (soft-capping, scaling): the fused path, which computes head(hidden) itself, does not model them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def linear_head(model: torch.nn.Module) -> tuple[torch.nn.Linear | None, str]:
    """The causal LM's lm_head when its logits are exactly ``lm_head(final hidden states)``, else ``None`` and
    why not (no ``get_output_embeddings``, a head that is not an ``nn.Linear``, a logit soft-cap or scale)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None, "its lm_head is not an nn.Linear that get_output_embeddings() returns"
    config = getattr(model, "config", None)
    for field in _LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value is not None and value != 1:
            return None, f"its config sets {field}={value!r}, a transform of the logits the fused path does not model"
    return head, ""


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@contextlib.contextmanager
def hidden_states_as_logits(head: torch.nn.Module) -> Iterator[None]:
    """Within this context the lm_head returns its input, so the model's forward returns its final hidden states
    as ``.logits`` (no ``[B, T, V]`` logits are computed). The model is still called through its own forward
    (and any wrapper's, e.g. DDP), so hooks and autocast apply as usual."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


# ---------------------------------------------------------------------------------------------
# CE + KD


def combine_ce_kd(
    ce: torch.Tensor,
    kd_total: torch.Tensor,
    kd_scaling: str | tuple[float, float] = "dynamic",
    *,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``L = L_ce + sg(L_ce / L_kd_total) * L_kd_total`` (``kd_scaling="dynamic"``) or
    ``w_ce * L_ce + w_kd * L_kd_total`` (``kd_scaling=(w_ce, w_kd)``), SPEC.md §4.

    ``reference`` gives the ``(L_ce, L_kd_total)`` values the dynamic ratio is taken from when ``ce`` and
    ``kd_total`` are parts of a larger batch (the trainer passes the micro-batch's values over all ranks);
    by default they are ``ce`` and ``kd_total``. A zero KD total (no chunks) leaves ``L = L_ce``."""
    check_kd_scaling(kd_scaling)
    if kd_scaling == "dynamic":
        ce_value, kd_value = (ce, kd_total) if reference is None else reference
        return ce + dynamic_scale(ce_value, kd_value).to(kd_total.dtype) * kd_total
    w_ce, w_kd = kd_scaling
    return w_ce * ce + w_kd * kd_total


def dynamic_scale(ce: torch.Tensor, kd_total: torch.Tensor) -> torch.Tensor:
    """``L_ce / L_kd_total`` (no gradient), 0 where ``L_kd_total`` is 0."""
    ce, kd_total = ce.detach(), kd_total.detach()
    return torch.where(kd_total != 0, ce / torch.where(kd_total != 0, kd_total, 1), 0)


def check_kd_scaling(kd_scaling: Any) -> None:
    if kd_scaling == "dynamic":
        return
    if (
        isinstance(kd_scaling, (tuple, list))
        and len(kd_scaling) == 2
        and all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in kd_scaling)
    ):
        return
    raise ValueError(f"kd_scaling: expected 'dynamic' or (w_ce, w_kd) with weights >= 0, got {kd_scaling!r}")


# ---------------------------------------------------------------------------------------------
# The collator

CHUNK_STAT_NAMES = (*CHUNK_SHAPES, "student_tokens", "student_dropped", "teacher_tokens", "teacher_dropped")
"""The entries of a teacher's ``chunk_stats`` vector in a collated batch."""


def _stat_vector(stats: AlignStats) -> torch.Tensor:
    values = [stats.shapes[s] for s in CHUNK_SHAPES] + [
        stats.student_tokens, sum(stats.student_dropped.values()),
        stats.teacher_tokens, sum(stats.teacher_dropped.values()),
    ]  # fmt: skip
    return torch.tensor(values, dtype=torch.int64)


class DistillationCollator:
    """A DataLoader ``collate_fn`` for distillation: tokenizes a batch of texts for the student once and for
    every teacher, and aligns the student with each teacher (SPEC.md §2). Picklable.

    Each example is a text, or a mapping holding one under ``text_key``; or, for chat data, a conversation (a
    list of ``{"role", "content"}`` messages, a mapping with ``"messages"``, or one with ``"prompt"`` and
    ``"completion"``), which every side renders with its own chat template (:mod:`xtoken.chat`). A batch is a dict:

    - ``input_ids``, ``attention_mask`` (int64 ``[B, T_s]``), ``labels`` (``input_ids`` with -100 at padding;
      for conversations also at the template and the untrained messages) and ``student_targets`` (int64
      ``[B * T_s]``, the realized next token of each row, -1 where none);
    - ``teachers``: one dict per teacher with ``input_ids``, ``attention_mask``, ``teacher_targets``,
      ``chunks`` (int32 ``[K, 4]`` over flattened rows) and ``chunk_stats`` (int64, :data:`CHUNK_STAT_NAMES`);
    - for conversations, ``conversations``: the parsed :class:`xtoken.chat.Conversation` objects (on-policy
      training re-renders them with the student's completions).

    Args:
        student_tokenizer: the student's tokenizer (anything :func:`xtoken.align.as_span_tokenizer` takes).
        teacher_tokenizers: one tokenizer per teacher (``None``: the student's), or :class:`Teacher` objects.
        max_length: keep at most this many tokens per text on each side (special tokens included).
        add_special_tokens: let each tokenizer add its BOS/EOS (texts only: a chat template writes its own).
        text_key: the field holding the text in mapping examples.
        student_chat_template: how the student renders conversations (``None``: its tokenizer's own template).
        train_on: ``"assistant"`` or ``"all"``: what the losses and the CE train on in a conversation
            (:func:`xtoken.align_conversations`).
        keep_encodings: keep the encodings of up to this many distinct texts per tokenizer (0, the default:
            none; :class:`xtoken.align.KeptEncodings`), so that training that sees a corpus for several epochs
            encodes each text once; the batches are the same. Conversations keep their rendered texts. Each
            DataLoader worker keeps its own (a pickled collator starts with nothing kept).
    """

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizers: Sequence[Any],
        max_length: int | None = None,
        *,
        add_special_tokens: bool = True,
        text_key: str = "text",
        student_chat_template: Any = None,
        train_on: str = "assistant",
        keep_encodings: int = 0,
    ) -> None:
        max_length = _max_length(max_length)
        _check_train_on(train_on)
        _check_kept_texts(keep_encodings, "keep_encodings")
        self.student = as_span_tokenizer(student_tokenizer)
        tokenizers = [t.tokenizer if isinstance(t, Teacher) else t for t in teacher_tokenizers]
        self.teachers = [self.student if t is None else as_span_tokenizer(t) for t in tokenizers]
        if keep_encodings:  # a wrapper per distinct side: a teacher that is the student stays the student
            kept = {id(t): KeptEncodings(t, keep_encodings) for t in (self.student, *self.teachers)}
            self.student, self.teachers = kept[id(self.student)], [kept[id(t)] for t in self.teachers]
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens
        self.text_key = text_key
        self.train_on = train_on
        self.student_template = ChatTemplate(student_tokenizer, student_chat_template)
        self.teacher_templates = []
        for t, tokenizer in zip(teacher_tokenizers, tokenizers):
            template = t.chat_template if isinstance(t, Teacher) else None
            if tokenizer is None and template is None:
                self.teacher_templates.append(self.student_template)
            else:
                own = student_tokenizer if tokenizer is None else tokenizer
                self.teacher_templates.append(ChatTemplate(own, template))

    def _texts(self, examples: Sequence) -> list[str]:
        return checks.texts(example_texts(examples, self.text_key), "examples")

    def _encode(self, tokenizer, texts: list[str]):
        encoded = tokenizer.encode_spans(texts, add_special_tokens=self.add_special_tokens, max_length=self.max_length)
        return _pad(encoded, tokenizer.pad_token_id, left=False)

    def __call__(self, examples: Sequence) -> dict[str, Any]:
        if examples and _is_conversation(examples[0], self.text_key):
            return self.collate_conversations([Conversation.parse(e, f"example {i}") for i, e in enumerate(examples)])
        texts = self._texts(examples)
        student = self._encode(self.student, texts)
        batch: dict[str, Any] = {
            "input_ids": student.input_ids,
            "attention_mask": student.attention_mask,
            "labels": student.input_ids.masked_fill(student.attention_mask == 0, -100),
            "student_targets": student.targets,
            "teachers": [],
        }
        encoded = {id(self.student): student}
        for tokenizer in self.teachers:
            if id(tokenizer) not in encoded:
                encoded[id(tokenizer)] = self._encode(tokenizer, texts)
            teacher = encoded[id(tokenizer)]
            alignment = align_spans(student.ends, student.lengths, teacher.ends, teacher.lengths)
            chunks = alignment.table()
            batch["teachers"].append({
                "input_ids": teacher.input_ids,
                "attention_mask": teacher.attention_mask,
                "teacher_targets": teacher.targets,
                "chunks": chunks,
                "chunk_stats": _stat_vector(AlignStats.compute(chunks, alignment.dropped)),
            })  # fmt: skip
        return batch


    def collate_conversations(
        self, conversations: Sequence[Conversation], train_on: str | None = None
    ) -> dict[str, Any]:
        """The batch of a list of :class:`xtoken.chat.Conversation` (``train_on`` overrides the collator's)."""
        train_on = train_on or self.train_on
        _check_train_on(train_on)
        trained = [c.trained(train_on) for c in conversations]
        options = dict(train_on=train_on, max_length=self.max_length, left=False)
        student = _encode_side(
            self.student, self.student_template, conversations, trained, side="student", **options
        )
        batch: dict[str, Any] = {
            "input_ids": student.padded.input_ids,
            "attention_mask": student.padded.attention_mask,
            "labels": student.labels,
            "student_targets": student.padded.targets,
            "teachers": [],
            "conversations": list(conversations),
        }
        starts = _message_starts(conversations, trained)
        encoded = {(id(self.student), id(self.student_template)): student}
        for i, (tokenizer, template) in enumerate(zip(self.teachers, self.teacher_templates)):
            key = (id(tokenizer), id(template))
            if key not in encoded:
                encoded[key] = _encode_side(tokenizer, template, conversations, trained, side=f"teacher {i}", **options)
            teacher = encoded[key].padded
            chunks, _, stats = _align_sides(student.padded, teacher, starts, "right")
            batch["teachers"].append({
                "input_ids": teacher.input_ids,
                "attention_mask": teacher.attention_mask,
                "teacher_targets": teacher.targets,
                "chunks": chunks,
                "chunk_stats": _stat_vector(stats),
            })  # fmt: skip
        return batch

    def generation_prompts(self, conversations: Sequence[Conversation]) -> list[tuple[str, list[int]]]:
        """Each conversation's prompt as the student continues it, ``(text, ids)``
        (:func:`xtoken.chat.render_prompts`)."""
        return render_prompts(conversations, self.student, self.student_template)


def _is_conversation(example: Any, text_key: str) -> bool:
    """Whether a dataset example is a conversation (messages, or a prompt/completion mapping), not a text."""
    if isinstance(example, Conversation):
        return True
    if hasattr(example, "get"):
        return not isinstance(example.get(text_key), str) and ("messages" in example or "prompt" in example)
    return isinstance(example, (list, tuple)) and bool(example) and isinstance(example[0], dict)


def chunk_stats_summary(stats: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Readable chunk statistics from a summed ``chunk_stats`` vector: the chunk count, the 1:1 share and the
    share of each side's tokens that no chunk holds."""
    values = dict(zip(CHUNK_STAT_NAMES, (float(v) for v in torch.as_tensor(stats).tolist())))
    chunks = sum(values[s] for s in CHUNK_SHAPES)
    return {
        "chunks": chunks,
        "one_to_one": values["1:1"] / max(chunks, 1),
        "student_dropped": values["student_dropped"] / max(values["student_tokens"], 1),
        "teacher_dropped": values["teacher_dropped"] / max(values["teacher_tokens"], 1),
    }
