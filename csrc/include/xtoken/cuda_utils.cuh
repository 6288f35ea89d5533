// Device helpers shared by the CUDA kernels: math overloads for the accumulation types, block-wide
// reductions, launch checks.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "xtoken/common.h"

namespace xtoken {
namespace cuda {

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A nan_value() {
  return A(__int_as_float(0x7fc00000));
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 values; the call
// synchronizes the block (twice), so it must be reached by every thread.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : A(0);
  return warp_sum(v);
}

// Combine two (max logit, sum of exp((z - max) / tau)) pairs (common.h: RowLse, scaled_shift). -inf maxima
// (nothing seen yet) combine cleanly; NaN propagates through the sums.
template <typename A>
__device__ __forceinline__ void lse_combine(A& m, A& s, A m2, A s2, A inv_tau) {
  const A mx = m > m2 ? m : m2;
  if (mx == -INFINITY) return;  // both empty
  s = (m == -INFINITY ? A(0) : s * dexp(scaled_shift(m, mx, inv_tau))) +
      (m2 == -INFINITY ? A(0) : s2 * dexp(scaled_shift(m2, mx, inv_tau)));
  m = mx;
}

// logsumexp over the block of per-thread (max, sum) pairs; every thread gets the result.
template <typename A>
__device__ RowLse<A> block_lse(A m, A s, A inv_tau, A* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const A s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    lse_combine(m, s, m2, s2, inv_tau);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch[2 * warp] = m;
    scratch[2 * warp + 1] = s;
  }
  __syncthreads();
  m = lane < warps ? scratch[2 * lane] : A(-INFINITY);
  s = lane < warps ? scratch[2 * lane + 1] : A(0);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const A s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    lse_combine(m, s, m2, s2, inv_tau);
  }
  return {m, dlog(s)};
}

// logsumexp(z * inv_tau) of one row, by the whole block, as (max, log_sum). Four loads in flight per
// thread before their exps, one rescale per group of four.
template <typename T, typename A>
__device__ RowLse<A> row_lse(const T* __restrict__ z, int64_t V, A inv_tau, A* scratch) {
  A m = -INFINITY, s = 0;
  const int64_t stride = blockDim.x;
  int64_t v = threadIdx.x;
  for (; v + 3 * stride < V; v += 4 * stride) {
    const A x0 = static_cast<A>(z[v]), x1 = static_cast<A>(z[v + stride]);
    const A x2 = static_cast<A>(z[v + 2 * stride]), x3 = static_cast<A>(z[v + 3 * stride]);
    const A mx = fmax(fmax(x0, x1), fmax(x2, x3));
    const A s4 = dexp(scaled_shift(x0, mx, inv_tau)) + dexp(scaled_shift(x1, mx, inv_tau)) +
                 dexp(scaled_shift(x2, mx, inv_tau)) + dexp(scaled_shift(x3, mx, inv_tau));
    lse_combine(m, s, mx, s4, inv_tau);
  }
  for (; v < V; v += stride) lse_combine(m, s, static_cast<A>(z[v]), A(1), inv_tau);
  return block_lse(m, s, inv_tau, scratch);
}

}  // namespace cuda
}  // namespace xtoken
