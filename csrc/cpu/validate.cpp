// CPU backends of the content checks (include/xtoken/validate.h): first offending index or -1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>

#include "xtoken/validate.h"

namespace xtoken {
namespace validate {
namespace cpu {

namespace {
at::Tensor result(int64_t first_bad) { return at::scalar_tensor(first_bad, at::dtype(at::kLong)); }
}  // namespace

at::Tensor first_bad_chunk(const at::Tensor& chunks_, int64_t N_s, int64_t N_t, bool disjoint) {
  const at::Tensor chunks = chunks_.contiguous();
  const int32_t* c = chunks.data_ptr<int32_t>();
  const int64_t K = chunks.size(0);
  for (int64_t k = 0; k < K; ++k) {
    const int32_t s0 = c[4 * k], s1 = c[4 * k + 1], t0 = c[4 * k + 2], t1 = c[4 * k + 3];
    const bool ok = s0 >= 0 && s0 < s1 && s1 <= N_s && t0 >= 0 && t0 < t1 && t1 <= N_t &&
                    (!disjoint || k == 0 || c[4 * (k - 1) + 1] <= s0);
    if (!ok) return result(k);
  }
  return result(-1);
}

at::Tensor first_out_of_range(const at::Tensor& t_, int64_t lo, int64_t hi) {
  const at::Tensor t = t_.contiguous();
  int64_t bad = -1;
  AT_DISPATCH_INTEGRAL_TYPES(t.scalar_type(), "first_out_of_range", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      const int64_t v = static_cast<int64_t>(p[i]);
      if (v < lo || v >= hi) {
        bad = i;
        break;
      }
    }
  });
  return result(bad);
}

at::Tensor first_bad_offset(const at::Tensor& ptr_, int64_t total) {
  const at::Tensor ptr = ptr_.contiguous();
  const int32_t* p = ptr.data_ptr<int32_t>();
  const int64_t n = ptr.numel();
  if (n == 0) return result(0);
  if (p[0] != 0) return result(0);
  for (int64_t i = 1; i < n; ++i) {
    if (p[i] < p[i - 1]) return result(i);
  }
  if (p[n - 1] != total) return result(n - 1);
  return result(-1);
}

at::Tensor first_negative_or_nonfinite(const at::Tensor& t_) {
  const at::Tensor t = t_.contiguous();
  const float* p = t.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (!(std::isfinite(p[i]) && p[i] >= 0.f)) return result(i);
  }
  return result(-1);
}

at::Tensor first_bad_bayes_target(const at::Tensor& chunks_, int side, const at::Tensor& targets_, int64_t V) {
  const at::Tensor chunks = chunks_.contiguous();
  const at::Tensor targets = targets_.contiguous();
  const int32_t* c = chunks.data_ptr<int32_t>();
  const int64_t* x = targets.data_ptr<int64_t>();
  const int64_t n_rows = targets.numel();
  for (int64_t k = 0; k < chunks.size(0); ++k) {
    const int64_t r0 = c[4 * k + 2 * side], r1 = c[4 * k + 2 * side + 1];
    for (int64_t r = r0; r < r1 - 1; ++r) {
      if (r < 0 || r >= n_rows || x[r] < 0 || x[r] >= V) return result(k);
    }
  }
  return result(-1);
}

}  // namespace cpu
}  // namespace validate
}  // namespace xtoken
