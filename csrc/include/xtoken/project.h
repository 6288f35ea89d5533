// The standalone projection op: host-side preparation shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "xtoken/projection.h"

namespace xtoken {

struct ProjectInputs {
  at::Tensor input;  // contiguous [N, V_s] (forward) or [N, V_t] (backward)
  ProjectionTensors W;
  int64_t V_s, V_t;
};

// transpose = false: input is probs [N, V_s]; true: input is the gradient [N, V_t].
ProjectInputs prepare_project(const at::Tensor& input, const char* name, const at::Tensor& idx,
                              const at::Tensor& val, const at::Tensor& col_ptr, const at::Tensor& col_src,
                              const at::Tensor& col_val, bool transpose);

}  // namespace xtoken
