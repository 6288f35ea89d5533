// Host helpers for ops that take a projection W in both of its forms (see ProjectionView).
#pragma once

#include <ATen/ATen.h>

#include "xtoken/checks.h"
#include "xtoken/common.h"

namespace xtoken {

struct ProjectionTensors {
  at::Tensor idx, val, col_ptr, col_src, col_val;  // contiguous; val and col_val in the accumulation type

  ProjectionView view() const {
    return {idx.data_ptr<int32_t>(), val.data_ptr(), idx.size(1), col_ptr.data_ptr<int32_t>(),
            col_src.data_ptr<int32_t>(), col_val.data_ptr(), col_src.size(0)};
  }
};

// Checks layout and contents of W (rows V_s, teacher width V_t) and returns contiguous tensors, the weights
// (float32 or float64) converted to `value_type`, the accumulation type of the kernels that read them.
// The content checks are queued on `checks`; the caller runs them.
ProjectionTensors prepare_projection(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& col_ptr,
                                     const at::Tensor& col_src, const at::Tensor& col_val, int64_t V_s,
                                     int64_t V_t, const at::Tensor& device_of, at::ScalarType value_type,
                                     ContentChecks& checks);

}  // namespace xtoken
