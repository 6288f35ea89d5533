// Host-side preparation of the chain KL ops, shared by the CPU and CUDA implementations.
#include "xtoken/chain_loss.h"

namespace xtoken {

namespace {

void check_piece_table(const at::Tensor& pieces, const at::Tensor& order, const char* name, int64_t V,
                       int64_t V_other, const at::Tensor& device_of, ContentChecks& checks) {
  TORCH_CHECK(pieces.scalar_type() == at::kInt && pieces.dim() == 2 && pieces.size(1) >= 1, name,
              " pieces: expected an int32 [V, L] table (L >= 1), got ", pieces.scalar_type(), " ", pieces.sizes());
  TORCH_CHECK(pieces.size(0) == V, name, " pieces: the table has ", pieces.size(0), " rows but the ", name,
              " logits have V = ", V, " columns (pad the table to the logit width: PieceTables.pad_to)");
  TORCH_CHECK(order.scalar_type() == at::kInt && order.dim() == 1 && order.size(0) == V, name,
              " order: expected an int32 [", V, "] permutation, got ", order.scalar_type(), " ", order.sizes());
  check_same_device(device_of, "the logits", pieces, name);
  check_same_device(device_of, "the logits", order, name);
  checks.index_range(pieces, -1, V_other, std::string(name) + " pieces (ids of the other vocabulary, -1 = none)");
  checks.sorted_rows(pieces, std::string(name) + " pieces");
  checks.index_range(order, 0, V, std::string(name) + " order");
  checks.distinct(order, std::string(name) + " order");
}

void check_realized(const at::Tensor& targets, const char* name, int64_t rows, const at::Tensor& device_of) {
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == rows, name,
              ": the chain loss needs the realized next token of every row, an int64 [", rows, "] tensor; got ",
              targets.scalar_type(), " ", targets.sizes());
  check_same_device(device_of, "the logits", targets, name);
}

}  // namespace

ChainInputs prepare_chain(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
                          const at::Tensor& student_pieces, const at::Tensor& student_order,
                          const c10::optional<at::Tensor>& teacher_pieces,
                          const c10::optional<at::Tensor>& teacher_order, double temperature,
                          const at::Tensor& student_targets, const at::Tensor& teacher_targets) {
  ContentChecks checks(student_logits.device());
  ChainInputs in;
  static_cast<LossInputs&>(in) =
      prepare_loss(student_logits, teacher_logits, chunks, temperature, "first", "first", c10::nullopt, c10::nullopt,
                   checks);
  const int64_t V_s = student_logits.size(1), V_t = teacher_logits.size(1);
  check_realized(student_targets, "student_targets", student_logits.size(0), student_logits);
  check_realized(teacher_targets, "teacher_targets", teacher_logits.size(0), student_logits);
  in.student_targets = student_targets.contiguous();
  in.teacher_targets = teacher_targets.contiguous();
  check_piece_table(student_pieces, student_order, "student", V_s, V_t, student_logits, checks);
  in.student_pieces = student_pieces.contiguous();
  in.student_order = student_order.contiguous();
  TORCH_CHECK(teacher_pieces.has_value() == teacher_order.has_value(),
              "teacher_pieces and teacher_order: give both or neither");
  if (teacher_pieces.has_value()) {
    check_piece_table(*teacher_pieces, *teacher_order, "teacher", V_t, V_s, student_logits, checks);
    in.teacher_pieces = teacher_pieces->contiguous();
    in.teacher_order = teacher_order->contiguous();
  }
  checks.raise_if_failed();
  return in;
}

ChainParams ChainInputs::params() const {
  ChainParams p{};
  static_cast<LossParams&>(p) = LossInputs::params();
  p.student_pieces = {student_pieces.data_ptr<int32_t>(), student_order.data_ptr<int32_t>(), student_pieces.size(0),
                      student_pieces.size(1)};
  if (teacher_pieces.defined()) {
    p.teacher_pieces = {teacher_pieces.data_ptr<int32_t>(), teacher_order.data_ptr<int32_t>(),
                        teacher_pieces.size(0), teacher_pieces.size(1)};
  } else {
    p.teacher_pieces = {nullptr, nullptr, 0, 0};
  }
  return p;
}

}  // namespace xtoken
