// Same-vocabulary KD on the CPU (SPEC.md §4): the exact KL of the pooled vectors, no projection, no eps.
//
// Forward, per chunk, with p_t = pool(teacher rows), p_s = pool(student rows) (cpu_pooling.h; each side has
// its own merge) and u = log p_t - log p_s:
//   L(k) = sum_{v : p_t[v] != 0} p_t[v] u[v]
// Both sides pooled by one row (first, bayes: p = c q): L(k) = c_t (KL(q_t || q_s) + log c_t - log c_s), the KL
// in the cancellation-free form of kd_math.h (RowPair), exact however close q_s is to q_t. Both sides normalized
// (first, mean): L(k) = sum_v p_s phi(u) (kd_math.h). Otherwise as written. Each log is read off the logits
// (first, bayes), or for mean is the log-mean-exp of the rows' log-probabilities (the log of the pooled vector
// on the teacher side), or for logmean is the mean of the rows' log-probabilities, so that log p_s never
// underflows to -inf.
// Backward, with G = dLoss/dL(k), S = sum_v p_t[v] (1 for first and mean, c_t for bayes, summed for logmean):
//   first:   dz_0 = G (p_0 S - p_t) / tau     (G c_t (q_s - q_t) / tau, kd_math.h: prob_difference, when the
//   bayes:   dz_last = G (p_last S - p_t) / tau;  dz_i = G S (p_i - onehot(x_i)) / tau  (i < m-1)  teacher pools
//   mean:    dz_i = G (p_i D_i - p_t rho_i) / tau,  rho_i = p_i / sum_j p_j,  D_i = sum_v p_t[v] rho_i[v]  one row)
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
#include "xtoken/kd_math.h"

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

// One student row and one teacher row (first, bayes) with D = lt.log_sum - ls.log_sum (kd_math.h), found in one
// pass over both rows.
template <typename T, typename A>
struct RowPair {
  const T* zs;
  const T* zt;
  RowLse<A> ls, lt;
  int64_t V;
  A inv_tau, D;

  RowPair(const T* zs_, RowLse<A> ls_, const T* zt_, RowLse<A> lt_, int64_t V_, A inv_tau_)
      : zs(zs_), zt(zt_), ls(ls_), lt(lt_), V(V_), inv_tau(inv_tau_) {
    // Every loop of this struct reads copies of the members, never the members through `this`: GCC does not
    // vectorize a loop that reads them so (the object under construction, or one a store might alias), and
    // these loops ran scalar (half of a KD step).
    const A S = blocked_sum<A>(V, [zs = zs_, zt = zt_, ls = ls_, lt = lt_, inv_tau = inv_tau_](int64_t v) {
      const A a_s = cpu_math::load<A>(zs[v]), a_t = cpu_math::load<A>(zt[v]);
      return lse_difference_term(cpu_math::exp(ls.log_prob(a_s, inv_tau)),
                                 cpu_math::exp(scaled_shift(a_t, lt.max, inv_tau) - ls.log_sum),
                                 logit_difference(a_t, a_s, lt.max, ls.max, inv_tau));
    });
    D = lse_difference(S, lt, ls);
  }

  // u = log q_t[v] - log q_s[v] of the logits a_t = zt[v], a_s = zs[v].
  __attribute__((always_inline)) A u(A a_t, A a_s) const {
    return logit_difference(a_t, a_s, lt.max, ls.max, inv_tau) - D;
  }

  // KL(q_t || q_s) = sum_v q_s phi(u) (kd_math.h).
  A kl() const {
    return blocked_sum<A>(V, [self = *this](int64_t v) {
      const A a_s = cpu_math::load<A>(self.zs[v]), a_t = cpu_math::load<A>(self.zt[v]);
      const A qs = cpu_math::exp(self.ls.log_prob(a_s, self.inv_tau));
      const A qt = cpu_math::exp(self.lt.log_prob(a_t, self.inv_tau));
      return kl_term(qt, qs, self.u(a_t, a_s));
    });
  }

  // dz[v] = scale * (q_s[v] - q_t[v])
  void write_grad(T* dz, A scale) const {
    const RowPair self = *this;
#pragma omp simd
    for (int64_t v = 0; v < self.V; ++v) {
      const A a_s = cpu_math::load<A>(self.zs[v]), a_t = cpu_math::load<A>(self.zt[v]);
      const A qs = cpu_math::exp(self.ls.log_prob(a_s, self.inv_tau));
      const A qt = cpu_math::exp(self.lt.log_prob(a_t, self.inv_tau));
      dz[v] = cpu_math::store<T>(scale * prob_difference(qs, qt, self.u(a_t, a_s)));
    }
  }
};

