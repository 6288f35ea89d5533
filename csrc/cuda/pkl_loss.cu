// P-KL on the GPU (SPEC.md §3-4). The formulas are those of csrc/cpu/pkl_loss.cpp:
//   forward:  q = W^T pool(p_s),  L(k) = sum_{t : p_t != 0} p_t (log p_t - log(q + eps))  (each side pooled by
//             its own merge)
//   backward: g = -G p_t / (q + eps),  h = W g,  dz = pooled-softmax Jacobian^T h  (see the CPU file);
//             when asked, dLoss/dW[s, t] = sum_k p_s^k[s] g^k[t] on W's support
// Work split:
//   forward  one block per chunk. Pass A: logsumexp of the rows the pooling reads (both sides).
//            Pass B: threads stride over the teacher vocabulary; each computes q[t] by gathering the
//            student probabilities of column t of W (its transpose, so no atomics) and adds its KL term.
//   backward a persistent grid; each block owns a V_t-sized float workspace for g and loops over chunks.
//            Pass 1 over t writes g[t] and accumulates D = <p, h> as sum_t g[t] q[t]; pass 2 over the
//            student vocabulary gathers h[s] = sum_j W[s, j] g[idx_j] and writes the gradient rows.
//            Every gradient row is written exactly once (rows between chunks get zeros), so the
//            gradient needs no memset. Results are deterministic: no atomics anywhere.
//   W gradient (only when asked) the chunks go in waves of a fixed size (a memory budget, not the device's
//            size): the backward kernel runs one block per chunk of the wave, leaving g in the wave's
//            workspace and p_s in a second one; then one thread per slot (s, j) of W adds the wave's terms
//            p_s^k[s] g^k[idx[s, j]] to grad[s, j] in chunk order. Every entry is thus summed over all chunks
//            in order: deterministic, with no float atomics.
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
constexpr int kGradThreads = 256;
constexpr int64_t kGradWaveBytes = int64_t(512) << 20;  // workspace budget of one wave of the W gradient

// q'[t] = sum over column t of W[s, t] * student.prob(s), before the bayes factor c.
template <typename T, typename A>
__device__ __forceinline__ A gather_column(const ProjectionView& W, const Pooled<T, A>& student, int64_t t) {
  A q = 0;
  const ProjectionView::Range column = W.column(t);
  for (int64_t j = column.begin; j < column.end; ++j) {
    const int32_t s = W.col_src[j];
    if (static_cast<uint32_t>(s) < static_cast<uint64_t>(student.V)) q += W.col_values<A>()[j] * student.prob(s);
  }
  return q;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) pkl_fwd_kernel(PklParams p, Side<T, A> student, Side<T, A> teacher) {
  __shared__ A scratch[64];
  const int64_t k = blockIdx.x;
  const Chunk c = p.chunks[k];
  A* losses = static_cast<A*>(p.losses);
  if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
    if (threadIdx.x == 0) losses[k] = nan_value<A>();
    return;
  }
  const LogPrefixes<A> log_c = chunk_log_prefixes(student, teacher, c, /*lse=*/true, scratch);
  const A c_s = dexp(log_c.student), log_c_t = log_c.teacher;
  const Pooled<T, A> ps = student.pooled(c.s0, c.s1), pt_rows = teacher.pooled(c.t0, c.t1);

  A acc = 0;
  for (int64_t t = threadIdx.x; t < p.V_t; t += blockDim.x) {
    const A q = c_s * gather_column(p.W, ps, t);
    A pt, lpt;
    pt_rows.prob_and_log(t, log_c_t, pt, lpt);
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
  const A* val = W.values<A>() + s * W.P;
  for (int64_t j = 0; j < W.P; ++j) {
    const int32_t t = idx[j];
    if (static_cast<uint32_t>(t) < static_cast<uint64_t>(V_t)) h += val[j] * g[t];
  }
  return h;
}

