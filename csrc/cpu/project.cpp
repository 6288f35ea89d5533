// The vocabulary projection q = W^T p on the CPU, row by row (SPEC.md §4, used inside P-KL).
//   forward:  q[n, t] = sum_{s in column t} W[s, t] p[n, s]      (gather through W's transpose)
//   backward: dp[n, s] = sum_j W[s, idx_j] dq[n, idx_j]          (gather through W's rows)
// Both are gathers, so rows are independent: OpenMP over rows, float32 (or float64) accumulation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "xtoken/checks.h"
#include "xtoken/cpu_rows.h"
#include "xtoken/project.h"

namespace xtoken {
namespace cpu {
namespace {

template <typename T>
void project_rows(const T* in, T* out, int64_t N, int64_t V_in, int64_t V_out, const ProjectionView& W,
                  bool transpose) {
  using A = acc_t<T>;
  const ProjectionPlan<A> plan(W, transpose ? V_out : V_in, transpose ? V_in : V_out);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<A> src(V_in), dst(V_out);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* row = in + n * V_in;
      for (int64_t v = 0; v < V_in; ++v) src[v] = cpu_math::load<A>(row[v]);
      if (transpose) {
        gather_rows(dst.data(), src.data(), plan);
      } else {
        gather_columns(dst.data(), src.data(), plan);
      }
      T* o = out + n * V_out;
      for (int64_t v = 0; v < V_out; ++v) o[v] = cpu_math::store<T>(dst[v]);
    }
  }
}

at::Tensor run(const ProjectInputs& in, bool transpose) {
  const int64_t V_out = transpose ? in.V_s : in.V_t;
  at::Tensor out = at::empty({in.input.size(0), V_out}, in.input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "project_cpu", [&] {
    project_rows<scalar_t>(in.input.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), in.input.size(0),
                           in.input.size(1), V_out, in.W.view(), transpose);
  });
  return out;
}

at::Tensor project_fwd_cpu(const at::Tensor& probs, const at::Tensor& idx, const at::Tensor& val,
                           const at::Tensor& col_ptr, const at::Tensor& col_src, const at::Tensor& col_val) {
  const ProjectInputs in = prepare_project(probs, "probs", idx, val, col_ptr, col_src, col_val, false);
  return run(in, false);
}

at::Tensor project_bwd_cpu(const at::Tensor& grad_q, const at::Tensor& idx, const at::Tensor& val,
                           const at::Tensor& col_ptr, const at::Tensor& col_src, const at::Tensor& col_val) {
  const ProjectInputs in = prepare_project(grad_q, "grad_q", idx, val, col_ptr, col_src, col_val, true);
  return run(in, true);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) {
  m.impl("project_fwd", &cpu::project_fwd_cpu);
  m.impl("project_bwd", &cpu::project_bwd_cpu);
}

}  // namespace xtoken
