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

#include "xtoken/cuda_utils.cuh"
#include "xtoken/pkl_loss.h"

namespace xtoken {
namespace cuda {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ bool chunk_ok(const Chunk& c, int64_t N_s, int64_t N_t) {
  return c.s0 >= 0 && c.s0 < c.s1 && c.s1 <= N_s && c.t0 >= 0 && c.t0 < c.t1 && c.t1 <= N_t;
}

// The pooled rows of one side of a chunk: the probability of token v under pool(rows) without the
// bayes prefix factor c (first: row r0; bayes: the last row; mean: the average of all rows).
template <typename T, typename A>
struct Pooled {
  const T* __restrict__ z;  // first row used
  int64_t V;
  A inv_tau;
  A L;                       // its logsumexp (first, bayes)
  const A* lse;              // the rows' logsumexps (mean); written by this kernel: not __restrict__
  int32_t m;                 // rows averaged (mean), 0 otherwise

  __device__ __forceinline__ A prob(int64_t v) const {
    if (m == 0) return dexp(static_cast<A>(z[v]) * inv_tau - L);
    A p = 0;
    for (int32_t i = 0; i < m; ++i) p += dexp(static_cast<A>(z[i * V + v]) * inv_tau - lse[i]);
    return p / A(m);
  }
};

// One side of the chunks as the kernels see it.
template <typename T, typename A>
struct Side {
  const T* __restrict__ z;
  int64_t V;
  A inv_tau;
  Merge merge;
  const int64_t* __restrict__ targets;
  A* lse;  // written by the forward kernel itself

  __device__ const T* row(int64_t r) const { return z + r * V; }
  __device__ int32_t lse_end(const int32_t r0, const int32_t r1) const { return merge == Merge::First ? r0 + 1 : r1; }
  __device__ int32_t pooled_row(const int32_t r0, const int32_t r1) const {
    return merge == Merge::Bayes ? r1 - 1 : r0;
  }

  // log c of merge="bayes" (0 otherwise), computed by one thread.
  __device__ A log_prefix(int32_t r0, int32_t r1) const {
    A log_c = 0;
    if (merge == Merge::Bayes) {
      for (int32_t r = r0; r < r1 - 1; ++r) {
        const int64_t x = targets[r];
        log_c += (x >= 0 && x < V) ? static_cast<A>(row(r)[x]) * inv_tau - lse[r] : nan_value<A>();
      }
    }
    return log_c;
  }

  // The pooled rows of a chunk (call after the lse values are written).
  __device__ Pooled<T, A> pooled(int32_t r0, int32_t r1) const {
    if (merge == Merge::Mean) return {row(r0), V, inv_tau, A(0), lse + r0, r1 - r0};
    const int32_t r = pooled_row(r0, r1);
    return {row(r), V, inv_tau, lse[r], nullptr, 0};
  }

