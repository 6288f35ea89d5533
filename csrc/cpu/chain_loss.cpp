// Chain KL on the CPU (SPEC.md §4).
//
// Per chunk, a sum over its levels (for_each_chain_level in chain_loss.h). A level conditions one side's row
// (logits a = z / tau) on a realized prefix: its tokens are the sorted rows [lo, hi) of that side's piece table,
// grouped into runs by their next piece c (or "ends here"). With S_c = sum_{v in run c} exp(a_v - max) and
// S = sum_c S_c, and the other side's row b (log-probabilities b_u - L):
//   cond(c)  = S_c / S
//   plain(c) = exp(b_c - L) for the pieces c of the runs; plain(end) = sum_{u not a piece} exp(b_u - L)
//   L_level  = sum_c T(c) (log T(c) - log(M(c) + eps)),  (T, M) = (plain, cond) on a teacher-side level
//                                                        (the student is conditioned), (cond, plain) on a
//                                                        student-side level (M:1 chunks)
// Backward, with r(c) = T(c) / (M(c) + eps) and R = sum_c M(c) r(c), the student row of the model side gets
//   dL/da_v = pi(v) (R - r(bucket(v))),   pi = the model's own probabilities (cond: S_v / S over the range;
//                                         plain: the softmax of the row, with bucket(v) = v for a piece, else end)
// and dL/dz = dL/da / tau. A teacher-side chunk's levels all sum into the student row s0; a student-side level
// writes its own row s0 + j.
// Work split: one chunk at a time per OpenMP thread (dynamic schedule), thread-private buffers; the bucket sums
// run in sorted-row order, so results do not depend on the thread count. A level over a whole row (depth 0, most
// of the work) takes the row's max and exps, and in the backward its gradient, in contiguous vectorized passes;
// the exps are the values the sorted-order pass would compute, and the sums keep their order. The buckets' terms
// (two logs, two exps and a division each, for up to V_t + 1 buckets a level) run in one vectorized pass with
// cpu_math's exp/log, and their sums in bucket order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "xtoken/chain_loss.h"
#include "xtoken/cpu_pooling.h"

namespace xtoken {
namespace cpu {
namespace {

template <typename T>
struct ChainCpu {
  using A = acc_t<T>;
  const ChainParams& p;
  const T* zs;
  const T* zt;
  A inv_tau;
  RowLse<A>* lse_s;
  RowLse<A>* lse_t;

  explicit ChainCpu(const ChainParams& params)
      : p(params),
        zs(static_cast<const T*>(p.student_logits)),
        zt(static_cast<const T*>(p.teacher_logits)),
        inv_tau(static_cast<A>(p.inv_tau)),
        lse_s(static_cast<RowLse<A>*>(p.student_lse)),
        lse_t(static_cast<RowLse<A>*>(p.teacher_lse)) {}

  struct Run {
    int32_t piece;  // -1: the tokens that end here
    int64_t begin, end;
    double sum;
    A r;
  };

  // Thread-private buffers: piece flags and r per piece (over the plain side's vocabulary), the runs, and the
  // gradient of the student row of a teacher-side chunk.
  // A level over a whole row (depth 0) also uses e, the row's exps by token, and r_tok, r by token.
  struct Work {
    std::vector<uint8_t> flags;
    std::vector<A> r_of, g, e, r_tok;
    // Per bucket: the runs (at most a table's V), then "ends here" if no run is.
    std::vector<A> cond_sum, log_plain, r_run, model_r, kl;
    std::vector<Run> runs;
    Work(int64_t V_s, int64_t V_t)
        : flags(std::max(V_s, V_t), 0), r_of(V_s), g(V_s), e(std::max(V_s, V_t)), r_tok(V_s),
          cond_sum(std::max(V_s, V_t) + 1), log_plain(cond_sum.size()), r_run(cond_sum.size()),
          model_r(cond_sum.size()), kl(cond_sum.size()) {}
  };

  // Whether the level's range is the whole conditioned row (depth 0): its max and exps then run over the row
  // contiguously (vectorized) instead of through the sorted order, with the same values.
  static bool whole_row(const ChainLevel& lv, const PieceTableView& tab) { return lv.lo == 0 && lv.hi == tab.V; }

