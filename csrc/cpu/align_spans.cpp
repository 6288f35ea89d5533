// Exact span alignment on the CPU (SPEC.md §2; inputs and outputs in include/xtoken/align_spans.h).
//
// A boundary is a byte offset where a non-empty token of each side ends. Per sequence, a two-pointer
// walk over the non-empty tokens of both sides advances the side whose current token ends first (both
// on a tie); a tie closes a chunk. A chunk whose targets are positions [a, b) on a side has predictor
// rows [a - 1, b - 1) there. It is dropped when a side's first target is that side's first token (no
// predictor row, or a padding row under left padding), or when an empty token lies between its
// targets; the tokens after the last boundary are dropped as truncated. O(n_s + n_t) per sequence,
// one sequence at a time per thread; every kept chunk takes at least one token of each side, so a
// sequence never has more than C = min(T_s, T_t) chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "xtoken/align_spans.h"

namespace xtoken {
namespace cpu {
namespace {

// The real tokens of one side of one sequence.
struct Tokens {
  const int32_t* ends;
  int32_t n;
  int64_t row0;  // flattened row of the sequence's first real token

  // Moves i past empty tokens (ends equal to `prev`, the end of the last non-empty token).
  // Returns false where an end decreases.
  bool skip_empty(int32_t& i, int32_t prev) const {
    while (i < n && ends[i] == prev) ++i;
    return i == n || ends[i] > prev;
  }

  // The non-empty tokens in [i, n), or -1 where an end decreases.
  int32_t count_rest(int32_t i, int32_t prev) const {
    int32_t count = 0;
    for (; i < n; ++i) {
      if (ends[i] < prev) return -1;
      count += ends[i] > prev;
      prev = ends[i];
    }
    return count;
  }
};

// Fills sequence b's rows of the outputs; returns false (and writes nothing) on invalid input.
bool align_sequence(const Tokens& s, const Tokens& t, int32_t* out, int32_t& count, int32_t* dropped) {
  int32_t i = 0, j = 0;    // next token of each side
  int32_t ps = 0, pt = 0;  // end of the last non-empty token taken
  int32_t fs = 0, ft = 0;  // first target of the open chunk
  int32_t cs = 0, ct = 0;  // non-empty tokens in the open chunk
  int32_t kept = 0;
  int32_t drop[2][kNumDropReasons] = {};
  for (;;) {
    if (!s.skip_empty(i, ps) || !t.skip_empty(j, pt)) return false;
    if (i == s.n || j == t.n) break;
    const int32_t es = s.ends[i], et = t.ends[j];
    if (es <= et) {
      if (cs++ == 0) fs = i;
      ps = es;
      ++i;
    }
    if (et <= es) {
      if (ct++ == 0) ft = j;
      pt = et;
      ++j;
    }
    if (es != et) continue;
    // Targets [fs, i) and [ft, j); a gap between their count and their extent is an empty token.
    int reason = -1;
    if (fs == 0 || ft == 0) {
      reason = kNoPredictor;
    } else if (i - fs != cs || j - ft != ct) {
      reason = kEmptyInside;
    }
    if (reason < 0) {
      int32_t* c = out + 4 * kept++;
      c[0] = static_cast<int32_t>(s.row0 + fs - 1);
      c[1] = static_cast<int32_t>(s.row0 + i - 1);
      c[2] = static_cast<int32_t>(t.row0 + ft - 1);
      c[3] = static_cast<int32_t>(t.row0 + j - 1);
    } else {
      drop[0][reason] += cs;
      drop[1][reason] += ct;
    }
    cs = ct = 0;
  }
  const int32_t rest_s = s.count_rest(i, ps), rest_t = t.count_rest(j, pt);
  if (rest_s < 0 || rest_t < 0) return false;
  drop[0][kTruncated] = cs + rest_s;
  drop[1][kTruncated] = ct + rest_t;
  count = kept;
  std::copy(&drop[0][0], &drop[0][0] + 2 * kNumDropReasons, dropped);
  return true;
}

// Sequences per task: enough tokens that a batch of a few hundred thousand tokens (well under a
// millisecond) runs on the calling thread instead of waking the thread pool.
int64_t grain_size(const AlignParams& p) {
  constexpr int64_t kTokensPerTask = int64_t(1) << 18;
  return std::max<int64_t>(1, kTokensPerTask / std::max<int64_t>(1, p.side[0].T + p.side[1].T));
}

void align_spans_cpu_impl(const AlignParams& p) {
  at::parallel_for(0, p.B, grain_size(p), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int32_t* out = p.chunks + b * p.C * 4;
      int32_t* dropped = p.dropped + b * 2 * kNumDropReasons;
      Tokens side[2];
      bool ok = true;
      for (int s = 0; s < 2; ++s) {
        const AlignSide& a = p.side[s];
        const int32_t n = a.lengths[b];
        ok = ok && n >= 0 && n <= a.T;
        const int64_t offset = a.left_padded && ok ? a.T - n : 0;
        side[s] = {a.ends + b * a.T + offset, ok ? n : 0, b * a.T + offset};
      }
      int32_t count = 0;
      ok = ok && align_sequence(side[0], side[1], out, count, dropped);
      if (!ok) {
        count = 0;
        std::fill(dropped, dropped + 2 * kNumDropReasons, 0);
      }
      p.counts[b] = ok ? count : -1;
      std::fill(out + 4 * count, out + 4 * p.C, -1);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> align_spans_cpu(const at::Tensor& student_ends,
                                                               const at::Tensor& student_lengths,
                                                               bool student_left_padded,
                                                               const at::Tensor& teacher_ends,
                                                               const at::Tensor& teacher_lengths,
                                                               bool teacher_left_padded) {
  AlignTensors a = prepare_align(student_ends, student_lengths, student_left_padded, teacher_ends, teacher_lengths,
                                 teacher_left_padded);
  align_spans_cpu_impl(a.params);
  return {a.chunks, a.counts, a.dropped};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) { m.impl("align_spans", &cpu::align_spans_cpu); }

}  // namespace xtoken
