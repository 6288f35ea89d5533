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
//   dz = the backward of the pooling applied to h (cpu_pooling.h)
// Work split: one chunk at a time per OpenMP thread (dynamic schedule) with thread-private V-sized
// buffers, so results do not depend on the thread count. The forward saves each used row's L for the
// backward; the backward writes every gradient row exactly once (zeros for rows no chunk uses).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "xtoken/cpu_pooling.h"
#include "xtoken/pkl_loss.h"

namespace xtoken {
namespace cpu {
namespace {

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

template <typename T>
struct PklCpu {
  using A = acc_t<T>;
  const PklParams& p;
  Side<T> student, teacher;
  ProjectionPlan plan;

  explicit PklCpu(const PklParams& params)
      : p(params), student(Side<T>::student(p)), teacher(Side<T>::teacher(p)), plan(p.W, p.V_s, p.V_t) {}

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
    const A G = static_cast<const A*>(p.grad_losses)[k];
    zero_rows_around_chunk<T>(p, k);
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
    gather_rows(w.h.data(), w.q.data(), plan);
    student.pool_backward(static_cast<T*>(p.grad_student), w.h.data(), w.ps.data(), w.pr.data(), c.s0, c.s1,
                          log_c_s);
  }

  Work make_work() const { return Work(p.V_s, p.V_t); }

  void forward() const {
    A* losses = static_cast<A*>(p.losses);
    parallel_chunks(p.K, [&] { return make_work(); },
                    [&](int64_t k, Work& w) { losses[k] = forward_chunk(p.chunks[k], w); });
  }

  void backward() const {
    parallel_chunks(p.K, [&] { return make_work(); }, [&](int64_t k, Work& w) { backward_chunk(k, w); });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> pkl_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
    const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature, c10::string_view merge,
    const c10::optional<at::Tensor>& student_targets, const c10::optional<at::Tensor>& teacher_targets) {
  const PklInputs in = prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr,
                                   proj_col_src, proj_col_val, temperature, merge, student_targets, teacher_targets);
  PklParams p = in.params();
  const ForwardOutputs out = allocate_forward(in, {p.K}, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "pkl_loss_fwd_cpu",
                                  [&] { PklCpu<scalar_t>(p).forward(); });
  return {out.losses, out.student_lse, out.teacher_lse};
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
  PklParams p = in.params();
  const BackwardTensors t = bind_backward(grad_losses, student_lse, teacher_lse, {p.K}, in, "pkl_loss_fwd", p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "pkl_loss_bwd_cpu",
                                  [&] { PklCpu<scalar_t>(p).backward(); });
  return t.grad_student;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) {
  m.impl("pkl_loss_fwd", &cpu::pkl_loss_fwd_cpu);
  m.impl("pkl_loss_bwd", &cpu::pkl_loss_bwd_cpu);
}

}  // namespace xtoken
