// The hybrid loss on the GPU (SPEC.md §4): GOLD and H-KL, and ULD when there are no pairs. The formulas are
// those of csrc/cpu/hybrid_loss.cpp:
//   term_c = sum_n D(p_t[t_n], p_s[s_n]),  term_u = sum_{r < R} |a_r - b_r|  (a, b: the uncommon tokens of each
//   side ranked by value descending, then id ascending; zero past the shorter side)
//   backward: h[s_n] = G_c dD/dp_s,  h[id of rank r] = G_u sign(a_r - b_r),  dz = pooling backward of h
// Rank keys: ~bits(float(value)) << 32 | id as one uint64, so the order is total and an ascending integer
// sort ranks the tokens (ties: lower id first). float64 logits are ranked (and their sorted-L1 term
// computed) at float32 precision.
// Work split: the chunks go in waves of G (so that the workspace is G x (V + R), never N x V):
//   1. pool kernel, one block per chunk: logsumexps (forward), the matched term (forward: its sum; backward:
//      h zeroed, then G_c dD/dp_s at the pairs), and the rank keys of every uncommon token of both sides.
//   2. select kernel (only when R < n), one block per chunk and side: radix select of the R smallest keys,
//      8 rounds of 8-bit digits with warp-aggregated shared-memory histograms; then the keys <= the R-th
//      are compacted (exactly R, as keys are unique; their order is fixed by the sort that follows).
//   3. cub::DeviceSegmentedRadixSort of each chunk's selected keys.
//   4. L1 kernel, one block per chunk: forward the sum over ranks; backward h at the ranked student ids.
//   5. backward only: pooling-backward kernel, one block per chunk: the gradient rows from h (cuda_pooling.cuh).
// Deterministic: integer atomics only (histogram counts and compaction slots, whose order the sort erases).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>

#include "xtoken/cuda_pooling.cuh"
#include "xtoken/hybrid_loss.h"
#include "xtoken/hybrid_math.h"

namespace xtoken {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kWaveBytes = int64_t(512) << 20;  // workspace budget of one wave of chunks

struct DeviceLog {
  template <typename A>
  __device__ __forceinline__ A operator()(A x) const {
    return dlog(x);
  }
};

__device__ __forceinline__ uint64_t rank_key(float value, int32_t id) {
  return (static_cast<uint64_t>(~__float_as_uint(value)) << 32) | static_cast<uint32_t>(id);
}
__device__ __forceinline__ float key_value(uint64_t key) {
  return __uint_as_float(~static_cast<uint32_t>(key >> 32));
}
__device__ __forceinline__ int32_t key_id(uint64_t key) { return static_cast<int32_t>(static_cast<uint32_t>(key)); }

// The device buffers of one wave: per chunk, the rank keys of every uncommon token (n per side), the
// selected keys (R per side, when R < n) and the sorted keys; in the backward, h (V_s per chunk).
struct Workspace {
  int64_t G;  // chunks per wave
  int64_t top_s, top_t;  // keys ranked per chunk: min(R, n)
  at::Tensor keys_s, keys_t, selected_s, selected_t, sorted_s, sorted_t, h;

  Workspace(const HybridParams& p, const at::Tensor& like, bool backward, at::ScalarType acc) {
    top_s = std::min(p.R, p.n_s);
    top_t = std::min(p.R, p.n_t);
    const bool select = top_s < p.n_s || top_t < p.n_t;
    const int64_t elem = at::elementSize(acc);
    const int64_t per_chunk = 8 * (p.n_s + p.n_t) + (select ? 16 : 8) * (top_s + top_t) + (backward ? elem * p.V_s : 0);
    const int64_t widest = std::max<int64_t>({p.n_s, p.n_t, 1});
    G = std::max<int64_t>(1, std::min<int64_t>({p.K, kWaveBytes / std::max<int64_t>(per_chunk, 1),
                                                (int64_t(1) << 31) / widest - 1}));
    const auto u64 = like.options().dtype(at::kLong);  // uint64 keys, stored as int64
    keys_s = at::empty({G, p.n_s}, u64);
    keys_t = at::empty({G, p.n_t}, u64);
    selected_s = top_s < p.n_s ? at::empty({G, top_s}, u64) : keys_s;
    selected_t = top_t < p.n_t ? at::empty({G, top_t}, u64) : keys_t;
    sorted_s = at::empty({G, top_s}, u64);
    sorted_t = at::empty({G, top_t}, u64);
    if (backward) h = at::empty({G, p.V_s}, like.options().dtype(acc));
  }

