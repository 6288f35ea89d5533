"""On-policy distillation across tokenizers: the sampler is exact and deterministic per prompt; with lmbda = 1
every step generates (checked through the logs) and the losses fall; lmbda = 0 is the off-policy trainer exactly;
data parallelism (torchrun, two CPU ranks over gloo) equals one process and a checkpoint resumes exactly, with
on-policy steps among the steps; a custom generator plugs in; bad settings fail clearly. Tiny Llama-style models
from configs, chat tokenizers trained here (tokenizers_util)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import xtoken
from distill_util import CHATS, TEXTS, make_teachers, tiny_lm, train, training_logs
from test_trainer import assert_logs_close, weights
from tokenizers_util import chat_tokenizer
from xtoken.chat import ChatTemplate, Conversation, render_prompts
from xtoken.onpolicy import (
    CompletionGenerator,
    GenerationPrompt,
    HFGenerator,
    gumbel_noise,
    on_policy_step,
    sampling_seed,
)

TESTS = Path(__file__).parent

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Sampling


def test_gumbel_noise_samples_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -3.0])
    draws = 60_000
    picks = (logits + gumbel_noise(torch.arange(draws), 3, logits.numel())).argmax(-1)
    frequencies = torch.bincount(picks, minlength=logits.numel()).double() / draws
    expected = torch.softmax(logits.double(), 0)
    # Binomial standard errors: every frequency within 4.5 of them.
    assert ((frequencies - expected).abs() <= 4.5 * (expected * (1 - expected) / draws).sqrt()).all(), frequencies


def test_gumbel_noise_is_a_function_of_seed_position_and_token():
    seeds = torch.tensor([5, 2**62 + 7, 11])
    noise = gumbel_noise(seeds, 4, 300)
    assert torch.equal(noise[1:2], gumbel_noise(seeds[1:2], 4, 300))  # the batch does not matter
    assert torch.equal(noise[:, :100], gumbel_noise(seeds, 4, 100))  # nor the vocabulary size
    assert not torch.equal(noise, gumbel_noise(seeds, 5, 300))
    assert not torch.equal(noise[0], noise[2])
    assert torch.isfinite(noise).all()


def test_on_policy_steps_and_seeds_are_deterministic():
    steps = [on_policy_step(0, step, 0.5) for step in range(400)]
    assert steps == [on_policy_step(0, step, 0.5) for step in range(400)]
    assert 0.4 < sum(steps) / 400 < 0.6
    assert steps != [on_policy_step(1, step, 0.5) for step in range(400)]
    assert not any(on_policy_step(0, step, 0.0) for step in range(50))
    assert all(on_policy_step(0, step, 1.0) for step in range(50))
    assert sampling_seed(0, 3, "a") == sampling_seed(0, 3, "a") != sampling_seed(0, 4, "a")


def prompts_for(tokenizer, count: int, step: int = 0) -> list[GenerationPrompt]:
    questions = [[{"role": "user", "content": f"Question {i}: {i * 37}?"}] for i in range(count)]
    conversations = [Conversation.parse(q) for q in questions]
    rendered = render_prompts(conversations, xtoken.align.as_span_tokenizer(tokenizer), ChatTemplate(tokenizer))
    return [
        GenerationPrompt(c.prompt(), text, ids, sampling_seed(0, step, text))
        for c, (text, ids) in zip(conversations, rendered)
    ]


def test_hf_generator_samples_each_prompt_independently_of_its_batch():
    tokenizer = chat_tokenizer("llama3")
    model = tiny_lm(len(tokenizer), seed=0)
    prompts = prompts_for(tokenizer, 5)
    assert prompts[0].text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    generator = HFGenerator(tokenizer, {"max_new_tokens": 12, "eos_token_id": tokenizer.eos_token_id})
    together = generator.generate(model, prompts)
    assert [generator.generate(model, [p])[0] for p in prompts] == together
    assert generator.generate(model, prompts[::-1])[::-1] == together
    assert len(set(together)) == 5 and all(together)
    assert model.training  # left as it was
    config = {"max_new_tokens": 12, "eos_token_id": tokenizer.eos_token_id}
    greedy = HFGenerator(tokenizer, {**config, "do_sample": False})
    assert greedy.generate(model, prompts) == greedy.generate(model, prompts[::-1])[::-1] != together
    # Greedy equals the argmax path: very low temperature samples it.
    cold = HFGenerator(tokenizer, {**config, "temperature": 1e-4})
    assert cold.generate(model, prompts) == greedy.generate(model, prompts)
    with pytest.raises(ValueError, match="num_beams"):
        HFGenerator(tokenizer, {"num_beams": 2, "eos_token_id": 1}).generate(model, prompts)


def test_hf_generator_decodes_the_tokens_bytes_up_to_the_stop_token():
    tokenizer = chat_tokenizer("llama3")
    generator = HFGenerator(tokenizer)
    ids = tokenizer.encode("Café 2024 😀", add_special_tokens=False)
    stop = tokenizer.eos_token_id
    assert generator.decode([*ids, stop, *ids], [stop]) == "Café 2024 😀"
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1 and generator.decode(emoji[:-1]) == "\ufffd"  # a cut character becomes U+FFFD
    assert generator.decode([tokenizer.convert_tokens_to_ids("<|begin_of_text|>"), 10**7]) == "<|begin_of_text|>"


# ---------------------------------------------------------------------------------------------
# The trainer


def test_every_step_generates_with_lmbda_one_and_the_losses_fall(tmp_path):
    trainer = train(str(tmp_path), teachers=["digits"], batch_size=11, steps=10, chat=True, on_policy=1.0)
    history = [e for e in trainer.state.log_history if "loss" in e]
    assert len(history) == 10
    for entry in history:
        assert entry["on_policy_share"] == 1.0
        assert entry["completion_length"] > 1 and entry["generation_seconds"] > 0
        assert entry["ce_loss"] == 0 and entry["loss"] == pytest.approx(entry["kd_loss/digits"], rel=1e-5)
    before = sum(e["kd_loss/digits"] for e in history[:3]) / 3
    after = sum(e["kd_loss/digits"] for e in history[-3:]) / 3
    assert after < 0.8 * before, (before, after)


def test_lmbda_zero_is_the_off_policy_trainer(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    def no_generation(*args, **kwargs):
        raise AssertionError("lmbda = 0 must never generate")

    monkeypatch.setattr(LlamaForCausalLM, "generate", no_generation)
    for chat in (False, True):
        plain = train(str(tmp_path / f"plain{chat}"), teachers=["digits"], batch_size=4, steps=3, chat=chat)
        zero = train(str(tmp_path / f"zero{chat}"), teachers=["digits"], batch_size=4, steps=3, chat=chat,
                     on_policy=0.0)  # fmt: skip
        assert training_logs(zero) == training_logs(plain)
        assert torch.equal(weights(zero), weights(plain))
        assert "on_policy_share" not in training_logs(zero)[0]


def test_conversations_train_off_policy(tmp_path):
    # Two teachers with two templates (ChatML, and [INST] for the SentencePiece one: a teacher trained on plain
    # text, whose loss on chat data is noisy; only its chunks are checked).
    trainer = train(str(tmp_path), teachers=["digits", "sentencepiece"], batch_size=11, steps=10, chat=True)
    logs = training_logs(trainer)
    for key in ["ce_loss", "kd_loss/digits"]:
        before, after = (sum(e[key] for e in part) / 3 for part in (logs[:3], logs[-3:]))
        assert after < 0.85 * before, (key, before, after)
    for entry in logs:
        assert entry["chunks/digits"] > 100 and entry["chunks/sentencepiece"] > 50
        assert entry["student_dropped/digits"] < 0.05 and entry["teacher_dropped/sentencepiece"] < 0.05


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_torchrun_two_cpu_ranks_equal_one_process_on_policy(tmp_path):
    assert [on_policy_step(0, step, 0.5) for step in range(4)] == [True, False, True, True]
    output = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]), "OMP_NUM_THREADS": "1"}
    command = [
        "torchrun", "--standalone", "--nproc_per_node", "2", str(TESTS / "distill_worker.py"),
        str(output), "2", "--on-policy", "0.5", "digits", "sentencepiece",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = json.loads(output.read_text())
    single = train(str(tmp_path / "single"), teachers=["digits", "sentencepiece"], batch_size=4, chat=True,
                   on_policy=0.5)  # fmt: skip
    logs = training_logs(single)
    assert [entry["on_policy_share"] for entry in logs] == [1.0, 0.0, 1.0, 1.0]
    assert_logs_close(distributed["logs"], logs)
    expected = [p.detach().double().sum().item() for p in single.model.parameters()]
    assert distributed["weights"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_checkpoint_resumes_on_policy(tmp_path):
    options = dict(teachers=["digits"], batch_size=4, chat=True, on_policy=0.5)
    straight = train(str(tmp_path / "straight"), steps=4, **options)
    train(str(tmp_path / "interrupted"), steps=2, save_steps=2, **options)
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    resumed = train(str(tmp_path / "interrupted"), steps=4, resume=str(checkpoint), **options)
    assert [e["on_policy_share"] for e in training_logs(resumed)[-2:]] == [1.0, 1.0]
    assert_logs_close(training_logs(resumed)[-2:], training_logs(straight)[-2:])
    torch.testing.assert_close(weights(resumed), weights(straight), rtol=0, atol=2e-4)


class FixedAnswers(CompletionGenerator):
    """A stand-in for an external engine: answers every prompt with the same text and records the prompts."""

    def __init__(self, answer: str) -> None:
        self.answer, self.prompts = answer, []

    def generate(self, model, prompts):
        self.prompts += prompts
        return [self.answer] * len(prompts)


def test_a_custom_generator_plugs_in(tmp_path):
    from transformers import TrainingArguments

    student_tok = chat_tokenizer("llama3")
    generator = FixedAnswers("In 2024 there were 201 cats.")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2, logging_steps=1,
                             per_device_train_batch_size=4, disable_tqdm=True)  # fmt: skip
    trainer = xtoken.DistillationTrainer(
        tiny_lm(len(student_tok), seed=0), args, teachers=make_teachers(["digits"], student_tok, chat=True),
        student_tokenizer=student_tok, train_dataset=CHATS, on_policy=1.0, generator=generator,
    )  # fmt: skip
    trainer.train()
    assert len(generator.prompts) == 8
    first = generator.prompts[0]
    assert first.messages in [c["messages"][:1] for c in CHATS]  # the prompt: the question before the answer
    assert first.text.startswith("<|begin_of_text|>") and first.text.endswith("assistant<|end_header_id|>\n\n")
    assert first.input_ids == student_tok.encode(first.text, add_special_tokens=False)
    # The answer's chunks: "In", " ", "202", "4", ... against the digit-splitting teacher (1:N for numbers).
    logs = training_logs(trainer)
    assert logs[0]["completion_length"] == len(student_tok.encode(generator.answer, add_special_tokens=False))
    assert 0 < logs[0]["one_to_one/digits"] < 1


def test_bad_on_policy_settings(tmp_path):
    from transformers import TrainingArguments

    student_tok = chat_tokenizer("llama3")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                             per_device_train_batch_size=4, disable_tqdm=True)  # fmt: skip

    def make(**kwargs):
        options = dict(teachers=make_teachers(["digits"], student_tok, chat=True), train_dataset=CHATS)
        options.update(kwargs)
        return xtoken.DistillationTrainer(tiny_lm(len(student_tok), seed=0), args, student_tokenizer=student_tok,
                                          **options)  # fmt: skip

    with pytest.raises(ValueError, match="on_policy"):
        make(on_policy=1.5)
    with pytest.raises(ValueError, match="at least one teacher"):
        make(on_policy=1.0, teachers=[])
    with pytest.raises(TypeError, match="CompletionGenerator"):
        make(on_policy=1.0, generator=lambda model, prompts: [])
    with pytest.raises(ValueError, match="conversation data"):
        make(on_policy=1.0, train_dataset=TEXTS, generation_config={"eos_token_id": 1}).train()
    with pytest.raises(TypeError, match="4 completion strings"):
        make(on_policy=1.0, generator=FixedAnswers(None)).train()
