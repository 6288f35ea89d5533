// P-KL on the CPU (SPEC.md §3-4).
//
// Forward, per chunk (rows r_0..r_{m-1} on each side, a = z / tau, L = logsumexp(a), p = exp(a - L)):
//   p_s = pool(student rows)                 first: p_0 | mean: (1/m) sum p_i | bayes: c p_last,
//                                            c = prod_{i<m-1} p_i[x_i]  (x_i = realized target of row i)
//   q[t] = sum_s W[s, t] p_s[s]              a gather through W's transpose (no scatter, no atomics)
//   L(k) = sum_{t : p_t[t] != 0} p_t[t] (log p_t[t] - log(q[t] + eps))   with p_t = pool(teacher rows)
// Backward, with G = dLoss/dL(k):
//   g[t] = -G p_t[t] / (q[t] + eps)          (dLoss/dq)
//   h[s] = sum_j W[s, idx_j] g[idx_j]        (dLoss/dp_s, a gather through W's rows)
//   first: dz_0 = p_0 (h - <p_0, h>) / tau;  mean: dz_i = p_i (h - <p_i, h>) / (m tau)
//   bayes: u = <p_last, h>;  dz_last = c p_last (h - u) / tau;  dz_i = c u (onehot(x_i) - p_i) / tau  (i < m-1)
// Work split: one chunk at a time per OpenMP thread (dynamic schedule) with thread-private V-sized
// buffers, so results do not depend on the thread count. The forward saves each used row's L for the
// backward; the backward writes every gradient row exactly once (zeros for rows no chunk uses).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "xtoken/cpu_rows.h"
#include "xtoken/pkl_loss.h"

namespace xtoken {
namespace cpu {
namespace {

// One side (student or teacher) of the chunks: its logits and how its rows are pooled.
template <typename T>
struct Side {
  using A = acc_t<T>;
  const T* z;
  int64_t V;
  A inv_tau;
  Merge merge;
  const int64_t* targets;
  A* lse;

  const T* row(int64_t r) const { return z + r * V; }

  // The row the pooled vector is read from (first, bayes).
  int32_t pooled_row(int32_t r0, int32_t r1) const { return merge == Merge::Bayes ? r1 - 1 : r0; }

  // log c of merge="bayes": sum over the prefix rows of log p_i[x_i] (0 otherwise). Reads lse.
  A log_prefix(int32_t r0, int32_t r1) const {
    A log_c = 0;
    if (merge == Merge::Bayes) {
      for (int32_t r = r0; r < r1 - 1; ++r) log_c += cpu_math::load<A>(row(r)[targets[r]]) * inv_tau - lse[r];
    }
    return log_c;
  }

  // Forward: out = the pooled probability vector of rows [r0, r1), computing (and saving) the
  // logsumexp of every row it reads; `tmp` is a V-sized scratch buffer. Returns log c.
  A pool_softmax(A* out, A* tmp, int32_t r0, int32_t r1) const {
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
    if (merge == Merge::Mean) {
      const A w = A(1) / A(r1 - r0);
      for (int32_t r = r0; r < r1; ++r) row_probs(out, row(r), V, inv_tau, lse[r], w, r > r0);
    } else {
      const int32_t r = pooled_row(r0, r1);
      row_probs(out, row(r), V, inv_tau, lse[r] - log_c, A(1), false);
    }
  }

  static void add(A* out, const A* x, int64_t V) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] += x[v];
  }
};

// sum_{t : p[t] != 0} p[t] (log p[t] - log(q[t] + eps)), with log p[t] = a[t] - shift read off the logits
// (first, bayes) or log(p[t]) (mean, from_logits = false).
template <typename T, typename A>
A kl_terms(const A* p, const T* z, const A* q, int64_t V, A inv_tau, A shift, bool from_logits) {
  double total = 0;
  for (int64_t b = 0; b < V; b += kSumBlock) {
    const int64_t e = b + kSumBlock < V ? b + kSumBlock : V;
    A s = 0;
    if (from_logits) {
#pragma omp simd reduction(+ : s)
      for (int64_t t = b; t < e; ++t) {
        const A lp = cpu_math::load<A>(z[t]) * inv_tau - shift;
        s += p[t] != A(0) ? p[t] * (lp - cpu_math::log(q[t] + A(kPklEps))) : A(0);
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t t = b; t < e; ++t) {
        s += p[t] != A(0) ? p[t] * (cpu_math::log(p[t]) - cpu_math::log(q[t] + A(kPklEps))) : A(0);
      }
    }
    total += s;
  }
  return static_cast<A>(total);
}

// In place: q[t] <- -G p[t] / (q[t] + eps), p from the logit row (first, bayes) ...
template <typename T, typename A>
void grad_q_from_logits(A* q, const T* z, int64_t V, A inv_tau, A shift, A G) {
#pragma omp simd
  for (int64_t t = 0; t < V; ++t) q[t] = -G * cpu_math::exp(cpu_math::load<A>(z[t]) * inv_tau - shift) / (q[t] + A(kPklEps));
}

// ... or from probabilities (mean).
template <typename A>
void grad_q_from_probs(A* q, const A* p, int64_t V, A G) {
#pragma omp simd
  for (int64_t t = 0; t < V; ++t) q[t] = -G * p[t] / (q[t] + A(kPklEps));
}

// dz[v] = scale * p[v] * (h[v] - D)
template <typename T, typename A>
void write_softmax_grad(T* dz, const A* p, const A* h, int64_t V, A D, A scale) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) dz[v] = cpu_math::store<T>(scale * p[v] * (h[v] - D));
}