// The chunks [k_begin, k_end), block b taking k_begin + b, then every gridDim.x-th. `ps_out` (W gradient only,
// one block per chunk): where each block leaves its chunk's pooled student probabilities p_s (with c), [V_s].
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) pkl_bwd_kernel(PklParams p, Side<T, A> student, Side<T, A> teacher,
                                                          A* workspace, int64_t k_begin, int64_t k_end, A* ps_out) {
  __shared__ A scratch[64];
  A* g = workspace + static_cast<int64_t>(blockIdx.x) * p.V_t;
  A* ps_block = ps_out == nullptr ? nullptr : ps_out + static_cast<int64_t>(blockIdx.x) * p.V_s;
  T* dz = static_cast<T*>(p.grad_student);
  const A* grad_losses = static_cast<const A*>(p.grad_losses);

  for (int64_t k = k_begin + blockIdx.x; k < k_end; k += gridDim.x) {
    const Chunk c = p.chunks[k];
    zero_rows_around_chunk<T>(p, k);
    if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
      nan_rows_of_chunk<T>(p, c);
      if (ps_block != nullptr) {  // its W-gradient terms become NaN
        for (int64_t v = threadIdx.x; v < p.V_s; v += blockDim.x) ps_block[v] = nan_value<A>();
      }
      continue;
    }
    const LogPrefixes<A> log_c = chunk_log_prefixes(student, teacher, c, /*lse=*/false, scratch);
    const A log_c_s = log_c.student, log_c_t = log_c.teacher;
    const A c_s = dexp(log_c_s);
    const A G = grad_losses[k];
    const Pooled<T, A> ps = student.pooled(c.s0, c.s1), pt_rows = teacher.pooled(c.t0, c.t1);

    // Pass 1: g = dLoss/dq and D = <p', h> = sum_t g[t] q'[t], p' the pooled vector without c (first, bayes,
    // logmean).
    A d_acc = 0;
    for (int64_t t = threadIdx.x; t < p.V_t; t += blockDim.x) {
      const A q_row = gather_column(p.W, ps, t);
      A pt, lpt;
      pt_rows.prob_and_log(t, log_c_t, pt, lpt);
      const A gt = -G * pt / (c_s * q_row + A(kPklEps));
      g[t] = gt;
      d_acc += gt * q_row;
    }
    const A D = block_sum(d_acc, scratch);  // also orders the g writes before the reads below

    // Pass 2: the gradient rows, h[s] = sum_j W[s, j] g[idx_j].
    const auto h = [&](int64_t s) { return gather_row(p.W, g, s, p.V_t); };
    student.pool_backward(dz, h, c.s0, c.s1, c_s, D, scratch);
    if (ps_block != nullptr) {
      for (int64_t v = threadIdx.x; v < p.V_s; v += blockDim.x) ps_block[v] = c_s * ps.prob(v);
    }
    __syncthreads();  // the next chunk overwrites g
  }
}