  static uint64_t* u64(const at::Tensor& t) { return reinterpret_cast<uint64_t*>(t.data_ptr<int64_t>()); }
};

// Kernel 1. Forward: lse of the rows (saved), term_c -> losses[2k]. Backward: h[g] = 0, then G_c dD/dp_s at
// the student side of every pair. Both: the rank keys of both sides' uncommon tokens.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    hybrid_pool_kernel(HybridParams p, Side<T, A> student, Side<T, A> teacher, int64_t k0, bool backward,
                       uint64_t* __restrict__ keys_s, uint64_t* __restrict__ keys_t, A* __restrict__ h) {
  __shared__ A scratch[64];
  __shared__ A shared_log_c[2];
  const int64_t g = blockIdx.x, k = k0 + g;
  const Chunk c = p.chunks[k];
  if (!chunk_ok(c, p.N_s, p.N_t)) return;  // only reachable when the host checks were skipped; see l1_kernel
  if (!backward) {
    student.compute_lse(c.s0, c.s1, scratch);
    teacher.compute_lse(c.t0, c.t1, scratch);
    __syncthreads();  // the lse values written by thread 0 are read by every thread below
  }
  if (threadIdx.x == 0) {
    shared_log_c[0] = student.log_prefix(c.s0, c.s1);
    shared_log_c[1] = teacher.log_prefix(c.t0, c.t1);
  }
  __syncthreads();
  const A c_s = dexp(shared_log_c[0]), c_t = dexp(shared_log_c[1]);
  const Pooled<T, A> ps = student.pooled(c.s0, c.s1), pt = teacher.pooled(c.t0, c.t1);
  const A beta = A(p.beta);
  const uint32_t V_s = static_cast<uint32_t>(p.V_s), V_t = static_cast<uint32_t>(p.V_t);

  with_matched_form(matched_form(p.matched, p.beta), [&](auto f) {
    constexpr MatchedForm F = decltype(f)::value;
    if (backward) {
      A* hg = h + g * p.V_s;
      for (int64_t v = threadIdx.x; v < p.V_s; v += blockDim.x) hg[v] = A(0);
      __syncthreads();  // the zeros land before the pair writes, which other threads make
      const A G_c = static_cast<const A*>(p.grad_losses)[2 * k];
      for (int64_t n = threadIdx.x; n < p.C; n += blockDim.x) {
        const int32_t s = p.pair_s[n], t = p.pair_t[n];
        if (static_cast<uint32_t>(s) < V_s && static_cast<uint32_t>(t) < V_t) {
          hg[s] = G_c * matched_grad<F>(c_t * pt.prob(t), c_s * ps.prob(s), beta, DeviceLog());
        }
      }
    } else {
      A acc = 0;
      for (int64_t n = threadIdx.x; n < p.C; n += blockDim.x) {
        const int32_t s = p.pair_s[n], t = p.pair_t[n];
        acc += static_cast<uint32_t>(s) < V_s && static_cast<uint32_t>(t) < V_t
                   ? matched_term<F>(c_t * pt.prob(t), c_s * ps.prob(s), beta, DeviceLog())
                   : nan_value<A>();
      }
      acc = block_sum(acc, scratch);
      if (threadIdx.x == 0) static_cast<A*>(p.losses)[2 * k] = acc;
    }
    return 0;
  });

  uint64_t* ks = keys_s + g * p.n_s;
  for (int64_t i = threadIdx.x; i < p.n_s; i += blockDim.x) {
    const int32_t v = p.uncommon_s[i];
    const A value = static_cast<uint32_t>(v) < V_s ? c_s * ps.prob(v) : A(0);
    ks[i] = rank_key(static_cast<float>(value), v);
  }
  uint64_t* kt = keys_t + g * p.n_t;
  for (int64_t i = threadIdx.x; i < p.n_t; i += blockDim.x) {
    const int32_t v = p.uncommon_t[i];
    const A value = static_cast<uint32_t>(v) < V_t ? c_t * pt.prob(v) : A(0);
    kt[i] = rank_key(static_cast<float>(value), v);
  }
}

