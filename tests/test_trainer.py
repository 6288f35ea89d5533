"""DistillationTrainer on tiny Llama-style models built from configs: training with one and two teachers
lowers the losses, global normalization makes data parallelism (torchrun, two CPU ranks over gloo) and
gradient accumulation equal to one process with the same global batch, a checkpoint resumes exactly,
and bad settings fail with clear errors."""

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
from distill_util import TEXTS, make_teachers, student_tokenizer, tiny_lm, train, training_logs

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def assert_logs_close(actual: list[dict], expected: list[dict], rtol: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert a.keys() == e.keys(), f"step {step}"
        for key in e:
            assert a[key] == pytest.approx(e[key], rel=rtol, abs=1e-7), f"step {step}: {key}"


@pytest.mark.parametrize("teachers", [["digits"], ["digits", "sentencepiece"]], ids=["one", "two"])
def test_losses_decrease(tmp_path, teachers):
    trainer = train(str(tmp_path), teachers=teachers, batch_size=11, steps=12)
    logs = training_logs(trainer)
    assert len(logs) == 12
    for key in ["loss", "ce_loss", *(f"kd_loss/{name}" for name in teachers)]:
        before = sum(entry[key] for entry in logs[:3]) / 3
        after = sum(entry[key] for entry in logs[-3:]) / 3
        assert after < 0.95 * before, f"{key}: {before:.4f} -> {after:.4f}"
    for entry in logs:
        for name in teachers:
            assert entry[f"chunks/{name}"] > 0
            assert 0 < entry[f"one_to_one/{name}"] <= 1
        assert entry["loss"] == pytest.approx(2 * entry["ce_loss"], rel=1e-4)  # dynamic scaling: KD equals CE
    assert all("tokens_per_second" in e for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize("loss", ["pkl", "hkl", "gold", "uld"])
def test_every_cross_tokenizer_loss_trains(tmp_path, loss):
    student_tok = student_tokenizer()
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=8, learning_rate=1e-2,
                             per_device_train_batch_size=11, logging_steps=1, disable_tqdm=True, seed=0)
    trainer = xtoken.DistillationTrainer(
        tiny_lm(len(student_tok), seed=0), args, teachers=make_teachers(["digits"], student_tok, loss=loss),
        student_tokenizer=student_tok, train_dataset=TEXTS,
    )  # fmt: skip
    assert trainer.teachers[0].loss == loss
    trainer.train()
    logs = training_logs(trainer)
    assert logs[-1]["kd_loss/digits"] < logs[0]["kd_loss/digits"]
    assert logs[-1]["ce_loss"] < logs[0]["ce_loss"]


def test_same_tokenizer_teacher_with_a_cross_tokenizer_teacher(tmp_path):
    trainer = train(str(tmp_path), teachers=["digits", "same"], batch_size=11, steps=6)
    logs = training_logs(trainer)
    assert logs[-1]["kd_loss/same"] < logs[0]["kd_loss/same"]
    assert logs[0]["one_to_one/same"] == 1.0  # the same tokenization aligns 1:1 everywhere
    assert logs[0]["student_dropped/same"] == logs[0]["teacher_dropped/same"]


def test_kept_encodings_train_the_same_student(tmp_path):
    """keep_encodings reaches the collator, and two epochs (22 texts, 11 steps of 4 with the last partial batch
    dropped) train the same student bit for bit as without it."""
    from xtoken.align import KeptEncodings

    kwargs = dict(teachers=["digits", "same"], batch_size=4, steps=11)
    plain = train(str(tmp_path / "plain"), **kwargs)
    kept = train(str(tmp_path / "kept"), keep_encodings=len(TEXTS), **kwargs)
    assert isinstance(kept.data_collator.student, KeptEncodings)
    assert not isinstance(plain.data_collator.student, KeptEncodings)
    assert len(kept.data_collator.student._kept) == len(set(TEXTS))
    assert training_logs(kept) == training_logs(plain)
    assert torch.equal(weights(kept), weights(plain))


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # Fixed weights: the normalization over the step's global counts makes the split invisible.
    kwargs = dict(teachers=["digits", "sentencepiece"], steps=3, kd_scaling=(1.0, 0.5))
    big = train(str(tmp_path / "big"), batch_size=4, **kwargs)
    accumulated = train(str(tmp_path / "accumulated"), batch_size=2, accumulation=2, **kwargs)
    assert_logs_close(
        [{k: v for k, v in e.items() if k != "epoch"} for e in training_logs(accumulated)],
        [{k: v for k, v in e.items() if k != "epoch"} for e in training_logs(big)],
    )
    # Adam turns float32 rounding in near-zero gradients into visible steps: compare within 2% of lr.
    torch.testing.assert_close(weights(accumulated), weights(big), rtol=0, atol=2e-4)


@pytest.mark.parametrize("teachers", [["digits"], ["sentencepiece", "same"]], ids=["one", "two"])
def test_fused_linear_equals_the_logits_path(tmp_path, teachers):
    # Dynamic scaling, CE fused into the first teacher's blocks, a cross-tokenizer and a same-tokenizer teacher.
    # P-KL named (loss="auto" picks P-KL + chain for "digits"; the chain losses are compared in the next test).
    pkl = dict(loss="pkl") if teachers == ["digits"] else None
    logits = train(str(tmp_path / "logits"), teachers=teachers, batch_size=4, steps=3, teacher_settings=pkl)
    widths = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: widths.append(out.shape[-1]) if isinstance(module, torch.nn.Linear)
        and module.out_features > 100 else None)
    try:
        fused = train(str(tmp_path / "fused"), teachers=teachers, batch_size=4, steps=3, fused_linear=True,
                      teacher_settings=pkl)
    finally:
        hook.remove()
    assert fused.fused_linear and all(head is not None for head in fused._teacher_heads)
    assert widths and all(w == 32 for w in widths)  # every lm_head call returned hidden states, never logits
    assert_logs_close(training_logs(fused), training_logs(logits))
    torch.testing.assert_close(weights(fused), weights(logits), rtol=0, atol=2e-4)


