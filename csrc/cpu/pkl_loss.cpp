// P-KL on the CPU (SPEC.md §3-4).
//
// Forward, per chunk (rows r_0..r_{m-1} on each side, a = z / tau, L = logsumexp(a), p = exp(a - L)):
//   p_s = pool(student rows)                 first: p_0 | mean: (1/m) sum p_i | bayes: c p_last,
//                                            c = prod_{i<m-1} p_i[x_i]  (x_i = realized target of row i)
//                                            logmean: exp((1/m) sum log p_i); each side has its own merge
//   q[t] = sum_s W[s, t] p_s[s]              a gather through W's transpose (no scatter, no atomics)
//   L(k) = sum_{t : p_t[t] != 0} p_t[t] (log p_t[t] - log(q[t] + eps))   with p_t = pool(teacher rows); log p_t
//                                            is read off the logits (first, bayes), log p_t (mean), or the
//                                            mean of the rows' log-probabilities (logmean)
// Backward, with G = dLoss/dL(k):
//   g[t] = -G p_t[t] / (q[t] + eps)          (dLoss/dq)
//   h[s] = sum_j W[s, idx_j] g[idx_j]        (dLoss/dp_s, a gather through W's rows)
//   dz = the backward of the pooling applied to h (cpu_pooling.h)
//   when asked, dLoss/dW[s, t] = sum_k p_s^k[s] g^k[t] on W's support (learned W)
// Work split: one chunk at a time per OpenMP thread (dynamic schedule) with thread-private V-sized
// buffers, so results do not depend on the thread count. The forward saves each used row's L for the
// backward; the backward writes every gradient row exactly once (zeros for rows no chunk uses). The W
// gradient splits the chunks into a fixed number of consecutive groups (it depends on K only, not on the
// thread count); a thread takes a whole group, adds each chunk's terms p_s[s] g[idx[s, j]] to the group's
// [V_s, P] partial sum in chunk order (while p_s and g are in its cache), and the partials are added in group
// order at the end: deterministic, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "xtoken/cpu_pooling.h"
#include "xtoken/pkl_loss.h"

namespace xtoken {
namespace cpu {
namespace {

// Chunk groups of the W gradient: at most this many partial sums [V_s, P] (the parallelism of the backward
// when W's gradient is asked).
constexpr int64_t kGradGroups = 32;

// sum_{t : p[t] != 0} p[t] (log_p(t) - log(q[t] + eps))
template <typename A, typename LogP>
A kl_terms(const A* p, const A* q, int64_t V, const LogP& log_p) {
  return blocked_sum<A>(V, [&](int64_t t) {
    return p[t] != A(0) ? p[t] * (log_p(t) - cpu_math::log(q[t] + A(kPklEps))) : A(0);
  });
}

// In place: q[t] <- -G p[t] / (q[t] + eps), p from the logit row (first, bayes) ...
template <typename T, typename A>
void grad_q_from_logits(A* q, const T* z, int64_t V, A inv_tau, RowLse<A> lse, A G) {
#pragma omp simd
  for (int64_t t = 0; t < V; ++t) q[t] = -G * cpu_math::exp(lse.log_prob(cpu_math::load<A>(z[t]), inv_tau)) / (q[t] + A(kPklEps));
}

// ... or from probabilities (mean, logmean).
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
  ProjectionPlan<A> plan;

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
    const A* pt = w.pt.data();
    if (teacher.merge == Merge::Mean) {  // log p_t into tt (logmean: pool_softmax left it there)
      A* lt = w.tt.data();
#pragma omp simd
      for (int64_t t = 0; t < p.V_t; ++t) lt[t] = cpu_math::log(pt[t]);
    }
    return teacher.with_log_pooled(w.tt.data(), c.t0, c.t1, log_c_t,
                                   [&](const auto& log_pt) { return kl_terms(pt, w.q.data(), p.V_t, log_pt); });
  }

