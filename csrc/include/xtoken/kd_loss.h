// Same-vocabulary KD (SPEC.md §4): host-side preparation shared by the CPU and CUDA kernels. The kernels
// take plain LossParams.
#pragma once

#include <ATen/ATen.h>

#include "xtoken/loss.h"

namespace xtoken {

LossInputs prepare_kd(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                      double temperature, c10::string_view student_merge, c10::string_view teacher_merge,
                      const c10::optional<at::Tensor>& student_targets,
                      const c10::optional<at::Tensor>& teacher_targets);

}  // namespace xtoken
