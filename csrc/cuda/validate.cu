// CUDA backends of the content checks (include/xtoken/validate.h). Each kernel folds the index of
// the first offending element into one int64 with atomicMin; nothing here syncs with the host (the
// caller copies every result back in one go).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "xtoken/validate.h"

namespace xtoken {
namespace validate {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr unsigned long long kNone = ~0ull;

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > 4096 ? 4096 : b));
}

at::Tensor make_slot(const at::Tensor& like) {
  return at::full({}, static_cast<int64_t>(kNone >> 1), like.options().dtype(at::kLong));
}

// kNone >> 1 is INT64_MAX: turn "nothing found" into -1.
at::Tensor finish(const at::Tensor& slot) {
  return at::where(slot == INT64_MAX, at::full({}, -1, slot.options()), slot);
}

__device__ __forceinline__ void note(long long* slot, int64_t i) {
  atomicMin(reinterpret_cast<long long*>(slot), static_cast<long long>(i));
}

__global__ void bad_chunk_kernel(const int32_t* __restrict__ c, int64_t K, int64_t N_s, int64_t N_t, bool disjoint,
                                 long long* slot) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < K; k += int64_t(gridDim.x) * blockDim.x) {
    const int32_t s0 = c[4 * k], s1 = c[4 * k + 1], t0 = c[4 * k + 2], t1 = c[4 * k + 3];
    const bool ok = s0 >= 0 && s0 < s1 && s1 <= N_s && t0 >= 0 && t0 < t1 && t1 <= N_t &&
                    (!disjoint || k == 0 || c[4 * (k - 1) + 1] <= s0);
    if (!ok) note(slot, k);
  }
}

template <typename T>
__global__ void out_of_range_kernel(const T* __restrict__ p, int64_t n, int64_t lo, int64_t hi, long long* slot) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = static_cast<int64_t>(p[i]);
    if (v < lo || v >= hi) note(slot, i);
  }
}

__global__ void bad_offset_kernel(const int32_t* __restrict__ p, int64_t n, int64_t total, long long* slot) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const bool ok = (i == 0 ? p[0] == 0 : p[i] >= p[i - 1]) && (i != n - 1 || p[i] == total);
    if (!ok) note(slot, i);
  }
}

__global__ void nonfinite_kernel(const float* __restrict__ p, int64_t n, long long* slot) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (!(isfinite(p[i]) && p[i] >= 0.f)) note(slot, i);
  }
}

__global__ void bayes_target_kernel(const int32_t* __restrict__ c, int64_t K, int side, const int64_t* __restrict__ x,
                                    int64_t n_rows, int64_t V, long long* slot) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < K; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r0 = c[4 * k + 2 * side], r1 = c[4 * k + 2 * side + 1];
    for (int64_t r = r0; r < r1 - 1; ++r) {
      if (r < 0 || r >= n_rows || x[r] < 0 || x[r] >= V) {
        note(slot, k);
        break;
      }
    }
  }
}

#define XT_LAUNCH(kernel, n, ...)                                                                        \
  do {                                                                                                 \
    kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);            \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                    \
  } while (0)

}  // namespace

at::Tensor first_bad_chunk(const at::Tensor& chunks_, int64_t N_s, int64_t N_t, bool disjoint) {
  const c10::cuda::CUDAGuard guard(chunks_.device());
  const at::Tensor chunks = chunks_.contiguous();
  at::Tensor slot = make_slot(chunks);
  const int64_t K = chunks.size(0);
  XT_LAUNCH(bad_chunk_kernel, K, chunks.data_ptr<int32_t>(), K, N_s, N_t, disjoint,
            reinterpret_cast<long long*>(slot.data_ptr<int64_t>()));
  return finish(slot);
}

at::Tensor first_out_of_range(const at::Tensor& t_, int64_t lo, int64_t hi) {
  const c10::cuda::CUDAGuard guard(t_.device());
  const at::Tensor t = t_.contiguous();
  at::Tensor slot = make_slot(t);
  AT_DISPATCH_INTEGRAL_TYPES(t.scalar_type(), "first_out_of_range", [&] {
    XT_LAUNCH(out_of_range_kernel<scalar_t>, t.numel(), t.data_ptr<scalar_t>(), t.numel(), lo, hi,
              reinterpret_cast<long long*>(slot.data_ptr<int64_t>()));
  });
  return finish(slot);
}

at::Tensor first_bad_offset(const at::Tensor& ptr_, int64_t total) {
  const c10::cuda::CUDAGuard guard(ptr_.device());
  const at::Tensor ptr = ptr_.contiguous();
  at::Tensor slot = make_slot(ptr);
  XT_LAUNCH(bad_offset_kernel, ptr.numel(), ptr.data_ptr<int32_t>(), ptr.numel(), total,
            reinterpret_cast<long long*>(slot.data_ptr<int64_t>()));
  return finish(slot);
}

at::Tensor first_negative_or_nonfinite(const at::Tensor& t_) {
  const c10::cuda::CUDAGuard guard(t_.device());
  const at::Tensor t = t_.contiguous();
  at::Tensor slot = make_slot(t);
  XT_LAUNCH(nonfinite_kernel, t.numel(), t.data_ptr<float>(), t.numel(),
            reinterpret_cast<long long*>(slot.data_ptr<int64_t>()));
  return finish(slot);
}

at::Tensor first_bad_bayes_target(const at::Tensor& chunks_, int side, const at::Tensor& targets_, int64_t V) {
  const c10::cuda::CUDAGuard guard(chunks_.device());
  const at::Tensor chunks = chunks_.contiguous();
  const at::Tensor targets = targets_.contiguous();
  at::Tensor slot = make_slot(chunks);
  const int64_t K = chunks.size(0);
  XT_LAUNCH(bayes_target_kernel, K, chunks.data_ptr<int32_t>(), K, side, targets.data_ptr<int64_t>(),
            targets.numel(), V, reinterpret_cast<long long*>(slot.data_ptr<int64_t>()));
  return finish(slot);
}

}  // namespace cuda
}  // namespace validate
}  // namespace xtoken