// Kernel 2: per (chunk, side), out <- the `top` smallest of the n keys (unique keys: exactly `top`).
__global__ void __launch_bounds__(kThreads)
    select_kernel(const uint64_t* __restrict__ keys_s, uint64_t* __restrict__ out_s, int64_t n_s, int64_t top_s,
                  const uint64_t* __restrict__ keys_t, uint64_t* __restrict__ out_t, int64_t n_t, int64_t top_t) {
  __shared__ unsigned int hist[256];
  __shared__ uint64_t shared_prefix;
  __shared__ unsigned int slots;
  const bool student = blockIdx.y == 0;
  const int64_t n = student ? n_s : n_t, top = student ? top_s : top_t;
  if (top >= n) return;  // this side keeps every key (the sort reads them in place)
  const uint64_t* in = (student ? keys_s : keys_t) + blockIdx.x * n;
  uint64_t* out = (student ? out_s : out_t) + blockIdx.x * top;
  const int lane = threadIdx.x & 31;

  // The top-th smallest key, one byte at a time from the most significant: among the keys that match the
  // bytes found so far, count each value of the next byte, and descend into the byte holding rank `rest`.
  uint64_t prefix = 0, mask = 0;
  int64_t rest = top;  // used by thread 0 only
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    // Warp-uniform trip count, so that every lane reaches __match_any_sync.
    for (int64_t base = 0; base < n; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      const uint64_t key = i < n ? in[i] : 0;
      const bool counted = i < n && (key & mask) == prefix;
      const unsigned int digit = counted ? static_cast<unsigned int>((key >> shift) & 255) : 256u;
      const unsigned int peers = __match_any_sync(0xffffffffu, digit);
      if (counted && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], static_cast<unsigned int>(__popc(peers)));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int d = 0;
      for (; d < 255 && rest > static_cast<int64_t>(hist[d]); ++d) rest -= hist[d];
      shared_prefix = prefix | (static_cast<uint64_t>(d) << shift);
    }
    __syncthreads();
    prefix = shared_prefix;
    mask |= static_cast<uint64_t>(255) << shift;
  }
  if (threadIdx.x == 0) slots = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const uint64_t key = in[i];
    if (key <= prefix) {
      const unsigned int slot = atomicAdd(&slots, 1u);
      if (slot < top) out[slot] = key;
    }
  }
}

// Kernel 4. Forward: term_u -> losses[2k + 1]. Backward: h[g][id of rank r] = G_u sign(a_r - b_r).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    l1_kernel(HybridParams p, int64_t k0, bool backward, const uint64_t* __restrict__ sorted_s, int64_t na,
              const uint64_t* __restrict__ sorted_t, int64_t nb, A* __restrict__ h) {
  __shared__ A scratch[64];
  const int64_t g = blockIdx.x, k = k0 + g;
  A* losses = static_cast<A*>(p.losses);
  if (!chunk_ok(p.chunks[k], p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
    if (!backward && threadIdx.x == 0) losses[2 * k] = losses[2 * k + 1] = nan_value<A>();
    return;
  }
  const uint64_t* a = sorted_s + g * na;
  const uint64_t* b = sorted_t + g * nb;
  if (backward) {
    const A G_u = static_cast<const A*>(p.grad_losses)[2 * k + 1];
    A* hg = h + g * p.V_s;
    for (int64_t r = threadIdx.x; r < na; r += blockDim.x) {
      const int32_t id = key_id(a[r]);
      const A vb = r < nb ? A(key_value(b[r])) : A(0);
      if (static_cast<uint64_t>(id) < static_cast<uint64_t>(p.V_s)) {
        hg[id] = G_u * sign_of_difference(A(key_value(a[r])), vb);
      }
    }
    return;
  }
  A acc = 0;
  const int64_t ranks = na > nb ? na : nb;
  for (int64_t r = threadIdx.x; r < ranks; r += blockDim.x) {
    const A va = r < na ? A(key_value(a[r])) : A(0), vb = r < nb ? A(key_value(b[r])) : A(0);
    acc += va > vb ? va - vb : vb - va;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) losses[2 * k + 1] = acc;
}

// Kernel 5 (backward): the gradient rows of chunk k from h (and zeros for the rows around it).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    hybrid_bwd_kernel(HybridParams p, Side<T, A> student, int64_t k0, const A* __restrict__ h) {
  __shared__ A scratch[64];
  __shared__ A shared_log_c;
  const int64_t g = blockIdx.x, k = k0 + g;
  const Chunk c = p.chunks[k];
  if (!chunk_ok(c, p.N_s, p.N_t)) return;  // only reachable when the host checks were skipped
  zero_rows_around_chunk<T>(p, k);
  if (threadIdx.x == 0) shared_log_c = student.log_prefix(c.s0, c.s1);
  __syncthreads();
  const A c_s = dexp(shared_log_c);
  const A* hg = h + g * p.V_s;
  const auto hv = [&](int64_t v) { return hg[v]; };
  const A D = student.merge == Merge::Mean ? A(0) : student.pooled_dot(hv, c.s0, c.s1, scratch);
  student.pool_backward(static_cast<T*>(p.grad_student), hv, c.s0, c.s1, c_s, D, scratch);
}

