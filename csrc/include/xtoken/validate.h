// Content validation backends. Each function returns a 0-dim int64 tensor on the input's device
// holding the index of the first offending element, or -1 when every element is valid. They are
// called through xtoken::ContentChecks (checks.h), which batches the device results into one copy.
#pragma once

#include <ATen/ATen.h>

namespace xtoken {
namespace validate {

#define XT_VALIDATE_DECLS(NS)                                                                         \
  namespace NS {                                                                                   \
  at::Tensor first_bad_chunk(const at::Tensor& chunks, int64_t N_s, int64_t N_t, bool disjoint);   \
  at::Tensor first_out_of_range(const at::Tensor& t, int64_t lo, int64_t hi);                      \
  at::Tensor first_bad_offset(const at::Tensor& ptr, int64_t total);                               \
  at::Tensor first_negative_or_nonfinite(const at::Tensor& t);                                     \
  at::Tensor first_bad_bayes_target(const at::Tensor& chunks, int side, const at::Tensor& targets, \
                                    int64_t V);                                                    \
  }

XT_VALIDATE_DECLS(cpu)
#ifdef XTOKEN_WITH_CUDA
XT_VALIDATE_DECLS(cuda)
#endif

#undef XT_VALIDATE_DECLS

}  // namespace validate
}  // namespace xtoken
