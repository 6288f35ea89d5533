// Exact span alignment on the GPU (SPEC.md §2; inputs and outputs in include/xtoken/align_spans.h).
//
// One block per sequence, no host sync. The boundaries (byte offsets where a non-empty token of both
// sides ends) are found without a sequential walk:
//   pass 1, per side: token i is non-empty when ends[i] > ends[i-1] (0 before the first). It *ends* a
//     chunk when its end is also an end of the other side, and *starts* one when the end before it is
//     0 or a boundary (binary searches in the other side's ends, which never decrease). A block scan
//     of the (start, end, non-empty) flags numbers the chunks: the k-th start and the k-th end of a
//     side delimit chunk k there, and the non-empty count at the k-th end gives its number of targets.
//     Both sides see the same boundaries, so they number the same K chunks.
//   pass 2, per chunk: apply the dropping rules (first target at a side's first token; an empty token
//     between the targets, seen as extent != number of targets), scan the kept flags and compact the
//     kept chunks to the front of the sequence's rows in place (each tile is read before it is
//     written, and a chunk only moves to a lower index). The rest of the rows are set to -1.
// A sequence whose lengths are out of [0, T] or whose ends decrease gets count -1; every index is
// guarded, so bad input never reads or writes out of bounds.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>
#include <limits>
#include <tuple>

#include "xtoken/align_spans.h"

