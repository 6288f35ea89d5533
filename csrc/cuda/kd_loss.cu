// Same-vocabulary KD on the GPU (SPEC.md §4). The formulas are those of csrc/cpu/kd_loss.cpp:
//   L(k) = sum_{v : p_t[v] != 0} p_t[v] (log p_t[v] - log p_s[v]), log p_s read off the logits (first, bayes) or
//   the log-mean-exp of the rows (mean);  backward: first/bayes dz = G (p S - p_t) / tau (+ the bayes prefix
//   rows), mean dz_i = G (p_i D_i - p_t rho_i) / tau
// Work split: one block per chunk, forward and backward; the backward needs no workspace. Every gradient row
// is written exactly once; no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "xtoken/cuda_pooling.cuh"
#include "xtoken/kd_loss.h"

namespace xtoken {
namespace cuda {
namespace {

constexpr int kThreads = 512;

// log sum_i exp(a_i[v] - L_i) over the rows [r0, r1): log(m p_mean[v]), without underflow.
template <typename T, typename A>
__device__ __forceinline__ A log_sum_probs(const Side<T, A>& side, int32_t r0, int32_t r1, int64_t v) {
  A out = static_cast<A>(side.row(r0)[v]) * side.inv_tau - side.lse[r0];
  for (int32_t r = r0 + 1; r < r1; ++r) {
    const A x = static_cast<A>(side.row(r)[v]) * side.inv_tau - side.lse[r];
    const A hi = x > out ? x : out, lo = x > out ? out : x;
    out = hi == A(-INFINITY) ? hi : hi + dlog(A(1) + dexp(lo - hi));
  }
  return out;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) kd_fwd_kernel(LossParams p, Side<T, A> student, Side<T, A> teacher) {
  __shared__ A scratch[64];
  __shared__ A shared_log_c[2];
  const int64_t k = blockIdx.x;
  const Chunk c = p.chunks[k];
  A* losses = static_cast<A*>(p.losses);
  if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
    if (threadIdx.x == 0) losses[k] = nan_value<A>();
    return;
  }
  student.compute_lse(c.s0, c.s1, scratch);
  teacher.compute_lse(c.t0, c.t1, scratch);
  __syncthreads();  // the lse values written by thread 0 are read by every thread below
  if (threadIdx.x == 0) {
    shared_log_c[0] = student.log_prefix(c.s0, c.s1);
    shared_log_c[1] = teacher.log_prefix(c.t0, c.t1);
  }
  __syncthreads();
  const A inv_tau = student.inv_tau;
  const bool mean = p.merge == Merge::Mean;
  const int32_t rs = student.pooled_row(c.s0, c.s1), rt = teacher.pooled_row(c.t0, c.t1);
  const A shift_s = student.lse[rs] - shared_log_c[0], shift_t = teacher.lse[rt] - shared_log_c[1];
  const T* zs = student.row(rs);
  const T* zt = teacher.row(rt);
  const Pooled<T, A> pt_rows = teacher.pooled(c.t0, c.t1);
  const A log_m = dlog(A(c.s1 - c.s0));
  A acc = 0;
  for (int64_t v = threadIdx.x; v < p.V_s; v += blockDim.x) {
    A pt, lpt, lps;
    if (mean) {
      pt = pt_rows.prob(v);
      lpt = dlog(pt);
      lps = log_sum_probs(student, c.s0, c.s1, v) - log_m;
    } else {
      lpt = static_cast<A>(zt[v]) * inv_tau - shift_t;
      pt = dexp(lpt);
      lps = static_cast<A>(zs[v]) * inv_tau - shift_s;
    }
    acc += pt != A(0) ? pt * (lpt - lps) : A(0);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) losses[k] = acc;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) kd_bwd_kernel(LossParams p, Side<T, A> student, Side<T, A> teacher) {
  __shared__ A scratch[64];
  __shared__ A shared_log_c[2];
  const int64_t k = blockIdx.x;
  const Chunk c = p.chunks[k];
  zero_rows_around_chunk<T>(p, k);
  if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
    nan_rows_of_chunk<T>(p, c);
    return;
  }
  if (threadIdx.x == 0) {
    shared_log_c[0] = student.log_prefix(c.s0, c.s1);
    shared_log_c[1] = teacher.log_prefix(c.t0, c.t1);
  }
  __syncthreads();
  const int64_t V = p.V_s;
  const A inv_tau = student.inv_tau;
  const A scale = static_cast<const A*>(p.grad_losses)[k] * inv_tau;
  const A c_t = dexp(shared_log_c[1]);  // S = sum_v p_t[v]: 1, or c_t for bayes
  const Pooled<T, A> pt_rows = teacher.pooled(c.t0, c.t1);
  T* dz = static_cast<T*>(p.grad_student);
  if (p.merge == Merge::Mean) {
    for (int32_t r = c.s0; r < c.s1; ++r) {
      const T* z = student.row(r);
      const A L = student.lse[r];
      A d_row = 0;  // D_r = sum_v p_t[v] rho_r[v]
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const A rho = dexp(static_cast<A>(z[v]) * inv_tau - L - log_sum_probs(student, c.s0, c.s1, v));
        d_row += rho == rho ? pt_rows.prob(v) * rho : A(0);
      }
      d_row = block_sum(d_row, scratch);
      T* out = dz + r * V;
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const A a = static_cast<A>(z[v]) * inv_tau - L;
        const A rho = dexp(a - log_sum_probs(student, c.s0, c.s1, v));
        out[v] = static_cast<T>(scale * (dexp(a) * d_row - (rho == rho ? pt_rows.prob(v) * rho : A(0))));
      }
    }
    return;
  }
  const int32_t last = student.pooled_row(c.s0, c.s1);
  const T* z = student.row(last);
  const A L = student.lse[last];
  T* out = dz + last * V;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    out[v] = static_cast<T>(scale * (dexp(static_cast<A>(z[v]) * inv_tau - L) * c_t - c_t * pt_rows.prob(v)));
  }
  if (p.merge == Merge::First) {
    zero_rows(dz, V, c.s0 + 1, c.s1);
    return;
  }
  for (int32_t r = c.s0; r < last; ++r) {  // bayes prefix rows: G S (p_r - onehot(x_r)) / tau
    const T* zr = student.row(r);
    const A Lr = student.lse[r];
    const int64_t x = p.student_targets[r];
    T* o = dz + r * V;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      o[v] = static_cast<T>(scale * c_t * (dexp(static_cast<A>(zr[v]) * inv_tau - Lr) - (v == x ? A(1) : A(0))));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cuda(const at::Tensor& student_logits,
                                                                const at::Tensor& teacher_logits,
                                                                const at::Tensor& chunks, double temperature,
                                                                c10::string_view merge,
                                                                const c10::optional<at::Tensor>& student_targets,
                                                                const c10::optional<at::Tensor>& teacher_targets) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const LossInputs in = prepare_kd(student_logits, teacher_logits, chunks, temperature, merge, student_targets,
                                   teacher_targets);
  LossParams p = in.params();
  const ForwardOutputs out = allocate_forward(in, {p.K}, p);
  if (p.K == 0) return {out.losses, out.student_lse, out.teacher_lse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "kd_loss_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    kd_fwd_kernel<scalar_t, A><<<static_cast<unsigned>(p.K), kThreads, 0, stream>>>(
        p, Side<scalar_t, A>::student(p), Side<scalar_t, A>::teacher(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.losses, out.student_lse, out.teacher_lse};
}

at::Tensor kd_loss_bwd_cuda(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                            const at::Tensor& teacher_logits, const at::Tensor& chunks, double temperature,
                            c10::string_view merge, const c10::optional<at::Tensor>& student_targets,
                            const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse,
                            const at::Tensor& teacher_lse) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const LossInputs in = prepare_kd(student_logits, teacher_logits, chunks, temperature, merge, student_targets,
                                   teacher_targets);
  LossParams p = in.params();
  const BackwardTensors t = bind_backward(grad_losses, student_lse, teacher_lse, {p.K}, in, "kd_loss_fwd", p);
  if (p.K == 0) return t.grad_student;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "kd_loss_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    kd_bwd_kernel<scalar_t, A><<<static_cast<unsigned>(p.K), kThreads, 0, stream>>>(
        p, Side<scalar_t, A>::student(p), Side<scalar_t, A>::teacher(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return t.grad_student;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) {
  m.impl("kd_loss_fwd", &cuda::kd_loss_fwd_cuda);
  m.impl("kd_loss_bwd", &cuda::kd_loss_bwd_cuda);
}

}  // namespace xtoken
