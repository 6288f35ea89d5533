// Host-side preparation shared by every chunked loss (see include/xtoken/loss.h).
#include "xtoken/loss.h"

namespace xtoken {

at::ScalarType accumulate_type(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

LossInputs prepare_loss(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                        double temperature, c10::string_view student_merge, c10::string_view teacher_merge,
                        const c10::optional<at::Tensor>& student_targets,
                        const c10::optional<at::Tensor>& teacher_targets, ContentChecks& checks) {
  check_logits(student_logits, "student_logits");
  check_logits(teacher_logits, "teacher_logits");
  check_same_device(student_logits, "student_logits", teacher_logits, "teacher_logits");
  TORCH_CHECK(teacher_logits.scalar_type() == student_logits.scalar_type(), "teacher_logits: expected the dtype of ",
              "student_logits (", student_logits.scalar_type(), "), got ", teacher_logits.scalar_type());
  check_chunk_table(chunks);
  check_same_device(student_logits, "student_logits", chunks, "chunks");
  check_temperature(temperature);
  const Merge m_s = parse_merge(student_merge, "student_merge");
  const Merge m_t = parse_merge(teacher_merge, "teacher_merge");
  const int64_t N_s = student_logits.size(0), V_s = student_logits.size(1);
  const int64_t N_t = teacher_logits.size(0), V_t = teacher_logits.size(1);
  TORCH_CHECK(N_s < (int64_t(1) << 31) && N_t < (int64_t(1) << 31), "logits: more than 2^31 - 1 rows");
  check_targets(student_targets, "student_targets", N_s, m_s);
  check_targets(teacher_targets, "teacher_targets", N_t, m_t);

  LossInputs in;
  in.student_logits = student_logits.contiguous();
  in.teacher_logits = teacher_logits.contiguous();
  in.chunks = chunks.contiguous();
  checks.chunks(in.chunks, N_s, N_t, /*student_rows_disjoint=*/true);
  if (m_s == Merge::Bayes) {
    check_same_device(student_logits, "student_logits", *student_targets, "student_targets");
    in.student_targets = student_targets->contiguous();
    checks.bayes_targets(in.chunks, 0, in.student_targets, V_s, "student_targets");
  }
  if (m_t == Merge::Bayes) {
    check_same_device(student_logits, "student_logits", *teacher_targets, "teacher_targets");
    in.teacher_targets = teacher_targets->contiguous();
    checks.bayes_targets(in.chunks, 1, in.teacher_targets, V_t, "teacher_targets");
  }
  in.inv_tau = 1.0 / temperature;
  in.student_merge = m_s;
  in.teacher_merge = m_t;
  return in;
}

LossParams LossInputs::params() const {
  LossParams p{};
  p.student_logits = student_logits.data_ptr();
  p.teacher_logits = teacher_logits.data_ptr();
  p.N_s = student_logits.size(0);
  p.V_s = student_logits.size(1);
  p.N_t = teacher_logits.size(0);
  p.V_t = teacher_logits.size(1);
  p.chunks = reinterpret_cast<const Chunk*>(chunks.data_ptr<int32_t>());
  p.K = chunks.size(0);
  p.inv_tau = inv_tau;
  p.student_merge = student_merge;
  p.teacher_merge = teacher_merge;
  p.student_targets = student_targets.defined() ? student_targets.data_ptr<int64_t>() : nullptr;
  p.teacher_targets = teacher_targets.defined() ? teacher_targets.data_ptr<int64_t>() : nullptr;
  return p;
}

ForwardOutputs allocate_forward(const LossInputs& in, at::IntArrayRef loss_shape, LossParams& p) {
  const auto acc = in.student_logits.options().dtype(accumulate_type(in.student_logits.scalar_type()));
  ForwardOutputs out{at::empty(loss_shape, acc), at::zeros({in.student_logits.size(0), 2}, acc),
                     at::zeros({in.teacher_logits.size(0), 2}, acc)};
  p.losses = out.losses.data_ptr();
  p.student_lse = out.student_lse.data_ptr();
  p.teacher_lse = out.teacher_lse.data_ptr();
  return out;
}

BackwardTensors bind_backward(const at::Tensor& grad_losses, const at::Tensor& student_lse,
                              const at::Tensor& teacher_lse, at::IntArrayRef loss_shape, const LossInputs& in,
                              const char* op, LossParams& p) {
  TORCH_CHECK(grad_losses.sizes() == loss_shape, "grad_losses: expected shape ", loss_shape, ", got ",
              grad_losses.sizes());
  TORCH_CHECK(student_lse.sizes() == at::IntArrayRef({in.student_logits.size(0), 2}) &&
                  teacher_lse.sizes() == at::IntArrayRef({in.teacher_logits.size(0), 2}),
              "student_lse/teacher_lse: expected the [N_s, 2] and [N_t, 2] tensors saved by ", op, ", got ",
              student_lse.sizes(), " and ", teacher_lse.sizes());
  check_same_device(in.student_logits, "student_logits", grad_losses, "grad_losses");
  check_same_device(in.student_logits, "student_logits", student_lse, "student_lse");
  check_same_device(in.student_logits, "student_logits", teacher_lse, "teacher_lse");
  const auto acc = accumulate_type(in.student_logits.scalar_type());
  BackwardTensors t{grad_losses.to(acc).contiguous(), student_lse.to(acc).contiguous(),
                    teacher_lse.to(acc).contiguous(),
                    in.chunks.size(0) == 0 ? at::zeros_like(in.student_logits) : at::empty_like(in.student_logits)};
  p.grad_losses = t.grad_losses.data_ptr();
  p.student_lse = t.student_lse.data_ptr();
  p.teacher_lse = t.teacher_lse.data_ptr();
  p.grad_student = t.grad_student.data_ptr();
  return t;
}

}  // namespace xtoken
