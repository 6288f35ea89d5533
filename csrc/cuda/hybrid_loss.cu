// The hybrid loss on the GPU (SPEC.md §4): GOLD and H-KL, and ULD when there are no pairs. The formulas are
// those of csrc/cpu/hybrid_loss.cpp:
//   term_c = sum_n D(p_t[t_n], p_s[s_n]),  term_u = sum_{r < R} |a_r - b_r|  (a, b: the uncommon tokens of each
//   side ranked by value descending, then id ascending; zero past the shorter side)
//   backward: h[s_n] = G_c dD/dp_s,  h[id of rank r] = G_u sign(a_r - b_r),  dz = pooling backward of h
// Rank keys: ~bits(value) << 32 | id as one uint64 (float accumulation), so the order is total and an ascending
// integer sort ranks the tokens (ties: lower id first). float64 logits need all 64 bits of the value: their
// keys are {~bits(value), id, chunk}, ranked exactly as on the CPU (see ExactKey).
// Work split: the chunks go in waves of G (so that the workspace is G x (V + R), never N x V):
//   1. pool kernel, one block per chunk: logsumexps (forward), the matched term (forward: its sum; backward:
//      h zeroed, then G_c dD/dp_s at the pairs), and the rank keys of every uncommon token of both sides.
//   2. select kernel (only when R < n; float keys), one block per chunk and side: radix select of the R
//      smallest keys, 8 rounds of 8-bit digits with warp-aggregated shared-memory histograms; then the keys
//      <= the R-th are compacted (exactly R, as keys are unique; their order is fixed by the sort that follows).
//   3. cub::DeviceSegmentedRadixSort of each chunk's selected keys (float64: cub::DeviceMergeSort of the wave).
//   4. L1 kernel, one block per chunk: forward the sum over ranks; backward h at the ranked student ids.
//   5. backward only: pooling-backward kernel, one block per chunk: the gradient rows from h (cuda_pooling.cuh).
// Deterministic: integer atomics only (histogram counts and compaction slots, whose order the sort erases).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_merge_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <type_traits>

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

// The rank key of a float64 value: its 64 bits do not leave room for the id in one word. The keys of a wave are
// ordered by chunk, then value descending, then id ascending (the CPU's order), by one comparison sort, which
// leaves chunk g's keys at [g n, (g + 1) n) in rank order; there is no selection step (float64 is for checking
// gradients, not for speed).
struct ExactKey {
  uint64_t order;  // ~bits(value): ascending order = value descending (the values are >= +0)
  int32_t id;
  int32_t chunk;  // in the wave
};

struct ExactKeyLess {
  __device__ bool operator()(const ExactKey& a, const ExactKey& b) const {
    if (a.chunk != b.chunk) return a.chunk < b.chunk;
    if (a.order != b.order) return a.order < b.order;
    return a.id < b.id;
  }
};

// The rank keys of one accumulation type: make(value, id, chunk of the wave), value(key), id(key).
template <typename A>
struct Rank;

template <>
struct Rank<float> {
  using Key = uint64_t;
  __device__ static Key make(float value, int32_t id, int64_t) { return rank_key(value, id); }
  __device__ static float value(Key key) { return key_value(key); }
  __device__ static int32_t id(Key key) { return key_id(key); }
};

template <>
struct Rank<double> {
  using Key = ExactKey;
  __device__ static Key make(double value, int32_t id, int64_t chunk) {
    return {~static_cast<uint64_t>(__double_as_longlong(value)), id, static_cast<int32_t>(chunk)};
  }
  __device__ static double value(const Key& key) { return __longlong_as_double(static_cast<long long>(~key.order)); }
  __device__ static int32_t id(const Key& key) { return key.id; }
};

// The device buffers of one wave: per chunk, the rank keys of every uncommon token (n per side), the
// selected keys (R per side, when R < n; float keys only) and the sorted keys; in the backward, h (V_s per
// chunk). Keys are stored in int64 tensors (one word per float key, two per ExactKey).
template <typename A>
struct Workspace {
  using Key = typename Rank<A>::Key;
  static constexpr bool kExact = std::is_same<A, double>::value;  // float64: sorted in place, whole
  static constexpr int64_t kWords = sizeof(Key) / sizeof(int64_t);
  int64_t G;  // chunks per wave
  int64_t top_s, top_t;  // keys ranked per chunk: min(R, n)
  int64_t stride_s, stride_t;  // keys per chunk in the sorted buffers: top, or n (float64)
  at::Tensor keys_s, keys_t, selected_s, selected_t, sorted_s, sorted_t, h;

