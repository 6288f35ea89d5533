#include "xtoken/projection.h"

namespace xtoken {

ProjectionTensors prepare_projection(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& col_ptr,
                                     const at::Tensor& col_src, const at::Tensor& col_val, int64_t V_s,
                                     int64_t V_t, const at::Tensor& device_of, at::ScalarType value_type,
                                     ContentChecks& checks) {
  check_projection_layout(idx, val, col_ptr, col_src, col_val, V_s, V_t);
  check_same_device(device_of, "the logits", idx, "projection idx");
  check_same_device(device_of, "the logits", val, "projection val");
  check_same_device(device_of, "the logits", col_ptr, "projection col_ptr");
  check_same_device(device_of, "the logits", col_src, "projection col_src");
  check_same_device(device_of, "the logits", col_val, "projection col_val");
  ProjectionTensors W{idx.contiguous(), val.to(value_type).contiguous(), col_ptr.contiguous(),
                      col_src.contiguous(), col_val.to(value_type).contiguous()};
  checks.index_range(W.idx, -1, V_t, "projection idx (teacher token ids, -1 = empty slot)");
  // The content check reads float32 (a float64 weight beyond float32's range fails it as non-finite).
  checks.finite_nonnegative(val.to(at::kFloat), "projection val");
  checks.offsets(W.col_ptr, W.col_src.size(0), "projection col_ptr");
  checks.index_range(W.col_src, 0, V_s, "projection col_src (student token ids)");
  checks.finite_nonnegative(col_val.to(at::kFloat), "projection col_val");
  return W;
}

}  // namespace xtoken