  // The gradient rows of chunk k; leaves the pooled student probs in w.ps and g in w.q.
  void backward_chunk(int64_t k, Work& w) const {
    A* ps = w.ps.data();
    A* g = w.q.data();
    const Chunk c = p.chunks[k];
    const A G = static_cast<const A*>(p.grad_losses)[k];
    zero_rows_around_chunk<T>(p, k);
    const A log_c_s = student.log_prefix(c.s0, c.s1);
    student.pool_probs(ps, c.s0, c.s1, log_c_s);
    gather_columns(g, ps, plan);
    const A log_c_t = teacher.log_prefix(c.t0, c.t1);
    if (teacher.single_row()) {
      const int32_t r = teacher.pooled_row(c.t0, c.t1);
      grad_q_from_logits(g, teacher.row(r), p.V_t, teacher.inv_tau, teacher.lse[r].times(log_c_t), G);
    } else {
      teacher.pool_probs(w.pt.data(), c.t0, c.t1, log_c_t);
      grad_q_from_probs(g, w.pt.data(), p.V_t, G);
    }
    gather_rows(w.h.data(), g, plan);
    student.pool_backward(static_cast<T*>(p.grad_student), w.h.data(), ps, w.pr.data(), c.s0, c.s1, log_c_s);
  }

  // grad[s, j] += ps[s] g[idx[s, j]] over W's slots (grad: one group's partial sum).
  void add_grad_val(A* grad, const A* ps, const A* g) const {
    const int32_t* idx = p.W.idx;
    const int64_t P = p.W.P;
    for (int64_t s = 0; s < p.V_s; ++s) {
      for (int64_t j = 0; j < P; ++j) {
        const int32_t t = idx[s * P + j];
        if (t >= 0) grad[s * P + j] += ps[s] * g[t];
      }
    }
  }

  Work make_work() const { return Work(p.V_s, p.V_t); }

  void forward() const {
    A* losses = static_cast<A*>(p.losses);
    parallel_chunks(p.K, [&] { return make_work(); },
                    [&](int64_t k, Work& w) { losses[k] = forward_chunk(p.chunks[k], w); });
  }

  void backward() const {
    if (p.grad_val == nullptr) {
      parallel_chunks(p.K, [&] { return make_work(); },
                      [&](int64_t k, Work& w) { backward_chunk(k, w); });
      return;
    }
    // Group b holds the chunks [b K / groups, (b + 1) K / groups).
    const int64_t groups = std::min(p.K, kGradGroups), slots = p.V_s * p.W.P;
    std::vector<A> partial(groups * slots, A(0));
    parallel_chunks(groups, [&] { return make_work(); }, [&](int64_t b, Work& w) {
      for (int64_t k = b * p.K / groups; k < (b + 1) * p.K / groups; ++k) {
        backward_chunk(k, w);
        add_grad_val(partial.data() + b * slots, w.ps.data(), w.q.data());
      }
    });
    A* grad = static_cast<A*>(p.grad_val);
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
    for (int64_t e = 0; e < slots; ++e) {
      A sum = 0;
      for (int64_t b = 0; b < groups; ++b) sum += partial[b * slots + e];
      grad[e] = sum;
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> pkl_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
    const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
    c10::string_view student_merge, c10::string_view teacher_merge, const c10::optional<at::Tensor>& student_targets,
    const c10::optional<at::Tensor>& teacher_targets) {
  const PklInputs in =
      prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr, proj_col_src, proj_col_val,
                  temperature, student_merge, teacher_merge, student_targets, teacher_targets);
  PklParams p = in.params();
  return run_forward(in, p, {p.K}, "pkl_loss_fwd_cpu",
                     [&](auto scalar) { PklCpu<decltype(scalar)>(p).forward(); });
}

std::tuple<at::Tensor, at::Tensor> pkl_loss_bwd_cpu(
    const at::Tensor& grad_losses, const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const at::Tensor& chunks, const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
    const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
    c10::string_view student_merge, c10::string_view teacher_merge, const c10::optional<at::Tensor>& student_targets,
    const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
    bool proj_val_grad) {
  const PklInputs in =
      prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr, proj_col_src, proj_col_val,
                  temperature, student_merge, teacher_merge, student_targets, teacher_targets);
  PklParams p = in.params();
  const BackwardTensors t = bind_backward(grad_losses, student_lse, teacher_lse, {p.K}, in, "pkl_loss_fwd", p);
  const at::Tensor grad_val = bind_grad_val(proj_val_grad, in, p);
  if (p.K > 0) {
    dispatch_logits(in, "pkl_loss_bwd_cpu", [&](auto scalar) { PklCpu<decltype(scalar)>(p).backward(); });
  }
  return {t.grad_student, finish_grad_val(grad_val, proj_val)};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) {
  m.impl("pkl_loss_fwd", &cpu::pkl_loss_fwd_cpu);
  m.impl("pkl_loss_bwd", &cpu::pkl_loss_bwd_cpu);
}

}  // namespace xtoken
