// The chunk pooling of SPEC.md §3 on the GPU, shared by every chunked loss (the formulas and their
// backward are those of cpu_pooling.h). A Side is one side (student or teacher) of the chunks, with its own
// merge; its methods are called by a whole block working on one chunk.
#pragma once

#include <ATen/OpMathType.h>

#include "xtoken/cuda_utils.cuh"
#include "xtoken/loss.h"

namespace xtoken {
namespace cuda {

__device__ __forceinline__ bool chunk_ok(const Chunk& c, int64_t N_s, int64_t N_t) {
  return c.s0 >= 0 && c.s0 < c.s1 && c.s1 <= N_s && c.t0 >= 0 && c.t0 < c.t1 && c.t1 <= N_t;
}

// Rows [r0, r1) of a [rows, V] tensor set to `value` (none when r1 <= r0).
template <typename T>
__device__ void fill_rows(T* base, int64_t V, int64_t r0, int64_t r1, T value) {
  const int64_t n = (r1 - r0) * V;
  T* out = base + r0 * V;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = value;
}

template <typename T>
__device__ void zero_rows(T* base, int64_t V, int64_t r0, int64_t r1) {
  fill_rows(base, V, r0, r1, T(0));
}

__device__ __forceinline__ int64_t clamp_row(int64_t r, int64_t rows) { return r < 0 ? 0 : (r > rows ? rows : r); }

// The student gradient rows no chunk owns, around chunk k (see the CPU version in cpu_pooling.h): those between
// chunk k-1 and chunk k, and after the last chunk. The bounds are clamped into [0, N_s]: with the chunks'
// own rows (nan_rows_of_chunk for an invalid chunk) this writes every gradient row whatever the chunk table
// holds, and nothing outside the gradient (the content checks may have been skipped).
template <typename T>
__device__ void zero_rows_around_chunk(const LossParams& p, int64_t k) {
  T* dz = static_cast<T*>(p.grad_student);
  const Chunk c = p.chunks[k];
  zero_rows(dz, p.V_s, clamp_row(k == 0 ? 0 : p.chunks[k - 1].s1, p.N_s), clamp_row(c.s0, p.N_s));
  if (k == p.K - 1) zero_rows(dz, p.V_s, clamp_row(c.s1, p.N_s), p.N_s);
}

// The student rows of a chunk that fails chunk_ok (reachable only when the content checks were skipped), clamped
// into [0, N_s), get NaN: the gradient says that the chunk was invalid, as its NaN loss does.
template <typename T>
__device__ void nan_rows_of_chunk(const LossParams& p, const Chunk& c) {
  fill_rows(static_cast<T*>(p.grad_student), p.V_s, clamp_row(c.s0, p.N_s), clamp_row(c.s1, p.N_s), nan_value<T>());
}

// log sum_i exp(a_i[v] - L_i) over m rows from z (row stride V, logsumexps lse[0, m)): log(m p_mean[v]),
// without underflow.
template <typename T, typename A>
__device__ __forceinline__ A log_sum_probs(const T* z, int64_t V, A inv_tau, const RowLse<A>* lse, int32_t m, int64_t v) {
  A out = lse[0].log_prob(static_cast<A>(z[v]), inv_tau);
  for (int32_t i = 1; i < m; ++i) {
    const A x = lse[i].log_prob(static_cast<A>(z[i * V + v]), inv_tau);
    const A hi = x > out ? x : out, lo = x > out ? out : x;
    out = hi == A(-INFINITY) ? hi : hi + dlog(A(1) + dexp(lo - hi));
  }
  return out;
}

// The pooled rows of one side of a chunk: the probability of token v under pool(rows) without the
// bayes prefix factor c (first: row r0; bayes: the last row; mean: the average of all rows; logmean: the
// geometric mean of all rows), and its log.
template <typename T, typename A>
struct Pooled {
  const T* __restrict__ z;  // first row used
  int64_t V;
  A inv_tau;
  RowLse<A> L;                // its logsumexp (first, bayes)
  const RowLse<A>* lse;       // the rows' logsumexps (mean, logmean); written by the forward kernel: not __restrict__
  int32_t m;                  // rows pooled (mean, logmean), 0 otherwise
  bool log_mean;              // logmean rather than mean