// dz[v] = -coef * p[v] with p = exp(a - L), then dz[x] += coef: the gradient of coef * log p[x].
template <typename T, typename A>
void write_logprob_grad(T* dz, const T* z, int64_t V, A inv_tau, A L, int64_t x, A coef) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) dz[v] = cpu_math::store<T>(-coef * cpu_math::exp(cpu_math::load<A>(z[v]) * inv_tau - L));
  dz[x] = cpu_math::store<T>(coef * (A(1) - cpu_math::exp(cpu_math::load<A>(z[x]) * inv_tau - L)));
}

template <typename T>
void zero_rows(T* base, int64_t V, int64_t r0, int64_t r1) {
  if (r1 > r0) std::memset(static_cast<void*>(base + r0 * V), 0, sizeof(T) * (r1 - r0) * V);
}

template <typename T>
struct PklCpu {
  using A = acc_t<T>;
  const PklParams& p;
  Side<T> student, teacher;
  ProjectionPlan plan;

  explicit PklCpu(const PklParams& params)
      : p(params),
        student{static_cast<const T*>(p.student_logits), p.V_s, A(p.inv_tau), p.merge, p.student_targets,
                static_cast<A*>(p.student_lse)},
        teacher{static_cast<const T*>(p.teacher_logits), p.V_t, A(p.inv_tau), p.merge, p.teacher_targets,
                static_cast<A*>(p.teacher_lse)},
        plan(p.W, p.V_s, p.V_t) {}

  // Thread-private buffers: pooled student probs, scratch, h; q (then g), pooled teacher probs, scratch.
  struct Work {
    std::vector<A> ps, pr, h, q, pt, tt;
    Work(int64_t V_s, int64_t V_t) : ps(V_s), pr(V_s), h(V_s), q(V_t), pt(V_t), tt(V_t) {}
  };

  A forward_chunk(const Chunk& c, Work& w) const {
    student.pool_softmax(w.ps.data(), w.pr.data(), c.s0, c.s1);
    gather_columns(w.q.data(), w.ps.data(), plan);
    // Teacher rows may be shared by chunks; every writer of a teacher lse stores the same value.
    const A log_c_t = teacher.pool_softmax(w.pt.data(), w.tt.data(), c.t0, c.t1);
    const int32_t r = teacher.pooled_row(c.t0, c.t1);
    return kl_terms(w.pt.data(), teacher.row(r), w.q.data(), p.V_t, teacher.inv_tau, teacher.lse[r] - log_c_t,
                    p.merge != Merge::Mean);
  }

