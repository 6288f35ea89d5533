// P-KL (SPEC.md §4): the parameters the CPU and CUDA kernels share, and the host-side preparation.
#pragma once

#include <ATen/ATen.h>

#include "xtoken/loss.h"
#include "xtoken/projection.h"

namespace xtoken {

struct PklParams : LossParams {
  ProjectionView W;
};

struct PklInputs : LossInputs {
  ProjectionTensors W;

  PklParams params() const;
};

PklInputs prepare_pkl(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                      const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
                      const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
                      c10::string_view merge, const c10::optional<at::Tensor>& student_targets,
                      const c10::optional<at::Tensor>& teacher_targets);

}  // namespace xtoken
