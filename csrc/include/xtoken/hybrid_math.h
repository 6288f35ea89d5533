// The per-pair and per-rank math of the hybrid loss (SPEC.md §4), shared by the CPU and CUDA kernels.
// `log` is the backend's log (cpu_math::log, or dlog on the GPU), passed in so that both vectorize.
#pragma once

#include <type_traits>

#include "xtoken/common.h"
#include "xtoken/hybrid_loss.h"

namespace xtoken {

template <typename A>
XT_HD A clamp_below(A x, A floor) {
  return x < floor ? floor : x;  // NaN stays NaN
}

// The four forms of the matched term D(p_t, p_s) (SPEC.md §4), each branch-free so that loops over the
// pairs vectorize; the kernels pick one per call (matched_form).
//   Kl:        p_t (log max(p_t, eps) - log max(p_s, eps)), 0 where p_t = 0
//   and on p~ = max(p, 1e-8), TRL's generalized JSD:
//   ForwardKl: beta = 0: p~_t (log p~_t - log p~_s)
//   ReverseKl: beta = 1: p~_s (log p~_s - log p~_t)
//   Mixture:   m = (1 - beta) p~_s + beta p~_t: beta p~_t (log p~_t - log m) + (1 - beta) p~_s (log p~_s - log m)
enum class MatchedForm : int32_t { Kl, ForwardKl, ReverseKl, Mixture };

XT_HD MatchedForm matched_form(Matched matched, double beta) {
  if (matched == Matched::Kl) return MatchedForm::Kl;
  return beta == 0.0 ? MatchedForm::ForwardKl : (beta == 1.0 ? MatchedForm::ReverseKl : MatchedForm::Mixture);
}

// D of one pair.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <MatchedForm F, typename A, typename Log>
XT_HD A matched_term(A pt, A ps, A beta, const Log& log) {
  if constexpr (F == MatchedForm::Kl) {
    const A eps = A(kPklEps);
    const A safe_t = pt == A(0) ? A(1) : pt;
    return pt == A(0) ? A(0) : pt * (log(clamp_below(safe_t, eps)) - log(clamp_below(ps, eps)));
  } else {
    const A t = clamp_below(pt, A(kJsdClamp)), s = clamp_below(ps, A(kJsdClamp));
    if constexpr (F == MatchedForm::ForwardKl) return t * (log(t) - log(s));
    if constexpr (F == MatchedForm::ReverseKl) return s * (log(s) - log(t));
    if constexpr (F == MatchedForm::Mixture) {
      const A lm = log((A(1) - beta) * s + beta * t);
      return beta * t * (log(t) - lm) + (A(1) - beta) * s * (log(s) - lm);
    }
  }
}

// dD/dp_s of one pair. A clamped p_s passes no gradient (as torch's clamp_min).
//   Kl: -p_t / p_s;  ForwardKl: -p~_t / p~_s;  ReverseKl: log p~_s - log p~_t + 1;  Mixture: (1 - beta)(log p~_s - log m)
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <MatchedForm F, typename A, typename Log>
XT_HD A matched_grad(A pt, A ps, A beta, const Log& log) {
  if constexpr (F == MatchedForm::Kl) {
    return pt == A(0) || ps < A(kPklEps) ? A(0) : -pt / ps;
  } else {
    const A t = clamp_below(pt, A(kJsdClamp));
    const bool clamped = ps < A(kJsdClamp);
    const A s = clamped ? A(1) : ps;
    A g;
    if constexpr (F == MatchedForm::ForwardKl) g = -t / s;
    if constexpr (F == MatchedForm::ReverseKl) g = log(s) - log(t) + A(1);
    if constexpr (F == MatchedForm::Mixture) g = (A(1) - beta) * (log(s) - log((A(1) - beta) * s + beta * t));
    return clamped ? A(0) : g;
  }
}

// Calls fn(std::integral_constant<MatchedForm, F>()) for the form in use: one instantiation per form.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Fn>
XT_HD auto with_matched_form(MatchedForm form, const Fn& fn) {
  switch (form) {
    case MatchedForm::Kl:
      return fn(std::integral_constant<MatchedForm, MatchedForm::Kl>());
    case MatchedForm::ForwardKl:
      return fn(std::integral_constant<MatchedForm, MatchedForm::ForwardKl>());
    case MatchedForm::ReverseKl:
      return fn(std::integral_constant<MatchedForm, MatchedForm::ReverseKl>());
    default:
      return fn(std::integral_constant<MatchedForm, MatchedForm::Mixture>());
  }
}

// sign(a - b): the sorted-L1 term's gradient at one rank.
template <typename A>
XT_HD A sign_of_difference(A a, A b) {
  return a > b ? A(1) : (a < b ? A(-1) : A(0));
}

}  // namespace xtoken
