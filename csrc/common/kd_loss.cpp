// Host-side preparation of the KD ops, shared by the CPU and CUDA implementations.
#include "xtoken/kd_loss.h"

namespace xtoken {

LossInputs prepare_kd(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                      double temperature, c10::string_view student_merge, c10::string_view teacher_merge,
                      const c10::optional<at::Tensor>& student_targets,
                      const c10::optional<at::Tensor>& teacher_targets) {
  ContentChecks checks(student_logits.device());
  LossInputs in = prepare_loss(student_logits, teacher_logits, chunks, temperature, student_merge, teacher_merge,
                               student_targets, teacher_targets, checks);
  TORCH_CHECK(student_logits.size(1) == teacher_logits.size(1),
              "kd: the student and teacher logits must share one vocabulary, got widths ", student_logits.size(1),
              " and ", teacher_logits.size(1), " (for different tokenizers use pkl_loss or gold_loss)");
  checks.raise_if_failed();
  return in;
}

}  // namespace xtoken
