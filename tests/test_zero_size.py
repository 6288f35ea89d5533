"""Zero-size inputs (N = 0 rows, K = 0 chunks, an empty output vocabulary, B = 0 or T = 0 sequences): every op
returns the same shapes, dtypes and values on every device (on the GPU an empty launch grid is an error, so each
kernel must not be launched at all)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from xtoken.pieces import PieceTables
from xtoken.testing import random_pairs, random_projection

V_S, V_T = 37, 41


def _cases():
    """name -> a function of the device that returns the op's outputs (a tuple of tensors)."""
    W = random_projection(V_S, V_T)
    no_columns = (W.idx.new_full((V_S, 2), -1), W.val.new_zeros((V_S, 2)), torch.zeros(1, dtype=torch.int32),
                  torch.zeros(0, dtype=torch.int32), torch.zeros(0))  # W into an empty teacher vocabulary
    pairs = random_pairs(V_S, V_T, 9)
    pieces = PieceTables(torch.randint(-1, V_T, (V_S, 3), dtype=torch.int32),
                         torch.randint(-1, V_S, (V_T, 3), dtype=torch.int32))
    empty = torch.zeros(0, 4, dtype=torch.int32)

    def on(device, *tensors):
        return [t.to(device) for t in tensors]

    def losses(device, N_s, N_t):
        zs, zt, kd_t, chunks, p = on(device, torch.randn(N_s, V_S), torch.randn(N_t, V_T), torch.randn(N_t, V_S),
                                     empty, pairs)
        targets = on(device, torch.zeros(N_s, dtype=torch.long), torch.zeros(N_t, dtype=torch.long))
        out = []
        for op, args, options in (
            ("pkl_loss", (zs, zt, chunks, *on(device, *W.kernel_args(V_T))), (1.0, "mean", "mean", None, None)),
            ("hybrid_loss", (zs, zt, chunks, p), (1.0, "first", "first", "jsd", 0.5, 7, None, None)),
            ("kd_loss", (zs, kd_t, chunks), (1.0, "bayes", "bayes", *targets)),
            ("chain_loss", (zs, zt, chunks, *on(device, *pieces.kernel_args(V_S, V_T))), (1.0, *targets)),
        ):
            losses_, lse_s, lse_t = getattr(torch.ops.xtoken, f"{op}_fwd")(*args, *options)
            if op == "pkl_loss":  # also the gradient in W's values
                grad, grad_val = torch.ops.xtoken.pkl_loss_bwd(torch.ones_like(losses_), *args, *options, lse_s, lse_t,
                                                               True)
                out.append(grad_val)
            else:
                grad = getattr(torch.ops.xtoken, f"{op}_bwd")(torch.ones_like(losses_), *args, *options, lse_s, lse_t)
            out += [losses_, lse_s, lse_t, grad]
        return tuple(out)

    return {
        "project N = 0": lambda d: (torch.ops.xtoken.project_fwd(*on(d, torch.rand(0, V_S), *W.kernel_args(V_T))),
                                    torch.ops.xtoken.project_bwd(*on(d, torch.rand(0, V_T), *W.kernel_args(V_T)))),
        "project into V_t = 0": lambda d: (torch.ops.xtoken.project_fwd(*on(d, torch.rand(5, V_S), *no_columns)),),
        "project N = 0, V_t = 0": lambda d: (torch.ops.xtoken.project_fwd(*on(d, torch.rand(0, V_S), *no_columns)),),
        "losses K = 0": lambda d: losses(d, 6, 7),
        "losses K = 0, N_s = 0": lambda d: losses(d, 0, 7),
        "losses K = 0, N_t = 0": lambda d: losses(d, 6, 0),
        "losses K = 0, N = 0": lambda d: losses(d, 0, 0),
        "align B = 0": lambda d: torch.ops.xtoken.align_spans(
            *on(d, torch.zeros(0, 5, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)), False,
            *on(d, torch.zeros(0, 3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)), False),
        "align T = 0": lambda d: torch.ops.xtoken.align_spans(
            *on(d, torch.zeros(2, 0, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)), False,
            *on(d, torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)), False),
    }


CASES = _cases()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_zero_size_inputs_agree_across_devices(device, case):
    expected = CASES[case]("cpu")
    got = CASES[case](device)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.device.type == device and g.shape == e.shape and g.dtype == e.dtype
        assert torch.equal(g.cpu(), e)
    if case.startswith("losses"):
        for g in got:
            assert not g.any()  # zero losses, zero LSEs, zero gradients