  const PieceTableView& table(const ChainLevel& lv) const {
    return lv.teacher_side ? p.student_pieces : p.teacher_pieces;
  }
  const T* cond_row(const ChainLevel& lv) const {
    return lv.teacher_side ? zs + int64_t(lv.cond_row) * p.V_s : zt + int64_t(lv.cond_row) * p.V_t;
  }
  const T* plain_row(const ChainLevel& lv) const {
    return lv.teacher_side ? zt + int64_t(lv.plain_row) * p.V_t : zs + int64_t(lv.plain_row) * p.V_s;
  }
  int64_t plain_width(const ChainLevel& lv) const { return lv.teacher_side ? p.V_t : p.V_s; }
  RowLse<A>& plain_lse(const ChainLevel& lv) const { return lv.teacher_side ? lse_t[lv.plain_row] : lse_s[lv.plain_row]; }

  // Per bucket j of a level, from its conditioned side's sum of exps cs[j] (log cond = log cs[j] - log_total)
  // and the plain side's log-probability lp[j]: r[j] = T / (M + eps), model_r[j] = M r[j] and the KL term
  // kl[j] = T (log T - log(M + eps)) (0 where T = 0; a NaN T propagates). One vectorized pass (the side is a
  // template argument: GCC does not vectorize a select on a loop-invariant bool).
  template <bool target_is_plain>
  static void bucket_terms(int64_t n, A log_total, const A* __restrict cs, const A* __restrict lp,
                           A* __restrict r, A* __restrict model_r, A* __restrict kl) {
    const A eps = static_cast<A>(kPklEps);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const A log_cond = cpu_math::log(cs[j]) - log_total;
      const A log_t = target_is_plain ? lp[j] : log_cond;
      const A log_m = target_is_plain ? log_cond : lp[j];
      const A t = cpu_math::exp(log_t), model = cpu_math::exp(log_m);
      const bool live = t != 0;
      const A rj = live ? t / (model + eps) : A(0);
      r[j] = rj;
      model_r[j] = model * rj;
      kl[j] = live ? t * (log_t - cpu_math::log(model + eps)) : A(0);
    }
  }

  // The level's KL. Fills w.runs (with r per run) and w.flags (cleared by clear_flags), and returns the max
  // shift, the log of the range's total and R through the out-parameters, for the backward.
  A level_terms(const ChainLevel& lv, Work& w, A& shift, A& log_total, A& R, A& r_end) const {
    const PieceTableView& tab = table(lv);
    const T* zc = cond_row(lv);
    const bool whole = whole_row(lv, tab);
    A mx = -std::numeric_limits<A>::infinity();
    if (whole) {
      mx = row_max_or_nan<T, A>(zc, tab.V);
    } else {
      for (int64_t r = lv.lo; r < lv.hi; ++r) {
        const A x = cpu_math::load<A>(zc[tab.order[r]]);
        mx = (x > mx || x != x) ? x : mx;  // NaN propagates
      }
    }
    if (mx == -std::numeric_limits<A>::infinity()) mx = 0;  // every token of the range impossible
    A* ex = w.e.data();
    if (whole) {
#pragma omp simd
      for (int64_t v = 0; v < tab.V; ++v) ex[v] = cpu_math::exp(scaled_shift(cpu_math::load<A>(zc[v]), mx, inv_tau));
    }
    w.runs.clear();
    double total = 0, run_sum = 0;  // the sums in registers; a run is stored when it ends
    int64_t begin = lv.lo;
    int32_t current = lv.lo < lv.hi ? tab.pieces[lv.lo * tab.L + lv.depth] : 0;
    for (int64_t r = lv.lo; r < lv.hi; ++r) {  // in sorted-row order, whichever way the exps came
      const int32_t piece = tab.pieces[r * tab.L + lv.depth];
      if (piece != current) {
        w.runs.push_back({current, begin, r, run_sum, A(0)});
        current = piece;
        begin = r;
        run_sum = 0;
      }
      const int32_t v = tab.order[r];
      const A e = whole ? ex[v] :
                          cpu_math::exp(scaled_shift(cpu_math::load<A>(zc[v]), mx, inv_tau));
      run_sum += e;
      total += e;
    }
    if (lv.lo < lv.hi) w.runs.push_back({current, begin, lv.hi, run_sum, A(0)});
    shift = mx;
    log_total = total > 0 ? static_cast<A>(std::log(total)) : A(0);  // once a level: libm
    const T* zp = plain_row(lv);
    const int64_t V_p = plain_width(lv);
    const RowLse<A> L = plain_lse(lv);
    for (const Run& run : w.runs) {
      if (run.piece >= 0) w.flags[run.piece] = 1;
    }
    const uint8_t* flags = w.flags.data();
    const A end_mass = blocked_sum<A>(V_p, [&](int64_t u) {
      const A e = cpu_math::exp(L.log_prob(cpu_math::load<A>(zp[u]), inv_tau));
      return flags[u] ? A(0) : e;
    });
    const A log_plain_end = end_mass > 0 ? static_cast<A>(std::log(end_mass)) : -std::numeric_limits<A>::infinity();
    // The buckets' terms in one vectorized pass over the runs (plus the "ends here" bucket when no token of the
    // range ends here), then their sums in bucket order.
    const int64_t n_runs = static_cast<int64_t>(w.runs.size());
    A* cs = w.cond_sum.data();
    A* lp = w.log_plain.data();
    int64_t end_at = n_runs;  // the bucket whose r is r_end
    for (int64_t j = 0; j < n_runs; ++j) {
      const Run& run = w.runs[j];
      cs[j] = static_cast<A>(run.sum);
      if (run.piece < 0) {
        lp[j] = log_plain_end;
        end_at = j;
      } else {
        lp[j] = L.log_prob(cpu_math::load<A>(zp[run.piece]), inv_tau);
      }
    }
    int64_t n_buckets = n_runs;
    if (end_at == n_runs) {  // no token of the range ends here: its conditional mass is 0
      cs[n_runs] = 0;
      lp[n_runs] = log_plain_end;
      n_buckets = n_runs + 1;
    }
    if (lv.teacher_side) {
      bucket_terms<true>(n_buckets, log_total, cs, lp, w.r_run.data(), w.model_r.data(), w.kl.data());
    } else {
      bucket_terms<false>(n_buckets, log_total, cs, lp, w.r_run.data(), w.model_r.data(), w.kl.data());
    }
    const A* rr = w.r_run.data();
    const A* mr = w.model_r.data();
    const A* kl = w.kl.data();
    A loss = 0, R_sum = 0;
    for (int64_t j = 0; j < n_buckets; ++j) {  // in bucket order
      R_sum += mr[j];
      loss += kl[j];
    }
    for (int64_t j = 0; j < n_runs; ++j) w.runs[j].r = rr[j];
    R = R_sum;
    r_end = rr[end_at];
    return loss;
  }