// grad[e] += sum_{i < n} ps[i][s] g[i][idx[e]], in order of i, for every slot e = s P + j: one wave of the W
// gradient. One thread per slot (grid-stride), its sum in a register; the threads sweep the chunks i at about
// the same pace, so each g[i] is gathered from L2. Empty slots keep 0.
template <typename A>
__global__ void __launch_bounds__(kGradThreads) pkl_grad_val_kernel(ProjectionView W, int64_t V_s, int64_t V_t,
                                                                    int64_t n, const A* __restrict__ ps,
                                                                    const A* __restrict__ g, A* __restrict__ grad) {
  const int64_t slots = V_s * W.P;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < slots; e += stride) {
    const int32_t t = W.idx[e];
    if (static_cast<uint32_t>(t) >= static_cast<uint64_t>(V_t)) continue;
    const int64_t s = e / W.P;
    A acc = grad[e];
    for (int64_t i = 0; i < n; ++i) acc += ps[i * V_s + s] * g[i * V_t + t];
    grad[e] = acc;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pkl_loss_fwd_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
    const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
    c10::string_view student_merge, c10::string_view teacher_merge, const c10::optional<at::Tensor>& student_targets,
    const c10::optional<at::Tensor>& teacher_targets) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const PklInputs in =
      prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr, proj_col_src, proj_col_val,
                  temperature, student_merge, teacher_merge, student_targets, teacher_targets);
  PklParams p = in.params();
  return run_forward(in, p, {p.K}, "pkl_loss_fwd_cuda", [&](auto scalar) {
    using T = decltype(scalar);
    using A = at::opmath_type<T>;
    pkl_fwd_kernel<T, A><<<static_cast<unsigned>(p.K), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p, Side<T, A>::student(p), Side<T, A>::teacher(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> pkl_loss_bwd_cuda(
    const at::Tensor& grad_losses, const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const at::Tensor& chunks, const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
    const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
    c10::string_view student_merge, c10::string_view teacher_merge, const c10::optional<at::Tensor>& student_targets,
    const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
    bool proj_val_grad) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const PklInputs in =
      prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr, proj_col_src, proj_col_val,
                  temperature, student_merge, teacher_merge, student_targets, teacher_targets);
  PklParams p = in.params();
  const BackwardTensors t = bind_backward(grad_losses, student_lse, teacher_lse, {p.K}, in, "pkl_loss_fwd", p);
  const at::Tensor grad_val = bind_grad_val(proj_val_grad, in, p);
  if (p.K == 0) return {t.grad_student, finish_grad_val(grad_val, proj_val)};
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_logits(in, "pkl_loss_bwd_cuda", [&](auto scalar) {
    using scalar_t = decltype(scalar);
    using A = at::opmath_type<scalar_t>;
    const auto kernel = pkl_bwd_kernel<scalar_t, A>;
    const auto student = Side<scalar_t, A>::student(p), teacher = Side<scalar_t, A>::teacher(p);
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    if (p.grad_val == nullptr) {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
      // Two resident blocks per SM keep the memory system busy; more would only grow the workspace.
      const int64_t blocks = std::min<int64_t>(p.K, static_cast<int64_t>(sms) * std::max(1, std::min(per_sm, 2)));
      at::Tensor workspace = at::empty({blocks, p.V_t}, t.student_lse.options());
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, student, teacher, workspace.data_ptr<A>(),
                                                                     0, p.K, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t per_chunk = static_cast<int64_t>(sizeof(A)) * (p.V_s + p.V_t);
    const int64_t wave = std::max<int64_t>(1, std::min<int64_t>(p.K, kGradWaveBytes / per_chunk));
    at::Tensor workspace = at::empty({wave, p.V_t}, t.student_lse.options());
    at::Tensor pooled = at::empty({wave, p.V_s}, t.student_lse.options());
    // One thread per slot of W (V_s P < 2^31 * 256 for any int32 vocabulary and a few slots).
    const int64_t grad_blocks = std::max<int64_t>(1, (p.V_s * p.W.P + kGradThreads - 1) / kGradThreads);
    for (int64_t k0 = 0; k0 < p.K; k0 += wave) {
      const int64_t n = std::min(wave, p.K - k0);
      kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(p, student, teacher, workspace.data_ptr<A>(), k0,
                                                                k0 + n, pooled.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pkl_grad_val_kernel<A><<<static_cast<unsigned>(grad_blocks), kGradThreads, 0, stream>>>(
          p.W, p.V_s, p.V_t, n, pooled.data_ptr<A>(), workspace.data_ptr<A>(), static_cast<A*>(p.grad_val));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {t.grad_student, finish_grad_val(grad_val, proj_val)};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) {
  m.impl("pkl_loss_fwd", &cuda::pkl_loss_fwd_cuda);
  m.impl("pkl_loss_bwd", &cuda::pkl_loss_bwd_cuda);
}

}  // namespace xtoken
