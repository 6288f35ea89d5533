// Host-side preparation of the hybrid-loss ops, shared by the CPU and CUDA implementations.
#include "xtoken/hybrid_loss.h"

#include <cmath>

namespace xtoken {
namespace {

Matched parse_matched(c10::string_view matched) {
  if (matched == "kl") return Matched::Kl;
  if (matched == "jsd") return Matched::Jsd;
  TORCH_CHECK(false, "matched: expected 'kl' or 'jsd', got '", std::string(matched), "'");
}

// The ids of [0, V) that `used` (valid, distinct ids) leaves out, ascending. No device sync: the count is
// known. Ids are clamped so that unchecked input (CUDA graph capture) cannot index out of bounds.
at::Tensor complement(const at::Tensor& used, int64_t V) {
  at::Tensor keep = at::ones({V}, used.options().dtype(at::kBool));
  keep.index_fill_(0, used.to(at::kLong).clamp(0, V - 1), false);
  return at::nonzero_static(keep, V - used.size(0), -1).reshape({-1}).to(at::kInt);
}

}  // namespace

HybridInputs prepare_hybrid(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                            const at::Tensor& chunks, const at::Tensor& pairs, double temperature,
                            c10::string_view student_merge, c10::string_view teacher_merge,
                            c10::string_view matched, double beta,
                            c10::optional<int64_t> uld_topk, const c10::optional<at::Tensor>& student_targets,
                            const c10::optional<at::Tensor>& teacher_targets) {
  ContentChecks checks(student_logits.device());
  HybridInputs in;
  static_cast<LossInputs&>(in) = prepare_loss(student_logits, teacher_logits, chunks, temperature, student_merge,
                                               teacher_merge, student_targets, teacher_targets, checks);
  TORCH_CHECK(pairs.scalar_type() == at::kInt && pairs.dim() == 2 && pairs.size(1) == 2,
              "pairs: expected an int32 [C, 2] table of (student id, teacher id), got ", pairs.scalar_type(), " ",
              pairs.sizes());
  check_same_device(student_logits, "student_logits", pairs, "pairs");
  in.matched = parse_matched(matched);
  TORCH_CHECK(std::isfinite(beta) && beta >= 0.0 && beta <= 1.0, "beta: expected a value in [0, 1], got ", beta);
  TORCH_CHECK(!uld_topk.has_value() || *uld_topk >= 1, "uld_topk: expected None or a count >= 1, got ",
              uld_topk.value_or(0));
  const int64_t V_s = student_logits.size(1), V_t = teacher_logits.size(1), C = pairs.size(0);
  TORCH_CHECK(C <= std::min(V_s, V_t), "pairs: ", C, " pairs but the vocabularies have ", V_s, " and ", V_t,
              " tokens (each id may appear at most once)");
  in.pair_s = pairs.select(1, 0).contiguous();
  in.pair_t = pairs.select(1, 1).contiguous();
  checks.index_range(in.pair_s, 0, V_s, "pairs[:, 0] (student ids)");
  checks.index_range(in.pair_t, 0, V_t, "pairs[:, 1] (teacher ids)");
  checks.distinct(in.pair_s, "pairs[:, 0] (student ids)");
  checks.distinct(in.pair_t, "pairs[:, 1] (teacher ids)");
  checks.raise_if_failed();
  in.uncommon_s = complement(in.pair_s, V_s);
  in.uncommon_t = complement(in.pair_t, V_t);
  const int64_t n = std::max(V_s, V_t) - C;
  in.R = uld_topk.has_value() ? std::min(*uld_topk, n) : n;
  in.beta = beta;
  return in;
}

HybridParams HybridInputs::params() const {
  HybridParams p{};
  static_cast<LossParams&>(p) = LossInputs::params();
  p.pair_s = pair_s.data_ptr<int32_t>();
  p.pair_t = pair_t.data_ptr<int32_t>();
  p.C = pair_s.size(0);
  p.uncommon_s = uncommon_s.data_ptr<int32_t>();
  p.uncommon_t = uncommon_t.data_ptr<int32_t>();
  p.n_s = uncommon_s.size(0);
  p.n_t = uncommon_t.size(0);
  p.R = R;
  p.matched = matched;
  p.beta = beta;
  return p;
}

}  // namespace xtoken
