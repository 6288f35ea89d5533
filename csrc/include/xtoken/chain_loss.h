// Chain KL (SPEC.md §4): the parameters the CPU and CUDA kernels share, and the host-side preparation.
//
// A piece table spells every token of one vocabulary in the other's tokens. The kernels read it in its
// sorted layout: the rows sorted lexicographically (-1, "no more pieces", before any id), with `order[r]`
// the token of sorted row r. The tokens whose first i pieces equal a prefix are then one contiguous range
// of sorted rows, and within it the tokens sharing piece i are contiguous runs (the "ends here" run first),
// so every bucket sum is a plain sequential sum: no scatter, no atomics, deterministic on both devices.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "xtoken/loss.h"

namespace xtoken {

struct PieceTableView {
  const int32_t* pieces;  // [V, L], rows in sorted order; nullptr when the table is absent
  const int32_t* order;   // [V]: the token id of each sorted row
  int64_t V, L;
};

struct ChainParams : LossParams {
  PieceTableView student_pieces;  // student tokens spelled in teacher ids
  PieceTableView teacher_pieces;  // teacher tokens spelled in student ids (pieces == nullptr: none)
};

struct ChainInputs : LossInputs {
  at::Tensor student_pieces, student_order, teacher_pieces, teacher_order;  // contiguous; teacher ones may be undefined

  ChainParams params() const;
};

ChainInputs prepare_chain(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                          const at::Tensor& student_pieces, const at::Tensor& student_order,
                          const c10::optional<at::Tensor>& teacher_pieces,
                          const c10::optional<at::Tensor>& teacher_order, double temperature,
                          const at::Tensor& student_targets, const at::Tensor& teacher_targets);

// The range of sorted rows [lo, hi) within [lo, hi) whose piece `col` equals `piece` (rows in [lo, hi) agree on
// the earlier pieces, so they are sorted by piece `col`).
XT_HD void piece_range(const PieceTableView& t, int64_t col, int32_t piece, int64_t& lo, int64_t& hi) {
  int64_t a = lo, b = hi;
  while (a < b) {  // first row with piece >= `piece`
    const int64_t mid = a + (b - a) / 2;
    if (t.pieces[mid * t.L + col] < piece) a = mid + 1; else b = mid;
  }
  int64_t c = a, d = hi;
  while (c < d) {  // first row with piece > `piece`
    const int64_t mid = c + (d - c) / 2;
    if (t.pieces[mid * t.L + col] <= piece) c = mid + 1; else d = mid;
  }
  lo = a;
  hi = c;
}

// One level of a chunk: the conditioned side's rows [lo, hi) at depth `depth`, compared with `plain_row`.
struct ChainLevel {
  bool teacher_side;  // true: student row conditioned on teacher pieces; false: teacher row on student pieces
  int32_t cond_row, plain_row;
  int64_t lo, hi, depth;
};

// Calls f(level) for every level of chunk `c` (SPEC.md §4, chain KL), in order:
//   m = 1 (1:1, 1:N): levels i = 0..n along the teacher's pieces, the student row s0 conditioned on the realized
//     teacher prefix, against teacher row t0 + i (t1 for i = n: the level after the chunk, left out when t1 = N_t);
//   n = 1 < m (M:1): levels j = 0..m-1 along the student's pieces, the teacher row t0 conditioned on the
//     realized student prefix, against student row s0 + j (without a teacher piece table: as M:N);
//   m, n > 1 (M:N): level 0 of the first kind.
// A level deeper than the table's L - 1, or below a prefix piece that is not a token id (< 0), is left out, and
// so are the levels below an empty range.
template <typename F>
XT_HD void for_each_chain_level(const ChainParams& p, const Chunk& c, F&& f) {
  const int32_t m = c.s1 - c.s0, n = c.t1 - c.t0;
  const bool student_side = m > 1 && n == 1 && p.teacher_pieces.pieces != nullptr;
  const PieceTableView& table = student_side ? p.teacher_pieces : p.student_pieces;
  const int64_t levels = m == 1 ? n + 1 : (student_side ? m : 1);
  ChainLevel level{!student_side, student_side ? c.t0 : c.s0, 0, 0, table.V, 0};
  for (int64_t i = 0; i < levels && i < table.L; ++i) {
    if (i > 0) {
      const int64_t piece = student_side ? p.student_targets[c.s0 + i - 1] : p.teacher_targets[c.t0 + i - 1];
      if (piece < 0 || piece > INT32_MAX) return;
      piece_range(table, i - 1, static_cast<int32_t>(piece), level.lo, level.hi);
      if (level.lo >= level.hi) return;
    }
    level.depth = i;
    level.plain_row = static_cast<int32_t>(student_side ? c.s0 + i : c.t0 + i);
    if (!student_side && level.plain_row >= p.N_t) return;
    f(level);
  }
}

}  // namespace xtoken
