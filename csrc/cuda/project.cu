// The vocabulary projection q = W^T p on the GPU (formulas in csrc/cpu/project.cpp).
// Work split: a 2-D grid, blockIdx.y = row n (up to 65535 rows per launch, chunked beyond),
// blockIdx.x tiles the output vocabulary; each thread gathers one output element. Gathers only:
// deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "xtoken/cuda_utils.cuh"
#include "xtoken/project.h"

namespace xtoken {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxRowsPerLaunch = 65535;

template <typename T, typename A>
__global__ void project_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t V_in, int64_t V_out,
                               ProjectionView W, bool transpose) {
  const int64_t n = blockIdx.y;
  const int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (v >= V_out) return;
  const T* row = in + n * V_in;
  A acc = 0;
  if (transpose) {  // out[s] = sum_j W[s, j] in[idx_j]
    for (int64_t j = 0; j < W.P; ++j) {
      const int32_t t = W.idx[v * W.P + j];
      if (static_cast<uint32_t>(t) < static_cast<uint64_t>(V_in)) {
        acc += W.values<A>()[v * W.P + j] * static_cast<A>(row[t]);
      }
    }
  } else {  // out[t] = sum over column t of W[s, t] in[s]
    const ProjectionView::Range column = W.column(v);
    for (int64_t j = column.begin; j < column.end; ++j) {
      const int32_t s = W.col_src[j];
      if (static_cast<uint32_t>(s) < static_cast<uint64_t>(V_in)) acc += W.col_values<A>()[j] * static_cast<A>(row[s]);
    }
  }
  out[n * V_out + v] = static_cast<T>(acc);
}

at::Tensor run(const ProjectInputs& in, bool transpose) {
  const int64_t N = in.input.size(0), V_in = in.input.size(1);
  const int64_t V_out = transpose ? in.V_s : in.V_t;
  at::Tensor out = at::empty({N, V_out}, in.input.options());
  if (N == 0 || V_out == 0) return out;  // an empty grid is a launch error
  const auto stream = at::cuda::getCurrentCUDAStream();
  const ProjectionView W = in.W.view();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "project_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    for (int64_t n0 = 0; n0 < N; n0 += kMaxRowsPerLaunch) {
      const int64_t rows = std::min(kMaxRowsPerLaunch, N - n0);
      const dim3 grid(static_cast<unsigned>((V_out + kThreads - 1) / kThreads), static_cast<unsigned>(rows));
      project_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(in.input.data_ptr<scalar_t>() + n0 * V_in,
                                                                 out.data_ptr<scalar_t>() + n0 * V_out, V_in, V_out,
                                                                 W, transpose);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor project_fwd_cuda(const at::Tensor& probs, const at::Tensor& idx, const at::Tensor& val,
                            const at::Tensor& col_ptr, const at::Tensor& col_src, const at::Tensor& col_val) {
  const c10::cuda::CUDAGuard guard(probs.device());
  return run(prepare_project(probs, "probs", idx, val, col_ptr, col_src, col_val, false), false);
}

at::Tensor project_bwd_cuda(const at::Tensor& grad_q, const at::Tensor& idx, const at::Tensor& val,
                            const at::Tensor& col_ptr, const at::Tensor& col_src, const at::Tensor& col_val) {
  const c10::cuda::CUDAGuard guard(grad_q.device());
  return run(prepare_project(grad_q, "grad_q", idx, val, col_ptr, col_src, col_val, true), true);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) {
  m.impl("project_fwd", &cuda::project_fwd_cuda);
  m.impl("project_bwd", &cuda::project_bwd_cuda);
}

}  // namespace xtoken
