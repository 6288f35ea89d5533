// The hybrid loss on the CPU (SPEC.md §4): GOLD and H-KL, and ULD when there are no pairs.
//
// Forward, per chunk, with p_s = pool(student rows) and p_t = pool(teacher rows) (cpu_pooling.h):
//   term_c = sum_n D(p_t[t_n], p_s[s_n])                  over the common pairs (hybrid_math.h)
//   term_u = sum_{r < R} |a_r - b_r|                       a, b = the uncommon probabilities of each side in
//                                                          rank order (value descending, then id ascending),
//                                                          zero past the end of the shorter side
// Ranking: each side's top min(R, n) are selected (radix select on the top bits of the probabilities) and
// only those are sorted (stable radix passes), on keys that order (value, id) as one integer, so ties go to
// the lower token id and the order is total.
// Backward, with (G_c, G_u) = dLoss/d(term_c, term_u):
//   h[s_n] = G_c dD/dp_s(pair n);  h[id of rank r] = G_u sign(a_r - b_r) (r < min(R, n_s));  h = 0 elsewhere
//   dz = the backward of the pooling applied to h (cpu_pooling.h)
// The backward recomputes the pooled vectors (from the saved logsumexps) and the ranking rather than saving
// them, so memory is O(threads x (V + R)), never O(N x V) beyond the gradient itself.
// Work split: one chunk at a time per OpenMP thread with thread-private buffers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "xtoken/cpu_pooling.h"
#include "xtoken/hybrid_loss.h"
#include "xtoken/hybrid_math.h"

namespace xtoken {
namespace cpu {
namespace {

struct CpuLog {
  template <typename A>
  __attribute__((always_inline)) A operator()(A x) const {
    return cpu_math::log(x);
  }
};

// The rank order of the sorted-L1 term: value descending, then token id ascending. Values are probabilities
// (>= +0), whose bit patterns order like the values, so complemented bits sort descending.
//   float:  one uint64, ~bits(value) << 32 | id, ordered as an integer; sorted by radix passes.
//   double: (~bits(value), id) pairs, compared (the float64 path only serves gradcheck).
template <typename A>
struct RankKey;

template <>
struct RankKey<float> {
  uint64_t bits;
  RankKey() = default;
  RankKey(float value, int32_t id)
      : bits((static_cast<uint64_t>(~static_cast<uint32_t>(cpu_math::float_to_bits(value))) << 32) |
             static_cast<uint32_t>(id)) {}
  float value() const { return cpu_math::bits_to_float(static_cast<int32_t>(~static_cast<uint32_t>(bits >> 32))); }
  int32_t id() const { return static_cast<int32_t>(static_cast<uint32_t>(bits)); }
  bool operator<(const RankKey& o) const { return bits < o.bits; }
};

template <>
struct RankKey<double> {
  uint64_t order;  // ~bits(value)
  int32_t token;
  RankKey() = default;
  RankKey(double value, int32_t id) : order(~__builtin_bit_cast(uint64_t, value)), token(id) {}
  double value() const { return __builtin_bit_cast(double, ~order); }
  int32_t id() const { return token; }
  bool operator<(const RankKey& o) const { return order != o.order ? order < o.order : token < o.token; }
};

// Radix passes over the upper 32 bits of float rank keys (the lower 32, the ids, break ties by their input
// order, which the stable passes keep): digits of 11, 11 and 10 bits, least significant first.
constexpr int kDigitShift[3] = {32, 43, 54};
constexpr uint64_t kDigitMask[3] = {2047, 2047, 1023};

inline int64_t digit(const RankKey<float>& key, int pass) {
  return static_cast<int64_t>((key.bits >> kDigitShift[pass]) & kDigitMask[pass]);
}

// Stable LSD radix sort of keys[0, n) whose ids ascend, ping-ponging with tmp; returns where the result is.
inline RankKey<float>* radix_sort(RankKey<float>* keys, RankKey<float>* tmp, int64_t n) {
  std::vector<int64_t> count(3 * 2048, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int pass = 0; pass < 3; ++pass) ++count[pass * 2048 + digit(keys[i], pass)];
  }
  for (int pass = 0; pass < 3; ++pass) {
    int64_t* offset = count.data() + pass * 2048;
    if (n == 0 || offset[digit(keys[0], pass)] == n) continue;  // one digit value: nothing to move
    int64_t sum = 0;
    for (int64_t d = 0; d < 2048; ++d) {
      const int64_t c = offset[d];
      offset[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) tmp[offset[digit(keys[i], pass)]++] = keys[i];
    std::swap(keys, tmp);
  }
  return keys;
}

// Radix selection of the first `top` keys in rank order: by the most significant 11 bits, the keys whose
// digit is below that of rank `top` are in, those at its digit are candidates, the rest are out. Copies the
// in and candidate keys to `out`, in their input order (ids still ascending), and returns their count.
inline int64_t radix_select(const RankKey<float>* keys, RankKey<float>* out, int64_t n, int64_t top) {
  constexpr int kShift = 53;
  std::vector<int64_t> count(2048, 0);
  for (int64_t i = 0; i < n; ++i) ++count[keys[i].bits >> kShift];
  uint64_t last = 0;  // the digit of rank `top` (top < n, so it exists)
  int64_t seen = 0;
  while (seen + count[last] < top) seen += count[last++];
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[m] = keys[i];
    m += (keys[i].bits >> kShift) <= last;
  }
  return m;
}

// The first top = min(R, n) uncommon tokens of one side in rank order, from candidate i = token ids[i] with
// probability probs[ids[i]] (ids ascending). Selection, then a sort of the selected only. `keys` and `tmp`
// hold n keys; returns where the ranked keys are.
template <typename A>
const RankKey<A>* rank_side(RankKey<A>* keys, RankKey<A>* tmp, const A* probs, const int32_t* ids, int64_t n,
                            int64_t top) {
  for (int64_t i = 0; i < n; ++i) keys[i] = RankKey<A>(probs[ids[i]], ids[i]);
  if constexpr (std::is_same_v<A, float>) {
    if (top == n) return radix_sort(keys, tmp, n);
    const int64_t m = radix_select(keys, tmp, n, top);
    return radix_sort(tmp, keys, m);
  } else {
    (void)tmp;
    if (top < n) std::nth_element(keys, keys + top, keys + n);
    std::sort(keys, keys + top);
    return keys;
  }
}

// sum_r |a_r - b_r| with a = a_keys[0, na), b = b_keys[0, nb), zero past their ends (na, nb <= R, so the
// ranks past both ends add nothing).
template <typename A>
A sorted_l1(const RankKey<A>* a, int64_t na, const RankKey<A>* b, int64_t nb) {
  const int64_t both = std::min(na, nb);
  const A paired = blocked_sum<A>(both, [&](int64_t r) { return std::abs(a[r].value() - b[r].value()); });
  const A tail_a = blocked_sum<A>(na - both, [&](int64_t r) { return std::abs(a[both + r].value()); });
  const A tail_b = blocked_sum<A>(nb - both, [&](int64_t r) { return std::abs(b[both + r].value()); });
  return paired + tail_a + tail_b;
}

template <typename T>
struct HybridCpu {
  using A = acc_t<T>;
  const HybridParams& p;
  Side<T> student, teacher;
  A beta;
  MatchedForm form;

