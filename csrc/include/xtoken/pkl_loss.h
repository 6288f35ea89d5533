// P-KL (SPEC.md §4): the parameters the CPU and CUDA kernels share, and the host-side preparation.
#pragma once

#include <ATen/ATen.h>

#include "xtoken/loss.h"
#include "xtoken/projection.h"

namespace xtoken {

struct PklParams : LossParams {
  ProjectionView W;
  // Backward, when asked: dLoss/dW on W's support, [V_s, P] in the accumulation type, zeroed by the host;
  // grad_val[s, j] = sum_k p_hat_s^k[s] g^k[idx[s, j]] (0 at empty slots), summed over the chunks in an order
  // that depends on K only (deterministic).
  void* grad_val;
};

struct PklInputs : LossInputs {
  ProjectionTensors W;

  PklParams params() const;
};

PklInputs prepare_pkl(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                      const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
                      const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
                      c10::string_view student_merge, c10::string_view teacher_merge,
                      const c10::optional<at::Tensor>& student_targets,
                      const c10::optional<at::Tensor>& teacher_targets);

// The gradient of the losses in W's values: a zeroed [V_s, P] accumulator bound to p.grad_val when asked
// (an undefined tensor and a null pointer otherwise), and its conversion to the dtype of proj_val (an empty
// tensor when not asked).
at::Tensor bind_grad_val(bool proj_val_grad, const PklInputs& in, PklParams& p);
at::Tensor finish_grad_val(const at::Tensor& grad_val, const at::Tensor& proj_val);

}  // namespace xtoken
