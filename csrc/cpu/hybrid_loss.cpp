// The hybrid loss on the CPU (SPEC.md §4): GOLD and H-KL, and ULD when there are no pairs.
//
// Forward, per chunk, with p_s = pool(student rows) and p_t = pool(teacher rows) (cpu_pooling.h; each side
// has its own merge):
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

// Rank keys order the uncommon tokens of one side for the sorted-L1 term: value descending, then token id
// ascending. Values are probabilities (>= +0), whose bit patterns order like the values, so complemented bits
// sort descending. Two kinds, so that only the student side of the backward carries ids:
//   ValueKey: the value alone (the loss needs only the sorted values; so does the teacher side of the backward)
//   TokenKey: the value and the token id (the backward sends each student rank's sign to its token)
// float keys are integers, sorted by radix passes over the value bits (kShift: where the three 11-bit digits
// of radix_select and the large sort start, least significant first); double keys (the float64 path, for
// gradcheck) are compared.
template <typename A>
struct ValueKey;
template <typename A>
struct TokenKey;

template <>
struct ValueKey<float> {
  static constexpr bool kRadix = true;
  static constexpr int kShift[3] = {0, 11, 22};
  uint32_t bits;
  ValueKey() = default;
  ValueKey(float value, int32_t) : bits(~static_cast<uint32_t>(cpu_math::float_to_bits(value))) {}
  uint64_t integer() const { return bits; }
  float value() const { return cpu_math::bits_to_float(static_cast<int32_t>(~bits)); }
  bool operator<(const ValueKey& o) const { return bits < o.bits; }
};

template <>
struct TokenKey<float> {
  static constexpr bool kRadix = true;
  static constexpr int kShift[3] = {32, 43, 54};
  uint64_t bits;  // ~bits(value) << 32 | id
  TokenKey() = default;
  TokenKey(float value, int32_t id)
      : bits((static_cast<uint64_t>(~static_cast<uint32_t>(cpu_math::float_to_bits(value))) << 32) |
             static_cast<uint32_t>(id)) {}
  uint64_t integer() const { return bits; }
  float value() const { return cpu_math::bits_to_float(static_cast<int32_t>(~static_cast<uint32_t>(bits >> 32))); }
  int32_t id() const { return static_cast<int32_t>(static_cast<uint32_t>(bits)); }
  bool operator<(const TokenKey& o) const { return bits < o.bits; }
};

template <>
struct ValueKey<double> {
  static constexpr bool kRadix = false;
  uint64_t order;  // ~bits(value)
  ValueKey() = default;
  ValueKey(double value, int32_t) : order(~__builtin_bit_cast(uint64_t, value)) {}
  double value() const { return __builtin_bit_cast(double, ~order); }
  bool operator<(const ValueKey& o) const { return order < o.order; }
};

template <>
struct TokenKey<double> {
  static constexpr bool kRadix = false;
  uint64_t order;  // ~bits(value)
  int32_t token;
  TokenKey() = default;
  TokenKey(double value, int32_t id) : order(~__builtin_bit_cast(uint64_t, value)), token(id) {}
  double value() const { return __builtin_bit_cast(double, ~order); }
  int32_t id() const { return token; }
  bool operator<(const TokenKey& o) const { return order != o.order ? order < o.order : token < o.token; }
};

// Digits of 11, 11 and 10 bits (the most significant one last).
template <typename Key>
int64_t digit(const Key& key, int pass) {
  return static_cast<int64_t>((key.integer() >> Key::kShift[pass]) & (pass == 2 ? 1023 : 2047));
}

// Stable LSD radix sort of keys[0, n) by their 32 value bits, in kPasses digits of kBits bits (the value's
// lowest bit at Key::kShift[0]), ping-ponging with tmp, with kPasses << kBits counts; returns where the
// result is. Stability keeps the input order of equal values: ascending ids.
template <int kBits, int kPasses, typename Count, typename Key>
Key* radix_sort_digits(Key* keys, Key* tmp, int64_t n, Count* count) {
  constexpr int64_t kRadix = int64_t(1) << kBits;
  const auto digit_of = [](const Key& key, int pass) {
    return static_cast<int64_t>((key.integer() >> (Key::kShift[0] + pass * kBits)) & (kRadix - 1));
  };
  std::fill(count, count + kPasses * kRadix, Count(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int pass = 0; pass < kPasses; ++pass) ++count[pass * kRadix + digit_of(keys[i], pass)];
  }
  for (int pass = 0; pass < kPasses; ++pass) {
    Count* offset = count + pass * kRadix;
    if (n == 0 || offset[digit_of(keys[0], pass)] == n) continue;  // one digit value: nothing to move
    Count sum = 0;
    for (int64_t d = 0; d < kRadix; ++d) {
      const Count c = offset[d];
      offset[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) tmp[offset[digit_of(keys[i], pass)]++] = keys[i];
    std::swap(keys, tmp);
  }
  return keys;
}

// Up to kSmallSort keys (a chunk's uncommon tokens in a small vocabulary) sort in four passes of 8-bit digits
// whose counts fit on the stack; more in three passes of 11 bits (fewer passes over many keys). Both are the
// same stable sort, so the result does not depend on which runs.
constexpr int64_t kSmallSort = 4096;

template <typename Key>
Key* radix_sort(Key* keys, Key* tmp, int64_t n) {
  if (n <= kSmallSort) {
    int32_t count[4 * 256];
    return radix_sort_digits<8, 4>(keys, tmp, n, count);
  }
  std::vector<int64_t> count(3 * 2048);
  return radix_sort_digits<11, 3>(keys, tmp, n, count.data());
}

// Radix selection of the first `top` keys in rank order: by the most significant digit, the keys whose digit
// is below that of rank `top` are in, those at its digit are candidates, the rest are out. Copies the in and
// candidate keys to `out`, in their input order (ids still ascending), and returns their count.
template <typename Key>
int64_t radix_select(const Key* keys, Key* out, int64_t n, int64_t top) {
  std::vector<int64_t> count(1024, 0);
  for (int64_t i = 0; i < n; ++i) ++count[digit(keys[i], 2)];
  int64_t last = 0;  // the digit of rank `top` (top < n, so it exists)
  int64_t seen = 0;
  while (seen + count[last] < top) seen += count[last++];
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[m] = keys[i];
    m += digit(keys[i], 2) <= last;
  }
  return m;
}