  explicit HybridCpu(const HybridParams& params)
      : p(params),
        student(Side<T>::student(p)),
        teacher(Side<T>::teacher(p)),
        beta(A(p.beta)),
        form(matched_form(p.matched, p.beta)) {}

  // Thread-private buffers: pooled student probs, scratch, h; pooled teacher probs, scratch; rank keys.
  struct Work {
    std::vector<A> ps, pr, h, pt, tt;
    std::vector<RankKey<A>> ks, ks_tmp, kt, kt_tmp;
    explicit Work(const HybridParams& p)
        : ps(p.V_s), pr(p.V_s), h(p.V_s), pt(p.V_t), tt(p.V_t), ks(p.n_s), ks_tmp(p.n_s), kt(p.n_t), kt_tmp(p.n_t) {}
  };

  struct Ranked {
    const RankKey<A>* a;  // student, na keys
    const RankKey<A>* b;  // teacher, nb keys
    int64_t na, nb;
  };

  Ranked rank(Work& w) const {
    const int64_t na = std::min(p.R, p.n_s), nb = std::min(p.R, p.n_t);
    return {rank_side(w.ks.data(), w.ks_tmp.data(), w.ps.data(), p.uncommon_s, p.n_s, na),
            rank_side(w.kt.data(), w.kt_tmp.data(), w.pt.data(), p.uncommon_t, p.n_t, nb), na, nb};
  }

  A matched_sum(const A* ps, const A* pt) const {
    const int32_t *s = p.pair_s, *t = p.pair_t;
    return with_matched_form(form, [&](auto f) {
      return blocked_sum<A>(p.C, [&](int64_t n) { return matched_term<decltype(f)::value>(pt[t[n]], ps[s[n]], beta, CpuLog()); });
    });
  }