namespace xtoken {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Flags {
  int32_t start, end, nonempty;
};

struct AddFlags {
  __device__ __forceinline__ Flags operator()(const Flags& a, const Flags& b) const {
    return {a.start + b.start, a.end + b.end, a.nonempty + b.nonempty};
  }
};

using FlagScan = cub::BlockScan<Flags, kThreads>;
using KeepScan = cub::BlockScan<int32_t, kThreads>;

// Whether v is one of ends[0, n) (non-decreasing when the input is valid; in bounds either way).
__device__ __forceinline__ bool contains(const int32_t* __restrict__ ends, int32_t n, int32_t v) {
  int32_t lo = 0, hi = n;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (ends[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < n && ends[lo] == v;
}

struct Seq {
  const int32_t* ends;  // the real tokens
  int32_t n;
  int64_t row0;         // flattened row of the first real token
};

// Pass 1 for one side: writes the first target (column 2 * side) and the end of the targets (column
// 2 * side + 1) of chunk k at chunks[k], and the non-empty count up to chunk k's last target at
// nonempty_at_end[k]. Returns the totals; `bad` is set where an end decreases.
__device__ Flags number_chunks(const Seq& self, const Seq& other, int side, int32_t* chunks, int64_t C,
                               int32_t* nonempty_at_end, FlagScan::TempStorage& temp, bool& bad) {
  Flags running{0, 0, 0};
  for (int64_t base = 0; base < self.n; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    Flags f{0, 0, 0};
    if (i < self.n) {
      const int32_t end = self.ends[i];
      const int32_t prev = i > 0 ? self.ends[i - 1] : 0;
      bad = bad || end < prev;
      if (end > prev) {
        f.nonempty = 1;
        f.end = contains(other.ends, other.n, end);
        f.start = prev == 0 || contains(other.ends, other.n, prev);
      }
    }
    Flags before, tile;
    FlagScan(temp).ExclusiveScan(f, before, Flags{0, 0, 0}, AddFlags(), tile);
    const int64_t k_start = int64_t(running.start) + before.start;
    const int64_t k_end = int64_t(running.end) + before.end;
    if (f.start && k_start < C) chunks[4 * k_start + 2 * side] = static_cast<int32_t>(i);
    if (f.end && k_end < C) {
      chunks[4 * k_end + 2 * side + 1] = static_cast<int32_t>(i + 1);
      nonempty_at_end[k_end] = running.nonempty + before.nonempty + 1;
    }
    running = AddFlags()(running, tile);
    __syncthreads();  // temp is reused by the next tile
  }
  return running;
}

__global__ void __launch_bounds__(kThreads)
    align_spans_kernel(AlignParams p, int32_t* __restrict__ nonempty_at_end /* [B, 2, C] */) {
  __shared__ union {
    FlagScan::TempStorage flags;
    KeepScan::TempStorage keep;
  } temp;
  __shared__ int32_t drop[2][kNumDropReasons];

  const int64_t b = blockIdx.x;
  const int64_t C = p.C;
  int32_t* chunks = p.chunks + b * C * 4;
  int32_t* dropped = p.dropped + b * 2 * kNumDropReasons;
  int32_t* nz[2] = {nonempty_at_end + b * 2 * C, nonempty_at_end + (b * 2 + 1) * C};

  Seq seq[2];
  bool ok = true;
  for (int s = 0; s < 2; ++s) {
    const AlignSide& a = p.side[s];
    const int32_t n = a.lengths[b];
    const bool valid = n >= 0 && n <= a.T;
    ok = ok && valid;
    const int64_t offset = a.left_padded && valid ? a.T - n : 0;
    seq[s] = {a.ends + b * a.T + offset, valid ? n : 0, b * a.T + offset};
  }
  if (threadIdx.x < 2 * kNumDropReasons) drop[threadIdx.x / kNumDropReasons][threadIdx.x % kNumDropReasons] = 0;

  Flags total[2] = {{0, 0, 0}, {0, 0, 0}};
  bool bad = !ok;
  if (ok) {  // uniform over the block: every thread read the same lengths
    total[0] = number_chunks(seq[0], seq[1], 0, chunks, C, nz[0], temp.flags, bad);
    total[1] = number_chunks(seq[1], seq[0], 1, chunks, C, nz[1], temp.flags, bad);
  }
  bad = __syncthreads_or(bad);  // also publishes pass 1's global writes to the block

  int32_t kept = 0;
  if (!bad) {
    // Valid input gives total[0].end == total[1].end <= min(n_s, n_t) <= C.
    const int64_t K_both = total[0].end < total[1].end ? total[0].end : total[1].end;
    const int64_t K = K_both < C ? K_both : C;
    for (int64_t base = 0; base < K; base += kThreads) {
      const int64_t k = base + threadIdx.x;
      int32_t row[4] = {0, 0, 0, 0};
      int32_t keep = 0;
      if (k < K) {
        int32_t targets[2];
        for (int s = 0; s < 2; ++s) {
          row[2 * s] = chunks[4 * k + 2 * s];
          row[2 * s + 1] = chunks[4 * k + 2 * s + 1];
          targets[s] = nz[s][k] - (k > 0 ? nz[s][k - 1] : 0);
        }
        int reason = -1;
        if (row[0] == 0 || row[2] == 0) {
          reason = kNoPredictor;
        } else if (row[1] - row[0] != targets[0] || row[3] - row[2] != targets[1]) {
          reason = kEmptyInside;
        }
        if (reason < 0) {
          keep = 1;
        } else {
          atomicAdd(&drop[0][reason], targets[0]);
          atomicAdd(&drop[1][reason], targets[1]);
        }
      }
      __syncthreads();  // the whole tile is read before any of it is overwritten
      int32_t before, tile;
      KeepScan(temp.keep).ExclusiveSum(keep, before, tile);
      if (keep) {
        int32_t* c = chunks + 4 * (int64_t(kept) + before);
        for (int s = 0; s < 2; ++s) {
          c[2 * s] = static_cast<int32_t>(seq[s].row0 + row[2 * s] - 1);
          c[2 * s + 1] = static_cast<int32_t>(seq[s].row0 + row[2 * s + 1] - 1);
        }
      }
      kept += tile;
      __syncthreads();  // temp is reused by the next tile
    }
    if (threadIdx.x < 2) {
      const int s = threadIdx.x;
      drop[s][kTruncated] = total[s].nonempty - (K > 0 ? nz[s][K - 1] : 0);
    }
  }
  for (int64_t i = 4 * int64_t(kept) + threadIdx.x; i < 4 * C; i += kThreads) chunks[i] = -1;
  __syncthreads();
  if (threadIdx.x == 0) p.counts[b] = bad ? -1 : kept;
  if (threadIdx.x < 2 * kNumDropReasons) {
    dropped[threadIdx.x] = bad ? 0 : drop[threadIdx.x / kNumDropReasons][threadIdx.x % kNumDropReasons];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> align_spans_cuda(const at::Tensor& student_ends,
                                                                const at::Tensor& student_lengths,
                                                                bool student_left_padded,
                                                                const at::Tensor& teacher_ends,
                                                                const at::Tensor& teacher_lengths,
                                                                bool teacher_left_padded) {
  const c10::cuda::CUDAGuard guard(student_ends.device());
  AlignTensors a = prepare_align(student_ends, student_lengths, student_left_padded, teacher_ends, teacher_lengths,
                                 teacher_left_padded);
  const AlignParams& p = a.params;
  if (p.B > 0) {
    TORCH_CHECK(p.B <= std::numeric_limits<int32_t>::max(), "align_spans: more than 2^31 - 1 sequences");
    at::Tensor nonempty_at_end = at::empty({p.B, 2, p.C}, a.chunks.options());
    align_spans_kernel<<<static_cast<unsigned int>(p.B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p, nonempty_at_end.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {a.chunks, a.counts, a.dropped};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) { m.impl("align_spans", &cuda::align_spans_cuda); }

}  // namespace xtoken
