// Host-side argument checks (see include/xtoken/checks.h).
#include "xtoken/checks.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>

#include <atomic>
#include <cstdlib>
#include <sstream>

#ifdef XTOKEN_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

#include "xtoken/validate.h"

namespace xtoken {

void check_logits(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D [rows, vocab] tensor, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, name,
              ": expected float32, bfloat16, float16 (or float64) logits, got ", dt);
  TORCH_CHECK(t.size(1) > 0, name, ": the vocabulary dimension is empty");
  TORCH_CHECK(t.size(1) < (int64_t(1) << 31), name, ": vocabulary of ", t.size(1), " exceeds 2^31 - 1");
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), name, ": expected a CPU or CUDA tensor, got ",
              t.device());
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), b_name, " is on ", b.device(), " but ", a_name, " is on ", a.device(),
              "; move both to the same device");
}

void check_chunk_table(const at::Tensor& chunks) {
  TORCH_CHECK(chunks.scalar_type() == at::kInt, "chunks: expected an int32 [K, 4] table, got dtype ",
              chunks.scalar_type());
  TORCH_CHECK(chunks.dim() == 2 && chunks.size(1) == 4,
              "chunks: expected an int32 [K, 4] table (s0, s1, t0, t1), got shape ", chunks.sizes());
  TORCH_CHECK(chunks.size(0) < (int64_t(1) << 31), "chunks: more than 2^31 - 1 chunks");
}

void check_projection_layout(const at::Tensor& idx, const at::Tensor& val, const at::Tensor& col_ptr,
                             const at::Tensor& col_src, const at::Tensor& col_val, int64_t V_s, int64_t V_t) {
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 2,
              "projection idx: expected an int32 [V_s, P] tensor, got ", idx.scalar_type(), " ", idx.sizes());
  TORCH_CHECK((val.scalar_type() == at::kFloat || val.scalar_type() == at::kDouble) && val.sizes() == idx.sizes(),
              "projection val: expected a float32 (or float64) tensor shaped like idx ", idx.sizes(), ", got ",
              val.scalar_type(), " ", val.sizes());
  TORCH_CHECK(idx.size(0) == V_s, "projection: W has ", idx.size(0),
              " student rows but the student logits have V_s = ", V_s,
              " columns (pad W to the logit width, e.g. Projection.pad_to(student_vocab_size=...))");
  TORCH_CHECK(idx.size(1) >= 1, "projection idx: needs at least one slot per row");
  TORCH_CHECK(col_ptr.scalar_type() == at::kInt && col_ptr.dim() == 1 && col_ptr.size(0) == V_t + 1,
              "projection col_ptr: expected int32 [V_t + 1] = [", V_t + 1, "] for teacher logits of width ", V_t,
              ", got ", col_ptr.scalar_type(), " ", col_ptr.sizes(),
              " (build the transpose for this teacher width: projection.transposed(V_t))");
  TORCH_CHECK(col_src.scalar_type() == at::kInt && col_src.dim() == 1,
              "projection col_src: expected int32 [nnz], got ", col_src.scalar_type(), " ", col_src.sizes());
  TORCH_CHECK(col_val.scalar_type() == val.scalar_type() && col_val.sizes() == col_src.sizes(),
              "projection col_val: expected the dtype of val (", val.scalar_type(), ") shaped like col_src ",
              col_src.sizes(), ", got ", col_val.scalar_type(), " ", col_val.sizes());
  TORCH_CHECK(col_src.size(0) <= idx.numel(), "projection: the transpose holds ", col_src.size(0),
              " entries but W has only ", idx.numel(), " slots");
}

void check_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "temperature: expected a finite value > 0, got ", temperature);
  // The bounds of xtoken.checks.TEMPERATURE_RANGE, whose TEMPERATURE_WHY says why in full.
  constexpr double kLowest = 1e-10, kHighest = 10.0;
  TORCH_CHECK(temperature >= kLowest && temperature <= kHighest, "temperature: ", temperature, " is outside [", kLowest,
              ", ", kHighest, "], the range the float32 kernels compute exactly: above it float32 rounding of the ",
              "probabilities, multiplied by tau^2, decides the loss of a student close to its teacher; below it tau^2 ",
              "nears float32's underflow");
}