  // h[s_n] = G_c dD/dp_s of every pair; `tmp` holds C values (computed in a vectorizable pass, then scattered).
  void matched_grads(A* h, A* tmp, const A* ps, const A* pt, A G_c) const {
    const int32_t *s = p.pair_s, *t = p.pair_t;
    with_matched_form(form, [&](auto f) {
#pragma omp simd
      for (int64_t n = 0; n < p.C; ++n) tmp[n] = G_c * matched_grad<decltype(f)::value>(pt[t[n]], ps[s[n]], beta, CpuLog());
      return 0;
    });
    for (int64_t n = 0; n < p.C; ++n) h[s[n]] = tmp[n];
  }

  void forward_chunk(int64_t k, Work& w) const {
    const Chunk c = p.chunks[k];
    A* losses = static_cast<A*>(p.losses) + 2 * k;
    student.pool_softmax(w.ps.data(), w.pr.data(), c.s0, c.s1);
    // Teacher rows may be shared by chunks; every writer of a teacher lse stores the same value.
    teacher.pool_softmax(w.pt.data(), w.tt.data(), c.t0, c.t1);
    losses[0] = matched_sum(w.ps.data(), w.pt.data());
    const Ranked r = rank(w);
    losses[1] = sorted_l1(r.a, r.na, r.b, r.nb);
  }

  void backward_chunk(int64_t k, Work& w) const {
    const Chunk c = p.chunks[k];
    const A* grad = static_cast<const A*>(p.grad_losses) + 2 * k;
    const A G_c = grad[0], G_u = grad[1];
    zero_rows_around_chunk<T>(p, k);
    const A log_c_s = student.log_prefix(c.s0, c.s1);
    student.pool_probs(w.ps.data(), c.s0, c.s1, log_c_s);
    teacher.pool_probs(w.pt.data(), c.t0, c.t1, teacher.log_prefix(c.t0, c.t1));
    A* h = w.h.data();
    std::fill(w.h.begin(), w.h.end(), A(0));
    matched_grads(h, w.pr.data(), w.ps.data(), w.pt.data(), G_c);  // pr: scratch until the pooling backward
    if (G_u != A(0)) {
      const Ranked r = rank(w);
      for (int64_t i = 0; i < r.na; ++i) {
        h[r.a[i].id()] = G_u * sign_of_difference(r.a[i].value(), i < r.nb ? r.b[i].value() : A(0));
      }
    }
    student.pool_backward(static_cast<T*>(p.grad_student), h, w.ps.data(), w.pr.data(), c.s0, c.s1, log_c_s);
  }

  void forward() const {
    parallel_chunks(p.K, [&] { return Work(p); }, [&](int64_t k, Work& w) { forward_chunk(k, w); });
  }

  void backward() const {
    parallel_chunks(p.K, [&] { return Work(p); }, [&](int64_t k, Work& w) { backward_chunk(k, w); });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> hybrid_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& pairs, double temperature, c10::string_view merge, c10::string_view matched, double beta,
    c10::optional<int64_t> uld_topk, const c10::optional<at::Tensor>& student_targets,
    const c10::optional<at::Tensor>& teacher_targets) {
  const HybridInputs in = prepare_hybrid(student_logits, teacher_logits, chunks, pairs, temperature, merge, matched,
                                         beta, uld_topk, student_targets, teacher_targets);
  HybridParams p = in.params();
  const ForwardOutputs out = allocate_forward(in, {p.K, 2}, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "hybrid_loss_fwd_cpu",
                                  [&] { HybridCpu<scalar_t>(p).forward(); });
  return {out.losses, out.student_lse, out.teacher_lse};
}

at::Tensor hybrid_loss_bwd_cpu(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                               const at::Tensor& teacher_logits, const at::Tensor& chunks, const at::Tensor& pairs,
                               double temperature, c10::string_view merge, c10::string_view matched, double beta,
                               c10::optional<int64_t> uld_topk, const c10::optional<at::Tensor>& student_targets,
                               const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse,
                               const at::Tensor& teacher_lse) {
  const HybridInputs in = prepare_hybrid(student_logits, teacher_logits, chunks, pairs, temperature, merge, matched,
                                         beta, uld_topk, student_targets, teacher_targets);
  HybridParams p = in.params();
  const BackwardTensors t =
      bind_backward(grad_losses, student_lse, teacher_lse, {p.K, 2}, in, "hybrid_loss_fwd", p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.student_logits.scalar_type(), "hybrid_loss_bwd_cpu",
                                  [&] { HybridCpu<scalar_t>(p).backward(); });
  return t.grad_student;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) {
  m.impl("hybrid_loss_fwd", &cpu::hybrid_loss_fwd_cpu);
  m.impl("hybrid_loss_bwd", &cpu::hybrid_loss_bwd_cpu);
}

}  // namespace xtoken