  void backward_chunk(int64_t k, Work& w) const {
    const Chunk c = p.chunks[k];
    T* dz = static_cast<T*>(p.grad_student);
    const A G = static_cast<const A*>(p.grad_losses)[k];
    const A inv_tau = student.inv_tau;
    // Rows between the previous chunk and this one (and after the last) get no gradient.
    zero_rows(dz, p.V_s, k == 0 ? 0 : p.chunks[k - 1].s1, c.s0);
    if (k == p.K - 1) zero_rows(dz, p.V_s, c.s1, p.N_s);

    const A log_c_s = student.log_prefix(c.s0, c.s1);
    student.pool_probs(w.ps.data(), c.s0, c.s1, log_c_s);
    gather_columns(w.q.data(), w.ps.data(), plan);
    const A log_c_t = teacher.log_prefix(c.t0, c.t1);
    if (p.merge == Merge::Mean) {
      teacher.pool_probs(w.pt.data(), c.t0, c.t1, log_c_t);
      grad_q_from_probs(w.q.data(), w.pt.data(), p.V_t, G);
    } else {
      const int32_t r = teacher.pooled_row(c.t0, c.t1);
      grad_q_from_logits(w.q.data(), teacher.row(r), p.V_t, teacher.inv_tau, teacher.lse[r] - log_c_t, G);
    }
    A* h = w.h.data();
    gather_rows(h, w.q.data(), plan);

    switch (p.merge) {
      case Merge::First: {
        const A D = dot(w.ps.data(), h, p.V_s);
        write_softmax_grad(dz + c.s0 * p.V_s, w.ps.data(), h, p.V_s, D, inv_tau);
        zero_rows(dz, p.V_s, c.s0 + 1, c.s1);
        break;
      }
      case Merge::Mean: {
        const A scale = inv_tau / A(c.s1 - c.s0);
        for (int32_t r = c.s0; r < c.s1; ++r) {
          row_probs(w.pr.data(), student.row(r), p.V_s, inv_tau, student.lse[r], A(1), false);
          const A D = dot(w.pr.data(), h, p.V_s);
          write_softmax_grad(dz + r * p.V_s, w.pr.data(), h, p.V_s, D, scale);
        }
        break;
      }
      case Merge::Bayes: {
        const int32_t last = c.s1 - 1;
        row_probs(w.pr.data(), student.row(last), p.V_s, inv_tau, student.lse[last], A(1), false);
        const A u = dot(w.pr.data(), h, p.V_s);
        const A cval = cpu_math::exp(log_c_s);
        write_softmax_grad(dz + last * p.V_s, w.pr.data(), h, p.V_s, u, inv_tau * cval);
        for (int32_t r = c.s0; r < last; ++r) {
          write_logprob_grad(dz + r * p.V_s, student.row(r), p.V_s, inv_tau, student.lse[r], p.student_targets[r],
                             inv_tau * cval * u);
        }
        break;
      }
    }
  }

  void forward() const {
    A* losses = static_cast<A*>(p.losses);
#pragma omp parallel num_threads(at::get_num_threads())
    {
      Work w(p.V_s, p.V_t);
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < p.K; ++k) losses[k] = forward_chunk(p.chunks[k], w);
    }
  }

  void backward() const {
    if (p.K == 0) {
      zero_rows(static_cast<T*>(p.grad_student), p.V_s, 0, p.N_s);
      return;
    }
#pragma omp parallel num_threads(at::get_num_threads())
    {
      Work w(p.V_s, p.V_t);
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < p.K; ++k) backward_chunk(k, w);
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> pkl_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
    const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature, c10::string_view merge,
    const c10::optional<at::Tensor>& student_targets, const c10::optional<at::Tensor>& teacher_targets) {
  const PklInputs in = prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr,
                                   proj_col_src, proj_col_val, temperature, merge, student_targets, teacher_targets);
  const auto acc = at::TensorOptions().dtype(accumulate_type(student_logits.scalar_type()));
  at::Tensor losses = at::empty({chunks.size(0)}, acc);
  at::Tensor lse_s = at::zeros({student_logits.size(0)}, acc);
  at::Tensor lse_t = at::zeros({teacher_logits.size(0)}, acc);
  PklParams p = in.params();
  p.losses = losses.data_ptr();
  p.student_lse = lse_s.data_ptr();
  p.teacher_lse = lse_t.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "pkl_loss_fwd_cpu",
                                  [&] { PklCpu<scalar_t>(p).forward(); });
  return {losses, lse_s, lse_t};
}

at::Tensor pkl_loss_bwd_cpu(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                            const at::Tensor& teacher_logits, const at::Tensor& chunks, const at::Tensor& proj_idx,
                            const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
                            const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
                            c10::string_view merge, const c10::optional<at::Tensor>& student_targets,
                            const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse,
                            const at::Tensor& teacher_lse) {
  const PklInputs in = prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr,
                                   proj_col_src, proj_col_val, temperature, merge, student_targets, teacher_targets);
  check_pkl_bwd_args(grad_losses, student_lse, teacher_lse, in);
  const auto acc = accumulate_type(student_logits.scalar_type());
  const at::Tensor g = grad_losses.to(acc).contiguous();
  const at::Tensor ls = student_lse.to(acc).contiguous();
  const at::Tensor lt = teacher_lse.to(acc).contiguous();
  at::Tensor grad = at::empty_like(in.student_logits);
  PklParams p = in.params();
  p.grad_losses = g.data_ptr();
  p.student_lse = const_cast<void*>(ls.data_ptr());
  p.teacher_lse = const_cast<void*>(lt.data_ptr());
  p.grad_student = grad.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "pkl_loss_bwd_cpu",
                                  [&] { PklCpu<scalar_t>(p).backward(); });
  return grad;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) {
  m.impl("pkl_loss_fwd", &cpu::pkl_loss_fwd_cpu);
  m.impl("pkl_loss_bwd", &cpu::pkl_loss_bwd_cpu);
}

}  // namespace xtoken