  // Writes the logsumexp of every row the pooling reads (the whole block takes part).
  __device__ void compute_lse(int32_t r0, int32_t r1, A* scratch) const {
    for (int32_t r = r0; r < lse_end(r0, r1); ++r) {
      const A L = row_lse(row(r), V, inv_tau, scratch);
      if (threadIdx.x == 0) lse[r] = L;
    }
  }
};

// q'[t] = sum over column t of W[s, t] * student.prob(s), before the bayes factor c.
template <typename T, typename A>
__device__ __forceinline__ A gather_column(const ProjectionView& W, const Pooled<T, A>& student, int64_t t) {
  A q = 0;
  const int32_t end = W.col_ptr[t + 1];
  for (int32_t j = W.col_ptr[t]; j < end; ++j) {
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

// h[s] = sum_j W[s, j] g[idx_j]. g is written by the same kernel: no __restrict__, so the loads do not
// go through the read-only cache, which is not coherent with those writes.
template <typename A>
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

template <typename T>
__device__ void zero_rows(T* base, int64_t V, int64_t r0, int64_t r1) {
  const int64_t n = (r1 - r0) * V;
  T* out = base + r0 * V;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = T(0);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) pkl_bwd_kernel(PklParams p, Side<T, A> student, Side<T, A> teacher,
                                                          A* workspace) {
  __shared__ A scratch[64];
  __shared__ A shared_log_c[2];
  A* g = workspace + static_cast<int64_t>(blockIdx.x) * p.V_t;
  T* dz = static_cast<T*>(p.grad_student);
  const A* grad_losses = static_cast<const A*>(p.grad_losses);
  const A inv_tau = student.inv_tau;

  for (int64_t k = blockIdx.x; k < p.K; k += gridDim.x) {
    const Chunk c = p.chunks[k];
    if (!chunk_ok(c, p.N_s, p.N_t)) continue;  // only reachable when the host checks were skipped
    const int64_t prev_end = k == 0 ? 0 : p.chunks[k - 1].s1;
    if (prev_end >= 0 && prev_end <= c.s0) zero_rows(dz, p.V_s, prev_end, c.s0);
    if (k == p.K - 1) zero_rows(dz, p.V_s, c.s1, p.N_s);
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

    // Pass 2: the gradient rows.
    const int64_t Vs = p.V_s;
    if (p.merge == Merge::First) {
      const A L = student.lse[c.s0];
      const T* z = student.row(c.s0);
      T* out = dz + c.s0 * Vs;
      for (int64_t s = threadIdx.x; s < Vs; s += blockDim.x) {
        const A p_s = dexp(static_cast<A>(z[s]) * inv_tau - L);
        out[s] = static_cast<T>(inv_tau * p_s * (gather_row(p.W, g, s, p.V_t) - D));
      }
      zero_rows(dz, Vs, c.s0 + 1, c.s1);
    } else if (p.merge == Merge::Mean) {
      const A scale = inv_tau / A(c.s1 - c.s0);
      for (int32_t r = c.s0; r < c.s1; ++r) {
        const A L = student.lse[r];
        const T* z = student.row(r);
        A d_row = 0;
        for (int64_t s = threadIdx.x; s < Vs; s += blockDim.x) {
          d_row += dexp(static_cast<A>(z[s]) * inv_tau - L) * gather_row(p.W, g, s, p.V_t);
        }
        d_row = block_sum(d_row, scratch);
        T* out = dz + r * Vs;
        for (int64_t s = threadIdx.x; s < Vs; s += blockDim.x) {
          const A p_s = dexp(static_cast<A>(z[s]) * inv_tau - L);
          out[s] = static_cast<T>(scale * p_s * (gather_row(p.W, g, s, p.V_t) - d_row));
        }
      }
    } else {  // Bayes: D is u = <p_last, h>
      const int32_t last = c.s1 - 1;
      const A L = student.lse[last];
      const T* z = student.row(last);
      T* out = dz + last * Vs;
      for (int64_t s = threadIdx.x; s < Vs; s += blockDim.x) {
        const A p_s = dexp(static_cast<A>(z[s]) * inv_tau - L);
        out[s] = static_cast<T>(inv_tau * c_s * p_s * (gather_row(p.W, g, s, p.V_t) - D));
      }
      const A coef = inv_tau * c_s * D;
      for (int32_t r = c.s0; r < last; ++r) {
        const A Lr = student.lse[r];
        const T* zr = student.row(r);
        const int64_t x = student.targets[r];
        T* o = dz + r * Vs;
        for (int64_t s = threadIdx.x; s < Vs; s += blockDim.x) {
          const A pr = dexp(static_cast<A>(zr[s]) * inv_tau - Lr);
          o[s] = static_cast<T>(coef * ((s == x ? A(1) : A(0)) - pr));
        }
      }
    }
    __syncthreads();  // the next chunk overwrites g
  }
}

template <typename T>
Side<T, at::opmath_type<T>> student_side(const PklParams& p) {
  using A = at::opmath_type<T>;
  return {static_cast<const T*>(p.student_logits), p.V_s, A(p.inv_tau), p.merge, p.student_targets,
          static_cast<A*>(p.student_lse)};
}

template <typename T>
Side<T, at::opmath_type<T>> teacher_side(const PklParams& p) {
  using A = at::opmath_type<T>;
  return {static_cast<const T*>(p.teacher_logits), p.V_t, A(p.inv_tau), p.merge, p.teacher_targets,
          static_cast<A*>(p.teacher_lse)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pkl_loss_fwd_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
    const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature, c10::string_view merge,
    const c10::optional<at::Tensor>& student_targets, const c10::optional<at::Tensor>& teacher_targets) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const PklInputs in = prepare_pkl(student_logits, teacher_logits, chunks, proj_idx, proj_val, proj_col_ptr,
                                   proj_col_src, proj_col_val, temperature, merge, student_targets, teacher_targets);
  const auto acc = student_logits.options().dtype(accumulate_type(student_logits.scalar_type()));
  at::Tensor losses = at::empty({chunks.size(0)}, acc);
  at::Tensor lse_s = at::zeros({student_logits.size(0)}, acc);
  at::Tensor lse_t = at::zeros({teacher_logits.size(0)}, acc);
  if (chunks.size(0) == 0) return {losses, lse_s, lse_t};
  PklParams p = in.params();
  p.losses = losses.data_ptr();
  p.student_lse = lse_s.data_ptr();
  p.teacher_lse = lse_t.data_ptr();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "pkl_loss_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    pkl_fwd_kernel<scalar_t, A><<<static_cast<unsigned>(p.K), kThreads, 0, stream>>>(p, student_side<scalar_t>(p),
                                                                                  teacher_side<scalar_t>(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {losses, lse_s, lse_t};
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
  check_pkl_bwd_args(grad_losses, student_lse, teacher_lse, in);
  const auto acc = accumulate_type(student_logits.scalar_type());
  const at::Tensor g = grad_losses.to(acc).contiguous();
  const at::Tensor ls = student_lse.to(acc).contiguous();
  const at::Tensor lt = teacher_lse.to(acc).contiguous();
  at::Tensor grad = at::empty_like(in.student_logits);
  if (chunks.size(0) == 0) return grad.zero_();
  PklParams p = in.params();
  p.grad_losses = g.data_ptr();
  p.student_lse = const_cast<void*>(ls.data_ptr());
  p.teacher_lse = const_cast<void*>(lt.data_ptr());
  p.grad_student = grad.data_ptr();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "pkl_loss_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto kernel = pkl_bwd_kernel<scalar_t, A>;
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    // Two resident blocks per SM keep the memory system busy; more would only grow the workspace.
    const int64_t blocks = std::min<int64_t>(p.K, static_cast<int64_t>(sms) * std::max(1, std::min(per_sm, 2)));
    at::Tensor workspace = at::empty({blocks, p.V_t}, in.student_logits.options().dtype(acc));
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, student_side<scalar_t>(p),
                                                                 teacher_side<scalar_t>(p), workspace.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) {
  m.impl("pkl_loss_fwd", &cuda::pkl_loss_fwd_cuda);
  m.impl("pkl_loss_bwd", &cuda::pkl_loss_bwd_cuda);
}

}  // namespace xtoken
