// The chunk pooling of SPEC.md §3 on the CPU, shared by every chunked loss: one side (student or teacher)
// of the chunks, its forward pooling (logsumexps saved for the backward, the bayes prefix factor) and the
// backward through it, plus the chunk loop and the gradient-row bookkeeping.
//
// Pooling, per side (each side has its own merge), rows r_0..r_{m-1}, a = z / tau, L = logsumexp(a),
// p = exp(a - L), read as exp((z - max) / tau - log_sum) (common.h: RowLse):
//   first: p_0 | mean: (1/m) sum p_i | bayes: c p_last, c = prod_{i<m-1} p_i[x_i] (x_i = realized target of row i)
//   logmean: exp((1/m) sum (a_i - L_i)), the geometric mean of the rows' probabilities, not renormalized
// Backward, given h = dLoss/dp_hat:
//   first: dz_0 = p_0 (h - <p_0, h>) / tau;  mean: dz_i = p_i (h - <p_i, h>) / (m tau)
//   bayes: u = <p_last, h>;  dz_last = c p_last (h - u) / tau;  dz_i = c u (onehot(x_i) - p_i) / tau  (i < m-1)
//   logmean: dz_i = (p_hat h - p_i <p_hat, h>) / (m tau)   (d log p_hat[y] / d a_i[v] = (delta_yv - p_i[v]) / m)
#pragma once

#include <ATen/Parallel.h>

#include <cstring>

#include "xtoken/cpu_rows.h"
#include "xtoken/loss.h"

namespace xtoken {
namespace cpu {

// dz[v] = scale * p[v] * (h[v] - D)
template <typename T, typename A>
void write_softmax_grad(T* dz, const A* p, const A* h, int64_t V, A D, A scale) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) dz[v] = cpu_math::store<T>(scale * p[v] * (h[v] - D));
}

// dz[v] = -coef * p[v], then dz[x] += coef: the gradient of coef * log p[x].
template <typename T, typename A>
void write_logprob_grad(T* dz, const T* z, int64_t V, A inv_tau, RowLse<A> L, int64_t x, A coef) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) dz[v] = cpu_math::store<T>(-coef * cpu_math::exp(L.log_prob(cpu_math::load<A>(z[v]), inv_tau)));
  dz[x] = cpu_math::store<T>(coef * (A(1) - cpu_math::exp(L.log_prob(cpu_math::load<A>(z[x]), inv_tau))));
}

// dz[v] = scale * (pooled[v] h[v] - p[v] D): the logmean gradient of one row.
template <typename T, typename A>
void write_logmean_grad(T* dz, const A* pooled, const A* h, const A* p, int64_t V, A D, A scale) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) dz[v] = cpu_math::store<T>(scale * (pooled[v] * h[v] - p[v] * D));
}

template <typename T>
void zero_rows(T* base, int64_t V, int64_t r0, int64_t r1) {
  if (r1 > r0) std::memset(static_cast<void*>(base + r0 * V), 0, sizeof(T) * (r1 - r0) * V);
}

// The student gradient rows no chunk owns, around chunk k: those between chunk k-1 and chunk k, and after the
// last chunk. With the chunks' own rows this writes every row exactly once (student rows are disjoint).
template <typename T>
void zero_rows_around_chunk(const LossParams& p, int64_t k) {
  T* dz = static_cast<T*>(p.grad_student);
  zero_rows(dz, p.V_s, k == 0 ? 0 : p.chunks[k - 1].s1, p.chunks[k].s0);
  if (k == p.K - 1) zero_rows(dz, p.V_s, p.chunks[k].s1, p.N_s);
}

// Runs body(k, work) for every chunk, one chunk at a time per OpenMP thread (dynamic schedule), with
// `work = make_work()` private to each thread; results do not depend on the thread count.
template <typename MakeWork, typename Body>
void parallel_chunks(int64_t K, const MakeWork& make_work, const Body& body) {
#pragma omp parallel num_threads(at::get_num_threads())
  {
    auto work = make_work();
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < K; ++k) body(k, work);
  }
}

