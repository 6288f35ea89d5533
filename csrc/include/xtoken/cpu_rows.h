// Row primitives of the CPU kernels: one pass over a logit or probability row each. They accumulate in
// A (float, or double for float64 logits). The loops vectorize (AVX2 + FMA when setup.py finds them on
// the build machine, SSE2 otherwise); they rely on -fno-trapping-math, without which GCC will not turn
// the selects of cpu_math into vector blends.
#pragma once

#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "xtoken/common.h"
#include "xtoken/cpu_math.h"

namespace xtoken {
namespace cpu {

template <typename T>
using acc_t = at::opmath_type<T>;

// Sums over a vocabulary run in blocks: a vectorized float sum inside each block, the block totals
// added in double. A plain float sum over 150k terms would lose ~1e-4 relative; this keeps the error
// at the level of one block.
constexpr int64_t kSumBlock = 512;

// sum_{i < n} term(i), blocked like the row sums: a vectorized A sum per block, the totals added in double.
template <typename A, typename Term>
A blocked_sum(int64_t n, const Term& term) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t e = b + kSumBlock < n ? b + kSumBlock : n;
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = b; i < e; ++i) s += term(i);
    total += s;
  }
  return static_cast<A>(total);
}

// max(z) of one row: the shift of the logsumexp passes below (common.h: RowLse, scaled_shift).
template <typename T, typename A>
A row_max(const T* z, int64_t V) {
  A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) {
    const A x = cpu_math::load<A>(z[v]);
    m = x > m ? x : m;
  }
  return m;
}

// max(z) of one row, or NaN if the row holds one (the max of a sequential scan that keeps a NaN once seen).
template <typename T, typename A>
A row_max_or_nan(const T* z, int64_t V) {
  A m = -std::numeric_limits<A>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t v = 0; v < V; ++v) {
    const A x = cpu_math::load<A>(z[v]);
    m = x > m ? x : m;
    nan |= x != x;
  }
  return nan ? std::numeric_limits<A>::quiet_NaN() : m;
}

// logsumexp(z * inv_tau) of one row, as (max, log_sum).
template <typename T, typename A>
RowLse<A> row_lse(const T* z, int64_t V, A inv_tau) {
  const A m = row_max<T, A>(z, V);
  double total = 0;
  for (int64_t b = 0; b < V; b += kSumBlock) {
    const int64_t e = b + kSumBlock < V ? b + kSumBlock : V;
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t v = b; v < e; ++v) s += cpu_math::exp(scaled_shift(cpu_math::load<A>(z[v]), m, inv_tau));
    total += s;
  }
  return {m, static_cast<A>(std::log(total))};
}

// out[v] = scale * p[v], p[v] = exp(lse.log_prob(z[v]))   (accumulate: out[v] += ...)
template <typename T, typename A>
void row_probs(A* out, const T* z, int64_t V, A inv_tau, RowLse<A> lse, A scale, bool accumulate) {
  if (accumulate) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] += scale * cpu_math::exp(lse.log_prob(cpu_math::load<A>(z[v]), inv_tau));
  } else {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] = scale * cpu_math::exp(lse.log_prob(cpu_math::load<A>(z[v]), inv_tau));
  }
}

template <typename A>
A dot(const A* a, const A* b, int64_t V) {
  double total = 0;
  for (int64_t blk = 0; blk < V; blk += kSumBlock) {
    const int64_t e = blk + kSumBlock < V ? blk + kSumBlock : V;
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t v = blk; v < e; ++v) s += a[v] * b[v];
    total += s;
  }
  return static_cast<A>(total);
}

// W laid out for branch-free CPU gathers. Each column's (row's) first entry sits in dense arrays, -1
// marking an empty column (row); the other entries form a list applied afterwards in order. A sum thus
// runs w_0 x_0 + w_1 x_1 + ... exactly as a plain loop over the column (row), the GPU's order, while the
// first, vectorizable pass does almost all of the work (most tokens have one entry).
// The weights are in A, the accumulation type.
template <typename A>
struct ProjectionPlan {
  std::vector<int32_t> col_first_src, col_rest_t, col_rest_src;
  std::vector<A> col_first_val, col_rest_val;
  std::vector<int32_t> row_first_t, row_rest_s, row_rest_t;
  std::vector<A> row_first_val, row_rest_val;

