"""``DistillationTrainer``: cross-tokenizer distillation as a ``transformers.Trainer`` subclass, so
Accelerate, DDP, FSDP and DeepSpeed run it as they run any Trainer.

Normalization (SPEC.md §4). For every optimizer step the trainer first counts, over the step's
micro-batches on every rank, the student's target tokens N and each teacher's chunks K_m (one
all-reduce). Each micro-batch then adds ``sum CE / N`` and ``sum_m alpha_m * sum L_m / K_m`` (losses
with ``reduction="sum"``), so the gradient of a step is the gradient of the loss over the whole global
batch, whatever its split into ranks and accumulation steps. Dynamic scaling multiplies the KD part by
``sg(L_ce / L_kd_total)`` of the micro-batch over all ranks (one small all-reduce per micro-batch, which
also gives the logged statistics); with one accumulation step that is exactly the global batch's ratio.

On-policy (``on_policy=lmbda``, :mod:`xtoken.onpolicy`): a share ``lmbda`` of the optimizer steps, drawn from the
run's seed and the step number, replaces every micro-batch's completions by the student's own before the counts
are taken; such a step trains on the teachers' losses over the completion chunks alone (``L_kd_total``, times
``w_kd`` under fixed weights): the student's own samples are no CE targets.

Host syncs (SPEC.md §6): the first micro-batch checks the contents of the losses' inputs; later ones skip
those checks, so the trainer's own step (the losses, their backward and the counts) does not block the
host; only logging reads values back.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from . import ops
from .distill import (
    CHUNK_STAT_NAMES,
    DistillationCollator,
    PreparedTeacher,
    Teacher,
    check_kd_scaling,
    chunk_stats_summary,
    combine_ce_kd,
    dynamic_scale,
    fused_teacher_loss,
    hidden_states_as_logits,
    linear_head,
    prepare_teachers,
    teacher_loss,
)
from .onpolicy import CompletionGenerator, GenerationPrompt, HFGenerator, on_policy_step, sampling_seed
from .nn import LearnedProjection
from .projection import Projection

__all__ = ["DistillationTrainer"]

if not hasattr(Trainer, "loss_is_scaled_for_ga"):
    # Older Trainers divide every returned loss by the accumulation steps; this one normalizes globally itself.
    raise ImportError(
        f"xtoken.DistillationTrainer needs transformers >= 5.19 (Trainer.loss_is_scaled_for_ga); found "
        f"{transformers.__version__}: pip install 'transformers>=5.19'"
    )

_STATS = len(CHUNK_STAT_NAMES)


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that trains a student causal LM on text with CE plus distillation from one
    or more teachers (SPEC.md §4): ``L_kd_total = sum_m alpha_m L_m``, combined with CE by dynamic scaling
    (``L = L_ce + sg(L_ce / L_kd_total) L_kd_total``) or by fixed weights ``(w_ce, w_kd)``.

    Args:
        model: the student (a causal LM returning ``.logits``).
        args: ``TrainingArguments``. ``remove_unused_columns`` is turned off (the collator reads the text)
            and ``accelerator_config.dispatch_batches`` defaults to False (each rank collates its own
            batches: chunk tables cannot be sliced across ranks).
        teachers: one :class:`xtoken.Teacher` or several; none trains with CE alone.
        student_tokenizer: the student's tokenizer (a Hugging Face fast tokenizer, a
            ``tokenizers.Tokenizer``, a path or a built-in name). Saved with checkpoints when it has
            ``save_pretrained``.
        kd_scaling: ``"dynamic"`` or ``(w_ce, w_kd)``.
        max_length: tokens kept per text (or rendered conversation) on each side (special tokens included).
        text_key: the field of a dataset example that holds its text.
        fused_linear: compute the losses from the final hidden states and the lm_head weights block by block
            (:mod:`xtoken.fused_linear`), so that no ``[B, T, V]`` logits exist in training: the student and
            each teacher run with their lm_head bypassed, and CE is fused into the first teacher's loss. A
            teacher whose logits are not exactly ``lm_head(hidden)`` (no ``nn.Linear`` head, a logit soft-cap or
            scale) keeps the logits path, with a warning; so does everything when the student is such a model,
            when there is no teacher, or under FSDP / DeepSpeed ZeRO-3 (which shard the lm_head weight).
            Evaluation computes logits as usual. ``ddp_find_unused_parameters`` defaults to False with it.
        keep_encodings: keep the encodings of up to this many texts per tokenizer in the collator, so that
            each text of a corpus trained on for several epochs is encoded once
            (:class:`DistillationCollator`; ignored when ``data_collator`` is given).
        train_dataset, eval_dataset: texts, or mappings (e.g. a ``datasets.Dataset``) with ``text_key``; or
            conversations: examples with ``"messages"`` (lists of ``{"role", "content"}``) or with ``"prompt"`` and
            ``"completion"``, which the student and each teacher render with their own chat templates
            (:func:`xtoken.align_conversations`).
        student_chat_template: the student's chat template (``None``: its tokenizer's own); a teacher's is
            :attr:`xtoken.Teacher.chat_template`.
        train_on: ``"assistant"`` (default) or ``"all"``: what a conversation trains on.
        on_policy: lmbda, the share of optimizer steps on which the student generates the completions of the
            prompts (conversations only; 0: never, exactly the off-policy trainer).
        generation_config: how the student samples (:class:`xtoken.onpolicy.HFGenerator`); its ``eos_token_id``
            should be the student template's end-of-turn token.
        generator: a :class:`xtoken.onpolicy.CompletionGenerator` (e.g. one backed by vLLM) instead of
            ``model.generate``.
        **kwargs: the other ``transformers.Trainer`` arguments (callbacks, optimizers, ...). A
            ``data_collator`` replaces the :class:`xtoken.DistillationCollator`; it must produce its batches.

    Example (a Llama student, a Qwen teacher through W and a same-tokenizer Llama teacher)::

        W = xtoken.Projection.build(llama_tok, qwen_tok)
        teachers = [
            xtoken.Teacher(qwen, qwen_tok, W, loss="auto", weight=0.8, dtype=torch.bfloat16, name="qwen"),
            xtoken.Teacher(llama_3b, None, None, loss="kd", weight=0.2, name="llama3b"),
        ]
        trainer = xtoken.DistillationTrainer(
            student, TrainingArguments("out", per_device_train_batch_size=8, bf16=True),
            teachers=teachers, student_tokenizer=llama_tok, max_length=2048, train_dataset=texts,
        )
        trainer.train()

    Logged with each training log: ``ce_loss``, ``kd_loss/<teacher>`` (per chunk, tau^2 included),
    ``kd_scale`` (the mean dynamic ratio, under dynamic scaling), ``chunks/<teacher>``, ``one_to_one/<teacher>``,
    ``student_dropped/<teacher>`` and ``teacher_dropped/<teacher>`` (shares of tokens in no chunk), and
    ``tokens_per_second`` (student tokens over all ranks per second of wall time, since the last log). With
    ``on_policy > 0`` also ``on_policy_share`` (the share of micro-batches that were on-policy),
    ``completion_length`` (student tokens per generated completion, over all ranks) and ``generation_seconds``
    (this rank's time in generation), all since the last log.

    A teacher with ``learn_projection=True`` trains its W's values (P-KL only; :class:`xtoken.nn.LearnedProjection`)
    in an optimizer group of their own (``projection_lr``, no weight decay, the run's schedule, no gradient
    clipping, as in the X-Token paper); every checkpoint (and ``save_model``) holds the learned W as
    ``xtoken_projection_<teacher>.safetensors`` in :meth:`Projection.save`'s format, which resuming restores.
    The Trainer's own optimizer is required (not DeepSpeed's).
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments | None = None,
        *,
        teachers: Teacher | Sequence[Teacher] = (),
        student_tokenizer: Any,
        kd_scaling: str | tuple[float, float] = "dynamic",
        max_length: int | None = None,
        text_key: str = "text",
        student_chat_template: Any = None,
        train_on: str = "assistant",
        on_policy: float = 0.0,
        generation_config: Any = None,
        generator: CompletionGenerator | None = None,
        fused_linear: bool = False,
        keep_encodings: int = 0,
        **kwargs: Any,
    ) -> None:
        check_kd_scaling(kd_scaling)
        if not (isinstance(on_policy, (int, float)) and 0 <= on_policy <= 1 and math.isfinite(on_policy)):
            raise ValueError(f"on_policy: expected lmbda in [0, 1], got {on_policy!r}")
        if on_policy and not (teachers if not isinstance(teachers, Teacher) else [teachers]):
            raise ValueError("on_policy: needs at least one teacher to score the student's completions")
        if generator is not None and not isinstance(generator, CompletionGenerator):
            raise TypeError(
                f"generator: expected an xtoken.onpolicy.CompletionGenerator, got {type(generator).__name__}"
            )
        if args is None:
            args = TrainingArguments(output_dir="xtoken_distill")
        _check_batching(args)
        args.remove_unused_columns = False
        if fused_linear and args.ddp_find_unused_parameters is None:
            # The lm_head weight gets its gradient from the loss, outside the forward that DDP searches for unused
            # parameters (which would mark it ready twice).
            args.ddp_find_unused_parameters = False
        self.kd_scaling = kd_scaling
        self.teachers: list[PreparedTeacher] = prepare_teachers(teachers, student_tokenizer, _logit_width(model))
        kwargs.setdefault(
            "data_collator",
            DistillationCollator(
                student_tokenizer, [p.teacher for p in self.teachers], max_length=max_length, text_key=text_key,
                student_chat_template=student_chat_template, train_on=train_on, keep_encodings=keep_encodings,
            ),
        )  # fmt: skip
        self.on_policy = float(on_policy)
        self.generator = None
        if self.on_policy:
            self.generator = generator or HFGenerator(student_tokenizer, generation_config)
        if hasattr(student_tokenizer, "save_pretrained"):
            kwargs.setdefault("processing_class", student_tokenizer)
        super().__init__(model=model, args=args, **kwargs)
        for prepared in self.teachers:
            teacher = prepared.teacher
            teacher.model.to(device=self.args.device, dtype=teacher.dtype).eval().requires_grad_(False)
        # W or the common pairs on the training device once, not copied there at every step.
        self.teachers = [dataclasses.replace(p, mapping=_on_device(p.mapping, self.args.device)) for p in self.teachers]
        self.learned_projections = {
            p.name: p.mapping.to(self.args.device) for p in self.teachers if isinstance(p.mapping, LearnedProjection)
        }
        if self.learned_projections:
            if self.optimizer is not None:
                raise ValueError(
                    "learn_projection needs the optimizer the trainer creates (it adds a group for each learned W); "
                    "pass optimizer_cls_and_kwargs instead of optimizers=(...), or drop learn_projection"
                )
            self.add_callback(_LearnedProjectionSteps(self))
        self.fused_linear = self._setup_fused_linear(fused_linear)
        self._step_counts: torch.Tensor | None = None
        self._content_checked = False
        self._reset_log_sums()

    # ------------------------------------------------------------------ normalization
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The step's micro-batches, and the global counts that normalize them: the student's target tokens
        and each teacher's chunks over every micro-batch of the step on every rank."""
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if on_policy_step(self.args.seed, self.state.global_step, self.on_policy):
            batch_samples = [self._on_policy_batch(batch) for batch in batch_samples]
        counts = torch.zeros(1 + len(self.teachers), dtype=torch.float64, device=device)
        for batch in batch_samples:
            counts += self._local_counts(batch).to(device, non_blocking=True)  # no stream sync
        self._step_counts = self._all_ranks_sum(counts)
        return batch_samples, self._step_counts[0]

    @staticmethod
    def _local_counts(batch: dict[str, Any]) -> torch.Tensor:
        """float64 [1 + M] on the batch's device: target tokens, then chunks per teacher (no device sync: the
        chunk counts are filled in on the device, not copied there)."""
        targets = (batch["labels"][:, 1:] != -100).sum().double()
        chunks = [targets.new_full((), float(t["chunks"].shape[0])) for t in batch["teachers"]]
        return torch.stack([targets, *chunks])

    # ------------------------------------------------------------------ on-policy
    def _on_policy_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with the student's completions of its prompts in place of the data's: sampled by the
        generator, rendered on every side and aligned; no CE labels. Adds ``on_policy_stats`` (float64: 1, the
        completions, their student tokens) for the logs."""
        collator = self.data_collator
        if not isinstance(collator, DistillationCollator):
            raise TypeError("on_policy: the data_collator must be an xtoken.DistillationCollator (it renders the "
                            "student's completions for every teacher)")  # fmt: skip
        conversations = batch.get("conversations")
        if conversations is None:
            raise ValueError("on_policy: needs conversation data (examples with 'messages' or "
                             "'prompt'/'completion'); this batch holds texts")  # fmt: skip
        prompts = [
            GenerationPrompt(c.prompt(), text, ids, sampling_seed(self.args.seed, self.state.global_step, text))
            for c, (text, ids) in zip(conversations, collator.generation_prompts(conversations))
        ]
        start = time.perf_counter()
        with torch.no_grad():
            completions = self.generator.generate(self.model, prompts)
        self._log_generation_seconds += time.perf_counter() - start
        if len(completions) != len(prompts) or not all(isinstance(c, str) for c in completions):
            raise TypeError(f"generator: expected {len(prompts)} completion strings, got {completions!r:.200}")
        generated = collator.collate_conversations([c.with_completion(t) for c, t in zip(conversations, completions)],
                                                   train_on="assistant")  # fmt: skip
        generated["labels"] = torch.full_like(generated["labels"], -100)
        generated["on_policy"] = True
        tokens = float(generated["teachers"][0]["chunk_stats"][CHUNK_STAT_NAMES.index("student_tokens")])
        generated["on_policy_stats"] = torch.tensor([1.0, len(prompts), tokens], dtype=torch.float64)
        return generated

    def _all_ranks_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    # ------------------------------------------------------------------ the loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if len(inputs["teachers"]) != len(self.teachers):
            raise ValueError(
                f"the batch aligns {len(inputs['teachers'])} teacher(s) but the trainer has {len(self.teachers)}; "
                "a custom data_collator must produce DistillationCollator batches for the same teachers"
            )
        with ops.skip_content_checks(self._content_checked):  # checked once, then no host sync per step
            if self.fused_linear and not return_outputs:
                outputs = None
                ce_sum, kd_sums = self._fused_sums(model, inputs)
            else:
                outputs = _forward(model, inputs)
                logits = outputs.logits
                labels = inputs["labels"]
                ce_sum = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                    ignore_index=-100, reduction="sum",
                )  # fmt: skip
                kd_sums = [self._teacher_sum(p, logits, inputs, t) for p, t in zip(self.teachers, inputs["teachers"])]
        self._content_checked = True
        local = torch.stack([ce_sum.detach().double(), *(k.detach().double() for k in kd_sums)])
        local_counts = self._local_counts(inputs).to(local.device)
        stats = [t["chunk_stats"].to(local.device, torch.float64) for t in inputs["teachers"]]
        tokens = inputs["attention_mask"].sum().to(local.device, torch.float64).reshape(1)
        if self.on_policy:
            stats.append(inputs.get("on_policy_stats", torch.zeros(3, dtype=torch.float64)).to(local.device))

        training = model.training and self._step_counts is not None
        if training:
            # One all-reduce: the micro-batch's sums over all ranks (the dynamic ratio and the logs).
            summed = self._all_ranks_sum(torch.cat([local, local_counts, tokens, *stats]))
            counts, ranks = self._step_counts.to(local.device), self.accelerator.num_processes
        else:
            summed = torch.cat([local, local_counts, tokens, *stats])
            counts, ranks = local_counts, 1
        m = len(self.teachers)
        micro_sums, micro_counts = summed[: 1 + m], summed[1 + m : 2 + 2 * m]

        ce = ce_sum / counts[0].clamp_min(1)
        kd = sum(
            (p.weight * s / counts[1 + i].clamp_min(1) for i, (p, s) in enumerate(zip(self.teachers, kd_sums))),
            ce.new_zeros(()),
        )
        micro_means = micro_sums / micro_counts.clamp_min(1)
        micro_kd = sum((p.weight * micro_means[1 + i] for i, p in enumerate(self.teachers)), micro_means.new_zeros(()))
        scale = dynamic_scale(micro_means[0], micro_kd)
        if inputs.get("on_policy"):
            loss, scale = kd * (1.0 if self.kd_scaling == "dynamic" else self.kd_scaling[1]), torch.ones_like(scale)
        elif self.teachers:
            loss = combine_ce_kd(ce, kd, self.kd_scaling, reference=(micro_means[0], micro_kd))
        else:
            loss = ce
        if training:
            self._accumulate_log_sums(summed, scale)
        # DDP, FSDP and DeepSpeed average gradients over ranks; each rank's share of the global sum is
        # scaled back up by the number of ranks.
        loss = loss * ranks
        return (loss, outputs) if return_outputs else loss

    def _teacher_sum(
        self, prepared: PreparedTeacher, student_logits: torch.Tensor, inputs: dict[str, Any], batch: dict[str, Any]
    ) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = _forward(prepared.teacher.model, batch).logits
        return teacher_loss(
            prepared, student_logits, teacher_logits, batch["chunks"],
            student_targets=inputs["student_targets"], teacher_targets=batch["teacher_targets"],
        )  # fmt: skip

    # ------------------------------------------------------------------ fused linear losses
    def _setup_fused_linear(self, requested: bool) -> bool:
        """Whether the fused path runs; keeps the student's and each teacher's lm_head (None: logits path)."""
        if not requested:
            return False
        reason = ""
        if not self.teachers:
            reason = "there is no teacher (CE alone is computed from the logits)"
        elif self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            reason = "FSDP and DeepSpeed ZeRO-3 shard the lm_head weight, which the fused path reads outside the forward"
        else:
            self._student_head, why = linear_head(self.model)
            reason = f"the student cannot be fused: {why}" if self._student_head is None else ""
        if not reason:
            self._teacher_heads = []
            for prepared in self.teachers:
                head, why = linear_head(prepared.teacher.model)
                if head is None:
                    warnings.warn(f"fused_linear=True: teacher {prepared.name!r} keeps the logits path ({why}); the "
                                  "student's logits are computed in full for its loss", stacklevel=3)
                self._teacher_heads.append(head)
            if all(head is None for head in self._teacher_heads):
                reason = "no teacher can be fused"
        if reason:
            warnings.warn(f"fused_linear=True falls back to the logits path: {reason}", stacklevel=3)
        return not reason

    def _fused_sums(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The CE sum and each teacher's KD sum from final hidden states and lm_head weights (no [B, T, V] logits
        but the student's for a teacher on the logits path). CE shares the first fused teacher's logits blocks."""
        head = self._student_head
        with hidden_states_as_logits(head):
            hidden = _forward(model, inputs).logits
        hidden = hidden.to(head.weight.dtype)  # a model that upcasts its logits returns upcast hidden states
        ce_targets = F.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
        ce_sum, student_logits, kd_sums = None, None, []
        for prepared, batch, teacher_head in zip(self.teachers, inputs["teachers"], self._teacher_heads):
            if teacher_head is None:
                student_logits = head(hidden) if student_logits is None else student_logits
                kd_sums.append(self._teacher_sum(prepared, student_logits, inputs, batch))
                continue
            with torch.no_grad(), hidden_states_as_logits(teacher_head):
                teacher_hidden = _forward(prepared.teacher.model, batch).logits.to(teacher_head.weight.dtype)
            out = fused_teacher_loss(
                prepared, hidden, head, teacher_hidden, teacher_head, batch["chunks"],
                student_targets=inputs["student_targets"], teacher_targets=batch["teacher_targets"],
                ce_targets=ce_targets if ce_sum is None else None,
            )  # fmt: skip
            if ce_sum is None:
                out, ce_sum = out
            kd_sums.append(out)
        return ce_sum, kd_sums

    # ------------------------------------------------------------------ learned W
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus one group per learned W (its ``projection_lr``, no weight decay)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            for prepared in self.teachers:
                if prepared.name in self.learned_projections:
                    optimizer.add_param_group({
                        "params": list(self.learned_projections[prepared.name].parameters()),
                        "lr": prepared.teacher.projection_lr, "weight_decay": 0.0,
                    })  # fmt: skip
        return optimizer

    @staticmethod
    def projection_file(name: str) -> str:
        """The file name of teacher ``name``'s learned W in a checkpoint or output folder."""
        return f"xtoken_projection_{name}.safetensors"

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            for name, learned in self.learned_projections.items():
                learned.save(os.path.join(output_dir, self.projection_file(name)))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, learned in self.learned_projections.items():
            path = os.path.join(resume_from_checkpoint, self.projection_file(name))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{resume_from_checkpoint} holds no learned W for teacher {name!r} ({path})")
            learned.load_values(Projection.load(path))

    # ------------------------------------------------------------------ logging
    def _reset_log_sums(self) -> None:
        self._log_sums: torch.Tensor | None = None
        self._log_scale_sum = 0.0
        self._log_micro_batches = 0
        self._log_time = time.perf_counter()
        self._log_generation_seconds = 0.0

    def _accumulate_log_sums(self, summed: torch.Tensor, scale: torch.Tensor) -> None:
        summed = summed.detach()
        self._log_sums = summed if self._log_sums is None else self._log_sums + summed
        self._log_scale_sum = self._log_scale_sum + scale.detach().double()
        self._log_micro_batches += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._log_sums is not None:
            logs.update(self._distillation_logs())
            self._reset_log_sums()
        super().log(logs, start_time)

    def _distillation_logs(self) -> dict[str, float]:
        m = len(self.teachers)
        values = self._log_sums.cpu().tolist()
        sums, counts = values[: 1 + m], values[1 + m : 2 + 2 * m]
        tokens, stats = values[2 + 2 * m], values[3 + 2 * m :]
        elapsed = max(time.perf_counter() - self._log_time, 1e-9)
        logs = {"ce_loss": sums[0] / max(counts[0], 1), "tokens_per_second": tokens / elapsed}
        if m and self.kd_scaling == "dynamic":
            logs["kd_scale"] = float(self._log_scale_sum) / max(self._log_micro_batches, 1)
        for i, prepared in enumerate(self.teachers):
            logs[f"kd_loss/{prepared.name}"] = sums[1 + i] / max(counts[1 + i], 1)
            summary = chunk_stats_summary(torch.tensor(stats[i * _STATS : (i + 1) * _STATS]))
            for key, value in summary.items():
                logs[f"{key}/{prepared.name}"] = value
        if self.on_policy:
            on_policy_batches, completions, completion_tokens = stats[m * _STATS :]
            micro_batches = self._log_micro_batches * self.accelerator.num_processes
            logs["on_policy_share"] = on_policy_batches / max(micro_batches, 1)
            logs["completion_length"] = completion_tokens / max(completions, 1)
            logs["generation_seconds"] = self._log_generation_seconds
        return logs


