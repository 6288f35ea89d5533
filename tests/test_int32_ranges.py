"""Class 2 of issue 12: int64 indices used to be narrowed to int32 before any range check, so 2**32 + 1
became 1 and a wrong chunk, pair or W entry was computed silently. Every index table is now range-checked in
its own dtype first (xtoken.checks.int32_index)."""

from __future__ import annotations

import pytest
import torch
from reliability_util import LOSSES, case
from safetensors.torch import save_file

import xtoken
from xtoken import Projection
from xtoken.checks import int32_index

WRAPS = [2**32 + 1, -(2**32) + 1, 2**31, -(2**31) - 1]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("bad", WRAPS)
def test_chunks_past_int32_raise(name, bad):
    zs, zt, chunks, W, _, _ = case()
    table = chunks.long()
    table[1, 2] = bad
    with pytest.raises(ValueError, match=rf"chunks: entry \[1, 2\] = {bad} is outside \[-2147483648, 2147483647\]"):
        LOSSES[name][0](zs, zt, table, W)


def test_the_reported_chunk_raises_instead_of_computing_chunk_1_2_1_2():
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(ValueError, match="4294967297"):
        xtoken.pkl_loss(zs, zt, [[2**32 + 1, 2**32 + 2, 1, 2]], W)  # entry [0, 0] is reported first


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_in_range_int64_and_small_integer_tables_give_the_int32_result(name):
    zs, zt, chunks, W, _, _ = case()
    expected = LOSSES[name][0](zs, zt, chunks, W, reduction="none")
    for table in (chunks.long(), chunks.to(torch.int16), chunks.tolist()):
        assert torch.equal(LOSSES[name][0](zs, zt, table, W, reduction="none"), expected)


def test_pairs_past_int32_raise():
    zs, zt, chunks, W, _, _ = case()
    pairs = W.common_pairs("relaxed").long()
    pairs[0, 1] += 2**32
    with pytest.raises(ValueError, match=r"pairs: entry \[0, 1\] = 42949673\d\d is outside"):
        xtoken.gold_loss(zs, zt, chunks, pairs)
    with pytest.raises(ValueError, match=r"pairs: entry \[0, 1\]"):
        xtoken.nn.GOLDLoss(pairs)


def test_projection_idx_past_int32_raises():
    idx = torch.tensor([[0, -1], [2**32 + 1, -1]])
    val = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match=r"idx: entry \[1, 0\] = 4294967297 is outside"):
        Projection(idx, val)
    with pytest.raises(ValueError, match=r"idx: entry \[1, 0\] = 4294967297 is outside"):
        Projection(idx, val, teacher_vocab_size=3)
    with pytest.raises(ValueError, match=r"teacher ids must lie in \[-1, 3\)"):
        Projection(torch.tensor([[0], [3]]), val[:, :1], teacher_vocab_size=3)


def test_projection_sizes_past_int32_raise():
    W = Projection.identity(3)
    with pytest.raises(ValueError, match="teacher_vocab_size: expected an integer in"):
        Projection(W.idx, W.val, teacher_vocab_size=2**32 + 3)
    with pytest.raises(ValueError, match="teacher_width"):
        W.columns(2**32 + 3)
    with pytest.raises(ValueError, match="student_vocab_size"):
        W.pad_to(2**32 + 3)


def test_a_W_file_with_int64_ids_past_int32_raises(tmp_path):
    path = tmp_path / "W.safetensors"
    save_file({"idx": torch.tensor([[0], [2**32 + 1]]), "val": torch.ones(2, 1)}, str(path),
              metadata={"format": "xtoken-projection-1", "teacher_vocab_size": "2"})
    with pytest.raises(ValueError, match=r"W.safetensors: not a valid W: idx: entry \[1, 0\] = 4294967297"):
        Projection.load(path)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_align_spans_lengths_and_ends_past_int32_raise(side):
    ends = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    lengths = torch.tensor([3], dtype=torch.int32)
    args = {"student_ends": ends, "student_lengths": lengths, "teacher_ends": ends, "teacher_lengths": lengths}
    wrapped = dict(args, **{f"{side}_lengths": torch.tensor([2**32 + 3])})
    with pytest.raises(ValueError, match=rf"{side}_lengths: entry \[0\] = 4294967299 is outside"):
        xtoken.align_spans(**wrapped)
    wrapped = dict(args, **{f"{side}_ends": ends.long() + 2**32})
    with pytest.raises(ValueError, match=rf"{side}_ends: entry \[0, 0\] = 4294967297 is outside"):
        xtoken.align_spans(**wrapped)
    # In range, int64 gives the int32 result.
    expected = xtoken.align_spans(**args).table()
    assert torch.equal(xtoken.align_spans(**dict(args, **{f"{side}_ends": ends.long()})).table(), expected)


def test_int32_index_checks_in_the_source_dtype():
    assert int32_index(torch.tensor([2**31 - 1, -(2**31)]), "x").tolist() == [2**31 - 1, -(2**31)]
    with pytest.raises(ValueError, match=r"x: entry \[1\] = 2147483648"):
        int32_index(torch.tensor([0, 2**31]), "x")
    with pytest.raises(ValueError, match=r"x: entry \[0\] = -2 is outside \[-1, 5\]"):
        int32_index(torch.tensor([-2]), "x", -1, 5)
    with pytest.raises(TypeError, match="x: expected an integer tensor, got dtype torch.float32"):
        int32_index(torch.tensor([1.0]), "x")
