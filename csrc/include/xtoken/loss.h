// What every chunked loss (P-KL, hybrid, KD) shares: the logits, the chunk table, the pooling of
// SPEC.md §3 and the saved logsumexps, as kernel parameters and as checked host tensors. Each loss
// extends LossParams / LossInputs with its own operands.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "xtoken/checks.h"
#include "xtoken/common.h"

namespace xtoken {

struct LossParams {
  const void* student_logits;  // [N_s, V_s], contiguous
  const void* teacher_logits;  // [N_t, V_t], contiguous
  int64_t N_s, V_s, N_t, V_t;
  const Chunk* chunks;
  int64_t K;
  double inv_tau;
  Merge student_merge, teacher_merge;
  const int64_t* student_targets;  // student_merge == Bayes only
  const int64_t* teacher_targets;  // teacher_merge == Bayes only
  // Forward outputs, in the accumulation type (float, or double for float64 logits).
  void* losses;
  void* student_lse;  // [N_s] RowLse (common.h; an [N_s, 2] tensor), rows no pooling reads stay 0
  void* teacher_lse;  // [N_t] RowLse
  // Backward.
  const void* grad_losses;  // shaped like the losses
  void* grad_student;       // [N_s, V_s], the student logits' dtype
};

struct LossInputs {
  at::Tensor student_logits, teacher_logits, chunks, student_targets, teacher_targets;  // contiguous
  double inv_tau;
  Merge student_merge, teacher_merge;

  // The pointers and sizes of the inputs; outputs stay null.
  LossParams params() const;
};

// Checks the arguments every loss shares and returns them contiguous. The content checks (chunk
// ranges, bayes targets) are queued on `checks`; the caller runs them. Each side has its own merge.
LossInputs prepare_loss(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                        double temperature, c10::string_view student_merge, c10::string_view teacher_merge,
                        const c10::optional<at::Tensor>& student_targets,
                        const c10::optional<at::Tensor>& teacher_targets, ContentChecks& checks);

// The dtype the kernels accumulate in (and of the losses and saved LSEs).
at::ScalarType accumulate_type(at::ScalarType logits_dtype);

// Forward outputs: the losses (shaped `loss_shape`) and zeroed LSEs, in the accumulation dtype, bound to `p`.
struct ForwardOutputs {
  at::Tensor losses, student_lse, teacher_lse;
};
ForwardOutputs allocate_forward(const LossInputs& in, at::IntArrayRef loss_shape, LossParams& p);

// Backward: checks the gradient of the losses and the LSEs saved by the forward (`op` names the forward op
// in messages), converts them to the accumulation dtype, allocates the student gradient (zeros when there are
// no chunks; otherwise the kernels write every row), binds all to `p`.
struct BackwardTensors {
  at::Tensor grad_losses, student_lse, teacher_lse, grad_student;
};
BackwardTensors bind_backward(const at::Tensor& grad_losses, const at::Tensor& student_lse,
                              const at::Tensor& teacher_lse, at::IntArrayRef loss_shape, const LossInputs& in,
                              const char* op, LossParams& p);

// The scaffolding of every loss op on every device. `launch(T())` runs the kernels for the logits' dtype T
// (a generic lambda reads the type off its argument; prepare_loss has checked it is one of these four).
template <typename Launch>
void dispatch_logits(const LossInputs& in, const char* name, Launch&& launch) {
  switch (in.student_logits.scalar_type()) {
    case at::kFloat: return launch(float());
    case at::kDouble: return launch(double());
    case at::kHalf: return launch(at::Half());
    case at::kBFloat16: return launch(at::BFloat16());
    default: TORCH_CHECK(false, name, ": logits of dtype ", in.student_logits.scalar_type(), " are not supported");
  }
}

// A forward op: its outputs bound to `p` (losses shaped `loss_shape`), then the kernels if there are chunks.
// Returns (losses, student_lse, teacher_lse).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(const LossInputs& in, LossParams& p,
                                                           at::IntArrayRef loss_shape, const char* name,
                                                           Launch&& launch) {
  const ForwardOutputs out = allocate_forward(in, loss_shape, p);
  if (p.K > 0) dispatch_logits(in, name, launch);
  return {out.losses, out.student_lse, out.teacher_lse};
}

// A backward op: the gradient of the losses and the saved LSEs bound to `p` (bind_backward; `op` names the
// forward op), then the kernels if there are chunks. Returns the student gradient.
template <typename Launch>
at::Tensor run_backward(const at::Tensor& grad_losses, const at::Tensor& student_lse, const at::Tensor& teacher_lse,
                        const LossInputs& in, LossParams& p, at::IntArrayRef loss_shape, const char* op,
                        const char* name, Launch&& launch) {
  const BackwardTensors t = bind_backward(grad_losses, student_lse, teacher_lse, loss_shape, in, op, p);
  if (p.K > 0) dispatch_logits(in, name, launch);
  return t.grad_student;
}

}  // namespace xtoken