// log p_hat[v] of a side pooled by first or bayes, read off the pooled row's logits: a[v] - L + log c ...
template <typename T, typename A>
struct LogFromLogits {
  const T* z;
  A inv_tau;
  RowLse<A> lse;  // the row's, times c
  __attribute__((always_inline)) A operator()(int64_t v) const { return lse.log_prob(cpu_math::load<A>(z[v]), inv_tau); }
};

// ... or, for mean and logmean, from an array that holds it.
template <typename A>
struct LogFromArray {
  const A* logs;
  __attribute__((always_inline)) A operator()(int64_t v) const { return logs[v]; }
};

// One side (student or teacher) of the chunks: its logits and how its rows are pooled.
template <typename T>
struct Side {
  using A = acc_t<T>;
  const T* z;
  int64_t V;
  A inv_tau;
  Merge merge;
  const int64_t* targets;
  RowLse<A>* lse;

  static Side student(const LossParams& p) {
    return {static_cast<const T*>(p.student_logits), p.V_s, A(p.inv_tau), p.student_merge, p.student_targets,
            static_cast<RowLse<A>*>(p.student_lse)};
  }
  static Side teacher(const LossParams& p) {
    return {static_cast<const T*>(p.teacher_logits), p.V_t, A(p.inv_tau), p.teacher_merge, p.teacher_targets,
            static_cast<RowLse<A>*>(p.teacher_lse)};
  }

  // Whether the pooled vector is one row's softmax times a constant (first, bayes): its log is read off the logits.
  bool single_row() const { return merge == Merge::First || merge == Merge::Bayes; }

  const T* row(int64_t r) const { return z + r * V; }

  // The row the pooled vector is read from (first, bayes).
  int32_t pooled_row(int32_t r0, int32_t r1) const { return merge == Merge::Bayes ? r1 - 1 : r0; }

  // log c of merge="bayes": sum over the prefix rows of log p_i[x_i] (0 otherwise). Reads lse.
  A log_prefix(int32_t r0, int32_t r1) const {
    A log_c = 0;
    if (merge == Merge::Bayes) {
      for (int32_t r = r0; r < r1 - 1; ++r) log_c += lse[r].log_prob(cpu_math::load<A>(row(r)[targets[r]]), inv_tau);
    }
    return log_c;
  }