  Workspace(const HybridParams& p, const at::Tensor& like, bool backward) {
    top_s = std::min(p.R, p.n_s);
    top_t = std::min(p.R, p.n_t);
    const bool select = !kExact && (top_s < p.n_s || top_t < p.n_t);
    const int64_t key = sizeof(Key);
    // float64: the keys and the merge sort's temporary copy of them.
    const int64_t keys_bytes = kExact ? 2 * key * (p.n_s + p.n_t)
                                      : key * (p.n_s + p.n_t) + (select ? 2 : 1) * key * (top_s + top_t);
    const int64_t per_chunk = keys_bytes + (backward ? int64_t(sizeof(A)) * p.V_s : 0);
    const int64_t widest = std::max<int64_t>({p.n_s, p.n_t, 1});
    G = std::max<int64_t>(1, std::min<int64_t>({p.K, kWaveBytes / std::max<int64_t>(per_chunk, 1),
                                                (int64_t(1) << 31) / widest - 1}));
    const auto words = like.options().dtype(at::kLong);
    keys_s = at::empty({G, p.n_s, kWords}, words);
    keys_t = at::empty({G, p.n_t, kWords}, words);
    if (kExact) {
      selected_s = sorted_s = keys_s;
      selected_t = sorted_t = keys_t;
    } else {
      selected_s = top_s < p.n_s ? at::empty({G, top_s}, words) : keys_s;
      selected_t = top_t < p.n_t ? at::empty({G, top_t}, words) : keys_t;
      sorted_s = at::empty({G, top_s}, words);
      sorted_t = at::empty({G, top_t}, words);
    }
    stride_s = kExact ? p.n_s : top_s;
    stride_t = kExact ? p.n_t : top_t;
    if (backward) h = at::empty({G, p.V_s}, like.options().dtype(c10::CppTypeToScalarType<A>::value));
  }

  static Key* keys(const at::Tensor& t) { return reinterpret_cast<Key*>(t.data_ptr<int64_t>()); }
  static uint64_t* u64(const at::Tensor& t) { return reinterpret_cast<uint64_t*>(t.data_ptr<int64_t>()); }
};

// The rank keys of one side's uncommon tokens for chunk g of the wave; value(v) is v's pooled probability.
template <typename A, typename Value>
__device__ void write_rank_keys(typename Rank<A>::Key* keys, const int32_t* uncommon, int64_t n, int64_t V,
                                int64_t g, const Value& value) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int32_t v = uncommon[i];
    keys[i] = Rank<A>::make(static_cast<uint64_t>(v) < static_cast<uint64_t>(V) ? value(v) : A(0), v, g);
  }
}

// Kernel 1. Forward: lse of the rows (saved), term_c -> losses[2k]. Backward: h[g] = 0, then G_c dD/dp_s at
// the student side of every pair. Both: the rank keys of both sides' uncommon tokens.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    hybrid_pool_kernel(HybridParams p, Side<T, A> student, Side<T, A> teacher, int64_t k0, bool backward,
                       typename Rank<A>::Key* __restrict__ keys_s, typename Rank<A>::Key* __restrict__ keys_t,
                       A* __restrict__ h) {
  __shared__ A scratch[64];
  const int64_t g = blockIdx.x, k = k0 + g;
  const Chunk c = p.chunks[k];
  if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped; see l1_kernel
    // Defined keys all the same, so that the sorts of the wave stay well-formed.
    const auto zero = [](int64_t) { return A(0); };
    write_rank_keys<A>(keys_s + g * p.n_s, p.uncommon_s, p.n_s, p.V_s, g, zero);
    write_rank_keys<A>(keys_t + g * p.n_t, p.uncommon_t, p.n_t, p.V_t, g, zero);
    return;
  }
  const LogPrefixes<A> log_c = chunk_log_prefixes(student, teacher, c, /*lse=*/!backward, scratch);
  const A c_s = dexp(log_c.student), c_t = dexp(log_c.teacher);
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

  write_rank_keys<A>(keys_s + g * p.n_s, p.uncommon_s, p.n_s, p.V_s, g, [&](int64_t v) { return c_s * ps.prob(v); });
  write_rank_keys<A>(keys_t + g * p.n_t, p.uncommon_t, p.n_t, p.V_t, g, [&](int64_t v) { return c_t * pt.prob(v); });
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

// Kernel 4. Forward: term_u -> losses[2k + 1]. Backward: h[g][id of rank r] = G_u sign(a_r - b_r). Chunk g's
// ranked keys start at g * stride.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    l1_kernel(HybridParams p, int64_t k0, bool backward, const typename Rank<A>::Key* __restrict__ sorted_s,
              int64_t na, int64_t stride_s, const typename Rank<A>::Key* __restrict__ sorted_t, int64_t nb,
              int64_t stride_t, A* __restrict__ h) {
  using R = Rank<A>;
  __shared__ A scratch[64];
  const int64_t g = blockIdx.x, k = k0 + g;
  A* losses = static_cast<A*>(p.losses);
  if (!chunk_ok(p.chunks[k], p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
    if (!backward && threadIdx.x == 0) losses[2 * k] = losses[2 * k + 1] = nan_value<A>();
    return;
  }
  const typename R::Key* a = sorted_s + g * stride_s;
  const typename R::Key* b = sorted_t + g * stride_t;
  if (backward) {
    const A G_u = static_cast<const A*>(p.grad_losses)[2 * k + 1];
    A* hg = h + g * p.V_s;
    for (int64_t r = threadIdx.x; r < na; r += blockDim.x) {
      const int32_t id = R::id(a[r]);
      const A vb = r < nb ? R::value(b[r]) : A(0);
      if (static_cast<uint64_t>(id) < static_cast<uint64_t>(p.V_s)) {
        hg[id] = G_u * sign_of_difference(R::value(a[r]), vb);
      }
    }
    return;
  }
  A acc = 0;
  const int64_t ranks = na > nb ? na : nb;
  for (int64_t r = threadIdx.x; r < ranks; r += blockDim.x) {
    const A va = r < na ? R::value(a[r]) : A(0), vb = r < nb ? R::value(b[r]) : A(0);
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
  zero_rows_around_chunk<T>(p, k);
  if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
    nan_rows_of_chunk<T>(p, c);
    return;
  }
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
  const uint64_t* keys_in = Workspace<float>::u64(in);
  uint64_t* keys_out = Workspace<float>::u64(out);
  const int* begin = offsets.data_ptr<int>();
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, bytes, keys_in, keys_out, items, segments, begin,
                                                         begin + 1, 0, 64, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(bytes)}, in.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(temp.data_ptr(), bytes, keys_in, keys_out, items, segments,
                                                         begin, begin + 1, 0, 64, stream));
}

