// Host-side preparation of the P-KL ops, shared by the CPU and CUDA implementations.
#include "xtoken/pkl_loss.h"

namespace xtoken {

PklInputs prepare_pkl(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                      const at::Tensor& proj_idx, const at::Tensor& proj_val, const at::Tensor& proj_col_ptr,
                      const at::Tensor& proj_col_src, const at::Tensor& proj_col_val, double temperature,
                      c10::string_view student_merge, c10::string_view teacher_merge,
                      const c10::optional<at::Tensor>& student_targets,
                      const c10::optional<at::Tensor>& teacher_targets) {
  ContentChecks checks(student_logits.device());
  PklInputs in;
  static_cast<LossInputs&>(in) = prepare_loss(student_logits, teacher_logits, chunks, temperature, student_merge,
                                               teacher_merge, student_targets, teacher_targets, checks);
  in.W = prepare_projection(proj_idx, proj_val, proj_col_ptr, proj_col_src, proj_col_val, student_logits.size(1),
                            teacher_logits.size(1), student_logits, accumulate_type(student_logits.scalar_type()),
                            checks);
  checks.raise_if_failed();
  return in;
}

PklParams PklInputs::params() const {
  PklParams p{};
  static_cast<LossParams&>(p) = LossInputs::params();
  p.W = W.view();
  p.grad_val = nullptr;
  return p;
}

at::Tensor bind_grad_val(bool proj_val_grad, const PklInputs& in, PklParams& p) {
  if (!proj_val_grad) return at::Tensor();
  at::Tensor grad_val = at::zeros_like(in.W.val);
  p.grad_val = grad_val.data_ptr();
  return grad_val;
}

at::Tensor finish_grad_val(const at::Tensor& grad_val, const at::Tensor& proj_val) {
  if (!grad_val.defined()) return at::empty({0}, proj_val.options());
  return grad_val.to(proj_val.scalar_type());
}

}  // namespace xtoken
