// Definitions shared by the host code, the CPU kernels and the CUDA kernels.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define XT_HD __host__ __device__ __forceinline__
#else
#define XT_HD inline __attribute__((always_inline))
#endif

namespace xtoken {

// SPEC.md §4: the P-KL floor inside the log, log(q + eps).
constexpr double kPklEps = 1e-10;

// SPEC.md §3: how the predictor rows of one side of a chunk are pooled into one vector. LogMean is the
// geometric mean of the rows' probabilities, not renormalized (NeMo-RL's mean of log-probabilities).
enum class Merge : int32_t { First = 0, Mean = 1, Bayes = 2, LogMean = 3 };

// One row of the chunk table (SPEC.md §1): student rows [s0, s1), teacher rows [t0, t1).
struct Chunk {
  int32_t s0, s1, t0, t1;
};

// A projection W (student token -> teacher tokens) in the two forms the kernels read.
//   rows:    ELL, `idx[s * P + j]` (-1 = empty slot) with weight `val[s * P + j]`.
//   columns: its transpose, built once by xtoken.Projection: the student tokens that feed teacher
//            token t are `col_src[col_ptr[t] .. col_ptr[t+1])`, with weights `col_val[...]`.
// Both forms make the projection a gather, so no kernel needs atomics. The weights are in the kernels'
// accumulation type A (float, or double for float64 inputs): read them with values<A>() / col_values<A>().
struct ProjectionView {
  const int32_t* idx;
  const void* val;
  int64_t P;
  const int32_t* col_ptr;
  const int32_t* col_src;
  const void* col_val;
  int64_t nnz;  // entries of the column form (col_src, col_val)

  template <typename A>
  XT_HD const A* values() const {
    return static_cast<const A*>(val);
  }
  template <typename A>
  XT_HD const A* col_values() const {
    return static_cast<const A*>(col_val);
  }

  // The entries [begin, end) of column t, clamped into [0, nnz): when the content checks were skipped
  // (CUDA kernels only) col_ptr may hold anything, and the kernels still read nothing out of bounds.
  struct Range {
    int64_t begin, end;
  };
  XT_HD Range column(int64_t t) const {
    const int64_t b = col_ptr[t] < 0 ? 0 : (col_ptr[t] > nnz ? nnz : col_ptr[t]);
    const int64_t e = col_ptr[t + 1];
    return {b, e < b ? b : (e > nnz ? nnz : e)};
  }
};

}  // namespace xtoken