// Kernel 3: each chunk's keys sorted ascending (= rank order), per side.
void sort_segments(const at::Tensor& in, const at::Tensor& out, int64_t chunks, int64_t len, cudaStream_t stream) {
  if (len == 0) return;
  const at::Tensor offsets =
      at::arange(0, (chunks + 1) * len, len, in.options().dtype(at::kInt));  // chunk g: [g len, (g+1) len)
  const int items = static_cast<int>(chunks * len), segments = static_cast<int>(chunks);
  const uint64_t* keys_in = Workspace::u64(in);
  uint64_t* keys_out = Workspace::u64(out);
  const int* begin = offsets.data_ptr<int>();
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, bytes, keys_in, keys_out, items, segments, begin,
                                                         begin + 1, 0, 64, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(bytes)}, in.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(temp.data_ptr(), bytes, keys_in, keys_out, items, segments,
                                                         begin, begin + 1, 0, 64, stream));
}

// Kernels 1-4 for the wave of chunks [k0, k0 + chunks).
template <typename T, typename A>
void rank_wave(const HybridParams& p, Workspace& ws, int64_t k0, int64_t chunks, bool backward, cudaStream_t stream) {
  const auto student = Side<T, A>::student(p), teacher = Side<T, A>::teacher(p);
  A* h = backward ? ws.h.data_ptr<A>() : nullptr;
  hybrid_pool_kernel<T, A><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      p, student, teacher, k0, backward, Workspace::u64(ws.keys_s), Workspace::u64(ws.keys_t), h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (ws.top_s < p.n_s || ws.top_t < p.n_t) {
    select_kernel<<<dim3(static_cast<unsigned>(chunks), 2), kThreads, 0, stream>>>(
        Workspace::u64(ws.keys_s), Workspace::u64(ws.selected_s), p.n_s, ws.top_s, Workspace::u64(ws.keys_t),
        Workspace::u64(ws.selected_t), p.n_t, ws.top_t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sort_segments(ws.selected_s, ws.sorted_s, chunks, ws.top_s, stream);
  sort_segments(ws.selected_t, ws.sorted_t, chunks, ws.top_t, stream);
  l1_kernel<A><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      p, k0, backward, Workspace::u64(ws.sorted_s), ws.top_s, Workspace::u64(ws.sorted_t), ws.top_t, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hybrid_loss_fwd_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& pairs, double temperature, c10::string_view student_merge, c10::string_view teacher_merge,
    c10::string_view matched, double beta, c10::optional<int64_t> uld_topk,
    const c10::optional<at::Tensor>& student_targets, const c10::optional<at::Tensor>& teacher_targets) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const HybridInputs in = prepare_hybrid(student_logits, teacher_logits, chunks, pairs, temperature, student_merge,
                                         teacher_merge, matched, beta, uld_topk, student_targets, teacher_targets);
  HybridParams p = in.params();
  const ForwardOutputs out = allocate_forward(in, {p.K, 2}, p);
  if (p.K == 0) return {out.losses, out.student_lse, out.teacher_lse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "hybrid_loss_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    Workspace ws(p, in.student_logits, /*backward=*/false, out.losses.scalar_type());
    for (int64_t k0 = 0; k0 < p.K; k0 += ws.G) {
      rank_wave<scalar_t, A>(p, ws, k0, std::min(ws.G, p.K - k0), /*backward=*/false, stream);
    }
  });
  return {out.losses, out.student_lse, out.teacher_lse};
}

at::Tensor hybrid_loss_bwd_cuda(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                                const at::Tensor& teacher_logits, const at::Tensor& chunks, const at::Tensor& pairs,
                                double temperature, c10::string_view student_merge, c10::string_view teacher_merge,
                                c10::string_view matched, double beta, c10::optional<int64_t> uld_topk,
                                const c10::optional<at::Tensor>& student_targets,
                                const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse,
                                const at::Tensor& teacher_lse) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const HybridInputs in = prepare_hybrid(student_logits, teacher_logits, chunks, pairs, temperature, student_merge,
                                         teacher_merge, matched, beta, uld_topk, student_targets, teacher_targets);
  HybridParams p = in.params();
  const BackwardTensors t = bind_backward(grad_losses, student_lse, teacher_lse, {p.K, 2}, in, "hybrid_loss_fwd", p);
  if (p.K == 0) return t.grad_student;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "hybrid_loss_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    Workspace ws(p, in.student_logits, /*backward=*/true, t.grad_losses.scalar_type());
    for (int64_t k0 = 0; k0 < p.K; k0 += ws.G) {
      const int64_t chunks_in_wave = std::min(ws.G, p.K - k0);
      rank_wave<scalar_t, A>(p, ws, k0, chunks_in_wave, /*backward=*/true, stream);
      hybrid_bwd_kernel<scalar_t, A><<<static_cast<unsigned>(chunks_in_wave), kThreads, 0, stream>>>(
          p, Side<scalar_t, A>::student(p), k0, ws.h.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return t.grad_student;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) {
  m.impl("hybrid_loss_fwd", &cuda::hybrid_loss_fwd_cuda);
  m.impl("hybrid_loss_bwd", &cuda::hybrid_loss_bwd_cuda);
}

}  // namespace xtoken
