// Same-vocabulary KD on the GPU (SPEC.md §4). The formulas are those of csrc/cpu/kd_loss.cpp:
//   L(k) = sum_{v : p_t[v] != 0} p_t[v] (log p_t[v] - log p_s[v]), each side pooled by its own merge; one row per
//   side (first, bayes, or one row of any merge): c_t (KL(q_t || q_s) + log c_t - log c_s) with the KL in the
//   cancellation-free form of kd_math.h (RowPair); both sides normalized (first, mean): sum_v p_s phi(u); log p_s
//   read off the logits (first, bayes), the log-mean-exp of the rows (mean) or their mean log-probability
//   (logmean);  backward, with S = sum_v p_t[v]: first/bayes dz = G (p S - p_t) / tau (= G S (q_s - q_t) / tau,
//   kd_math.h, when the teacher pools one row; + the bayes prefix rows), mean dz_i = G (p_i D_i - p_t rho_i) / tau,
//   logmean dz_i = G (p_i S - p_t) / (m tau)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "xtoken/cuda_pooling.cuh"
#include "xtoken/kd_loss.h"
#include "xtoken/kd_math.h"

namespace xtoken {
namespace cuda {
namespace {

constexpr int kThreads = 512;

// One student row and one teacher row of a chunk (both sides pooled by one row) with D = lt.log_sum - ls.log_sum
// (kd_math.h), found by the whole block in one pass over both rows.
template <typename T, typename A>
struct RowPair {
  const T* __restrict__ zs;
  const T* __restrict__ zt;
  RowLse<A> ls, lt;
  A inv_tau, D;

  __device__ RowPair(const Pooled<T, A>& s, const Pooled<T, A>& t, int64_t V, A* scratch)
      : zs(s.z), zt(t.z), ls(s.L), lt(t.L), inv_tau(s.inv_tau) {
    A acc = 0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const A a_s = static_cast<A>(zs[v]), a_t = static_cast<A>(zt[v]);
      acc += lse_difference_term(dexp(ls.log_prob(a_s, inv_tau)), dexp(scaled_shift(a_t, lt.max, inv_tau) - ls.log_sum),
                                 logit_difference(a_t, a_s, lt.max, ls.max, inv_tau));
    }
    D = lse_difference(block_sum(acc, scratch), lt, ls);
  }

