// Chain KL on the GPU (SPEC.md §4). The formulas are those of csrc/cpu/chain_loss.cpp: per level, with the
// conditioned side's sorted rows [lo, hi) in runs by their next piece c (S_c = sum exp(a_v - max), S = sum_c S_c)
// and the plain row b (logsumexp L),
//   L_level = sum_c T(c) (log T(c) - log(M(c) + eps)),  cond(c) = S_c / S,  plain(c) = exp(b_c - L),
//   plain(end) = the plain mass outside the runs' pieces;  (T, M) = (plain, cond) on a teacher-side level, else
//   (cond, plain);  backward dL/da_v = pi(v) (R - r(bucket(v))),  r = T / (M + eps),  R = sum_c M(c) r(c).
// Work split: a grid of B blocks (B bounded by a workspace budget); block b takes chunks b, b + B, ... and runs a
// chunk's levels in order (chain_loss.h). Per level: the range by binary search (every thread, the same result);
// the range's max (block reduction); each run is summed sequentially by the thread that owns its first row, which
// keeps the sum (later r(c)) in the block's workspace at that row and flags the run's piece; the total, the plain
// row's logsumexp and its "ends here" mass (block reductions); the terms per run. Backward: the run owners add
// dL/da of their rows into the block's float row g (teacher side: the student row s0, written out after the
// chunk's last level) or every thread writes its share of the student row (student side). Fixed row ownership
// and fixed reduction trees: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "xtoken/chain_loss.h"
#include "xtoken/cuda_pooling.cuh"

namespace xtoken {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kWorkspaceBytes = int64_t(512) << 20;  // budget of the blocks' workspaces together

// Per block: run sums / r per sorted row (max(V_s, V_t)), piece flags (max(V_s, V_t)), r per student piece and
// the gradient row g (V_s each).
template <typename A>
struct ChainWorkspace {
  A* run;
  uint8_t* flags;
  A* r_of;
  A* g;
  int64_t vmax;
};

// max that propagates NaN (fmax drops it).
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (b > a || b != b) ? b : a;
}

