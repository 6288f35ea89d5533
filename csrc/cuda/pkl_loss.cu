// P-KL on the GPU (SPEC.md §3-4). The formulas are those of csrc/cpu/pkl_loss.cpp:
//   forward:  q = W^T pool(p_s),  L(k) = sum_{t : p_t != 0} p_t (log p_t - log(q + eps))
//   backward: g = -G p_t / (q + eps),  h = W g,  dz = pooled-softmax Jacobian^T h  (see the CPU file)
// Work split:
//   forward  one block per chunk. Pass A: logsumexp of the rows the pooling reads (both sides).
//            Pass B: threads stride over the teacher vocabulary; each computes q[t] by gathering the
//            student probabilities of column t of W (its transpose, so no atomics) and adds its KL term.
//   backward a persistent grid; each block owns a V_t-sized float workspace for g and loops over chunks.
//            Pass 1 over t writes g[t] and accumulates D = <p, h> as sum_t g[t] q[t]; pass 2 over the
//            student vocabulary gathers h[s] = sum_j W[s, j] g[idx_j] and writes the gradient rows.
//            Every gradient row is written exactly once (rows between chunks get zeros), so the
//            gradient needs no memset. Results are deterministic: no atomics anywhere.
// The logits are read in their own dtype; everything accumulates in float (double for float64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "xtoken/cuda_pooling.cuh"
#include "xtoken/pkl_loss.h"