// Whether a side's pooled vector of rows [r0, r1) is one row's softmax times c (first, bayes, or any merge of one
// row), so that the chunk's KL can be read off two rows (RowPair).
template <typename T>
bool one_row(const Side<T>& side, int32_t r0, int32_t r1) {
  return side.single_row() || r1 - r0 == 1;
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
    if (one_row(student, c.s0, c.s1) && one_row(teacher, c.t0, c.t1)) {  // p = c q: L = c_t (KL(q_t || q_s) + log c_t - log c_s)
      const A c_t = cpu_math::exp(log_c_t);
      return c_t == A(0) ? A(0) : c_t * (row_pair(c, student.pooled_row(c.s0, c.s1)).kl() + (log_c_t - log_c_s));
    }
    const A* ps = w.ps.data();
    const bool normalized = sums_to_one(student.merge) && sums_to_one(teacher.merge);
    return teacher.with_log_pooled(w.lt.data(), c.t0, c.t1, log_c_t, [&](const auto& log_pt) {
      return student.with_log_pooled(w.ls.data(), c.s0, c.s1, log_c_s, [&](const auto& log_ps) {
        return blocked_sum<A>(V, [&](int64_t v) {
          const A u = log_pt(v) - log_ps(v);
          return normalized ? kl_term(pt[v], ps[v], u) : (pt[v] != A(0) ? pt[v] * u : A(0));
        });
      });
    });
  }

  // The gradient row of a student pooled by one row (first, bayes), dz = scale (p_s S - p_t): as
  // scale c_t (q_s - q_t) when the teacher pools one row too.
  void single_row_grad(T* dz, const Chunk& c, int32_t r, const A* pt, A S, A scale) const {
    if (!one_row(teacher, c.t0, c.t1)) {
      write_kd_grad(dz, student.row(r), p.V_s, student.inv_tau, student.lse[r], S, pt, scale);
      return;
    }
    row_pair(c, r).write_grad(dz, scale * S);
  }

  // The student row r and the teacher's pooled row of chunk c (both pooled by one row).
  RowPair<T, A> row_pair(const Chunk& c, int32_t r) const {
    const int32_t rt = teacher.pooled_row(c.t0, c.t1);
    return RowPair<T, A>(student.row(r), student.lse[r], teacher.row(rt), teacher.lse[rt], p.V_s, student.inv_tau);
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
        single_row_grad(dz + c.s0 * V, c, c.s0, pt, S, G * inv_tau);
        zero_rows(dz, V, c.s0 + 1, c.s1);
        break;
      case Merge::Bayes: {
        const int32_t last = c.s1 - 1;
        single_row_grad(dz + last * V, c, last, pt, S, G * inv_tau);
        for (int32_t r = c.s0; r < last; ++r) {
          write_logprob_grad(dz + r * V, student.row(r), V, inv_tau, student.lse[r], p.student_targets[r],
                             -G * S * inv_tau);
        }
        break;
      }
      case Merge::LogMean: {
        if (c.s1 - c.s0 == 1 && one_row(teacher, c.t0, c.t1)) {
          single_row_grad(dz + c.s0 * V, c, c.s0, pt, S, G * inv_tau);
          break;
        }
        const A scale = G * inv_tau / A(c.s1 - c.s0);
        for (int32_t r = c.s0; r < c.s1; ++r) {
          write_kd_grad(dz + r * V, student.row(r), V, inv_tau, student.lse[r], S, pt, scale);
        }
        break;
      }
      case Merge::Mean: {
        if (c.s1 - c.s0 == 1 && one_row(teacher, c.t0, c.t1)) {
          single_row_grad(dz + c.s0 * V, c, c.s0, pt, S, G * inv_tau);
          break;
        }
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
  return run_forward(in, p, {p.K}, "kd_loss_fwd_cpu",
                     [&](auto scalar) { KdCpu<decltype(scalar)>(p).forward(); });
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
  return run_backward(grad_losses, student_lse, teacher_lse, in, p, {p.K}, "kd_loss_fwd", "kd_loss_bwd_cpu",
                      [&](auto scalar) { KdCpu<decltype(scalar)>(p).backward(); });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) {
  m.impl("kd_loss_fwd", &cpu::kd_loss_fwd_cpu);
  m.impl("kd_loss_bwd", &cpu::kd_loss_bwd_cpu);
}

}  // namespace xtoken
