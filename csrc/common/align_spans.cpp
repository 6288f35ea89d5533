// Host-side preparation of xtoken::align_spans, shared by the CPU and CUDA implementations.
#include "xtoken/align_spans.h"

#include <limits>

#include "xtoken/checks.h"

namespace xtoken {

namespace {

void check_side(const at::Tensor& ends, const at::Tensor& lengths, const char* ends_name, const char* lengths_name) {
  TORCH_CHECK(ends.scalar_type() == at::kInt && ends.dim() == 2, ends_name,
              ": expected an int32 [B, T] tensor of byte offsets, got ", ends.scalar_type(), " ", ends.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kInt && lengths.dim() == 1 && lengths.size(0) == ends.size(0),
              lengths_name, ": expected an int32 [B] = [", ends.size(0), "] tensor, got ", lengths.scalar_type(),
              " ", lengths.sizes());
  TORCH_CHECK(ends.device().is_cpu() || ends.device().is_cuda(), ends_name, ": expected a CPU or CUDA tensor, got ",
              ends.device());
  check_same_device(ends, ends_name, lengths, lengths_name);
  TORCH_CHECK(ends.numel() <= std::numeric_limits<int32_t>::max(), ends_name, ": B * T = ", ends.numel(),
              " rows do not fit the int32 chunk table");
}

}  // namespace

AlignTensors prepare_align(const at::Tensor& student_ends, const at::Tensor& student_lengths,
                           bool student_left_padded, const at::Tensor& teacher_ends,
                           const at::Tensor& teacher_lengths, bool teacher_left_padded) {
  check_side(student_ends, student_lengths, "student_ends", "student_lengths");
  check_side(teacher_ends, teacher_lengths, "teacher_ends", "teacher_lengths");
  TORCH_CHECK(teacher_ends.size(0) == student_ends.size(0), "teacher_ends: expected the batch size B = ",
              student_ends.size(0), " of student_ends, got ", teacher_ends.size(0));
  check_same_device(student_ends, "student_ends", teacher_ends, "teacher_ends");

  AlignTensors a;
  a.ends[0] = student_ends.contiguous();
  a.ends[1] = teacher_ends.contiguous();
  a.lengths[0] = student_lengths.contiguous();
  a.lengths[1] = teacher_lengths.contiguous();
  const int64_t B = student_ends.size(0);
  const int64_t C = std::min(student_ends.size(1), teacher_ends.size(1));
  const auto opts = student_ends.options();
  a.chunks = at::empty({B, C, 4}, opts);
  a.counts = at::empty({B}, opts);
  a.dropped = at::empty({B, 2, kNumDropReasons}, opts);

  AlignParams& p = a.params;
  const bool left[2] = {student_left_padded, teacher_left_padded};
  for (int s = 0; s < 2; ++s) {
    p.side[s] = {a.ends[s].data_ptr<int32_t>(), a.lengths[s].data_ptr<int32_t>(), a.ends[s].size(1), left[s]};
  }
  p.B = B;
  p.C = C;
  p.chunks = a.chunks.data_ptr<int32_t>();
  p.counts = a.counts.data_ptr<int32_t>();
  p.dropped = a.dropped.data_ptr<int32_t>();
  return a;
}

}  // namespace xtoken
