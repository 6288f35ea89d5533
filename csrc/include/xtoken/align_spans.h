// Exact span alignment (SPEC.md §2): what the CPU and CUDA kernels of xtoken::align_spans share.
//
// Input, per side (0 = student, 1 = teacher): `ends [B, T]`, the byte offset where each token's span
// ends, and `lengths [B]`, the number of real tokens of each sequence (the rest is padding, on the
// right or on the left). Over a sequence's real tokens the ends never decrease: a token is *empty*
// (a BOS, EOS or chat marker that is not in the text) exactly when its end equals the previous
// token's end (0 before the first token), so the empty flags are part of `ends`.
//
// Output: `chunks [B, C, 4]` with C = min(T_s, T_t): the first counts[b] rows of sequence b are its
// kept chunks (s0, s1, t0, t1) over flattened predictor rows b * T + j, in order; the other rows are
// -1. A sequence has at most min(n_s, n_t) <= C chunks, so the capacity never overflows and the
// outputs have a size known before the kernel runs (no host sync; see python/xtoken/align.py for
// the compaction to the [K, 4] table the losses read). `counts [B]`, -1 for a sequence whose
// lengths or ends are invalid. `dropped [B, 2, kNumDropReasons]`: the non-empty tokens of each side
// that no kept chunk holds, by reason.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace xtoken {

enum DropReason : int32_t {
  kNoPredictor = 0,  // the chunk's first target is a side's first token: no predictor row (or a padding row)
  kEmptyInside = 1,  // an empty token lies between the chunk's targets, so its rows are not all predictors of targets
  kTruncated = 2,    // after the last byte offset both sides reach (the other side was cut or ends earlier)
  kNumDropReasons = 3,
};

struct AlignSide {
  const int32_t* ends;     // [B, T]
  const int32_t* lengths;  // [B]
  int64_t T;
  bool left_padded;
};

struct AlignParams {
  AlignSide side[2];
  int64_t B, C;
  int32_t* chunks;   // [B, C, 4]
  int32_t* counts;   // [B]
  int32_t* dropped;  // [B, 2, kNumDropReasons]
};

struct AlignTensors {
  at::Tensor ends[2], lengths[2];  // contiguous inputs
  at::Tensor chunks, counts, dropped;
  AlignParams params;
};

// Checks dtypes, shapes and devices (contents are checked by the kernels, which mark a bad
// sequence with count -1) and allocates the outputs.
AlignTensors prepare_align(const at::Tensor& student_ends, const at::Tensor& student_lengths,
                           bool student_left_padded, const at::Tensor& teacher_ends,
                           const at::Tensor& teacher_lengths, bool teacher_left_padded);

}  // namespace xtoken
