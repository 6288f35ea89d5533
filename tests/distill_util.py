"""Tiny causal LMs and a DistillationTrainer run shared by the trainer tests and their torchrun worker
(``distill_worker.py``). Everything is built from configs: nothing is downloaded."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import xtoken
from tokenizers_util import (
    CORPUS,
    DIGIT_PACKING_ROLES,
    DIGIT_SPLITTING_ROLES,
    SENTENCEPIECE_ROLES,
    chat_tokenizer,
    digit_packing_bpe,
    digit_splitting_bpe,
    sentencepiece_bpe,
)
from xtoken.tokenizer import load_tokenizer

TEXTS = CORPUS[:11] * 2  # 22 texts, each of the corpus sentences twice
CHATS = [
    {"messages": [
        {"role": "user", "content": f"Say sentence {i}, please."}, {"role": "assistant", "content": text.strip()},
    ]}
    for i, text in enumerate(TEXTS)
]  # fmt: skip
"""22 conversations: a distinct question and one of the corpus sentences as the answer (stripped: the Llama-3
template trims contents)."""
CHAT_TOKENIZERS = {"digits": "chatml", "sentencepiece": "sentencepiece"}
"""Teacher name -> its chat tokenizer (the same vocabulary as in :func:`teacher_tokenizers`, with a template)."""


def student_tokenizer():
    return load_tokenizer(digit_packing_bpe(), roles=DIGIT_PACKING_ROLES)


def teacher_tokenizers() -> dict[str, object]:
    """Two teacher families: a digit-splitting BPE (like Qwen) and a SentencePiece BPE with byte fallback."""
    return {
        "digits": load_tokenizer(digit_splitting_bpe(), roles=DIGIT_SPLITTING_ROLES),
        "sentencepiece": load_tokenizer(sentencepiece_bpe(), roles=SENTENCEPIECE_ROLES),
    }


def tiny_lm(vocab_size: int, seed: int, hidden: int = 32):
    transformers = pytest.importorskip("transformers")  # a test extra; the tests that need a model skip without it
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@functools.cache
def _teacher_weights(name: str) -> dict[str, torch.Tensor]:
    """A tiny teacher trained with CE on :data:`TEXTS` in its own tokenization (so it knows the data better
    than a fresh student): 40 full-batch AdamW steps, deterministic."""
    tokenizer = student_tokenizer() if name == "same" else teacher_tokenizers()[name]
    ids = tokenizer.hf_tokenizer().encode_batch(TEXTS)
    width = max(len(e.ids) for e in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, encoding in enumerate(ids):
        input_ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
        mask[row, : len(encoding.ids)] = 1
    model = tiny_lm(len(tokenizer), seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def teacher_lm(name: str):
    tokenizer = student_tokenizer() if name == "same" else teacher_tokenizers()[name]
    model = tiny_lm(len(tokenizer), seed=1)
    model.load_state_dict(_teacher_weights(name))
    return model


def make_teachers(names: list[str], student, loss: str = "auto", chat: bool = False) -> list[xtoken.Teacher]:
    """Teachers by name: a key of :func:`teacher_tokenizers`, or ``"same"`` (the student's tokenizer, KD).
    Weights 1, 1/2, 1/3, ... in order. ``chat``: their tokenizers carry chat templates (:data:`CHAT_TOKENIZERS`)."""
    tokenizers = teacher_tokenizers()
    if chat:
        tokenizers = {name: chat_tokenizer(kind) for name, kind in CHAT_TOKENIZERS.items()}
    teachers = []
    for i, name in enumerate(names):
        if name == "same":
            teachers.append(xtoken.Teacher(teacher_lm(name), None, None, loss="kd", weight=1.0 / (i + 1), name=name))
            continue
        tokenizer = tokenizers[name]
        projection = xtoken.Projection.build(student, tokenizer)
        teachers.append(
            xtoken.Teacher(teacher_lm(name), tokenizer, projection, loss=loss, weight=1.0 / (i + 1), name=name)
        )
    return teachers


def train(
    output_dir: str,
    *,
    teachers: list[str],
    batch_size: int,
    accumulation: int = 1,
    steps: int = 4,
    kd_scaling="dynamic",
    save_steps: int | None = None,
    resume: str | None = None,
    max_length: int | None = None,
    chat: bool = False,
    on_policy: float | None = None,
    learning_rate: float = 1e-2,
    fused_linear: bool = False,
    teacher_settings: dict | None = None,
    keep_encodings: int = 0,
):
    """Train a tiny student for ``steps`` optimizer steps on :data:`TEXTS` (fixed order), or with ``chat`` on
    :data:`CHATS` (a Llama-3 template student, teachers with their own templates), and return the trainer. With
    ``on_policy`` the student samples up to 8 tokens per answer. The student, teachers and data are the same in
    every process. ``max_length`` defaults to 48 tokens (96 for chat: the templates take room). ``teacher_settings``:
    Teacher attributes set on every teacher with a projection (e.g. ``loss``, ``merge``, ``learn_projection``)."""
    from transformers import TrainingArguments

    max_length = max_length or (96 if chat else 48)
    student_tok = chat_tokenizer("llama3") if chat else student_tokenizer()
    student = tiny_lm(len(student_tok), seed=0)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=learning_rate, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None, dataloader_drop_last=True,
        ddp_find_unused_parameters=False,
    )  # fmt: skip
    extra = {}
    if on_policy is not None:
        eos = student_tok.eos_token_id if chat else student_tok.roles["eos"]
        extra = dict(on_policy=on_policy, generation_config={"max_new_tokens": 8, "eos_token_id": eos})
    teacher_list = make_teachers(teachers, student_tok, chat=chat)
    for teacher in teacher_list:
        if teacher.projection is not None:
            for key, value in (teacher_settings or {}).items():
                setattr(teacher, key, value)
    trainer = xtoken.DistillationTrainer(
        student, args, teachers=teacher_list, student_tokenizer=student_tok,
        kd_scaling=kd_scaling, max_length=max_length, train_dataset=CHATS if chat else TEXTS, fused_linear=fused_linear,
        keep_encodings=keep_encodings, **extra,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def training_logs(trainer) -> list[dict[str, float]]:
    """The per-step training logs, without the timing-dependent entries."""
    return [
        {k: v for k, v in entry.items() if k not in ("tokens_per_second", "generation_seconds")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
