#include "xtoken/project.h"

#include "xtoken/checks.h"
#include "xtoken/loss.h"

namespace xtoken {

ProjectInputs prepare_project(const at::Tensor& input, const char* name, const at::Tensor& idx,
                              const at::Tensor& val, const at::Tensor& col_ptr, const at::Tensor& col_src,
                              const at::Tensor& col_val, bool transpose) {
  check_logits(input, name);
  TORCH_CHECK(idx.dim() == 2, "projection idx: expected an int32 [V_s, P] tensor, got shape ", idx.sizes());
  TORCH_CHECK(col_ptr.dim() == 1 && col_ptr.size(0) >= 1,
              "projection col_ptr: expected an int32 [V_t + 1] tensor, got shape ", col_ptr.sizes());
  const int64_t V_s = idx.size(0), V_t = col_ptr.size(0) - 1;
  const int64_t expected = transpose ? V_t : V_s;
  TORCH_CHECK(input.size(1) == expected, name, ": expected ", expected, " columns (W maps ", V_s,
              " student tokens to ", V_t, " teacher tokens), got ", input.size(1));
  ContentChecks checks(input.device());
  ProjectInputs in;
  in.W = prepare_projection(idx, val, col_ptr, col_src, col_val, V_s, V_t, input, accumulate_type(input.scalar_type()),
                            checks);
  checks.raise_if_failed();
  in.input = input.contiguous();
  in.V_s = V_s;
  in.V_t = V_t;
  return in;
}

}  // namespace xtoken