// Kernel 3 for float64: the first `items` keys of a wave (chunk by chunk) sorted in place into rank order.
void sort_exact_keys(const at::Tensor& keys, int64_t items, cudaStream_t stream) {
  if (items == 0) return;
  ExactKey* k = Workspace<double>::keys(keys);
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceMergeSort::SortKeys(nullptr, bytes, k, items, ExactKeyLess(), stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(bytes)}, keys.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceMergeSort::SortKeys(temp.data_ptr(), bytes, k, items, ExactKeyLess(), stream));
}

// Kernels 1-4 for the wave of chunks [k0, k0 + chunks).
template <typename T, typename A>
void rank_wave(const HybridParams& p, Workspace<A>& ws, int64_t k0, int64_t chunks, bool backward,
               cudaStream_t stream) {
  using W = Workspace<A>;
  const auto student = Side<T, A>::student(p), teacher = Side<T, A>::teacher(p);
  A* h = backward ? ws.h.template data_ptr<A>() : nullptr;
  hybrid_pool_kernel<T, A><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      p, student, teacher, k0, backward, W::keys(ws.keys_s), W::keys(ws.keys_t), h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (W::kExact) {
    sort_exact_keys(ws.keys_s, chunks * p.n_s, stream);
    sort_exact_keys(ws.keys_t, chunks * p.n_t, stream);
  } else {
    if (ws.top_s < p.n_s || ws.top_t < p.n_t) {
      select_kernel<<<dim3(static_cast<unsigned>(chunks), 2), kThreads, 0, stream>>>(
          W::u64(ws.keys_s), W::u64(ws.selected_s), p.n_s, ws.top_s, W::u64(ws.keys_t), W::u64(ws.selected_t),
          p.n_t, ws.top_t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sort_segments(ws.selected_s, ws.sorted_s, chunks, ws.top_s, stream);
    sort_segments(ws.selected_t, ws.sorted_t, chunks, ws.top_t, stream);
  }
  l1_kernel<A><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      p, k0, backward, W::keys(ws.sorted_s), ws.top_s, ws.stride_s, W::keys(ws.sorted_t), ws.top_t, ws.stride_t, h);
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
  return run_forward(in, p, {p.K, 2}, "hybrid_loss_fwd_cuda", [&](auto scalar) {
    using T = decltype(scalar);
    using A = at::opmath_type<T>;
    const auto stream = at::cuda::getCurrentCUDAStream();
    Workspace<A> ws(p, in.student_logits, /*backward=*/false);
    for (int64_t k0 = 0; k0 < p.K; k0 += ws.G) {
      rank_wave<T, A>(p, ws, k0, std::min(ws.G, p.K - k0), /*backward=*/false, stream);
    }
  });
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
  const auto launch = [&](auto scalar) {
    using T = decltype(scalar);
    using A = at::opmath_type<T>;
    const auto stream = at::cuda::getCurrentCUDAStream();
    Workspace<A> ws(p, in.student_logits, /*backward=*/true);
    for (int64_t k0 = 0; k0 < p.K; k0 += ws.G) {
      const int64_t chunks_in_wave = std::min(ws.G, p.K - k0);
      rank_wave<T, A>(p, ws, k0, chunks_in_wave, /*backward=*/true, stream);
      hybrid_bwd_kernel<T, A><<<static_cast<unsigned>(chunks_in_wave), kThreads, 0, stream>>>(
          p, Side<T, A>::student(p), k0, ws.h.template data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  return run_backward(grad_losses, student_lse, teacher_lse, in, p, {p.K, 2}, "hybrid_loss_fwd",
                      "hybrid_loss_bwd_cuda", launch);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) {
  m.impl("hybrid_loss_fwd", &cuda::hybrid_loss_fwd_cuda);
  m.impl("hybrid_loss_bwd", &cuda::hybrid_loss_bwd_cuda);
}

}  // namespace xtoken
