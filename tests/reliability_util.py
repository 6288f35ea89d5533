"""Small inputs and a table of every public loss, shared by the reliability tests (test_meta_devices,
test_int32_ranges, test_double_backward, test_huge_logits, test_stale_projection, test_temperature_range,
test_silent_accepts, test_valid_inputs, test_error_messages)."""

from __future__ import annotations

import torch

import xtoken
from xtoken import reference
from xtoken.testing import random_projection, random_targets

V_S, V_T, N_S, N_T = 17, 19, 9, 11

# 1:1, M:N, 1:N and M:1 chunks (student rows sorted and disjoint).
CHUNKS = [[0, 1, 0, 1], [1, 3, 1, 3], [3, 4, 3, 6], [5, 7, 7, 8]]


def case(device="cpu", dtype=torch.float32, scale=3.0):
    """(student logits, teacher logits, int32 chunks, W, student targets, teacher targets)."""
    W = random_projection(V_S, V_T, top_k=3, exact_fraction=0.6, empty_fraction=0.0)
    zs = (torch.randn(N_S, V_S, dtype=torch.float64) * scale).to(dtype).to(device)
    zt = (torch.randn(N_T, V_T, dtype=torch.float64) * scale).to(dtype).to(device)
    chunks = torch.tensor(CHUNKS, dtype=torch.int32, device=device)
    return zs, zt, chunks, W, random_targets(N_S, V_S).to(device), random_targets(N_T, V_T).to(device)


def pairs_of(W):
    return W.common_pairs("relaxed")


# name -> (fused loss, float64 reference); both called as f(zs, zt, chunks, W, **options). KD reads the first
# V_s teacher columns (it needs one vocabulary).
LOSSES = {
    "pkl": (
        lambda zs, zt, c, W, **kw: xtoken.pkl_loss(zs, zt, c, W, **kw),
        lambda zs, zt, c, W, **kw: reference.pkl_loss(zs, zt, c, W.idx, W.val, **kw),
    ),
    "gold": (
        lambda zs, zt, c, W, **kw: xtoken.gold_loss(zs, zt, c, pairs_of(W), **kw),
        lambda zs, zt, c, W, **kw: reference.hybrid_loss(zs, zt, c, pairs_of(W), **kw),
    ),
    "hkl": (
        lambda zs, zt, c, W, **kw: xtoken.hkl_loss(zs, zt, c, W, matched="jsd", **kw),
        lambda zs, zt, c, W, **kw: reference.hybrid_loss(zs, zt, c, pairs_of(W), matched="jsd", **kw),
    ),
    "uld": (
        lambda zs, zt, c, W, **kw: xtoken.uld_loss(zs, zt, c, **kw),
        lambda zs, zt, c, W, **kw: reference.hybrid_loss(zs, zt, c, torch.zeros(0, 2, dtype=torch.int32),
                                                         weights=(0.0, 1.0), **kw),
    ),
    "kd": (
        lambda zs, zt, c, W, **kw: xtoken.kd_loss(zs, zt[..., : zs.shape[-1]], c, **kw),
        lambda zs, zt, c, W, **kw: reference.kd_loss(zs, zt[..., : zs.shape[-1]], c, **kw),
    ),
}


def loss_and_grad(name, zs, zt, chunks, W, **options):
    """The fused loss and its gradient in the student logits (incoming gradient 2), both on the CPU. ``name`` is
    a key of LOSSES or "chain"."""
    z = zs.detach().clone().requires_grad_()
    loss = (CHAIN if name == "chain" else LOSSES[name])[0](z, zt, chunks, W, **options)
    (2.0 * loss.sum()).backward()
    return loss.detach().cpu(), z.grad.cpu()


def reference_loss_and_grad(name, zs, zt, chunks, W, **options):
    """The float64 reference's loss and gradient on the same inputs."""
    z = zs.detach().cpu().double().requires_grad_()
    loss = (CHAIN if name == "chain" else LOSSES[name])[1](z, zt.detach().cpu().double(), chunks.cpu(), W, **options)
    (2.0 * loss.sum()).backward()
    return loss.detach(), z.grad


# The chain KL (not in LOSSES: it needs piece tables and realized pieces, and pools no rows). The tables spell
# tokens in a small alphabet of pieces (0..4), so the realized pieces (targets % 5) reach the deeper levels.
def chain_tables() -> xtoken.PieceTables:
    g = torch.Generator().manual_seed(11)

    def table(V, L=3):
        t = torch.randint(0, 5, (V, L), generator=g, dtype=torch.int32)
        t[torch.arange(L)[None, :] >= torch.randint(1, L + 1, (V,), generator=g)[:, None]] = -1
        return t

    return xtoken.PieceTables(table(V_S), table(V_T))


CHAIN = (
    lambda zs, zt, c, W, **kw: xtoken.chain_loss(zs, zt, c, chain_tables(), **kw),
    lambda zs, zt, c, W, **kw: reference.chain_loss(zs, zt, c, chain_tables().student, chain_tables().teacher, **kw),
)


def chain_targets(ts, tt):
    return dict(student_targets=ts % 5, teacher_targets=tt % 5)