// Max over the block (NaN propagates); every thread gets the result. Synchronizes like block_sum.
template <typename A>
__device__ A block_max(A v, A* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : A(-INFINITY);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The KL term of one bucket and its r = T / (M + eps); adds M r to R.
template <typename A>
__device__ __forceinline__ A bucket_term(bool target_is_plain, A log_cond, A log_plain, A& r_out, A& R) {
  const A log_t = target_is_plain ? log_plain : log_cond;
  const A log_m = target_is_plain ? log_cond : log_plain;
  const A t = dexp(log_t), model = dexp(log_m);
  r_out = t != A(0) ? t / (model + A(kPklEps)) : A(0);  // a NaN t propagates
  R += model * r_out;
  return t != A(0) ? t * (log_t - dlog(model + A(kPklEps))) : A(0);
}

template <typename T, typename A, bool kBackward>
__global__ void __launch_bounds__(kThreads) chain_kernel(ChainParams p, ChainWorkspace<A> ws) {
  __shared__ A scratch[64];
  __shared__ A shared_r_end;
  const T* zs = static_cast<const T*>(p.student_logits);
  const T* zt = static_cast<const T*>(p.teacher_logits);
  RowLse<A>* lse_s = static_cast<RowLse<A>*>(p.student_lse);
  RowLse<A>* lse_t = static_cast<RowLse<A>*>(p.teacher_lse);
  T* dz = static_cast<T*>(p.grad_student);
  const A inv_tau = static_cast<A>(p.inv_tau);
  A* run = ws.run + blockIdx.x * ws.vmax;
  uint8_t* flags = ws.flags + blockIdx.x * ws.vmax;
  A* r_of = ws.r_of + blockIdx.x * p.V_s;
  A* g = ws.g + blockIdx.x * p.V_s;
  const int64_t tid = threadIdx.x, step = blockDim.x;

  for (int64_t k = blockIdx.x; k < p.K; k += gridDim.x) {
    const Chunk c = p.chunks[k];
    if (kBackward) zero_rows_around_chunk<T>(p, k);
    if (!chunk_ok(c, p.N_s, p.N_t)) {  // only reachable when the host checks were skipped
      if (kBackward) {
        nan_rows_of_chunk<T>(p, c);
      } else if (tid == 0) {
        static_cast<A*>(p.losses)[k] = nan_value<A>();
      }
      __syncthreads();
      continue;
    }
    const A scale = kBackward ? static_cast<const A*>(p.grad_losses)[k] * inv_tau : A(0);
    A loss = 0;
    int64_t next_row = c.s0;  // the first student row of the chunk not yet written (backward)
    bool teacher_side_chunk = true;
    for_each_chain_level(p, c, [&](const ChainLevel& lv) {
      const PieceTableView& tab = lv.teacher_side ? p.student_pieces : p.teacher_pieces;
      const T* zc = lv.teacher_side ? zs + lv.cond_row * p.V_s : zt + lv.cond_row * p.V_t;
      const T* zp = lv.teacher_side ? zt + lv.plain_row * p.V_t : zs + lv.plain_row * p.V_s;
      const int64_t V_p = lv.teacher_side ? p.V_t : p.V_s;
      RowLse<A>* lse_p = lv.teacher_side ? lse_t + lv.plain_row : lse_s + lv.plain_row;
      const int64_t V_c = lv.teacher_side ? p.V_s : p.V_t;
      const int64_t L = tab.L, d = lv.depth;
      // Pieces and order entries are range-checked on the host, except under CUDA-graph capture: out-of-range
      // ones then read as NaN instead of out of bounds.
      const auto piece_at = [&](int64_t r) {
        const int32_t piece = tab.pieces[r * L + d];
        return piece < V_p ? piece : int32_t(-2);
      };
      const auto cond_logit = [&](int64_t r) {
        const int32_t v = tab.order[r];
        return v >= 0 && v < V_c ? static_cast<A>(zc[v]) : nan_value<A>();
      };
      const auto run_start = [&](int64_t r) { return r == lv.lo || piece_at(r - 1) != piece_at(r); };

      A mx = -INFINITY;
      for (int64_t r = lv.lo + tid; r < lv.hi; r += step) mx = nan_max(mx, cond_logit(r));
      mx = block_max(mx, scratch);
      if (mx == A(-INFINITY)) mx = 0;  // every token of the range impossible

      A local = 0;
      for (int64_t r = lv.lo + tid; r < lv.hi; r += step) {
        if (!run_start(r)) continue;
        const int32_t piece = piece_at(r);
        A s = 0;
        for (int64_t e = r; e < lv.hi && piece_at(e) == piece; ++e) s += dexp(scaled_shift(cond_logit(e), mx, inv_tau));
        run[r] = piece == -2 ? nan_value<A>() : s;
        local += run[r];
        if (piece >= 0) flags[piece] = 1;
      }
      const A total = block_sum(local, scratch);  // also publishes run[] and flags[]
      const A log_total = total > A(0) ? dlog(total) : A(0);

      RowLse<A> L_p;
      if (kBackward) {
        L_p = *lse_p;
      } else {
        L_p = row_lse(zp, V_p, inv_tau, scratch);
        if (tid == 0) *lse_p = L_p;
      }
      local = 0;
      for (int64_t u = tid; u < V_p; u += step) {
        if (!flags[u]) local += dexp(L_p.log_prob(static_cast<A>(zp[u]), inv_tau));
      }
      const A end_mass = block_sum(local, scratch);
      const A log_plain_end = end_mass > A(0) ? dlog(end_mass) : A(-INFINITY);

      A loss_local = 0, R_local = 0;
      for (int64_t r = lv.lo + tid; r < lv.hi; r += step) {
        if (!run_start(r)) continue;
        const int32_t piece = piece_at(r);
        const A log_cond = dlog(run[r]) - log_total;
        const A log_plain = piece >= 0 ? L_p.log_prob(static_cast<A>(zp[piece]), inv_tau)
                                        : (piece == -1 ? log_plain_end : nan_value<A>());
        A rc;
        loss_local += bucket_term(lv.teacher_side, log_cond, log_plain, rc, R_local);
        run[r] = rc;
        if (piece >= 0 && !lv.teacher_side) r_of[piece] = rc;
        if (piece == -1) shared_r_end = rc;
      }
      if (tid == 0 && piece_at(lv.lo) != -1) {  // no token ends here: the "ends here" bucket has cond = 0
        A rc;
        loss_local += bucket_term(lv.teacher_side, A(-INFINITY), log_plain_end, rc, R_local);
        shared_r_end = rc;
      }
      loss += block_sum(loss_local, scratch);
      const A R = block_sum(R_local, scratch);  // also publishes run[], r_of[] and shared_r_end

      if (kBackward) {
        if (lv.teacher_side) {
          for (int64_t r = lv.lo + tid; r < lv.hi; r += step) {
            if (!run_start(r)) continue;
            const int32_t piece = piece_at(r);
            const A h = R - run[r];
            for (int64_t e = r; e < lv.hi && piece_at(e) == piece; ++e) {
              const int32_t v = tab.order[e];
              if (v < 0 || v >= V_c) continue;
              const A gv = scale * dexp(scaled_shift(cond_logit(e), mx, inv_tau) - log_total) * h;
              g[v] = d == 0 ? gv : g[v] + gv;
            }
          }
        } else {
          teacher_side_chunk = false;
          const A r_end = shared_r_end;
          T* out = dz + lv.plain_row * p.V_s;
          for (int64_t u = tid; u < p.V_s; u += step) {
            const A pu = dexp(L_p.log_prob(static_cast<A>(zp[u]), inv_tau));
            out[u] = static_cast<T>(scale * pu * (R - (flags[u] ? r_of[u] : r_end)));
          }
          next_row = lv.plain_row + 1;
        }
      }
      __syncthreads();  // every read of flags[] and g[] of this level is done
      for (int64_t r = lv.lo + tid; r < lv.hi; r += step) {
        if (run_start(r) && piece_at(r) >= 0) flags[piece_at(r)] = 0;
      }
      __syncthreads();
    });
    if (!kBackward) {
      if (tid == 0) static_cast<A*>(p.losses)[k] = loss;
      continue;
    }
    if (teacher_side_chunk) {
      T* out = dz + int64_t(c.s0) * p.V_s;
      for (int64_t v = tid; v < p.V_s; v += step) out[v] = static_cast<T>(g[v]);
      next_row = c.s0 + 1;
    }
    zero_rows(dz, p.V_s, next_row, c.s1);
    __syncthreads();  // g is reused by the block's next chunk
  }
}

template <typename T>
void launch(ChainParams& p, bool backward) {
  using A = at::opmath_type<T>;
  const int64_t vmax = std::max(p.V_s, p.V_t);
  const int64_t per_block = vmax * int64_t(sizeof(A) + 1) + 2 * p.V_s * int64_t(sizeof(A));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>({p.K, int64_t(2) * sms, kWorkspaceBytes / per_block}));
  const auto options = at::TensorOptions().device(at::kCUDA, c10::cuda::current_device());
  at::Tensor run = at::empty({blocks * vmax}, options.dtype(c10::CppTypeToScalarType<A>::value));
  at::Tensor flags = at::zeros({blocks * vmax}, options.dtype(at::kByte));
  at::Tensor rows = at::empty({2 * blocks * p.V_s}, options.dtype(c10::CppTypeToScalarType<A>::value));
  ChainWorkspace<A> ws{run.data_ptr<A>(), flags.data_ptr<uint8_t>(), rows.data_ptr<A>(),
                       rows.data_ptr<A>() + blocks * p.V_s, vmax};
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (backward) {
    chain_kernel<T, A, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, ws);
  } else {
    chain_kernel<T, A, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, ws);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_loss_fwd_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& student_pieces, const at::Tensor& student_order, const c10::optional<at::Tensor>& teacher_pieces,
    const c10::optional<at::Tensor>& teacher_order, double temperature, const at::Tensor& student_targets,
    const at::Tensor& teacher_targets) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const ChainInputs in = prepare_chain(student_logits, teacher_logits, chunks, student_pieces, student_order,
                                       teacher_pieces, teacher_order, temperature, student_targets, teacher_targets);
  ChainParams p = in.params();
  return run_forward(in, p, {p.K}, "chain_loss_fwd_cuda",
                     [&](auto scalar) { launch<decltype(scalar)>(p, /*backward=*/false); });
}

at::Tensor chain_loss_bwd_cuda(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                               const at::Tensor& teacher_logits, const at::Tensor& chunks,
                               const at::Tensor& student_pieces, const at::Tensor& student_order,
                               const c10::optional<at::Tensor>& teacher_pieces,
                               const c10::optional<at::Tensor>& teacher_order, double temperature,
                               const at::Tensor& student_targets, const at::Tensor& teacher_targets,
                               const at::Tensor& student_lse, const at::Tensor& teacher_lse) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const ChainInputs in = prepare_chain(student_logits, teacher_logits, chunks, student_pieces, student_order,
                                       teacher_pieces, teacher_order, temperature, student_targets, teacher_targets);
  ChainParams p = in.params();
  return run_backward(grad_losses, student_lse, teacher_lse, in, p, {p.K}, "chain_loss_fwd", "chain_loss_bwd_cuda",
                      [&](auto scalar) { launch<decltype(scalar)>(p, /*backward=*/true); });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xtoken, CUDA, m) {
  m.impl("chain_loss_fwd", &cuda::chain_loss_fwd_cuda);
  m.impl("chain_loss_bwd", &cuda::chain_loss_bwd_cuda);
}

}  // namespace xtoken
