// Argument checks shared by every op. They run once per call in host code and raise a
// c10::Error (RuntimeError in Python) that names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "xtoken/common.h"

namespace xtoken {

// dtype/shape/device checks (cheap: metadata only).
void check_logits(const at::Tensor& t, const char* name);
void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name);
void check_chunk_table(const at::Tensor& chunks);
void check_projection_layout(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& col_ptr,
                             const at::Tensor& col_src, const at::Tensor& col_val, int64_t V_s, int64_t V_t);
void check_temperature(double temperature);
// `name` names the argument in the error (student_merge, teacher_merge).
Merge parse_merge(c10::string_view merge, const char* name);
// Targets are required (and checked against the rows) only for a side whose merge is "bayes".
void check_targets(const c10::optional<at::Tensor>& targets, const char* name, int64_t rows, Merge merge);

// When the content checks run (SPEC.md §6). CPU inputs are always checked: there the checks cost no
// host sync. On CUDA the checks of one op call cost one host sync, so they are skipped
//   - while a CUDA graph is being captured (a capture cannot sync), and
//   - on a thread inside a skip scope (set_skip_content_checks(true)): the nn modules and the trainer
//     after their first call, and every backward that autograd runs (its forward checked the same
//     saved inputs), unless the process-wide mode is Always.
// Always (debug) checks every call outside a capture; the environment variable
// XTOKEN_CONTENT_CHECKS=always selects it at start (default: auto). The mode is process-wide because
// autograd runs backwards on threads of its own; the skip scope is per thread, so that concurrent
// callers (DataParallel replicas) cannot end each other's scopes. When the checks are skipped the
// kernels still guard every index: nothing is read or written out of bounds, and an invalid chunk
// gives a NaN loss and NaN gradient rows instead of an error.
enum class ContentCheckMode { Auto, Always };
ContentCheckMode content_check_mode();
ContentCheckMode set_content_check_mode(ContentCheckMode mode);  // returns the previous mode
bool skip_content_checks();                                        // this thread's skip scope
bool set_skip_content_checks(bool skip);                           // returns the previous value
// Whether an op called now on this thread runs the content checks of inputs on `device`.
bool content_checks_run(const at::Device& device);

// Checks on tensor contents. On the GPU they run as small kernels whose results come back to the
// host in one copy (one sync per op call), unless content_checks_run() says they are skipped.
class ContentChecks {
 public:
  explicit ContentChecks(const at::Device& device);
  // chunks inside the row ranges and non-empty; student rows sorted and disjoint if asked.
  void chunks(const at::Tensor& chunks, int64_t N_s, int64_t N_t, bool student_rows_disjoint);
  // every element of an integer tensor in [lo, hi).
  void index_range(const at::Tensor& t, int64_t lo, int64_t hi, std::string what);
  // a non-decreasing offset table from 0 to `total`.
  void offsets(const at::Tensor& ptr, int64_t total, std::string what);
  // no value of a 1-D integer tensor appears twice.
  void distinct(const at::Tensor& t, std::string what);
  // the rows of a 2-D integer tensor in lexicographic order (each row <= the next).
  void sorted_rows(const at::Tensor& t, std::string what);
  // every element finite and >= 0.
  void finite_nonnegative(const at::Tensor& t, std::string what);
  // merge="bayes": the realized target of every prefix row of every chunk (all rows but the last)
  // must be a token id in [0, V). side 0 = student rows (s0, s1), 1 = teacher rows (t0, t1).
  void bayes_targets(const at::Tensor& chunks, int side, const at::Tensor& targets, int64_t V, std::string what);
  // Runs the checks (one device sync on CUDA) and raises on the first failure.
  void raise_if_failed();

 private:
  struct Pending {
    std::string what;
    at::Tensor source;  // the tensor whose element `first_bad` is reported
    int kind;
  };
  at::Device device_;
  bool skip_;
  std::vector<Pending> pending_;
  std::vector<at::Tensor> first_bad_;  // one int64 scalar per check, -1 when fine
};

}  // namespace xtoken
