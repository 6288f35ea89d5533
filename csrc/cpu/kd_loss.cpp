// Same-vocabulary KD on the CPU (SPEC.md §4): the exact KL of the pooled vectors, no projection, no eps.
//
// Forward, per chunk, with p_t = pool(teacher rows), p_s = pool(student rows) (cpu_pooling.h; each side has
// its own merge):
//   L(k) = sum_{v : p_t[v] != 0} p_t[v] (log p_t[v] - log p_s[v])
// where each log is read off the logits (first: a - L; bayes: a_last - L_last + log c), or for mean is the
// log-mean-exp of the rows' log-probabilities (the log of the pooled vector on the teacher side), or for
// logmean is the mean of the rows' log-probabilities, so that log p_s never underflows to -inf.
// Backward, with G = dLoss/dL(k), S = sum_v p_t[v] (1 for first and mean, c_t for bayes, summed for logmean):
//   first:   dz_0 = G (p_0 S - p_t) / tau
//   bayes:   dz_last = G (p_last S - p_t) / tau;  dz_i = G S (p_i - onehot(x_i)) / tau  (i < m-1)
//   mean:    dz_i = G (p_i D_i - p_t rho_i) / tau,  rho_i = p_i / sum_j p_j,  D_i = sum_v p_t[v] rho_i[v]
//   logmean: dz_i = G (p_i S - p_t) / (m tau)
// Work split: one chunk at a time per OpenMP thread with thread-private V-sized buffers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "xtoken/cpu_pooling.h"
#include "xtoken/kd_loss.h"

namespace xtoken {
namespace cpu {
namespace {

// out[v] = log sum_i exp(a_i[v] - L_i) over the rows [r0, r1) (log of m times the mean pooling).
template <typename T, typename A>
void log_sum_probs(A* out, const Side<T>& side, int32_t r0, int32_t r1) {
  const int64_t V = side.V;
  const T* z0 = side.row(r0);
  const RowLse<A> L0 = side.lse[r0];
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] = L0.log_prob(cpu_math::load<A>(z0[v]), side.inv_tau);
  for (int32_t r = r0 + 1; r < r1; ++r) {
    const T* z = side.row(r);
    const RowLse<A> L = side.lse[r];
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const A x = L.log_prob(cpu_math::load<A>(z[v]), side.inv_tau);
      const A hi = x > out[v] ? x : out[v], lo = x > out[v] ? out[v] : x;
      const A sum = hi + cpu_math::log(A(1) + cpu_math::exp(lo - hi));
      out[v] = hi == -std::numeric_limits<A>::infinity() ? hi : sum;
    }
  }
}

// dz[v] = scale * (p[v] S - q[v])
template <typename T, typename A>
void write_kd_grad(T* dz, const T* z, int64_t V, A inv_tau, RowLse<A> L, A S, const A* q, A scale) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) dz[v] = cpu_math::store<T>(scale * (cpu_math::exp(L.log_prob(cpu_math::load<A>(z[v]), inv_tau)) * S - q[v]));
}

template <typename T>
struct KdCpu {
  using A = acc_t<T>;
  const LossParams& p;
  Side<T> student, teacher;

  explicit KdCpu(const LossParams& params) : p(params), student(Side<T>::student(p)), teacher(Side<T>::teacher(p)) {}

  // Thread-private buffers: pooled student and teacher probs, and their logs (or scratch).
  struct Work {
    std::vector<A> ps, pt, ls, lt;
    explicit Work(int64_t V) : ps(V), pt(V), ls(V), lt(V) {}
  };

