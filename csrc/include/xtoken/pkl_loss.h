// P-KL (SPEC.md §4): the parameters the CPU and CUDA kernels share, and the host-side preparation.
#pragma once

#include <ATen/ATen.h>

#include "xtoken/common.h"
#include "xtoken/projection.h"

namespace xtoken {

struct PklParams {
  const void* student_logits;  // [N_s, V_s], contiguous
  const void* teacher_logits;  // [N_t, V_t], contiguous
  int64_t N_s, V_s, N_t, V_t;
  const Chunk* chunks;
  int64_t K;
  ProjectionView W;
  double inv_tau;
  Merge merge;
  const int64_t* student_targets;  // merge == Bayes only
  const int64_t* teacher_targets;
  // Forward outputs; the accumulation type (float, or double for float64 logits).
  void* losses;       // [K]
  void* student_lse;  // [N_s], rows no pooling reads stay 0
  void* teacher_lse;  // [N_t]
  // Backward.
  const void* grad_losses;  // [K]
  void* grad_student;       // [N_s, V_s], the student logits' dtype
};

struct PklInputs {
  at::Tensor student_logits, teacher_logits, chunks, student_targets, teacher_targets;
  ProjectionTensors W;
  double inv_tau;
  Merge merge;

  PklParams params() const;
};

PklInputs prepare_pkl(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                      const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
                      const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
                      c10::string_view merge, const c10::optional<at::Tensor>& student_targets,
                      const c10::optional<at::Tensor>& teacher_targets);

// Shapes of the backward-only arguments (the gradient of the losses and the saved LSEs).
void check_pkl_bwd_args(const at::Tensor& grad_losses, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
                        const PklInputs& in);

// The dtype the kernels accumulate in (and of the losses and saved LSEs).
at::ScalarType accumulate_type(at::ScalarType logits_dtype);

}  // namespace xtoken