  void clear_flags(Work& w) const {
    for (const Run& run : w.runs) {
      if (run.piece >= 0) w.flags[run.piece] = 0;
    }
  }

  // Saves the LSE of every plain row the chunk's levels read (the conditioned rows need none).
  void save_plain_lse(const ChainLevel& lv) const {
    RowLse<A>& L = plain_lse(lv);
    L = row_lse(plain_row(lv), plain_width(lv), inv_tau);
  }

  A forward_chunk(const Chunk& c, Work& w) const {
    A loss = 0;
    for_each_chain_level(p, c, [&](const ChainLevel& lv) {
      save_plain_lse(lv);
      A shift, log_total, R, r_end;
      loss += level_terms(lv, w, shift, log_total, R, r_end);
      clear_flags(w);
    });
    return loss;
  }

  void backward_chunk(int64_t k, Work& w) const {
    const Chunk c = p.chunks[k];
    const A G = static_cast<const A*>(p.grad_losses)[k];
    T* dz = static_cast<T*>(p.grad_student);
    zero_rows_around_chunk<T>(p, k);
    int32_t next_row = c.s0;  // the first student row of the chunk not yet written
    bool teacher_side = true;
    for_each_chain_level(p, c, [&](const ChainLevel& lv) {
      A shift, log_total, R, r_end;
      level_terms(lv, w, shift, log_total, R, r_end);
      const A scale = G * inv_tau;
      if (lv.teacher_side) {
        const PieceTableView& tab = table(lv);
        const T* zc = cond_row(lv);
        if (whole_row(lv, tab)) {  // r by token, then one contiguous pass over the row
          A* r_tok = w.r_tok.data();
          for (const Run& run : w.runs) {
            for (int64_t r = run.begin; r < run.end; ++r) r_tok[tab.order[r]] = run.r;
          }
          A* g = w.g.data();
          const bool first = lv.depth == 0;
#pragma omp simd
          for (int64_t v = 0; v < tab.V; ++v) {
            const A pi = cpu_math::exp(scaled_shift(cpu_math::load<A>(zc[v]), shift, inv_tau) - log_total);
            const A gv = scale * pi * (R - r_tok[v]);
            g[v] = first ? gv : g[v] + gv;
          }
        } else {
          for (const Run& run : w.runs) {
            for (int64_t r = run.begin; r < run.end; ++r) {
              const int32_t v = tab.order[r];
              const A pi = cpu_math::exp(scaled_shift(cpu_math::load<A>(zc[v]), shift, inv_tau) - log_total);
              const A g = scale * pi * (R - run.r);
              w.g[v] = lv.depth == 0 ? g : w.g[v] + g;
            }
          }
        }
      } else {
        teacher_side = false;
        for (const Run& run : w.runs) {
          if (run.piece >= 0) w.r_of[run.piece] = run.r;
        }
        const T* zp = plain_row(lv);
        const RowLse<A> L = plain_lse(lv);
        const uint8_t* flags = w.flags.data();
        const A* r_of = w.r_of.data();
        T* row = dz + int64_t(lv.plain_row) * p.V_s;
#pragma omp simd
        for (int64_t u = 0; u < p.V_s; ++u) {
          const A pu = cpu_math::exp(L.log_prob(cpu_math::load<A>(zp[u]), inv_tau));
          row[u] = cpu_math::store<T>(scale * pu * (R - (flags[u] ? r_of[u] : r_end)));
        }
        next_row = lv.plain_row + 1;
      }
      clear_flags(w);
    });
    if (teacher_side) {
      T* row = dz + int64_t(c.s0) * p.V_s;
      const A* g = w.g.data();
#pragma omp simd
      for (int64_t v = 0; v < p.V_s; ++v) row[v] = cpu_math::store<T>(g[v]);
      next_row = c.s0 + 1;
    }
    zero_rows(dz, p.V_s, next_row, c.s1);
  }

