// The KL math of same-vocabulary KD (SPEC.md §4), shared by the CPU and CUDA kernels, written so that it keeps
// float32 precision when the two pooled vectors are close (a large temperature, or a student near its teacher).
//
// sum_v p_t (log p_t - log p_s) adds terms of both signs of the size of the log-ratio u that cancel to a KL of
// size u^2: in float32 the KL was lost (KD at tau = 1e4 gave 17.05 against 0.709), then multiplied by tau^2.
// For two vectors that sum to 1, with u = log p_t - log p_s,
//   KL = sum_v p_s phi(u),   phi(u) = u e^u - e^u + 1 >= 0,
// a sum of non-negative terms: an error e in u costs e p_t u per token, and a constant error (the rows'
// log-sums) e times the KL, relative to it. For one row per side (first, bayes), u = x - D is taken from the
// logits' difference x and the exact difference D of the rows' log-sums (logit_difference, lse_difference), so it
// is exact relative to u however close the rows are; the gradient's q_s - q_t is then -q_s expm1(u).
#pragma once

#include "xtoken/common.h"

namespace xtoken {

// Below this |u| the series forms are used.
constexpr double kKlSeriesBound = 0.5;

// e^u - 1 for |u| < kKlSeriesBound, by its Taylor series (relative error below 1e-9 there).
template <typename A>
XT_HD A expm1_series(A u) {
  return u * (A(1) + u * (A(1) / 2 + u * (A(1) / 6 + u * (A(1) / 24 + u * (A(1) / 120 + u * (A(1) / 720 +
         u * (A(1) / 5040 + u * (A(1) / 40320 + u * (A(1) / 362880 + u / A(3628800))))))))));
}

// phi(u) = u e^u - e^u + 1 = sum_{k >= 2} (k - 1) u^k / k! for |u| < kKlSeriesBound.
template <typename A>
XT_HD A phi_series(A u) {
  return u * u * (A(1) / 2 + u * (A(1) / 3 + u * (A(1) / 8 + u * (A(1) / 30 + u * (A(1) / 144 + u * (A(1) / 840 +
         u * (A(1) / 5760 + u * (A(1) / 45360 + u * (A(1) / 403200 + u / A(3991680))))))))));
}

template <typename A>
XT_HD bool near_zero(A u) {
  return u < A(kKlSeriesBound) && u > -A(kKlSeriesBound);
}

template <typename A>
XT_HD A abs_of(A x) {
  return x < A(0) ? -x : x;
}

// x = (zt - mt - zs + ms) / tau for the token's logits zt, zs under the maxima mt, ms of their rows (one row per
// side), so that u = log q_t - log q_s = x - D with D = lt.log_sum - ls.log_sum. It is evaluated as
// ((zt - zs) - (mt - ms)) / tau when those differences are the smaller ones (rows close to each other: the
// subtractions are then exact, and so is x relative to x), else as written (rows far apart, e.g. maxima 1e7
// apart: (zt - zs) - (mt - ms) would cancel two huge numbers).
template <typename A>
XT_HD A logit_difference(A zt, A zs, A mt, A ms, A inv_tau) {
  const A dz = zt - zs, dm = mt - ms;
  return abs_of(dz) + abs_of(dm) < abs_of(zt - mt) + abs_of(zs - ms) ? (dz - dm) * inv_tau
                                                                      : scaled_shift(zt, mt, inv_tau) - scaled_shift(zs, ms, inv_tau);
}

// One term q_s (e^x - 1) of S = e^D - 1 = sum_v q_s (e^x - 1) (both rows sum to 1): by the series near x = 0,
// else from cross = q_s e^x = exp((zt - mt) / tau - ls.log_sum), which stays right where q_s underflows to 0 (and
// gives 0 - 0 for a logit masked to -inf on both sides).
template <typename A>
XT_HD A lse_difference_term(A qs, A cross, A x) {
  return near_zero(x) ? qs * expm1_series(x) : cross - qs;
}

// D = lt.log_sum - ls.log_sum, from S when the rows are close (|D| below log 2: then log1p(S) is exact relative
// to D, which the difference of the two rounded log-sums is not), else from the rows' log-sums (the rows are
// far apart and u has no cancellation to lose).
template <typename A>
XT_HD A lse_difference(A S, RowLse<A> lt, RowLse<A> ls) {
  return S > A(-0.5) && S < A(1) ? static_cast<A>(::log1p(static_cast<double>(S))) : lt.log_sum - ls.log_sum;
}

// The term p_s phi(u) of L, p_t = p_s e^u: p_s where p_t = 0 (phi(-inf) = 1), the series near u = 0, and
// p_t (u - 1) + p_s elsewhere.
template <typename A>
XT_HD A kl_term(A pt, A ps, A u) {
  const A term = near_zero(u) ? ps * phi_series(u) : pt * (u - A(1)) + ps;
  return pt == A(0) ? ps : term;
}

// Whether a merge's pooled vector sums to 1 (first, mean), so that KL = sum_v p_s phi(u).
XT_HD bool sums_to_one(Merge m) { return m == Merge::First || m == Merge::Mean; }

// p_s - p_t, as -p_s expm1(u) near u = 0 (where the plain difference cancels).
template <typename A>
XT_HD A prob_difference(A ps, A pt, A u) {
  return near_zero(u) ? -ps * expm1_series(u) : ps - pt;
}

}  // namespace xtoken