def _on_device(mapping: Any, device: torch.device) -> Any:
    """What a teacher's loss reads besides the logits (W, the pairs, the piece tables, a tuple of them, or None),
    on ``device``."""
    if mapping is None:
        return None
    if isinstance(mapping, tuple):
        return tuple(_on_device(m, device) for m in mapping)
    return mapping.to(device)


class _LearnedProjectionSteps(TrainerCallback):
    """The optimizer steps of the learned W's values: their gradients averaged over ranks before each step (they
    are outside the model, so DDP does not), and cleared after it (the Trainer clears only the model's)."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def _parameters(self):
        return [p for learned in self.trainer.learned_projections.values() for p in learned.parameters()]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:
            for p in self._parameters():  # every rank joins every reduction, with or without a gradient
                p.grad = accelerator.reduce(torch.zeros_like(p) if p.grad is None else p.grad, reduction="mean")

    def on_optimizer_step(self, args, state, control, **kwargs):
        for p in self._parameters():
            p.grad = None


def _forward(model: torch.nn.Module, batch: dict[str, Any]):
    """The model on a batch's ids and attention mask, without building a KV cache where the model would (a
    training forward never reads one back; a transformers model with ``use_cache`` on spends ~7% of a small
    model's step on it)."""
    config = getattr(getattr(model, "module", model), "config", None)  # through a DDP wrapper
    off = getattr(config, "use_cache", False) and _takes_use_cache(type(model).forward)
    extra = {"use_cache": False} if off else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)


@functools.lru_cache(maxsize=64)
def _takes_use_cache(forward) -> bool:
    """Whether a forward accepts ``use_cache`` (by name or through ``**kwargs``): a custom model may carry a
    Hugging Face config without taking the argument."""
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _logit_width(model: torch.nn.Module) -> int | None:
    """The student's logit width (a padded lm_head may exceed the tokenizer), read without touching weights
    that DeepSpeed ZeRO-3 may have partitioned; None when the model does not say."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        return head.out_features
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _check_batching(args: TrainingArguments) -> None:
    """Each rank must collate its own batches: a chunk table indexes rows of its own batch."""
    config = args.accelerator_config
    if config.split_batches:
        raise ValueError(
            "accelerator_config.split_batches=True slices collated batches across ranks, which breaks the "
            "chunk tables; DistillationTrainer needs each rank to collate its own batches"
        )
    if config.dispatch_batches:
        raise ValueError(
            "accelerator_config.dispatch_batches=True sends slices of one collated batch to every rank, which "
            "breaks the chunk tables; DistillationTrainer needs dispatch_batches=False"
        )
    config.dispatch_batches = False