Merge parse_merge(c10::string_view merge, const char* name) {
  if (merge == "first") return Merge::First;
  if (merge == "mean") return Merge::Mean;
  if (merge == "bayes") return Merge::Bayes;
  if (merge == "logmean") return Merge::LogMean;
  TORCH_CHECK(false, name, ": expected 'first', 'mean', 'bayes' or 'logmean', got '", std::string(merge), "'");
}

void check_targets(const c10::optional<at::Tensor>& targets, const char* name, int64_t rows, Merge merge) {
  if (merge != Merge::Bayes) return;
  TORCH_CHECK(targets.has_value(), name, ": merge='bayes' needs the realized next token of every row");
  const auto& t = *targets;
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == rows, name,
              ": expected an int64 [", rows, "] tensor, got ", t.scalar_type(), " ", t.sizes());
}

namespace {

enum CheckKind { kChunk = 0, kRange = 1, kOffset = 2, kFinite = 3, kBayes = 4, kDistinct = 5, kSorted = 6 };

#define XT_DISPATCH_VALIDATE(fn, ...)                            \
  (device_.is_cuda() ? XT_VALIDATE_CUDA(fn, __VA_ARGS__)         \
                     : validate::cpu::fn(__VA_ARGS__))

#ifdef XTOKEN_WITH_CUDA
#define XT_VALIDATE_CUDA(fn, ...) validate::cuda::fn(__VA_ARGS__)
#else
[[noreturn]] at::Tensor no_cuda_kernels() { TORCH_CHECK(false, "xtoken was built without its CUDA kernels"); }
#define XT_VALIDATE_CUDA(fn, ...) no_cuda_kernels()
#endif

bool capturing(const at::Device& device) {
#ifdef XTOKEN_WITH_CUDA
  if (device.is_cuda()) {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
#endif
  (void)device;
  return false;
}

ContentCheckMode initial_content_check_mode() {
  const char* env = std::getenv("XTOKEN_CONTENT_CHECKS");
  const std::string value = env == nullptr ? "" : env;
  TORCH_CHECK(value.empty() || value == "auto" || value == "always",
              "XTOKEN_CONTENT_CHECKS: expected 'auto' or 'always', got '", value, "'");
  return value == "always" ? ContentCheckMode::Always : ContentCheckMode::Auto;
}

std::atomic<ContentCheckMode>& mode_slot() {
  static std::atomic<ContentCheckMode> slot(initial_content_check_mode());
  return slot;
}

thread_local bool skip_scope = false;

}  // namespace

ContentCheckMode content_check_mode() { return mode_slot().load(); }

ContentCheckMode set_content_check_mode(ContentCheckMode mode) { return mode_slot().exchange(mode); }

bool skip_content_checks() { return skip_scope; }

bool set_skip_content_checks(bool skip) {
  const bool previous = skip_scope;
  skip_scope = skip;
  return previous;
}

bool content_checks_run(const at::Device& device) {
  if (!device.is_cuda()) return true;
  if (capturing(device)) return false;
  return content_check_mode() == ContentCheckMode::Always || !skip_scope;
}

ContentChecks::ContentChecks(const at::Device& device) : device_(device), skip_(!content_checks_run(device)) {}

void ContentChecks::chunks(const at::Tensor& chunks, int64_t N_s, int64_t N_t, bool disjoint) {
  if (skip_ || chunks.size(0) == 0) return;
  std::ostringstream what;
  what << "chunks: every row (s0, s1, t0, t1) needs 0 <= s0 < s1 <= N_s = " << N_s
       << " and 0 <= t0 < t1 <= N_t = " << N_t;
  if (disjoint) what << ", with student rows sorted and non-overlapping (s1 of a chunk <= s0 of the next)";
  first_bad_.push_back(XT_DISPATCH_VALIDATE(first_bad_chunk, chunks, N_s, N_t, disjoint));
  pending_.push_back({what.str(), chunks, kChunk});
}

void ContentChecks::index_range(const at::Tensor& t, int64_t lo, int64_t hi, std::string what) {
  if (skip_ || t.numel() == 0) return;
  first_bad_.push_back(XT_DISPATCH_VALIDATE(first_out_of_range, t, lo, hi));
  std::ostringstream w;
  w << what << ": every value must lie in [" << lo << ", " << hi << ")";
  pending_.push_back({w.str(), t, kRange});
}

void ContentChecks::offsets(const at::Tensor& ptr, int64_t total, std::string what) {
  if (skip_) return;
  first_bad_.push_back(XT_DISPATCH_VALIDATE(first_bad_offset, ptr, total));
  std::ostringstream w;
  w << what << ": must start at 0, never decrease, and end at " << total;
  pending_.push_back({w.str(), ptr, kOffset});
}

void ContentChecks::distinct(const at::Tensor& t, std::string what) {
  if (skip_ || t.numel() < 2) return;
  // Sorted, a repeated value sits next to itself; the reported element is its second copy.
  const at::Tensor sorted = std::get<0>(t.reshape({-1}).sort());
  const at::Tensor repeat = sorted.slice(0, 1).eq(sorted.slice(0, 0, -1)).to(at::kInt);
  const at::Tensor none = at::scalar_tensor(-1, repeat.options().dtype(at::kLong));
  first_bad_.push_back(at::where(repeat.any(), repeat.argmax(), none));
  pending_.push_back({what + ": each id may appear at most once", sorted.slice(0, 1), kDistinct});
}

void ContentChecks::sorted_rows(const at::Tensor& t, std::string what) {
  if (skip_ || t.size(0) < 2) return;
  // Row r+1 is out of order when the first column where it differs from row r holds a smaller value.
  const at::Tensor diff = t.slice(0, 1).to(at::kLong) - t.slice(0, 0, -1).to(at::kLong);
  const at::Tensor differs = diff.ne(0);
  const at::Tensor first_col = differs.to(at::kInt).argmax(1, /*keepdim=*/true);
  const at::Tensor bad = differs.any(1).logical_and(diff.gather(1, first_col).squeeze(1).lt(0)).to(at::kInt);
  const at::Tensor none = at::scalar_tensor(-1, bad.options().dtype(at::kLong));
  first_bad_.push_back(at::where(bad.any(), bad.argmax() + 1, none));
  pending_.push_back({what + ": the rows must be sorted lexicographically", t, kSorted});
}

void ContentChecks::finite_nonnegative(const at::Tensor& t, std::string what) {
  if (skip_ || t.numel() == 0) return;
  first_bad_.push_back(XT_DISPATCH_VALIDATE(first_negative_or_nonfinite, t));
  pending_.push_back({what + ": every value must be finite and >= 0", t, kFinite});
}

void ContentChecks::bayes_targets(const at::Tensor& chunks, int side, const at::Tensor& targets, int64_t V,
                                  std::string what) {
  if (skip_ || chunks.size(0) == 0) return;
  first_bad_.push_back(XT_DISPATCH_VALIDATE(first_bad_bayes_target, chunks, side, targets, V));
  std::ostringstream w;
  w << what << ": merge='bayes' needs the realized target of every row of a chunk but its last to be a token id in [0, "
    << V << ")";
  pending_.push_back({w.str(), chunks, kBayes});
}

void ContentChecks::raise_if_failed() {
  if (first_bad_.empty()) return;
  const at::Tensor bad = at::stack(first_bad_).to(at::kCPU);  // the one device sync
  const int64_t* b = bad.data_ptr<int64_t>();
  for (size_t i = 0; i < pending_.size(); ++i) {
    if (b[i] < 0) continue;
    const Pending& p = pending_[i];
    std::ostringstream msg;
    msg << p.what << "; ";
    const at::Tensor src = p.source.to(at::kCPU).contiguous();
    if (p.kind == kChunk || p.kind == kBayes) {
      const int32_t* c = src.data_ptr<int32_t>() + 4 * b[i];
      msg << "chunk " << b[i] << " is (" << c[0] << ", " << c[1] << ", " << c[2] << ", " << c[3] << ")";
      if (p.kind == kChunk && b[i] > 0) {
        const int32_t* prev = c - 4;
        msg << " after chunk " << b[i] - 1 << " = (" << prev[0] << ", " << prev[1] << ", " << prev[2] << ", "
            << prev[3] << ")";
      }
    } else if (p.kind == kSorted) {
      msg << "row " << b[i] << " sorts before row " << b[i] - 1;
    } else if (p.kind == kDistinct) {
      msg << "id " << src.reshape({-1})[b[i]].item<int64_t>() << " appears more than once";
    } else {
      const at::Tensor flat = src.reshape({-1});
      msg << "element " << b[i] << " is " << flat[b[i]].item<double>();
    }
    pending_.clear();
    first_bad_.clear();
    TORCH_CHECK(false, msg.str());
  }
  pending_.clear();
  first_bad_.clear();
}

}  // namespace xtoken