  Work make_work() const { return Work(p.V_s, p.V_t); }

  void forward() const {
    A* losses = static_cast<A*>(p.losses);
    parallel_chunks(p.K, [&] { return make_work(); },
                    [&](int64_t k, Work& w) { losses[k] = forward_chunk(p.chunks[k], w); });
  }

  void backward() const {
    parallel_chunks(p.K, [&] { return make_work(); }, [&](int64_t k, Work& w) { backward_chunk(k, w); });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& chunks,
    const at::Tensor& student_pieces, const at::Tensor& student_order, const c10::optional<at::Tensor>& teacher_pieces,
    const c10::optional<at::Tensor>& teacher_order, double temperature, const at::Tensor& student_targets,
    const at::Tensor& teacher_targets) {
  const ChainInputs in = prepare_chain(student_logits, teacher_logits, chunks, student_pieces, student_order,
                                       teacher_pieces, teacher_order, temperature, student_targets, teacher_targets);
  ChainParams p = in.params();
  return run_forward(in, p, {p.K}, "chain_loss_fwd_cpu",
                     [&](auto scalar) { ChainCpu<decltype(scalar)>(p).forward(); });
}

at::Tensor chain_loss_bwd_cpu(const at::Tensor& grad_losses, const at::Tensor& student_logits,
                              const at::Tensor& teacher_logits, const at::Tensor& chunks,
                              const at::Tensor& student_pieces, const at::Tensor& student_order,
                              const c10::optional<at::Tensor>& teacher_pieces,
                              const c10::optional<at::Tensor>& teacher_order, double temperature,
                              const at::Tensor& student_targets, const at::Tensor& teacher_targets,
                              const at::Tensor& student_lse, const at::Tensor& teacher_lse) {
  const ChainInputs in = prepare_chain(student_logits, teacher_logits, chunks, student_pieces, student_order,
                                       teacher_pieces, teacher_order, temperature, student_targets, teacher_targets);
  ChainParams p = in.params();
  return run_backward(grad_losses, student_lse, teacher_lse, in, p, {p.K}, "chain_loss_fwd", "chain_loss_bwd_cpu",
                      [&](auto scalar) { ChainCpu<decltype(scalar)>(p).backward(); });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xtoken, CPU, m) {
  m.impl("chain_loss_fwd", &cpu::chain_loss_fwd_cpu);
  m.impl("chain_loss_bwd", &cpu::chain_loss_bwd_cpu);
}

}  // namespace xtoken
