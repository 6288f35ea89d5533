"""When the ops check the contents of their inputs (SPEC.md §6): the process-wide mode, the per-thread skip
scope, and the paths with no host sync per step (the nn modules and the trainer check their first call only,
every backward skips). On CUDA each op call that runs its content checks blocks the host once; the
``cuda_syncs`` mock counts those calls on the CPU, so these paths are tested without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import xtoken
from xtoken.ops import content_check_mode, content_checks_skipped, set_content_check_mode, skip_content_checks
from xtoken.testing import random_chunks, random_pairs, random_projection

LOSS_OPS = ("pkl_loss_fwd", "pkl_loss_bwd", "hybrid_loss_fwd", "hybrid_loss_bwd", "kd_loss_fwd", "kd_loss_bwd",
            "chain_loss_fwd", "chain_loss_bwd")


@pytest.fixture
def cuda_syncs(monkeypatch) -> list[tuple[str, bool]]:
    """Records every loss op call as (op name, whether it runs its content checks on CUDA inputs, i.e. one host
    sync there)."""
    calls: list[tuple[str, bool]] = []
    for name in LOSS_OPS:
        op = getattr(torch.ops.xtoken, name)

        def recorded(*args, _op=op, _name=name):
            calls.append((_name, not content_checks_skipped()))
            return _op(*args)

        monkeypatch.setattr(torch.ops.xtoken, name, recorded)
    return calls


@pytest.fixture
def always_mode():
    previous = set_content_check_mode("always")
    yield
    set_content_check_mode(previous)


def make_case(V_s=37, V_t=41, V_kd=37):
    zs = torch.randn(2 * 9, V_s)
    zt = torch.randn(2 * 11, V_t)
    chunks = random_chunks(2, 9, 11, one_to_one=0.6, drop=0.1)
    return zs, zt, chunks, random_projection(V_s, V_t), random_pairs(V_s, V_t, 20), zt[:, :V_kd].contiguous()


def test_mode_and_skip_scope():
    assert content_check_mode() == "auto" and not content_checks_skipped()
    with skip_content_checks():
        assert content_checks_skipped()
        with skip_content_checks(False):  # an inner scope may check again
            assert not content_checks_skipped()
        assert content_checks_skipped()
        previous = set_content_check_mode("always")  # debugging: every call checks, skip scopes included
        try:
            assert previous == "auto" and content_check_mode() == "always" and not content_checks_skipped()
        finally:
            set_content_check_mode(previous)
        assert content_checks_skipped()
    assert not content_checks_skipped()
    with pytest.raises(ValueError, match="expected 'auto' or 'always', got 'never'"):
        set_content_check_mode("never")


def test_skip_scope_is_per_thread_and_restored_on_error():
    seen = []
    with skip_content_checks():
        worker = threading.Thread(target=lambda: seen.append(content_checks_skipped()))
        worker.start()
        worker.join()
    assert seen == [False]
    with pytest.raises(KeyError), skip_content_checks():
        raise KeyError("inside the scope")
    assert not content_checks_skipped()


def test_mode_from_the_environment():
    root = str(Path(xtoken.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    script = "import xtoken; print(xtoken.ops.content_check_mode())"
    out = subprocess.run([sys.executable, "-c", script], env={**env, "XTOKEN_CONTENT_CHECKS": "always"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "always"
    bad = subprocess.run([sys.executable, "-c", script], env={**env, "XTOKEN_CONTENT_CHECKS": "sometimes"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "XTOKEN_CONTENT_CHECKS: expected 'auto' or 'always', got 'sometimes'" in bad.stderr


def test_cpu_inputs_are_checked_inside_a_skip_scope():
    # The scope spares CUDA calls their host sync; CPU checks cost none and always run, so the CPU kernels
    # never see an invalid chunk.
    zs, zt, _, W, pairs, zt_kd = make_case()
    bad = torch.tensor([[0, 1, 0, zt.shape[0] + 1]], dtype=torch.int32)
    with skip_content_checks():
        with pytest.raises(RuntimeError, match="N_t = 22"):
            xtoken.pkl_loss(zs, zt, bad, W)
        with pytest.raises(RuntimeError, match="N_t = 22"):
            xtoken.gold_loss(zs, zt, bad, pairs)
        with pytest.raises(RuntimeError, match="N_t = 22"):
            xtoken.kd_loss(zs, zt_kd, bad)


def modules(W, pairs):
    return {
        "pkl": (xtoken.nn.PKLLoss(W, merge="mean"), "pkl_loss", False),
        "gold": (xtoken.nn.GOLDLoss(pairs, uld_topk=9), "hybrid_loss", False),
        "hkl": (xtoken.nn.XTokenLoss(W, mode="hkl"), "hybrid_loss", False),
        "kd": (xtoken.nn.KDLoss(merge="first"), "kd_loss", True),
    }


@pytest.mark.parametrize("name", ["pkl", "gold", "hkl", "kd"])
def test_modules_check_their_first_call_only(cuda_syncs, name):
    zs, zt, chunks, W, pairs, zt_kd = make_case()
    module, op, same_vocab = modules(W, pairs)[name]
    for _ in range(3):
        z = zs.clone().requires_grad_()
        module(z, zt_kd if same_vocab else zt, chunks).backward()
    later = [(f"{op}_bwd", False), (f"{op}_fwd", False)] * 2 + [(f"{op}_bwd", False)]
    assert cuda_syncs == [(f"{op}_fwd", True)] + later


def test_chain_module_checks_its_first_call_only(cuda_syncs):
    zs, zt, chunks, _, _, _ = make_case()
    pieces = xtoken.PieceTables(torch.randint(-1, zt.shape[1], (zs.shape[1], 3), dtype=torch.int32))
    ts, tt = torch.randint(0, zt.shape[1], (zs.shape[0],)), torch.randint(0, zt.shape[1], (zt.shape[0],))
    module = xtoken.nn.ChainLoss(pieces)
    for _ in range(2):
        module(zs.clone().requires_grad_(), zt, chunks, ts, tt).backward()
    assert cuda_syncs == [("chain_loss_fwd", True), ("chain_loss_bwd", False), ("chain_loss_fwd", False),
                          ("chain_loss_bwd", False)]


def test_modules_check_every_call_in_always_mode(cuda_syncs, always_mode):
    zs, zt, chunks, W, pairs, _ = make_case()
    module = xtoken.nn.PKLLoss(W)
    for _ in range(2):
        module(zs.clone().requires_grad_(), zt, chunks).backward()
    assert cuda_syncs == [("pkl_loss_fwd", True), ("pkl_loss_bwd", True)] * 2


def test_functional_losses_check_every_forward_and_no_backward(cuda_syncs):
    zs, zt, chunks, W, pairs, zt_kd = make_case()
    for _ in range(2):
        xtoken.pkl_loss(zs.clone().requires_grad_(), zt, chunks, W).backward()
        xtoken.gold_loss(zs.clone().requires_grad_(), zt, chunks, pairs).backward()
        xtoken.kd_loss(zs.clone().requires_grad_(), zt_kd, chunks).backward()
    expected = [("pkl_loss_fwd", True), ("pkl_loss_bwd", False), ("hybrid_loss_fwd", True), ("hybrid_loss_bwd", False),
                ("kd_loss_fwd", True), ("kd_loss_bwd", False)]
    assert cuda_syncs == expected * 2


def test_trainer_checks_its_first_micro_batch_only(cuda_syncs, tmp_path, one_thread):
    pytest.importorskip("transformers")
    from distill_util import train

    train(str(tmp_path), teachers=["digits", "sentencepiece"], batch_size=4, accumulation=2, steps=3)
    forwards = [checked for name, checked in cuda_syncs if name.endswith("_fwd")]
    backwards = [checked for name, checked in cuda_syncs if name.endswith("_bwd")]
    assert len(forwards) == len(backwards) >= 2 * 3  # two teachers, at least one micro-batch per step
    # The first micro-batch's forwards (those before the first backward: P-KL and the chain KL for each teacher,
    # loss="auto" being pkl+chain for both) check their inputs; no later call does.
    first = next(i for i, (name, _) in enumerate(cuda_syncs) if name.endswith("_bwd"))
    assert [name for name, _ in cuda_syncs[:first]] == ["pkl_loss_fwd", "chain_loss_fwd"] * 2
    assert forwards[:first] == [True] * first and not any(forwards[first:]) and not any(backwards)