  // out[v] = (1/m) sum_r (a_r[v] - L_r): log p_hat of logmean (reads lse).
  void mean_log_probs(A* out, int32_t r0, int32_t r1) const {
    const A w = A(1) / A(r1 - r0);
    for (int32_t r = r0; r < r1; ++r) {
      const T* zr = row(r);
      const RowLse<A> L = lse[r];
      if (r == r0) {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) out[v] = L.log_prob(cpu_math::load<A>(zr[v]), inv_tau);
      } else {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) out[v] += L.log_prob(cpu_math::load<A>(zr[v]), inv_tau);
      }
    }
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] *= w;
  }

  // out = exp(logs), the logmean vector from its log.
  static void exp_of(A* out, const A* logs, int64_t V) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] = cpu_math::exp(logs[v]);
  }

  // Calls fn(log_p) with log_p(v) = log p_hat[v]: off the pooled row's logits (first, bayes; log_c from the
  // pooling) or from `logs`, which the caller has filled (mean, logmean). One instantiation per form.
  template <typename Fn>
  auto with_log_pooled(const A* logs, int32_t r0, int32_t r1, A log_c, const Fn& fn) const {
    if (single_row()) {
      const int32_t r = pooled_row(r0, r1);
      return fn(LogFromLogits<T, A>{row(r), inv_tau, lse[r].times(log_c)});
    }
    return fn(LogFromArray<A>{logs});
  }

  // Forward: out = the pooled probability vector of rows [r0, r1), computing (and saving) the
  // logsumexp of every row it reads; `tmp` is a V-sized scratch buffer, which holds log p_hat on return
  // for logmean. Returns log c.
  A pool_softmax(A* out, A* tmp, int32_t r0, int32_t r1) const {
    if (merge == Merge::LogMean) {
      for (int32_t r = r0; r < r1; ++r) lse[r] = row_lse(row(r), V, inv_tau);
      mean_log_probs(tmp, r0, r1);
      exp_of(out, tmp, V);
      return A(0);
    }
    if (merge == Merge::Mean) {
      const A w = A(1) / A(r1 - r0);
      lse[r0] = row_softmax(out, row(r0), V, inv_tau, w);
      for (int32_t r = r0 + 1; r < r1; ++r) {
        lse[r] = row_softmax(tmp, row(r), V, inv_tau, w);
        add(out, tmp, V);
      }
      return A(0);
    }
    if (merge == Merge::First) {
      lse[r0] = row_softmax(out, row(r0), V, inv_tau, A(1));
      return A(0);
    }
    for (int32_t r = r0; r < r1 - 1; ++r) lse[r] = row_lse(row(r), V, inv_tau);
    const A log_c = log_prefix(r0, r1);
    lse[r1 - 1] = row_softmax(out, row(r1 - 1), V, inv_tau, cpu_math::exp(log_c));
    return log_c;
  }

  // Backward: the same vector from the saved logsumexps.
  void pool_probs(A* out, int32_t r0, int32_t r1, A log_c) const {
    if (merge == Merge::LogMean) {
      mean_log_probs(out, r0, r1);
      exp_of(out, out, V);
    } else if (merge == Merge::Mean) {
      const A w = A(1) / A(r1 - r0);
      for (int32_t r = r0; r < r1; ++r) row_probs(out, row(r), V, inv_tau, lse[r], w, r > r0);
    } else {
      const int32_t r = pooled_row(r0, r1);
      row_probs(out, row(r), V, inv_tau, lse[r].times(log_c), A(1), false);
    }
  }

  // The gradient rows [r0, r1) of a loss whose gradient in the pooled vector is h (V-sized), into the
  // gradient base `dz` (row 0). `pooled` is the pooled vector (read by first, logmean, and by bayes without
  // prefix rows), `scratch` V-sized. Writes every row of the chunk.
  void pool_backward(T* dz, const A* h, const A* pooled, A* scratch, int32_t r0, int32_t r1, A log_c) const {
    switch (merge) {
      case Merge::First: {
        const A D = dot(pooled, h, V);
        write_softmax_grad(dz + r0 * V, pooled, h, V, D, inv_tau);
        zero_rows(dz, V, r0 + 1, r1);
        break;
      }
      case Merge::Mean: {
        const A scale = inv_tau / A(r1 - r0);
        for (int32_t r = r0; r < r1; ++r) {
          row_probs(scratch, row(r), V, inv_tau, lse[r], A(1), false);
          const A D = dot(scratch, h, V);
          write_softmax_grad(dz + r * V, scratch, h, V, D, scale);
        }
        break;
      }
      case Merge::Bayes: {
        const int32_t last = r1 - 1;
        const A* p_last = pooled;  // with no prefix rows, c = 1 and the pooled vector is p_last
        if (last > r0) {
          row_probs(scratch, row(last), V, inv_tau, lse[last], A(1), false);
          p_last = scratch;
        }
        const A u = dot(p_last, h, V);
        const A c = cpu_math::exp(log_c);
        write_softmax_grad(dz + last * V, p_last, h, V, u, inv_tau * c);
        for (int32_t r = r0; r < last; ++r) {
          write_logprob_grad(dz + r * V, row(r), V, inv_tau, lse[r], targets[r], inv_tau * c * u);
        }
        break;
      }
      case Merge::LogMean: {
        const A D = dot(pooled, h, V);
        const A scale = inv_tau / A(r1 - r0);
        for (int32_t r = r0; r < r1; ++r) {
          row_probs(scratch, row(r), V, inv_tau, lse[r], A(1), false);
          write_logmean_grad(dz + r * V, pooled, h, scratch, V, D, scale);
        }
        break;
      }
    }
  }

  static void add(A* out, const A* x, int64_t V) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] += x[v];
  }
};

}  // namespace cpu
}  // namespace xtoken
