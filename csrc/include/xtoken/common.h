// Definitions shared by the host code, the CPU kernels and the CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define XT_HD __host__ __device__ __forceinline__
#else
#define XT_HD inline __attribute__((always_inline))
#endif

namespace xtoken {

// SPEC.md §4: the P-KL floor inside the log, log(q + eps).
constexpr double kPklEps = 1e-10;

// (z - m) / tau, for a logit z and its row's largest m (or any two logits): the shift comes before the scaling,
// so z / tau is never formed (it overflows for |z| ~ 3e38 and tau < 1) and the largest logit gets exactly 0
// however the product rounds (z * inv_tau - m * inv_tau rounds differently in a max pass and an exp pass
// under FMA contraction: P-KL was ~1% off at |z| ~ 1e6). z - m itself overflows only when |z| and |m| are both
// ~1e38; the difference is then taken from the scaled values, whose rounding is far below that magnitude
// (and the probability is 0 either way).
template <typename A>
XT_HD A scaled_shift(A z, A m, A inv_tau) {
  const A d = z - m;
  return d == A(-INFINITY) || d == A(INFINITY) ? z * inv_tau - m * inv_tau : d * inv_tau;
}

// The logsumexp of a row of z / tau in two parts, max(z) and log sum_v exp((z_v - max) / tau), so that
// log p_v = (z_v - max) / tau - log_sum keeps full precision: as one number, max / tau + log_sum, a log_sum
// in [0, log V] is rounded away next to a max / tau of 1e7 (two tied maxima at 1e7 lost log 2). The ops save
// one per row, as an [N, 2] tensor of the accumulation type, for the backward.
template <typename A>
struct RowLse {
  A max;      // max_v z_v, in logit units
  A log_sum;  // log sum_v exp((z_v - max) / tau), >= 0

  // log p_v of the row's logit z_v.
  XT_HD A log_prob(A z, A inv_tau) const { return scaled_shift(z, max, inv_tau) - log_sum; }
  // The same row with every probability multiplied by exp(log_c) (the bayes prefix factor c).
  XT_HD RowLse times(A log_c) const { return {max, log_sum - log_c}; }
};

// SPEC.md §3: how the predictor rows of one side of a chunk are pooled into one vector. LogMean is the
// geometric mean of the rows' probabilities, not renormalized (NeMo-RL's mean of log-probabilities).
enum class Merge : int32_t { First = 0, Mean = 1, Bayes = 2, LogMean = 3 };

// One row of the chunk table (SPEC.md §1): student rows [s0, s1), teacher rows [t0, t1).
struct Chunk {
  int32_t s0, s1, t0, t1;
};

// A projection W (student token -> teacher tokens) in the two forms the kernels read.
//   rows:    ELL, `idx[s * P + j]` (-1 = empty slot) with weight `val[s * P + j]`.
//   columns: its transpose, built once by xtoken.Projection: the student tokens that feed teacher
//            token t are `col_src[col_ptr[t] .. col_ptr[t+1])`, with weights `col_val[...]`.
// Both forms make the projection a gather, so no kernel needs atomics. The weights are in the kernels'
// accumulation type A (float, or double for float64 inputs): read them with values<A>() / col_values<A>().
struct ProjectionView {
  const int32_t* idx;
  const void* val;
  int64_t P;
  const int32_t* col_ptr;
  const int32_t* col_src;
  const void* col_val;
  int64_t nnz;  // entries of the column form (col_src, col_val)

  template <typename A>
  XT_HD const A* values() const {
    return static_cast<const A*>(val);
  }
  template <typename A>
  XT_HD const A* col_values() const {
    return static_cast<const A*>(col_val);
  }

  // The entries [begin, end) of column t, clamped into [0, nnz): when the content checks were skipped
  // (CUDA kernels only) col_ptr may hold anything, and the kernels still read nothing out of bounds.
  struct Range {
    int64_t begin, end;
  };
  XT_HD Range column(int64_t t) const {
    const int64_t b = col_ptr[t] < 0 ? 0 : (col_ptr[t] > nnz ? nnz : col_ptr[t]);
    const int64_t e = col_ptr[t + 1];
    return {b, e < b ? b : (e > nnz ? nnz : e)};
  }
};

}  // namespace xtoken
