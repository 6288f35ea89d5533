// The hybrid loss (GOLD, H-KL; ULD with no pairs; SPEC.md §4): the parameters the CPU and CUDA kernels
// share, and the host-side preparation.
#pragma once

#include <ATen/ATen.h>

#include "xtoken/loss.h"

namespace xtoken {

// The matched term D of the common pairs.
enum class Matched : int32_t { Kl = 0, Jsd = 1 };

// SPEC.md §4: the logs of the matched term are clamped at eps (kl) or at this floor (jsd, as TRL).
constexpr double kJsdClamp = 1e-8;

struct HybridParams : LossParams {
  const int32_t* pair_s;  // [C] student ids of the common pairs
  const int32_t* pair_t;  // [C] their teacher ids
  int64_t C;
  const int32_t* uncommon_s;  // [n_s] the student ids outside the pairs, ascending
  const int32_t* uncommon_t;  // [n_t]
  int64_t n_s, n_t;
  int64_t R;  // ranks of the sorted-L1 term: min(uld_topk, max(n_s, n_t))
  Matched matched;
  double beta;
};

struct HybridInputs : LossInputs {
  at::Tensor pair_s, pair_t, uncommon_s, uncommon_t;  // int32, contiguous
  int64_t R;
  Matched matched;
  double beta;

  HybridParams params() const;
};

// The losses are [K, 2]: column 0 the matched term, column 1 the sorted-L1 term (unweighted, no tau^2).
HybridInputs prepare_hybrid(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                            const at::Tensor& chunks, const at::Tensor& pairs, double temperature,
                            c10::string_view student_merge, c10::string_view teacher_merge,
                            c10::string_view matched, double beta,
                            c10::optional<int64_t> uld_topk, const c10::optional<at::Tensor>& student_targets,
                            const c10::optional<at::Tensor>& teacher_targets);

}  // namespace xtoken