@pytest.mark.parametrize(
    "settings",
    [dict(loss="chain"), dict(loss="pkl+chain", merge=xtoken.NEMO_MERGE), dict(loss="hkl", merge=("bayes", "logmean")),
     dict(loss="pkl", merge=xtoken.NEMO_MERGE, learn_projection=True)],
    ids=["chain", "pkl+chain", "hkl", "learned-w"],
)
def test_fused_linear_equals_the_logits_path_for_every_loss_and_merge(tmp_path, settings):
    # The chain losses, the per-side merges and a learned W (its values trained from the fused blocks too), with
    # a cross-tokenizer and a same-tokenizer teacher.
    runs = [train(str(tmp_path / str(fused)), teachers=["digits", "same"], batch_size=4, steps=3,
                  fused_linear=fused, teacher_settings=settings) for fused in (False, True)]
    assert runs[1].fused_linear and all(head is not None for head in runs[1]._teacher_heads)
    assert_logs_close(training_logs(runs[1]), training_logs(runs[0]))
    torch.testing.assert_close(weights(runs[1]), weights(runs[0]), rtol=0, atol=2e-4)
    if settings.get("learn_projection"):
        learned = [run.learned_projections["digits"].weights().detach() for run in runs]
        assert not torch.allclose(learned[0], runs[0].teachers[0].teacher.projection.val)
        torch.testing.assert_close(learned[1], learned[0], rtol=0, atol=1e-5)


def test_fused_linear_on_policy_conversations_equal_the_logits_path(tmp_path):
    # The student samples with its full model (lm_head included); the losses of the sampled batch are fused. One
    # step: later samples would depend on weights that differ within float tolerance.
    runs = [train(str(tmp_path / str(fused)), teachers=["digits"], batch_size=4, steps=1, chat=True, on_policy=1.0,
                  fused_linear=fused) for fused in (False, True)]
    assert runs[1].fused_linear and training_logs(runs[1])[0]["on_policy_share"] == 1.0
    assert_logs_close(training_logs(runs[1]), training_logs(runs[0]))
    torch.testing.assert_close(weights(runs[1]), weights(runs[0]), rtol=0, atol=2e-4)