// The first top = min(R, n) uncommon tokens of one side in rank order, from candidate i = token ids[i] with
// probability probs[ids[i]] (ids ascending). Selection, then a sort of the selected only. `keys` and `tmp`
// hold n keys; returns where the ranked keys are.
template <typename Key, typename A>
const Key* rank_side(Key* keys, Key* tmp, const A* probs, const int32_t* ids, int64_t n, int64_t top) {
  for (int64_t i = 0; i < n; ++i) keys[i] = Key(probs[ids[i]], ids[i]);
  if constexpr (Key::kRadix) {
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
template <typename A, typename KeyA, typename KeyB>
A sorted_l1(const KeyA* a, int64_t na, const KeyB* b, int64_t nb) {
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

  // Thread-private buffers: pooled student probs, scratch, h; pooled teacher probs, scratch; rank keys (value
  // keys for both sides in the forward, token keys for the student side in the backward).
  struct Work {
    std::vector<A> ps, pr, h, pt, tt;
    std::vector<ValueKey<A>> vs, vs_tmp, vt, vt_tmp;
    std::vector<TokenKey<A>> ts, ts_tmp;
    Work(const HybridParams& p, bool backward)
        : ps(p.V_s), pr(p.V_s), h(backward ? p.V_s : 0), pt(p.V_t), tt(p.V_t), vs(backward ? 0 : p.n_s),
          vs_tmp(backward ? 0 : p.n_s), vt(p.n_t), vt_tmp(p.n_t), ts(backward ? p.n_s : 0),
          ts_tmp(backward ? p.n_s : 0) {}
  };

  int64_t top_s() const { return std::min(p.R, p.n_s); }
  int64_t top_t() const { return std::min(p.R, p.n_t); }

  const ValueKey<A>* rank_teacher(Work& w) const {
    return rank_side(w.vt.data(), w.vt_tmp.data(), w.pt.data(), p.uncommon_t, p.n_t, top_t());
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
    const ValueKey<A>* a = rank_side(w.vs.data(), w.vs_tmp.data(), w.ps.data(), p.uncommon_s, p.n_s, top_s());
    losses[1] = sorted_l1<A>(a, top_s(), rank_teacher(w), top_t());
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
      const TokenKey<A>* a = rank_side(w.ts.data(), w.ts_tmp.data(), w.ps.data(), p.uncommon_s, p.n_s, top_s());
      const ValueKey<A>* b = rank_teacher(w);
      const int64_t na = top_s(), nb = top_t();
      for (int64_t r = 0; r < na; ++r) h[a[r].id()] = G_u * sign_of_difference(a[r].value(), r < nb ? b[r].value() : A(0));
    }
    student.pool_backward(static_cast<T*>(p.grad_student), h, w.ps.data(), w.pr.data(), c.s0, c.s1, log_c_s);
  }

  void forward() const {
    parallel_chunks(p.K, [&] { return Work(p, false); }, [&](int64_t k, Work& w) { forward_chunk(k, w); });
  }

  void backward() const {
    parallel_chunks(p.K, [&] { return Work(p, true); }, [&](int64_t k, Work& w) { backward_chunk(k, w); });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> hybrid_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& pairs, double temperature, c10::string_view student_merge, c10::string_view teacher_merge,
    c10::string_view matched, double beta, c10::optional<int64_t> uld_topk,
    const c10::optional<at::Tensor>& student_targets, const c10::optional<at::Tensor>& teacher_targets) {
  const HybridInputs in = prepare_hybrid(student_logits, teacher_logits, chunks, pairs, temperature, student_merge,
                                         teacher_merge, matched, beta, uld_topk, student_targets, teacher_targets);
  HybridParams p = in.params();
  return run_forward(in, p, {p.K, 2}, "hybrid_loss_fwd_cpu",
                     [&](auto scalar) { HybridCpu<decltype(scalar)>(p).forward(); });
}

at::Tensor hybrid_loss_bwd_cpu(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                               const at::Tensor& teacher_logits, const at::Tensor& chunks, const at::Tensor& pairs,
                               double temperature, c10::string_view student_merge, c10::string_view teacher_merge,
                               c10::string_view matched, double beta, c10::optional<int64_t> uld_topk,
                               const c10::optional<at::Tensor>& student_targets,
                               const c10::optional<at::Tensor>& teacher_targets, const at::Tensor& student_lse,
                               const at::Tensor& teacher_lse) {
  const HybridInputs in = prepare_hybrid(student_logits, teacher_logits, chunks, pairs, temperature, student_merge,
                                         teacher_merge, matched, beta, uld_topk, student_targets, teacher_targets);
  HybridParams p = in.params();
  return run_backward(grad_losses, student_lse, teacher_lse, in, p, {p.K, 2}, "hybrid_loss_fwd",
                      "hybrid_loss_bwd_cpu", [&](auto scalar) { HybridCpu<decltype(scalar)>(p).backward(); });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) {
  m.impl("hybrid_loss_fwd", &cpu::hybrid_loss_fwd_cpu);
  m.impl("hybrid_loss_bwd", &cpu::hybrid_loss_bwd_cpu);
}

}  // namespace xtoken