  // u = log q_t[v] - log q_s[v], q_s[v] and q_t[v] of token v.
  __device__ __forceinline__ void at(int64_t v, A& u, A& qs, A& qt) const {
    const A a_s = static_cast<A>(zs[v]), a_t = static_cast<A>(zt[v]);
    u = logit_difference(a_t, a_s, lt.max, ls.max, inv_tau) - D;
    qs = dexp(ls.log_prob(a_s, inv_tau));
    qt = dexp(lt.log_prob(a_t, inv_tau));
  }
};

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) kd_fwd_kernel(LossParams p, Side<T, A> student, Side<T, A> teacher) {
  __shared__ A scratch[64];
  const int64_t k = blockIdx.x;
  const Chunk c = p.chunks[k];
  A* losses = static_cast<A*>(p.losses);
  if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
    if (threadIdx.x == 0) losses[k] = nan_value<A>();
    return;
  }
  const LogPrefixes<A> log_c = chunk_log_prefixes(student, teacher, c, /*lse=*/true, scratch);
  const A log_c_s = log_c.student, log_c_t = log_c.teacher;
  const Pooled<T, A> ps_rows = student.pooled(c.s0, c.s1), pt_rows = teacher.pooled(c.t0, c.t1);
  if (ps_rows.m == 0 && pt_rows.m == 0) {  // one row per side, p = c q: L = c_t (KL(q_t || q_s) + log c_t - log c_s)
    const RowPair<T, A> rows(ps_rows, pt_rows, p.V_s, scratch);
    A acc = 0;
    for (int64_t v = threadIdx.x; v < p.V_s; v += blockDim.x) {
      A u, qs, qt;
      rows.at(v, u, qs, qt);
      acc += kl_term(qt, qs, u);
    }
    acc = block_sum(acc, scratch);
    const A c_t = dexp(log_c_t);
    if (threadIdx.x == 0) losses[k] = c_t == A(0) ? A(0) : c_t * (acc + (log_c_t - log_c_s));
    return;
  }
  const bool normalized = sums_to_one(student.merge) && sums_to_one(teacher.merge);
  A acc = 0;
  for (int64_t v = threadIdx.x; v < p.V_s; v += blockDim.x) {
    A pt, lpt;
    pt_rows.prob_and_log(v, log_c_t, pt, lpt);
    const A lps = ps_rows.log_prob(v) + log_c_s, u = lpt - lps;
    acc += normalized ? kl_term(pt, dexp(lps), u) : (pt != A(0) ? pt * u : A(0));
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) losses[k] = acc;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) kd_bwd_kernel(LossParams p, Side<T, A> student, Side<T, A> teacher) {
  __shared__ A scratch[64];
  const int64_t k = blockIdx.x;
  const Chunk c = p.chunks[k];
  zero_rows_around_chunk<T>(p, k);
  if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
    nan_rows_of_chunk<T>(p, c);
    return;
  }
  const A c_t = dexp(chunk_log_prefixes(student, teacher, c, /*lse=*/false, scratch).teacher);
  const int64_t V = p.V_s;
  const A inv_tau = student.inv_tau;
  const A scale = static_cast<const A*>(p.grad_losses)[k] * inv_tau;
  const Pooled<T, A> pt_rows = teacher.pooled(c.t0, c.t1);
  const auto p_t = [&](int64_t v) { return c_t * pt_rows.prob(v); };
  A S = c_t;  // sum_v p_t[v]: 1 (first, mean), c_t (bayes), summed (logmean)
  if (teacher.merge == Merge::LogMean) {
    A acc = 0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) acc += p_t(v);
    S = block_sum(acc, scratch);
  }
  T* dz = static_cast<T*>(p.grad_student);
  if (student.merge == Merge::Mean && c.s1 - c.s0 > 1) {
    const int32_t m = c.s1 - c.s0;
    const T* z0 = student.row(c.s0);
    const RowLse<A>* lse0 = student.lse + c.s0;
    for (int32_t r = c.s0; r < c.s1; ++r) {
      const T* z = student.row(r);
      const RowLse<A> L = student.lse[r];
      A d_row = 0;  // D_r = sum_v p_t[v] rho_r[v]
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const A rho = dexp(L.log_prob(static_cast<A>(z[v]), inv_tau) - log_sum_probs(z0, V, inv_tau, lse0, m, v));
        d_row += rho == rho ? p_t(v) * rho : A(0);
      }
      d_row = block_sum(d_row, scratch);
      T* out = dz + r * V;
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const A a = L.log_prob(static_cast<A>(z[v]), inv_tau);
        const A rho = dexp(a - log_sum_probs(z0, V, inv_tau, lse0, m, v));
        out[v] = static_cast<T>(scale * (dexp(a) * d_row - (rho == rho ? p_t(v) * rho : A(0))));
      }
    }
    return;
  }
  if (student.merge == Merge::LogMean && c.s1 - c.s0 > 1) {  // dz_r = G (p_r S - p_t) / (m tau)
    const A scale_m = scale / A(c.s1 - c.s0);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const A ptv = p_t(v);
      for (int32_t r = c.s0; r < c.s1; ++r) {
        const A pr = dexp(student.lse[r].log_prob(static_cast<A>(student.row(r)[v]), inv_tau));
        dz[r * V + v] = static_cast<T>(scale_m * (pr * S - ptv));
      }
    }
    return;
  }
  const int32_t last = student.pooled_row(c.s0, c.s1);
  const T* z = student.row(last);
  const RowLse<A> L = student.lse[last];
  T* out = dz + last * V;
  if (pt_rows.m == 0) {  // the teacher pools one row too: S (q_s - q_t) without cancellation (kd_math.h)
    const RowPair<T, A> rows(student.pooled(c.s0, c.s1), pt_rows, V, scratch);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      A u, qs, qt;
      rows.at(v, u, qs, qt);
      out[v] = static_cast<T>(scale * S * prob_difference(qs, qt, u));
    }
  } else {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      out[v] = static_cast<T>(scale * (dexp(L.log_prob(static_cast<A>(z[v]), inv_tau)) * S - p_t(v)));
    }
  }
  if (student.merge == Merge::First) {
    zero_rows(dz, V, c.s0 + 1, c.s1);
    return;
  }
  for (int32_t r = c.s0; r < last; ++r) {  // bayes prefix rows: G S (p_r - onehot(x_r)) / tau
    const T* zr = student.row(r);
    const RowLse<A> Lr = student.lse[r];
    const int64_t x = p.student_targets[r];
    T* o = dz + r * V;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      o[v] = static_cast<T>(scale * S * (dexp(Lr.log_prob(static_cast<A>(zr[v]), inv_tau)) - (v == x ? A(1) : A(0))));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cuda(const at::Tensor& student_logits,
                                                                const at::Tensor& teacher_logits,
                                                                const at::Tensor& chunks, double temperature,
                                                                c10::string_view student_merge,
                                                                c10::string_view teacher_merge,
                                                                const c10::optional<at::Tensor>& student_targets,
                                                                const c10::optional<at::Tensor>& teacher_targets) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const LossInputs in = prepare_kd(student_logits, teacher_logits, chunks, temperature, student_merge, teacher_merge,
                                   student_targets, teacher_targets);
  LossParams p = in.params();
  return run_forward(in, p, {p.K}, "kd_loss_fwd_cuda", [&](auto scalar) {
    using T = decltype(scalar);
    using A = at::opmath_type<T>;
    kd_fwd_kernel<T, A><<<static_cast<unsigned>(p.K), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p, Side<T, A>::student(p), Side<T, A>::teacher(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor kd_loss_bwd_cuda(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                            const at::Tensor& teacher_logits, const at::Tensor& chunks, double temperature,
                            c10::string_view student_merge, c10::string_view teacher_merge,
                            const c10::optional<at::Tensor>& student_targets,
                            const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse,
                            const at::Tensor& teacher_lse) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const LossInputs in = prepare_kd(student_logits, teacher_logits, chunks, temperature, student_merge, teacher_merge,
                                   student_targets, teacher_targets);
  LossParams p = in.params();
  const auto launch = [&](auto scalar) {
    using T = decltype(scalar);
    using A = at::opmath_type<T>;
    kd_bwd_kernel<T, A><<<static_cast<unsigned>(p.K), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p, Side<T, A>::student(p), Side<T, A>::teacher(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  return run_backward(grad_losses, student_lse, teacher_lse, in, p, {p.K}, "kd_loss_fwd", "kd_loss_bwd_cuda", launch);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) {
  m.impl("kd_loss_fwd", &cuda::kd_loss_fwd_cuda);
  m.impl("kd_loss_bwd", &cuda::kd_loss_bwd_cuda);
}

}  // namespace xtoken