namespace xtoken {
namespace cuda {
namespace {

constexpr int kThreads = 512;

// q'[t] = sum over column t of W[s, t] * student.prob(s), before the bayes factor c.
template <typename T, typename A>
__device__ __forceinline__ A gather_column(const ProjectionView& W, const Pooled<T, A>& student, int64_t t) {
  A q = 0;
  const ProjectionView::Range column = W.column(t);
  for (int64_t j = column.begin; j < column.end; ++j) {
    const int32_t s = W.col_src[j];
    if (static_cast<uint32_t>(s) < static_cast<uint64_t>(student.V)) q += static_cast<A>(W.col_val[j]) * student.prob(s);
  }
  return q;
}

// Teacher pooled probability p and its log of token t: first/bayes read it off one row, mean averages.
template <typename T, typename A>
__device__ __forceinline__ void teacher_prob(const Pooled<T, A>& teacher, int64_t t, A log_c_t, A& p, A& lp) {
  if (teacher.m > 0) {
    p = teacher.prob(t);
    lp = dlog(p);
  } else {
    lp = static_cast<A>(teacher.z[t]) * teacher.inv_tau - teacher.L + log_c_t;
    p = dexp(lp);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) pkl_fwd_kernel(PklParams p, Side<T, A> student, Side<T, A> teacher) {
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
  const A c_s = dexp(shared_log_c[0]), log_c_t = shared_log_c[1];
  const Pooled<T, A> ps = student.pooled(c.s0, c.s1), pt_rows = teacher.pooled(c.t0, c.t1);

  A acc = 0;
  for (int64_t t = threadIdx.x; t < p.V_t; t += blockDim.x) {
    const A q = c_s * gather_column(p.W, ps, t);
    A pt, lpt;
    teacher_prob(pt_rows, t, log_c_t, pt, lpt);
    acc += pt != A(0) ? pt * (lpt - dlog(q + A(kPklEps))) : A(0);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) losses[k] = acc;
}

// h[s] = sum_j W[s, j] g[idx_j]
template <typename A>
// g is written by the same kernel: no __restrict__, so its loads skip the (non-coherent) read-only cache.
__device__ __forceinline__ A gather_row(const ProjectionView& W, const A* g, int64_t s, int64_t V_t) {
  A h = 0;
  const int32_t* idx = W.idx + s * W.P;
  const float* val = W.val + s * W.P;
  for (int64_t j = 0; j < W.P; ++j) {
    const int32_t t = idx[j];
    if (static_cast<uint32_t>(t) < static_cast<uint64_t>(V_t)) h += static_cast<A>(val[j]) * g[t];
  }
  return h;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) pkl_bwd_kernel(PklParams p, Side<T, A> student, Side<T, A> teacher,
                                                          A* workspace) {
  __shared__ A scratch[64];
  __shared__ A shared_log_c[2];
  A* g = workspace + static_cast<int64_t>(blockIdx.x) * p.V_t;
  T* dz = static_cast<T*>(p.grad_student);
  const A* grad_losses = static_cast<const A*>(p.grad_losses);

  for (int64_t k = blockIdx.x; k < p.K; k += gridDim.x) {
    const Chunk c = p.chunks[k];
    zero_rows_around_chunk<T>(p, k);
    if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
      nan_rows_of_chunk<T>(p, c);
      continue;
    }
    if (threadIdx.x == 0) {
      shared_log_c[0] = student.log_prefix(c.s0, c.s1);
      shared_log_c[1] = teacher.log_prefix(c.t0, c.t1);
    }
    __syncthreads();
    const A log_c_s = shared_log_c[0], log_c_t = shared_log_c[1];
    const A c_s = dexp(log_c_s);
    const A G = grad_losses[k];
    const Pooled<T, A> ps = student.pooled(c.s0, c.s1), pt_rows = teacher.pooled(c.t0, c.t1);

    // Pass 1: g = dLoss/dq and D = <p_pooled_row, h> = sum_t g[t] q'[t] (first, bayes).
    A d_acc = 0;
    for (int64_t t = threadIdx.x; t < p.V_t; t += blockDim.x) {
      const A q_row = gather_column(p.W, ps, t);
      A pt, lpt;
      teacher_prob(pt_rows, t, log_c_t, pt, lpt);
      const A gt = -G * pt / (c_s * q_row + A(kPklEps));
      g[t] = gt;
      d_acc += gt * q_row;
    }
    const A D = block_sum(d_acc, scratch);  // also orders the g writes before the reads below

    // Pass 2: the gradient rows, h[s] = sum_j W[s, j] g[idx_j].
    const auto h = [&](int64_t s) { return gather_row(p.W, g, s, p.V_t); };
    student.pool_backward(dz, h, c.s0, c.s1, c_s, D, scratch);
    __syncthreads();  // the next chunk overwrites g
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pkl_loss_fwd_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
    const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature, c10::string_view merge,
    const c10::optional<at::Tensor>& student_targets, const c10::optional<at::Tensor>& teacher_targets) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const PklInputs in = prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr,
                                   proj_col_src, proj_col_val, temperature, merge, student_targets, teacher_targets);
  PklParams p = in.params();
  const ForwardOutputs out = allocate_forward(in, {p.K}, p);
  if (p.K == 0) return {out.losses, out.student_lse, out.teacher_lse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "pkl_loss_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    pkl_fwd_kernel<scalar_t, A><<<static_cast<unsigned>(p.K), kThreads, 0, stream>>>(
        p, Side<scalar_t, A>::student(p), Side<scalar_t, A>::teacher(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.losses, out.student_lse, out.teacher_lse};
}

at::Tensor pkl_loss_bwd_cuda(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                             const at::Tensor& teacher_logits, const at::Tensor& chunks, const at::Tensor& proj_idx,
                             const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
                             const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
                             c10::string_view merge, const c10::optional<at::Tensor>& student_targets,
                             const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse,
                             const at::Tensor& teacher_lse) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const PklInputs in = prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr,
                                   proj_col_src, proj_col_val, temperature, merge, student_targets, teacher_targets);
  PklParams p = in.params();
  const BackwardTensors t = bind_backward(grad_losses, student_lse, teacher_lse, {p.K}, in, "pkl_loss_fwd", p);
  if (p.K == 0) return t.grad_student;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "pkl_loss_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto kernel = pkl_bwd_kernel<scalar_t, A>;
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    // Two resident blocks per SM keep the memory system busy; more would only grow the workspace.
    const int64_t blocks = std::min<int64_t>(p.K, static_cast<int64_t>(sms) * std::max(1, std::min(per_sm, 2)));
    at::Tensor workspace = at::empty({blocks, p.V_t}, t.student_lse.options());
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p, Side<scalar_t, A>::student(p), Side<scalar_t, A>::teacher(p), workspace.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return t.grad_student;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) {
  m.impl("pkl_loss_fwd", &cuda::pkl_loss_fwd_cuda);
  m.impl("pkl_loss_bwd", &cuda::pkl_loss_bwd_cuda);
}

}  // namespace xtoken