  // log p: off the logits (one row), the mean of the rows' log-probabilities (logmean) or their log-mean-exp
  // (mean).
  __device__ __forceinline__ A log_prob(int64_t v) const {
    if (m == 0) return L.log_prob(static_cast<A>(z[v]), inv_tau);
    if (!log_mean) return log_sum_probs(z, V, inv_tau, lse, m, v) - dlog(A(m));
    A s = 0;
    for (int32_t i = 0; i < m; ++i) s += lse[i].log_prob(static_cast<A>(z[i * V + v]), inv_tau);
    return s / A(m);
  }

  __device__ __forceinline__ A prob(int64_t v) const {
    if (m == 0 || log_mean) return dexp(log_prob(v));
    A p = 0;
    for (int32_t i = 0; i < m; ++i) p += dexp(lse[i].log_prob(static_cast<A>(z[i * V + v]), inv_tau));
    return p / A(m);
  }

  // p and log p of the pooled vector times the bayes factor c = exp(log_c): mean takes the log of p (the
  // cheaper way where p is only weighted, as on the teacher side), the others exponentiate log p.
  __device__ __forceinline__ void prob_and_log(int64_t v, A log_c, A& p, A& lp) const {
    if (m > 0 && !log_mean) {
      p = prob(v);
      lp = dlog(p);
    } else {
      lp = log_prob(v) + log_c;
      p = dexp(lp);
    }
  }
};

// One side of the chunks as the kernels see it.
template <typename T, typename A>
struct Side {
  const T* __restrict__ z;
  int64_t V;
  A inv_tau;
  Merge merge;
  const int64_t* __restrict__ targets;
  RowLse<A>* lse;

  static Side student(const LossParams& p) {
    return {static_cast<const T*>(p.student_logits), p.V_s, A(p.inv_tau), p.student_merge, p.student_targets,
            static_cast<RowLse<A>*>(p.student_lse)};
  }
  static Side teacher(const LossParams& p) {
    return {static_cast<const T*>(p.teacher_logits), p.V_t, A(p.inv_tau), p.teacher_merge, p.teacher_targets,
            static_cast<RowLse<A>*>(p.teacher_lse)};
  }

  __device__ const T* row(int64_t r) const { return z + r * V; }
  __device__ int32_t lse_end(const int32_t r0, const int32_t r1) const { return merge == Merge::First ? r0 + 1 : r1; }
  __device__ int32_t pooled_row(const int32_t r0, const int32_t r1) const {
    return merge == Merge::Bayes ? r1 - 1 : r0;
  }

  // log c of merge="bayes" (0 otherwise), computed by one thread.
  __device__ A log_prefix(int32_t r0, int32_t r1) const {
    A log_c = 0;
    if (merge == Merge::Bayes) {
      for (int32_t r = r0; r < r1 - 1; ++r) {
        const int64_t x = targets[r];
        log_c += (x >= 0 && x < V) ? lse[r].log_prob(static_cast<A>(row(r)[x]), inv_tau) : nan_value<A>();
      }
    }
    return log_c;
  }

  // The pooled rows of a chunk (call after the lse values are written). One row pools to itself whatever the merge.
  __device__ Pooled<T, A> pooled(int32_t r0, int32_t r1) const {
    if ((merge == Merge::Mean || merge == Merge::LogMean) && r1 - r0 > 1) {
      return {row(r0), V, inv_tau, RowLse<A>{A(0), A(0)}, lse + r0, r1 - r0, merge == Merge::LogMean};
    }
    const int32_t r = pooled_row(r0, r1);
    return {row(r), V, inv_tau, lse[r], nullptr, 0, false};
  }

  // Writes the logsumexp of every row the pooling reads (the whole block takes part).
  __device__ void compute_lse(int32_t r0, int32_t r1, A* scratch) const {
    for (int32_t r = r0; r < lse_end(r0, r1); ++r) {
      const RowLse<A> L = row_lse(row(r), V, inv_tau, scratch);
      if (threadIdx.x == 0) lse[r] = L;
    }
  }

