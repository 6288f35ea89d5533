// Row primitives of the CPU kernels: one pass over a logit or probability row each. They accumulate in
// A (float, or double for float64 logits) and are compiled twice (AVX2 and baseline) with runtime
// selection, so the loops vectorize on any x86-64 CPU.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <limits>

#include "xtoken/common.h"
#include "xtoken/cpu_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define XT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define XT_CLONES
#endif

namespace xtoken {
namespace cpu {

template <typename T>
using acc_t = at::opmath_type<T>;

// logsumexp(z * inv_tau) of one row.
template <typename T, typename A>
XT_CLONES A row_lse(const T* z, int64_t V, A inv_tau) {
  A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) {
    const A x = static_cast<A>(z[v]);
    m = x > m ? x : m;
  }
  m *= inv_tau;
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) s += cpu_math::exp(static_cast<A>(z[v]) * inv_tau - m);
  return m + cpu_math::log(s);
}

// out[v] = scale * exp(z[v] * inv_tau - shift)   (accumulate: out[v] += ...)
template <typename T, typename A>
XT_CLONES void row_probs(A* out, const T* z, int64_t V, A inv_tau, A shift, A scale, bool accumulate) {
  if (accumulate) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] += scale * cpu_math::exp(static_cast<A>(z[v]) * inv_tau - shift);
  } else {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] = scale * cpu_math::exp(static_cast<A>(z[v]) * inv_tau - shift);
  }
}

template <typename A>
XT_CLONES A dot(const A* a, const A* b, int64_t V) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) s += a[v] * b[v];
  return s;
}

// out[t] = sum over the column of t of W[s, t] * probs[s]: the projection q = W^T p as a gather.
template <typename A>
void gather_columns(A* out, const A* probs, const ProjectionView& W, int64_t V_t) {
  for (int64_t t = 0; t < V_t; ++t) {
    A q = 0;
    for (int32_t j = W.col_ptr[t]; j < W.col_ptr[t + 1]; ++j) q += static_cast<A>(W.col_val[j]) * probs[W.col_src[j]];
    out[t] = q;
  }
}

// out[s] = sum_j W[s, idx_j] * g[idx_j]: the transpose product h = W g, a gather through W's rows.
template <typename A>
void gather_rows(A* out, const A* g, const ProjectionView& W, int64_t V_s) {
  for (int64_t s = 0; s < V_s; ++s) {
    const int32_t* idx = W.idx + s * W.P;
    const float* val = W.val + s * W.P;
    A h = 0;
    for (int64_t j = 0; j < W.P; ++j) h += idx[j] >= 0 ? static_cast<A>(val[j]) * g[idx[j]] : A(0);
    out[s] = h;
  }
}

}  // namespace cpu
}  // namespace xtoken
