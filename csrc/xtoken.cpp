// Every op schema of the xtoken library, in one place. The kernels register their implementations
// per device in cpu/*.cpp and cuda/*.cu (TORCH_LIBRARY_IMPL); python/xtoken/ops.py adds the fake
// (meta) kernels and the autograd formulas.
#include <Python.h>
#include <torch/library.h>

#include <cstring>

#include "xtoken/checks.h"

namespace xtoken {
namespace {

// The content-check mode (include/xtoken/checks.h) as plain Python functions of the module: they take
// no tensors, so they stay out of the dispatcher and out of traced graphs.
const char* mode_name(ContentCheckMode mode) { return mode == ContentCheckMode::Always ? "always" : "auto"; }

PyObject* py_content_check_mode(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(mode_name(content_check_mode()));
  } catch (const std::exception& e) {  // XTOKEN_CONTENT_CHECKS holds an unknown mode
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* py_set_content_check_mode(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  if (std::strcmp(name, "auto") != 0 && std::strcmp(name, "always") != 0) {
    PyErr_Format(PyExc_ValueError, "content check mode: expected 'auto' or 'always', got '%s'", name);
    return nullptr;
  }
  const ContentCheckMode mode = std::strcmp(name, "always") == 0 ? ContentCheckMode::Always : ContentCheckMode::Auto;
  try {
    return PyUnicode_FromString(mode_name(set_content_check_mode(mode)));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* py_skip_content_checks(PyObject*, PyObject*) { return PyBool_FromLong(skip_content_checks()); }

PyObject* py_set_skip_content_checks(PyObject*, PyObject* args) {
  int skip = 0;
  if (!PyArg_ParseTuple(args, "p", &skip)) return nullptr;
  return PyBool_FromLong(set_skip_content_checks(skip != 0));
}

// The CUDA architectures the build compiled for (setup.py passes them as XTOKEN_CUDA_ARCHS, e.g.
// sm_80,sm_90,compute_90: machine code and PTX), so that a test can compare them with the library's contents.
#define XT_STRINGIFY(...) #__VA_ARGS__
#define XT_EXPAND_STRINGIFY(...) XT_STRINGIFY(__VA_ARGS__)
PyObject* py_cuda_architectures(PyObject*, PyObject*) {
#ifdef XTOKEN_CUDA_ARCHS
  return PyUnicode_FromString(XT_EXPAND_STRINGIFY(XTOKEN_CUDA_ARCHS));
#else
  return PyUnicode_FromString("");
#endif
}

PyMethodDef module_methods[] = {
    {"cuda_architectures", py_cuda_architectures, METH_NOARGS,
     "The CUDA targets compiled into the library, comma-separated ('' without CUDA)."},
    {"content_check_mode", py_content_check_mode, METH_NOARGS, "The process-wide content check mode."},
    {"set_content_check_mode", py_set_content_check_mode, METH_VARARGS,
     "Set the process-wide content check mode ('auto' or 'always'); returns the previous one."},
    {"skip_content_checks", py_skip_content_checks, METH_NOARGS, "Whether this thread is in a skip scope."},
    {"set_skip_content_checks", py_set_skip_content_checks, METH_VARARGS,
     "Enter (True) or leave (False) this thread's skip scope; returns the previous value."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace xtoken

extern "C" {
// Importing xtoken._C loads this library, whose static initializers register the ops. The module holds
// only the content-check functions above, so no pybind11 is needed and the limited API suffices.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, xtoken::module_methods};
  return PyModule_Create(&module_def);
}
}

namespace xtoken {

bool built_with_cuda() {
#ifdef XTOKEN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(xtoken, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);

  // q = W^T p, row by row. W comes in its row form (idx, val: [V_s, P]) and its column form
  // (col_ptr [V_t + 1], col_src, col_val [nnz]); see xtoken.Projection.
  m.def(
      "project_fwd(Tensor probs, Tensor proj_idx, Tensor proj_val, Tensor proj_col_ptr, Tensor proj_col_src, "
      "Tensor proj_col_val) -> Tensor");
  m.def(
      "project_bwd(Tensor grad_q, Tensor proj_idx, Tensor proj_val, Tensor proj_col_ptr, Tensor proj_col_src, "
      "Tensor proj_col_val) -> Tensor");

  // P-KL per chunk (SPEC.md §4), unreduced and without the tau^2 factor. Also returns the
  // logsumexp of every row the pooling reads as [N, 2] (max logit, log-sum: RowLse in common.h; 0
  // elsewhere), which the backward reuses. Every loss pools each
  // side of a chunk by its own merge ('first', 'mean', 'bayes' or 'logmean', SPEC.md §3). W's weights
  // (proj_val, proj_col_val) are float32 or float64. The backward returns the student gradient and, when
  // proj_val_grad, the gradient in W's values on its support ([V_s, P], proj_val's dtype; empty otherwise).
  m.def(
      "pkl_loss_fwd(Tensor student_logits, Tensor teacher_logits, Tensor chunks, Tensor proj_idx, "
      "Tensor proj_val, Tensor proj_col_ptr, Tensor proj_col_src, Tensor proj_col_val, float temperature, "
      "str student_merge, str teacher_merge, Tensor? student_targets, Tensor? teacher_targets) -> "
      "(Tensor losses, Tensor student_lse, Tensor teacher_lse)");
  m.def(
      "pkl_loss_bwd(Tensor grad_losses, Tensor student_logits, Tensor teacher_logits, Tensor chunks, "
      "Tensor proj_idx, Tensor proj_val, Tensor proj_col_ptr, Tensor proj_col_src, Tensor proj_col_val, "
      "float temperature, str student_merge, str teacher_merge, Tensor? student_targets, Tensor? teacher_targets, "
      "Tensor student_lse, Tensor teacher_lse, bool proj_val_grad) -> (Tensor grad_student, Tensor grad_proj_val)");

  // Exact span alignment (SPEC.md §2): token end offsets and lengths of both sides -> the chunk table
  // [B, min(T_s, T_t), 4] (the first counts[b] rows of sequence b are its chunks, the rest -1), the
  // chunk counts [B] (-1 for a sequence with invalid input) and the dropped tokens [B, 2, 3] per side
  // and reason. See include/xtoken/align_spans.h.
  m.def(
      "align_spans(Tensor student_ends, Tensor student_lengths, bool student_left_padded, Tensor teacher_ends, "
      "Tensor teacher_lengths, bool teacher_left_padded) -> (Tensor chunks, Tensor counts, Tensor dropped)");
  // The hybrid loss per chunk (SPEC.md §4: GOLD, H-KL; ULD with no pairs): losses [K, 2] holds the matched
  // term (column 0) and the sorted-L1 term (column 1), unweighted and without the tau^2 factor. pairs is an
  // int32 [C, 2] table of (student id, teacher id); matched is 'kl' or 'jsd' (with beta); uld_topk caps
  // the ranks of the sorted-L1 term (None: all). The LSEs are those of pkl_loss_fwd.
  m.def(
      "hybrid_loss_fwd(Tensor student_logits, Tensor teacher_logits, Tensor chunks, Tensor pairs, "
      "float temperature, str student_merge, str teacher_merge, str matched, float beta, int? uld_topk, "
      "Tensor? student_targets, Tensor? teacher_targets) -> (Tensor losses, Tensor student_lse, Tensor teacher_lse)");
  m.def(
      "hybrid_loss_bwd(Tensor grad_losses, Tensor student_logits, Tensor teacher_logits, Tensor chunks, "
      "Tensor pairs, float temperature, str student_merge, str teacher_merge, str matched, float beta, "
      "int? uld_topk, Tensor? student_targets, Tensor? teacher_targets, Tensor student_lse, Tensor teacher_lse) "
      "-> Tensor");

  // Same-vocabulary KD per chunk (SPEC.md §4), unreduced and without the tau^2 factor.
  m.def(
      "kd_loss_fwd(Tensor student_logits, Tensor teacher_logits, Tensor chunks, float temperature, "
      "str student_merge, str teacher_merge, Tensor? student_targets, Tensor? teacher_targets) -> "
      "(Tensor losses, Tensor student_lse, Tensor teacher_lse)");
  m.def(
      "kd_loss_bwd(Tensor grad_losses, Tensor student_logits, Tensor teacher_logits, Tensor chunks, "
      "float temperature, str student_merge, str teacher_merge, Tensor? student_targets, Tensor? teacher_targets, "
      "Tensor student_lse, Tensor teacher_lse) -> Tensor");

  // Chain KL per chunk (SPEC.md §4), unreduced and without the tau^2 factor. The piece tables come in their
  // sorted layout (rows sorted lexicographically, order = the token of each sorted row; see
  // include/xtoken/chain_loss.h); the teacher's is optional. The targets are the realized next tokens.
  m.def(
      "chain_loss_fwd(Tensor student_logits, Tensor teacher_logits, Tensor chunks, Tensor student_pieces, "
      "Tensor student_order, Tensor? teacher_pieces, Tensor? teacher_order, float temperature, "
      "Tensor student_targets, Tensor teacher_targets) -> (Tensor losses, Tensor student_lse, Tensor teacher_lse)");
  m.def(
      "chain_loss_bwd(Tensor grad_losses, Tensor student_logits, Tensor teacher_logits, Tensor chunks, "
      "Tensor student_pieces, Tensor student_order, Tensor? teacher_pieces, Tensor? teacher_order, "
      "float temperature, Tensor student_targets, Tensor teacher_targets, Tensor student_lse, "
      "Tensor teacher_lse) -> Tensor");
}

}  // namespace xtoken