  // The D of pool_backward for first, bayes and logmean: the pooled probabilities without c against h(v).
  template <typename H>
  __device__ A pooled_dot(const H& h, int32_t r0, int32_t r1, A* scratch) const {
    const Pooled<T, A> pooled_rows = pooled(r0, r1);
    A acc = 0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) acc += pooled_rows.prob(v) * h(v);
    return block_sum(acc, scratch);
  }

  // The gradient rows [r0, r1) of a loss whose gradient in the pooled vector is h(v), into the gradient
  // base dz (row 0); every row of the chunk is written. c is the bayes prefix factor and D = <p, h> with p
  // the pooled probabilities without c (first, bayes, logmean; see pooled_dot); mean computes its own per row.
  template <typename H>
  __device__ void pool_backward(T* dz, const H& h, int32_t r0, int32_t r1, A c, A D, A* scratch) const {
    if (merge == Merge::First) {
      const RowLse<A> L = lse[r0];
      const T* zr = row(r0);
      T* out = dz + r0 * V;
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        out[v] = static_cast<T>(inv_tau * dexp(L.log_prob(static_cast<A>(zr[v]), inv_tau)) * (h(v) - D));
      }
      zero_rows(dz, V, r0 + 1, r1);
    } else if (merge == Merge::Mean) {
      const A scale = inv_tau / A(r1 - r0);
      for (int32_t r = r0; r < r1; ++r) {
        const RowLse<A> L = lse[r];
        const T* zr = row(r);
        A d_row = 0;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x) d_row += dexp(L.log_prob(static_cast<A>(zr[v]), inv_tau)) * h(v);
        d_row = block_sum(d_row, scratch);
        T* out = dz + r * V;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
          out[v] = static_cast<T>(scale * dexp(L.log_prob(static_cast<A>(zr[v]), inv_tau)) * (h(v) - d_row));
        }
      }
    } else if (merge == Merge::LogMean) {  // dz_r = (p_hat h - p_r D) / (m tau)
      const A scale = inv_tau / A(r1 - r0);
      const Pooled<T, A> pooled_rows = pooled(r0, r1);
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const A hp = h(v) * pooled_rows.prob(v);
        for (int32_t r = r0; r < r1; ++r) {
          dz[r * V + v] = static_cast<T>(scale * (hp - dexp(lse[r].log_prob(static_cast<A>(row(r)[v]), inv_tau)) * D));
        }
      }
    } else {  // Bayes: D is u = <p_last, h>
      const int32_t last = r1 - 1;
      const RowLse<A> L = lse[last];
      const T* zr = row(last);
      T* out = dz + last * V;
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        out[v] = static_cast<T>(inv_tau * c * dexp(L.log_prob(static_cast<A>(zr[v]), inv_tau)) * (h(v) - D));
      }
      const A coef = inv_tau * c * D;
      for (int32_t r = r0; r < last; ++r) {
        const RowLse<A> Lr = lse[r];
        const T* zp = row(r);
        const int64_t x = targets[r];
        T* o = dz + r * V;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
          o[v] = static_cast<T>(coef * ((v == x ? A(1) : A(0)) - dexp(Lr.log_prob(static_cast<A>(zp[v]), inv_tau))));
        }
      }
    }
  }
};

// log c of both sides' pooling of chunk c (merge="bayes"; 0 otherwise), computed by thread 0 and returned to
// every thread. With `lse` (the forward), first the logsumexps of the rows the pooling reads, saved for the
// backward. The whole block takes part; a kernel looping over chunks must sync between the return and the next
// call (its block sums do).
template <typename A>
struct LogPrefixes {
  A student, teacher;
};

template <typename T, typename A>
__device__ LogPrefixes<A> chunk_log_prefixes(const Side<T, A>& student, const Side<T, A>& teacher, const Chunk& c,
                                             bool lse, A* scratch) {
  __shared__ A shared[2];
  if (lse) {
    student.compute_lse(c.s0, c.s1, scratch);
    teacher.compute_lse(c.t0, c.t1, scratch);
    __syncthreads();  // the lse values written by thread 0 are read by every thread below
  }
  if (threadIdx.x == 0) {
    shared[0] = student.log_prefix(c.s0, c.s1);
    shared[1] = teacher.log_prefix(c.t0, c.t1);
  }
  __syncthreads();
  return {shared[0], shared[1]};
}

}  // namespace cuda
}  // namespace xtoken