  A forward_chunk(const Chunk& c, Work& w) const {
    const int64_t V = p.V_s;
    // logmean leaves log p_hat in ls / lt; mean fills it below.
    const A log_c_s = student.pool_softmax(w.ps.data(), w.ls.data(), c.s0, c.s1);
    const A log_c_t = teacher.pool_softmax(w.pt.data(), w.lt.data(), c.t0, c.t1);
    const A* pt = w.pt.data();
    if (teacher.merge == Merge::Mean) {
      A* lt = w.lt.data();
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) lt[v] = cpu_math::log(pt[v]);
    }
    if (student.merge == Merge::Mean) {
      A* ls = w.ls.data();
      log_sum_probs(ls, student, c.s0, c.s1);
      const A log_m = std::log(A(c.s1 - c.s0));
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) ls[v] -= log_m;
    }
    return teacher.with_log_pooled(w.lt.data(), c.t0, c.t1, log_c_t, [&](const auto& log_pt) {
      return student.with_log_pooled(w.ls.data(), c.s0, c.s1, log_c_s, [&](const auto& log_ps) {
        return blocked_sum<A>(V, [&](int64_t v) { return pt[v] != A(0) ? pt[v] * (log_pt(v) - log_ps(v)) : A(0); });
      });
    });
  }

  void backward_chunk(int64_t k, Work& w) const {
    const Chunk c = p.chunks[k];
    const int64_t V = p.V_s;
    const A G = static_cast<const A*>(p.grad_losses)[k];
    const A inv_tau = student.inv_tau;
    T* dz = static_cast<T*>(p.grad_student);
    zero_rows_around_chunk<T>(p, k);
    const A log_c_t = teacher.log_prefix(c.t0, c.t1);
    teacher.pool_probs(w.pt.data(), c.t0, c.t1, log_c_t);
    const A* pt = w.pt.data();
    const A S = teacher.merge == Merge::LogMean ? blocked_sum<A>(V, [&](int64_t v) { return pt[v]; })
                                                 : cpu_math::exp(log_c_t);
    switch (student.merge) {
      case Merge::First:
        write_kd_grad(dz + c.s0 * V, student.row(c.s0), V, inv_tau, student.lse[c.s0], S, pt, G * inv_tau);
        zero_rows(dz, V, c.s0 + 1, c.s1);
        break;
      case Merge::Bayes: {
        const int32_t last = c.s1 - 1;
        write_kd_grad(dz + last * V, student.row(last), V, inv_tau, student.lse[last], S, pt, G * inv_tau);
        for (int32_t r = c.s0; r < last; ++r) {
          write_logprob_grad(dz + r * V, student.row(r), V, inv_tau, student.lse[r], p.student_targets[r],
                             -G * S * inv_tau);
        }
        break;
      }
      case Merge::LogMean: {
        const A scale = G * inv_tau / A(c.s1 - c.s0);
        for (int32_t r = c.s0; r < c.s1; ++r) {
          write_kd_grad(dz + r * V, student.row(r), V, inv_tau, student.lse[r], S, pt, scale);
        }
        break;
      }
      case Merge::Mean: {
        A* log_sum = w.ps.data();
        A* rho = w.ls.data();
        log_sum_probs(log_sum, student, c.s0, c.s1);
        for (int32_t r = c.s0; r < c.s1; ++r) {
          const T* z = student.row(r);
          const RowLse<A> L = student.lse[r];
#pragma omp simd
          for (int64_t v = 0; v < V; ++v) {
            const A x = cpu_math::exp(L.log_prob(cpu_math::load<A>(z[v]), inv_tau) - log_sum[v]);
            rho[v] = x == x ? x : A(0);  // every row's p underflowed at v: no term, no gradient
          }
          const A D = dot(pt, rho, V);
          T* out = dz + r * V;
#pragma omp simd
          for (int64_t v = 0; v < V; ++v) {
            out[v] = cpu_math::store<T>(G * inv_tau * (cpu_math::exp(L.log_prob(cpu_math::load<A>(z[v]), inv_tau)) * D - pt[v] * rho[v]));
          }
        }
        break;
      }
    }
  }

  void forward() const {
    A* losses = static_cast<A*>(p.losses);
    parallel_chunks(p.K, [&] { return Work(p.V_s); },
                    [&](int64_t k, Work& w) { losses[k] = forward_chunk(p.chunks[k], w); });
  }

  void backward() const {
    parallel_chunks(p.K, [&] { return Work(p.V_s); }, [&](int64_t k, Work& w) { backward_chunk(k, w); });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student_logits,
                                                               const at::Tensor& teacher_logits,
                                                               const at::Tensor& chunks, double temperature,
                                                               c10::string_view student_merge,
                                                               c10::string_view teacher_merge,
                                                               const c10::optional<at::Tensor>& student_targets,
                                                               const c10::optional<at::Tensor>& teacher_targets) {
  const LossInputs in = prepare_kd(student_logits, teacher_logits, chunks, temperature, student_merge, teacher_merge,
                                   student_targets, teacher_targets);
  LossParams p = in.params();
  const ForwardOutputs out = allocate_forward(in, {p.K}, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "kd_loss_fwd_cpu",
                                  [&] { KdCpu<scalar_t>(p).forward(); });
  return {out.losses, out.student_lse, out.teacher_lse};
}

at::Tensor kd_loss_bwd_cpu(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                           const at::Tensor& teacher_logits, const at::Tensor& chunks, double temperature,
                           c10::string_view student_merge, c10::string_view teacher_merge,
                           const c10::optional<at::Tensor>& student_targets,
                           const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse,
                           const at::Tensor& teacher_lse) {
  const LossInputs in = prepare_kd(student_logits, teacher_logits, chunks, temperature, student_merge, teacher_merge,
                                   student_targets, teacher_targets);
  LossParams p = in.params();
  const BackwardTensors t = bind_backward(grad_losses, student_lse, teacher_lse, {p.K}, in, "kd_loss_fwd", p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "kd_loss_bwd_cpu",
                                  [&] { KdCpu<scalar_t>(p).backward(); });
  return t.grad_student;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) {
  m.impl("kd_loss_fwd", &cpu::kd_loss_fwd_cpu);
  m.impl("kd_loss_bwd", &cpu::kd_loss_bwd_cpu);
}

}  // namespace xtoken