  ProjectionPlan(const ProjectionView& W, int64_t V_s, int64_t V_t)
      : col_first_src(V_t, -1), col_first_val(V_t, A(0)), row_first_t(V_s, -1), row_first_val(V_s, A(0)) {
    const A* val = W.values<A>();
    const A* col_val = W.col_values<A>();
    for (int64_t t = 0; t < V_t; ++t) {
      for (int32_t j = W.col_ptr[t]; j < W.col_ptr[t + 1]; ++j) {
        if (j == W.col_ptr[t]) {
          col_first_src[t] = W.col_src[j];
          col_first_val[t] = col_val[j];
        } else {
          col_rest_t.push_back(static_cast<int32_t>(t));
          col_rest_src.push_back(W.col_src[j]);
          col_rest_val.push_back(col_val[j]);
        }
      }
    }
    for (int64_t s = 0; s < V_s; ++s) {
      bool first = true;
      for (int64_t j = 0; j < W.P; ++j) {
        const int32_t t = W.idx[s * W.P + j];
        if (t < 0) continue;
        if (first) {
          row_first_t[s] = t;
          row_first_val[s] = val[s * W.P + j];
          first = false;
        } else {
          row_rest_s.push_back(static_cast<int32_t>(s));
          row_rest_t.push_back(t);
          row_rest_val.push_back(val[s * W.P + j]);
        }
      }
    }
  }
};

// out[i] = val[i] * x[src[i]] where src[i] >= 0, else 0; then out[rest_out[e]] += rest_val[e] * x[rest_src[e]].
template <typename A>
void gather_first(A* out, const A* x, const int32_t* src, const A* val, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const int32_t s = src[i] < 0 ? 0 : src[i];
    const A v = val[i] * x[s];
    out[i] = src[i] < 0 ? A(0) : v;
  }
}

template <typename A>
void gather_rest(A* out, const A* x, const std::vector<int32_t>& out_idx, const std::vector<int32_t>& src,
                 const std::vector<A>& val) {
  for (size_t e = 0; e < out_idx.size(); ++e) out[out_idx[e]] += val[e] * x[src[e]];
}

// q = W^T p (out [V_t], probs [V_s]).
template <typename A>
void gather_columns(A* out, const A* probs, const ProjectionPlan<A>& plan) {
  gather_first(out, probs, plan.col_first_src.data(), plan.col_first_val.data(),
               static_cast<int64_t>(plan.col_first_src.size()));
  gather_rest(out, probs, plan.col_rest_t, plan.col_rest_src, plan.col_rest_val);
}

// h = W g (out [V_s], g [V_t]).
template <typename A>
void gather_rows(A* out, const A* g, const ProjectionPlan<A>& plan) {
  gather_first(out, g, plan.row_first_t.data(), plan.row_first_val.data(),
               static_cast<int64_t>(plan.row_first_t.size()));
  gather_rest(out, g, plan.row_rest_s, plan.row_rest_t, plan.row_rest_val);
}

// Softmax of one row in two passes: out[v] = p[v] * scale; returns the row's logsumexp.
template <typename T, typename A>
RowLse<A> row_softmax(A* out, const T* z, int64_t V, A inv_tau, A scale) {
  const A m = row_max<T, A>(z, V);
  double total = 0;
  for (int64_t b = 0; b < V; b += kSumBlock) {
    const int64_t e = b + kSumBlock < V ? b + kSumBlock : V;
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t v = b; v < e; ++v) {
      const A ev = cpu_math::exp(scaled_shift(cpu_math::load<A>(z[v]), m, inv_tau));
      out[v] = ev;
      s += ev;
    }
    total += s;
  }
  const A f = static_cast<A>(static_cast<double>(scale) / total);
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] *= f;
  return {m, static_cast<A>(std::log(total))};
}

}  // namespace cpu
}  // namespace xtoken