def test_fused_linear_falls_back_for_a_soft_capped_teacher(tmp_path):
    student_tok = student_tokenizer()
    digits, same = make_teachers(["digits", "same"], student_tok)
    same.model.config.final_logit_softcapping = 30.0
    with pytest.warns(UserWarning, match="teacher 'same' keeps the logits path .*final_logit_softcapping=30.0"):
        trainer = _trainer(tmp_path, teachers=[digits, same], fused_linear=True)
    assert trainer.fused_linear and trainer._teacher_heads[1] is None
    trainer.train()  # the soft-capped teacher's loss uses the student's logits
    with pytest.warns(UserWarning) as caught:
        trainer = _trainer(tmp_path, teachers=[same], fused_linear=True)
    assert not trainer.fused_linear
    assert "falls back to the logits path: no teacher can be fused" in str(caught[-1].message)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_torchrun_two_cpu_ranks_equal_one_process(tmp_path):
    output = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]), "OMP_NUM_THREADS": "1"}
    command = [
        "torchrun", "--standalone", "--nproc_per_node", "2", str(TESTS / "distill_worker.py"),
        str(output), "2", "digits", "sentencepiece",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = json.loads(output.read_text())
    single = train(str(tmp_path / "single"), teachers=["digits", "sentencepiece"], batch_size=4)
    assert_logs_close(distributed["logs"], training_logs(single))
    expected = [p.detach().double().sum().item() for p in single.model.parameters()]
    assert distributed["weights"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_checkpoint_resumes(tmp_path):
    straight = train(str(tmp_path / "straight"), teachers=["digits"], batch_size=4, steps=4)
    train(str(tmp_path / "interrupted"), teachers=["digits"], batch_size=4, steps=2, save_steps=2)
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    resumed = train(str(tmp_path / "interrupted"), teachers=["digits"], batch_size=4, steps=4, resume=str(checkpoint))
    assert_logs_close(training_logs(resumed)[-2:], training_logs(straight)[-2:])
    torch.testing.assert_close(weights(resumed), weights(straight), rtol=0, atol=2e-4)


def test_without_teachers_trains_on_ce(tmp_path):
    trainer = train(str(tmp_path), teachers=[], batch_size=11, steps=6)
    logs = training_logs(trainer)
    assert all(entry["loss"] == pytest.approx(entry["ce_loss"], rel=1e-5) for entry in logs)
    assert logs[-1]["ce_loss"] < logs[0]["ce_loss"]


def _trainer(tmp_path, **overrides):
    from transformers import TrainingArguments

    student_tok = student_tokenizer()
    kwargs = dict(
        model=tiny_lm(len(student_tok), seed=0),
        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1),
        teachers=make_teachers(["digits"], student_tok),
        student_tokenizer=student_tok,
        train_dataset=TEXTS,
    )
    kwargs.update(overrides)
    return xtoken.DistillationTrainer(**kwargs)


def test_bad_settings(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="kd_scaling"):
        _trainer(tmp_path, kd_scaling=(1.0,))
    with pytest.raises(ValueError, match="kd_scaling"):
        _trainer(tmp_path, kd_scaling=(1.0, -1.0))
    split = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                              accelerator_config={"split_batches": True})
    with pytest.raises(ValueError, match="split_batches"):
        _trainer(tmp_path, args=split)
    dispatch = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                 accelerator_config={"dispatch_batches": True})
    with pytest.raises(ValueError, match="dispatch_batches"):
        _trainer(tmp_path, args=dispatch)


def test_bad_dataset_example(tmp_path):
    trainer = _trainer(tmp_path, train_dataset=[{"content": "no text field"}] * 4)
    with pytest.raises(TypeError, match="'text'"):
        trainer.train()


def test_bf16_teacher_and_evaluation(tmp_path):
    from transformers import TrainingArguments

    student_tok = student_tokenizer()
    (teacher,) = make_teachers(["digits"], student_tok)
    teacher.dtype = torch.bfloat16
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                             per_device_train_batch_size=4, per_device_eval_batch_size=4, disable_tqdm=True)
    trainer = xtoken.DistillationTrainer(
        tiny_lm(len(student_tok), seed=0), args, teachers=teacher, student_tokenizer=student_tok,
        train_dataset=TEXTS, eval_dataset=TEXTS[:8],
    )  # fmt: skip
    model = trainer.teachers[0].teacher.model
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert not model.training
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_forward_turns_the_kv_cache_off_only_where_the_model_takes_it():
    """The trainer's forwards pass use_cache=False to a model whose config has use_cache and whose forward takes
    it (by name or **kwargs), and call a custom model that carries a config but not the argument as it is."""
    from types import SimpleNamespace

    from transformers import LlamaConfig
    from xtoken.trainer import _forward

    seen = []

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig()

        def forward(self, input_ids, attention_mask):
            seen.append("custom")
            return SimpleNamespace(logits=input_ids)

    class Kwargs(Custom):
        def forward(self, input_ids, attention_mask, **kwargs):
            seen.append(kwargs)
            return SimpleNamespace(logits=input_ids)

    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    _forward(Custom(), batch)
    _forward(Kwargs(), batch)
    no_cache = Kwargs()
    no_cache.config.use_cache = False
    _forward(no_cache, batch)
    assert seen == ["custom", {"use_cache": False}, {}]
