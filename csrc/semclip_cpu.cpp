// Fused CPU kernel of the SemCLIP partitions (docs/contract.md §7):
//
//   row_lse_i = log Σ_c exp(S_ic + b_c),   col_lse_c = log Σ_i exp(S_ic) for c < Kq,   S = τ·A·Cᵀ
//
// and their backward by recomputation. Work is split over row blocks (one
// thread owns a part of them: their row statistics and grad_rows); each tile of
// S (block_rows × block_cols, sized to stay in L2) is produced by one BLAS call
// on views of A and C and consumed at once. Nothing of M×K elements exists.
//
// One exponential per element and pass. A tile uses a single shift, its max M:
// e_ic = exp(S_ic − M) gives the row sums Σ_c e_ic·β_c (β_c = exp b_c) and the
// column sums Σ_i e_ic; in the backward dS_ic = e_ic·(u_i·β_c + v_c) with
// u_i = g_row_i·exp(M − row_lse_i), v_c = g_col_c·exp(M − col_lse_c). A row or
// column for which the shared shift is unsafe (its sum would lose precision to
// underflow, or exp(M − lse) could overflow) is recomputed exactly with its own
// shift; that happens only in tiles whose logits span > ~50 nats.
//
// Gradient filtering: every softmax weight of a tile, relative to the mass of the gradient it feeds and
// times its line's |g| over the largest |g| of the problem (G), is at most
// exp(M + max b − min row_lse − min log column mass) · max|g_row|/G (rows; the column-mass term matters for
// negation columns, whose gradient is made of row weights only) and exp(M − min col_lse) · max|g_col|/G
// (columns); when both bounds are below eps the tile's gradient work is skipped entirely: M is the tile max
// the forward recorded (one number per tile), so a skipped tile costs neither its recomputation nor its two
// gradient products. The default eps = 2^-24 / max(M, K) (float32; 2^-53 for float64, set in
// backends/cpp.py) keeps the total dropped weight of any row or column below float resolution of G times its
// mass, i.e. the default is exact per gradient tensor. Statistics enter the backward in float64. The design:
// docs/cpu_kernel.md.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <limits>
#include <mutex>
#include <vector>

#include "cpu_parts.h"
#include "sigmoid_cpu.h"
#include "tile_math.h"

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

namespace semclip {
namespace {

// A shared-shift row/column sum below exp(-50) may have lost relevant terms to underflow: recompute it.
constexpr double kMinSharedSum = 1.9287498479639178e-22;  // exp(-50)
// Backward: exp(M − lse) above exp(20) would let weights ≥ exp(-67) underflow in e = exp(S − M).
constexpr double kMaxShiftExcess = 20.0;

// Online log-sum-exp state (m, s) meaning log(s) + m; adds log(sum) + shift.
template <typename T>
inline void merge_lse(T& m, T& s, T shift, T sum) {
  if (sum == 0) return;
  if (shift <= m) {
    s += sum * std::exp(shift - m);
  } else {  // also the NaN path: NaN shifts propagate into s
    s = s * std::exp(m - shift) + sum;
    m = shift;
  }
}

template <typename T>
inline void merge_exact(T& m, T& s, const T* x, int64_t n, int64_t stride, const T* bias) {
  // log Σ_k exp(x_k + bias_k) with the line's own max, merged into (m, s). bias may be null. The bias is
  // added after the shift, (x_k − max) + bias_k: at |x| ≈ 1e4 rounding x_k + bias_k first would cost
  // ~5e-4 of the weight, where the shifted difference is exact.
  T shift = -std::numeric_limits<T>::infinity();
  bool has_nan = false;
  for (int64_t k = 0; k < n; ++k) {
    const T xk = x[k * stride];
    has_nan |= std::isnan(xk);
    shift = std::max(shift, xk);
  }
  if (has_nan) {
    m = s = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  if (shift == -std::numeric_limits<T>::infinity()) return;
  T sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += std::exp((x[k * stride] - shift) + (bias ? bias[k] : T(0)));
  merge_lse(m, s, shift, sum);
}

// log(s) + m in double: the statistics the backward divides by. Rounding lse to the inputs' float32 would
// cost up to half an ulp of |lse| in every weight (5e-4 at |lse| ≈ 1e4); in double it costs nothing.
inline double lse_of(double m, double s) { return m + std::log(s); }

// min/max that return NaN when either argument is NaN (std::min/max keep the first argument then).
inline double nan_min(double a, double b) { return std::isnan(a) || std::isnan(b) ? a + b : std::min(a, b); }
inline double nan_max(double a, double b) { return std::isnan(a) || std::isnan(b) ? a + b : std::max(a, b); }

// The columns as the caller holds them: blocks [K_j, d] (e.g. captions, paraphrases, negations), logically
// concatenated, never copied. Column tiles never straddle two blocks: block j is cut into ceil(K_j / bc)
// tiles, numbered after those of the blocks before it.
struct Columns {
  struct ColTile {
    int64_t block, local0, c0, nc;  // block index, first row in that block, first global column, width
  };
  std::vector<at::Tensor> blocks;
  std::vector<ColTile> tiles;
  std::vector<int64_t> tile_of;  // the column tile of every global column
  int64_t K = 0;

  Columns(const std::vector<at::Tensor>& blocks_, int64_t bc) : blocks(blocks_) {
    for (int64_t j = 0; j < int64_t(blocks.size()); ++j) {
      const int64_t n = blocks[j].size(0);
      for (int64_t local = 0; local < n; local += bc) {
        const int64_t nc = std::min(bc, n - local);
        for (int64_t c = 0; c < nc; ++c) tile_of.push_back(int64_t(tiles.size()));
        tiles.push_back({j, local, K + local, nc});
      }
      K += n;
    }
  }
  int64_t n_tiles() const { return int64_t(tiles.size()); }
  at::Tensor block_rows(int64_t cb) const {  // the columns of tile cb, as a [nc, d] view
    const ColTile& t = tiles[cb];
    return blocks[t.block].narrow(0, t.local0, t.nc);
  }
};

struct Tile {
  int64_t r0, nr, c0, nc, nq;  // rows [r0, r0+nr), columns [c0, c0+nc), the first nq of them queries
  int64_t cb;                  // the column tile
};

Tile make_tile(int64_t rb, int64_t cb, int64_t M, const Columns& cols, int64_t Kq, int64_t br) {
  Tile t;
  t.r0 = rb * br;
  t.nr = std::min(br, M - t.r0);
  t.c0 = cols.tiles[cb].c0;
  t.nc = cols.tiles[cb].nc;
  t.nq = std::max<int64_t>(0, std::min(t.nc, Kq - t.c0));
  t.cb = cb;
  return t;
}

// S_tile = τ·A[rows]·C[cols]ᵀ into the front of a thread's tile buffer.
at::Tensor logits_tile(const at::Tensor& buffer, const at::Tensor& rows, const Columns& cols, const Tile& t,
                       double scale) {
  at::Tensor S = buffer.narrow(0, 0, t.nr * t.nc).view({t.nr, t.nc});
  // beta = 0: the buffer's old content is ignored (not even NaNs propagate).
  at::addmm_out(S, S, rows.narrow(0, t.r0, t.nr), cols.block_rows(t.cb).t(), /*beta=*/0, /*alpha=*/scale);
  return S;
}

// The entries (i, first + i·per_row + p), p < per_row, of every band (first, per_row) in `positives` (flat
// pairs) that fall in tile t, set to −inf: they are left out of both partitions (Problem.positives in
// backends/values.py), so their exponentials are 0 in every pass.
template <typename T>
void exclude_positives(T* S, const Tile& t, const std::vector<int64_t>& positives) {
  const T minus_inf = -std::numeric_limits<T>::infinity();
  for (size_t b = 0; b + 1 < positives.size(); b += 2) {
    const int64_t first = positives[b], per_row = positives[b + 1];
    for (int64_t i = 0; i < t.nr; ++i) {
      const int64_t lo = std::max(first + (t.r0 + i) * per_row, t.c0);
      const int64_t hi = std::min(first + (t.r0 + i + 1) * per_row, t.c0 + t.nc);
      for (int64_t c = lo; c < hi; ++c) S[i * t.nc + (c - t.c0)] = minus_inf;
    }
  }
}

// Returns row_lse [M] and col_lse [K] in float64 (every column's log-partition: the query columns' are the
// primitive's output, the others bound the column masses for the backward's filter), and each tile's max.
template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& rows, const Columns& cols, double scale,
                                     const at::Tensor& col_bias, int64_t Kq, int64_t br, int64_t bc,
                                     const std::vector<int64_t>& positives) {
  const int64_t M = rows.size(0), K = cols.K;
  const auto opts = rows.options();
  const at::Tensor col_weight = col_bias.exp().contiguous();  // β_c multiplies the row sums
  const T* w = col_weight.data_ptr<T>();
  const T* bias = col_bias.data_ptr<T>();
  const int64_t n_rb = ceil_div(M, br), n_cb = cols.n_tiles();

  at::Tensor row_m = at::full({M}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor row_s = at::zeros({M}, opts);
  // Column statistics: one (m, s) pair per column and part, merged after the parallel loop.
  // Each tile's max, kept for the backward's filter: it skips a tile before recomputing its logits.
  at::Tensor tile_max = at::empty({n_rb, n_cb}, opts);
  const Parts parts(n_rb);
  at::Tensor col_m = at::full({parts.count, K}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor col_s = at::zeros({parts.count, K}, opts);

  parts.run([&](int64_t part) {
    const FlushDenormals flush_denormals;
    at::Tensor buffer = at::empty({br * bc}, opts);
    std::vector<T> col_sum(bc), row_sum(br);
    T* rm = row_m.data_ptr<T>();
    T* rs = row_s.data_ptr<T>();
    T* cm = col_m.data_ptr<T>() + part * K;
    T* cs = col_s.data_ptr<T>() + part * K;
    for (int64_t rb = parts.begin(part); rb < parts.end(part); ++rb) {
      for (int64_t cb = 0; cb < n_cb; ++cb) {
        const Tile t = make_tile(rb, cb, M, cols, Kq, br);
        const at::Tensor S_tile = logits_tile(buffer, rows, cols, t, scale);
        T* S = S_tile.data_ptr<T>();
        exclude_positives(S, t, positives);
        const T shift = max_of(S, t.nr * t.nc);
        tile_max.data_ptr<T>()[rb * n_cb + cb] = shift;
        if (shift == -std::numeric_limits<T>::infinity()) continue;  // nothing left in this tile
        std::fill(col_sum.begin(), col_sum.begin() + t.nc, T(0));
        for (int64_t i = 0; i < t.nr; ++i)
          row_sum[i] = row_exp_sums(S + i * t.nc, w + t.c0, t.nc, t.nc, shift, col_sum.data());
        for (int64_t i = 0; i < t.nr; ++i) {
          const int64_t r = t.r0 + i;
          if (row_sum[i] >= kMinSharedSum)
            merge_lse(rm[r], rs[r], shift, row_sum[i]);
          else  // the tile max is far above this row's: redo it with its own max (also NaN rows)
            merge_exact(rm[r], rs[r], S + i * t.nc, t.nc, 1, bias + t.c0);
        }
        for (int64_t j = 0; j < t.nc; ++j) {
          const int64_t c = t.c0 + j;
          if (col_sum[j] >= kMinSharedSum)
            merge_lse(cm[c], cs[c], shift, col_sum[j]);
          else
            merge_exact<T>(cm[c], cs[c], S + j, t.nr, t.nc, nullptr);
        }
      }
    }
  });

  at::Tensor row_lse = at::empty({M}, opts.dtype(at::kDouble));
  at::Tensor col_lse = at::empty({K}, opts.dtype(at::kDouble));
  double* row_out = row_lse.data_ptr<double>();
  const T* rm = row_m.data_ptr<T>();
  const T* rs = row_s.data_ptr<T>();
  for (int64_t r = 0; r < M; ++r) row_out[r] = lse_of(rm[r], rs[r]);
  double* col_out = col_lse.data_ptr<double>();
  const T* cm = col_m.data_ptr<T>();
  const T* cs = col_s.data_ptr<T>();
  for (int64_t c = 0; c < K; ++c) {
    T m = -std::numeric_limits<T>::infinity(), s = 0;
    for (int64_t part = 0; part < parts.count; ++part) {
      const T tm = cm[part * K + c], ts = cs[part * K + c];
      if (std::isnan(tm) || std::isnan(ts)) {
        m = s = std::numeric_limits<T>::quiet_NaN();
      } else if (ts > 0) {
        merge_lse(m, s, tm, ts);
      }
    }
    col_out[c] = lse_of(m, s);
  }
  return {row_lse, col_lse, tile_max};
}

// The gradient filter's per-block bounds (NaN-propagating: a NaN statistic never lets a tile be skipped):
// min row_lse per row block; per column block the max bias, the min col_lse, and the min log-mass of the
// columns' gradients that row weights feed (0 for a query column with a column gradient, whose column
// softmax alone has mass 1; else col_mass_lb_c ≤ log Σ_i p_ic, the lower bound the caller computed (see
// backends/values.py: Stats.col_mass_lb), or −inf without it: such a column's mass is unknown and its tiles
// are never skipped).
// Each weight counts with its line's gradient |g| against the largest |g| of the problem, G: a line whose
// gradient is e^-45 of the others' (a query column's off-positive share, once the loss leaves its positives
// out of the partitions) has nothing to add where the weights of a line of gradient G would be dropped.
// Per block, max over its lines of log|g| − lse: |g_i|·p_ic ≤ exp(S_ic + b_c + that), tighter than pairing the
// largest |g| with the smallest lse when the lines' partitions differ (off-positive partitions do).
struct FilterBounds {
  std::vector<double> rb_max_g_lse, cb_max_bias, cb_max_g_lse, cb_min_col_mass;
  double log_eps;  // log(eps·G)

  // Whether every weight of tile (rb, cb) with max logit tile_max, times its line's |g|, is below eps·G of the
  // mass of the gradient it feeds. NaN bounds compare false: NaN always reaches the gradients.
  bool skippable(const Tile& t, int64_t rb, int64_t cb, double tile_max) const {
    const double row_bound = tile_max + cb_max_bias[cb] + rb_max_g_lse[rb] - cb_min_col_mass[cb];
    const double col_bound = t.nq > 0 ? tile_max + cb_max_g_lse[cb] : -std::numeric_limits<double>::infinity();
    return row_bound < log_eps && col_bound < log_eps;
  }
};

// log|g| − lse of one line: −inf for a line without gradient, also when its lse is −inf (every entry left
// out); NaN stays NaN.
inline double log_g_minus_lse(double g, double lse) {
  const double inf = std::numeric_limits<double>::infinity();
  return g == 0 && lse == -inf ? -inf : std::log(std::abs(g)) - lse;
}

template <typename T>
FilterBounds filter_bounds(const double* rl, const double* cl, const double* mass_lb, const T* bias, const T* gr,
                           const T* gc, int64_t M, const Columns& cols, int64_t Kq, int64_t br, double eps) {
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t n_rb = ceil_div(M, br), n_cb = cols.n_tiles(), K = cols.K;
  FilterBounds f{std::vector<double>(n_rb, -inf), std::vector<double>(n_cb, -inf), std::vector<double>(n_cb, -inf),
                 std::vector<double>(n_cb, 0.0), -inf};
  double largest_g = 0;  // G (NaN-propagating)
  for (int64_t r = 0; r < M; ++r) {
    f.rb_max_g_lse[r / br] = nan_max(f.rb_max_g_lse[r / br], log_g_minus_lse(double(gr[r]), rl[r]));
    largest_g = nan_max(largest_g, std::abs(double(gr[r])));
  }
  for (int64_t c = 0; c < Kq; ++c) largest_g = nan_max(largest_g, std::abs(double(gc[c])));
  if (eps > 0) f.log_eps = std::log(eps) + std::log(largest_g);
  for (int64_t c = 0; c < K; ++c) {
    const int64_t cb = cols.tile_of[c];
    f.cb_max_bias[cb] = nan_max(f.cb_max_bias[cb], double(bias[c]));
    if (c < Kq) f.cb_max_g_lse[cb] = nan_max(f.cb_max_g_lse[cb], log_g_minus_lse(double(gc[c]), cl[c]));
    if (c < Kq && gc[c] != 0) continue;
    double log_mass = -inf;
    if (mass_lb) log_mass = std::isnan(mass_lb[c]) ? mass_lb[c] : std::min(0.0, mass_lb[c]);
    f.cb_min_col_mass[cb] = nan_min(f.cb_min_col_mass[cb], log_mass);
  }
  return f;
}

// What the backward needs to turn a tile of logits into its gradient dS (pointers to whole-problem arrays).
template <typename T>
struct GradWeights {
  const double *row_lse, *col_lse;  // float64 statistics
  const T *g_row, *g_col, *bias, *col_weight;
};

// dS of one tile into G (contiguous t.nr × t.nc) with the shared shift, rows/columns where it is unsafe
// recomputed exactly; returns Σ dS ⊙ S (for dτ) and adds the number of exact lines to *n_exact.
template <typename T>
double tile_grad_logits(const GradWeights<T>& gw, const Tile& t, const T* S, T shift, std::vector<T>& u,
                        std::vector<T>& v, T* G, int64_t* n_exact) {
  std::vector<int64_t> exact_rows, exact_cols;
  for (int64_t i = 0; i < t.nr; ++i) {
    const T g = gw.g_row[t.r0 + i];
    const double excess = shift - gw.row_lse[t.r0 + i];
    u[i] = 0;
    if (g == 0) continue;
    if (excess <= kMaxShiftExcess)
      u[i] = T(g * std::exp(excess));
    else
      exact_rows.push_back(i);  // also NaN
  }
  for (int64_t j = 0; j < t.nc; ++j) {
    v[j] = 0;
    if (j >= t.nq) continue;
    const T g = gw.g_col[t.c0 + j];
    const double excess = shift - gw.col_lse[t.c0 + j];
    if (g == 0) continue;
    if (excess <= kMaxShiftExcess)
      v[j] = T(g * std::exp(excess));
    else
      exact_cols.push_back(j);
  }
  double dot = 0;
  for (int64_t i = 0; i < t.nr; ++i)
    dot += row_grad_logits(S + i * t.nc, gw.col_weight + t.c0, v.data(), t.nc, shift, u[i], G + i * t.nc);
  for (int64_t i : exact_rows) {
    const T g = gw.g_row[t.r0 + i];
    const double lse = gw.row_lse[t.r0 + i];
    for (int64_t j = 0; j < t.nc; ++j) {  // (S − lse) + b: see merge_exact
      if (S[i * t.nc + j] == -std::numeric_limits<T>::infinity()) continue;  // left out (dS = 0)
      const T s = S[i * t.nc + j], p = T(g * std::exp((s - lse) + gw.bias[t.c0 + j]));
      G[i * t.nc + j] += p;
      dot += double(p) * s;
    }
  }
  for (int64_t j : exact_cols) {
    const T g = gw.g_col[t.c0 + j];
    const double lse = gw.col_lse[t.c0 + j];
    for (int64_t i = 0; i < t.nr; ++i) {
      if (S[i * t.nc + j] == -std::numeric_limits<T>::infinity()) continue;
      const T s = S[i * t.nc + j], p = T(g * std::exp(s - lse));
      G[i * t.nc + j] += p;
      dot += double(p) * s;
    }
  }
  *n_exact += int64_t(exact_rows.size() + exact_cols.size());
  return dot;
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& rows, const Columns& cols, double scale,
                                      const at::Tensor& col_bias, int64_t Kq, const at::Tensor& row_lse,
                                      const at::Tensor& col_lse, const at::Tensor& col_mass_lb,
                                      const at::Tensor& tile_max, const at::Tensor& g_row, const at::Tensor& g_col,
                                      bool need_rows, bool need_cols, bool need_scale, int64_t br, int64_t bc,
                                      double eps, const std::vector<int64_t>& positives) {
  const int64_t M = rows.size(0);
  const auto opts = rows.options();
  const int64_t n_rb = ceil_div(M, br), n_cb = cols.n_tiles();
  at::Tensor grad_rows = need_rows ? at::zeros_like(rows) : at::Tensor();
  std::vector<at::Tensor> grad_cols;  // one per block
  if (need_cols)
    for (const at::Tensor& block : cols.blocks) grad_cols.push_back(at::zeros_like(block));
  auto result = [&](const at::Tensor& grad_scale, const at::Tensor& stats) {
    std::vector<at::Tensor> out{grad_rows, grad_scale, stats};
    out.insert(out.end(), grad_cols.begin(), grad_cols.end());
    return out;
  };
  if (!need_rows && !need_cols && !need_scale) return result(at::zeros({}, opts), at::zeros({3}, at::kLong));
  const Parts parts(n_rb);
  std::vector<double> scale_dot(parts.count, 0.0);  // Σ dS ⊙ S per part (dτ = Σ dS ⊙ A·Cᵀ = that / τ)
  // Below 1e-30, τ·A·Cᵀ falls into float32's subnormals, which the GEMM may flush to zero: S then carries no
  // A·Cᵀ to divide τ out of, and dτ takes the products themselves.
  const bool tiny_scale = std::abs(scale) < 1e-30;
  std::vector<double> scale_dot_raw(parts.count, 0.0);  // only for a tiny τ
  std::atomic<int64_t> skipped{0}, exact_lines{0};

  const at::Tensor col_weight = col_bias.exp().contiguous();
  const GradWeights<T> gw{row_lse.data_ptr<double>(), col_lse.data_ptr<double>(), g_row.data_ptr<T>(),
                          g_col.data_ptr<T>(), col_bias.data_ptr<T>(), col_weight.data_ptr<T>()};
  // Without the forward's tile maxima (a backward given statistics computed elsewhere) each tile's shift is
  // its max, taken after recomputing it, and the filter judges the tile from that max.
  const T* fwd_tile_max = tile_max.numel() > 0 ? tile_max.data_ptr<T>() : nullptr;
  const FilterBounds filter = filter_bounds(gw.row_lse, gw.col_lse,
                                            col_mass_lb.numel() > 0 ? col_mass_lb.data_ptr<double>() : nullptr,
                                            gw.bias, gw.g_row, gw.g_col, M, cols, Kq, br, eps);
  ColumnDeposits deposits(parts.count, n_cb);
  parts.run([&](int64_t part) {
    try {
      const FlushDenormals flush_denormals;
      at::Tensor s_buffer = at::empty({br * bc}, opts);
      at::Tensor g_buffer = at::empty({br * bc}, opts);
      at::Tensor col_grad_buffer = need_cols ? at::empty({bc, rows.size(1)}, opts) : at::Tensor();
      std::vector<T> u(br), v(bc);
      int64_t n_exact = 0;
      for (int64_t cb = 0; cb < n_cb; ++cb) {
        bool col_grad_live = false;  // whether col_grad_buffer holds this column block's sum yet
        for (int64_t rb = parts.begin(part); rb < parts.end(part); ++rb) {
          const Tile t = make_tile(rb, cb, M, cols, Kq, br);
          // With the forward's tile max a skipped tile costs no product at all; without it, the logits product.
          if (fwd_tile_max && filter.skippable(t, rb, cb, fwd_tile_max[rb * n_cb + cb])) {
            skipped.fetch_add(1, std::memory_order_relaxed);
            continue;
          }
          const at::Tensor S_tile = logits_tile(s_buffer, rows, cols, t, scale);
          T* S = S_tile.data_ptr<T>();
          exclude_positives(S, t, positives);
          // The forward's shift where known (the same products: no max pass), else this tile's max.
          const T shift = fwd_tile_max ? fwd_tile_max[rb * n_cb + cb] : max_of(S, t.nr * t.nc);
          if (shift == -std::numeric_limits<T>::infinity()) continue;  // every entry left out: dS = 0
          if (!fwd_tile_max && filter.skippable(t, rb, cb, shift)) {
            skipped.fetch_add(1, std::memory_order_relaxed);
            continue;
          }
          at::Tensor G_tile = g_buffer.narrow(0, 0, t.nr * t.nc).view({t.nr, t.nc});
          scale_dot[part] += tile_grad_logits(gw, t, S, shift, u, v, G_tile.data_ptr<T>(), &n_exact);

          const at::Tensor row_tile = rows.narrow(0, t.r0, t.nr);
          const at::Tensor col_tile = cols.block_rows(cb);
          if (need_scale && tiny_scale)
            scale_dot_raw[part] += (G_tile * at::mm(row_tile, col_tile.t())).sum().item<double>();
          if (need_rows) grad_rows.narrow(0, t.r0, t.nr).addmm_(G_tile, col_tile, /*beta=*/1, /*alpha=*/scale);
          if (need_cols) {
            at::Tensor col_grad = col_grad_buffer.narrow(0, 0, t.nc);
            col_grad.addmm_(G_tile.t(), row_tile, /*beta=*/col_grad_live ? 1 : 0, /*alpha=*/scale);
            col_grad_live = true;
          }
        }
        if (need_cols) {
          deposits.deposit(part, cb, col_grad_live, [&] {
            const Columns::ColTile& ct = cols.tiles[cb];
            grad_cols[ct.block].narrow(0, ct.local0, ct.nc).add_(col_grad_buffer.narrow(0, 0, ct.nc));
          });
        }
      }
      exact_lines.fetch_add(n_exact, std::memory_order_relaxed);
    } catch (...) {
      deposits.fail();
      throw;
    }
  });

  double grad_scale = 0;
  for (int64_t part = 0; part < parts.count; ++part)
    grad_scale += tiny_scale ? scale_dot_raw[part] : scale_dot[part] / scale;
  at::Tensor stats = at::empty({3}, at::kLong);
  stats[0] = n_rb * n_cb;
  stats[1] = skipped.load();
  stats[2] = exact_lines.load();
  return result(at::scalar_tensor(grad_scale, opts), stats);
}

void check_inputs(const at::Tensor& rows, const std::vector<at::Tensor>& cols, const at::Tensor& col_bias, int64_t Kq,
                  int64_t br, int64_t bc) {
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 2, "semclip_kernels._C: rows must be a [M, d] CPU tensor");
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble,
              "semclip_kernels._C computes in float32 or float64 (upcast half precision first)");
  TORCH_CHECK(rows.scalar_type() == col_bias.scalar_type(), "rows and col_bias must share one dtype");
  TORCH_CHECK(rows.is_contiguous() && col_bias.is_contiguous(), "inputs must be contiguous");
  int64_t K = 0;
  for (const at::Tensor& block : cols) {
    TORCH_CHECK(block.device().is_cpu() && block.dim() == 2 && block.size(1) == rows.size(1),
                "every column block must be a [K_j, d] CPU tensor with the rows' d");
    TORCH_CHECK(block.scalar_type() == rows.scalar_type() && block.is_contiguous(),
                "column blocks must be contiguous, of the rows' dtype");
    K += block.size(0);
  }
  TORCH_CHECK(col_bias.dim() == 1 && col_bias.size(0) == K, "col_bias must be [K]");
  TORCH_CHECK(0 <= Kq && Kq <= K, "need 0 <= n_query_cols <= K");
  TORCH_CHECK(br >= 1 && bc >= 1, "block sizes must be positive");
}

void check_positives(const std::vector<int64_t>& positives) {
  TORCH_CHECK(positives.size() % 2 == 0, "positives must be flat (first_col, per_row) pairs");
  for (size_t b = 0; b < positives.size(); b += 2)
    TORCH_CHECK(positives[b] >= 0 && positives[b + 1] >= 1, "positives: need first_col >= 0 and per_row >= 1");
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& rows, const std::vector<at::Tensor>& col_blocks, double scale,
                                const at::Tensor& col_bias, int64_t n_query_cols, int64_t block_rows,
                                int64_t block_cols, const std::vector<int64_t>& positives) {
  check_inputs(rows, col_blocks, col_bias, n_query_cols, block_rows, block_cols);
  check_positives(positives);
  at::NoGradGuard no_grad;
  const Columns cols(col_blocks, block_cols);
  if (rows.scalar_type() == at::kDouble)
    return forward_impl<double>(rows, cols, scale, col_bias, n_query_cols, block_rows, block_cols, positives);
  return forward_impl<float>(rows, cols, scale, col_bias, n_query_cols, block_rows, block_cols, positives);
}

std::vector<at::Tensor> backward(const at::Tensor& rows, const std::vector<at::Tensor>& col_blocks, double scale,
                                 const at::Tensor& col_bias, int64_t n_query_cols, const at::Tensor& row_lse,
                                 const at::Tensor& col_lse, const at::Tensor& col_mass_lb, const at::Tensor& tile_max,
                                 const at::Tensor& grad_row_lse, const at::Tensor& grad_col_lse, bool need_rows,
                                 bool need_cols, bool need_scale, int64_t block_rows, int64_t block_cols,
                                 double grad_filter_eps, const std::vector<int64_t>& positives) {
  check_inputs(rows, col_blocks, col_bias, n_query_cols, block_rows, block_cols);
  check_positives(positives);
  const Columns cols(col_blocks, block_cols);
  for (const at::Tensor* t : {&grad_row_lse, &grad_col_lse})
    TORCH_CHECK(t->scalar_type() == rows.scalar_type() && t->is_contiguous() && t->dim() == 1,
                "grad_row_lse and grad_col_lse must be contiguous 1-d tensors of the inputs' dtype");
  for (const at::Tensor* t : {&row_lse, &col_lse, &col_mass_lb})
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->dim() == 1,
                "row_lse, col_lse and col_mass_lb must be contiguous 1-d float64 tensors");
  TORCH_CHECK(row_lse.size(0) == rows.size(0) && grad_row_lse.size(0) == rows.size(0), "row statistics must be [M]");
  TORCH_CHECK(col_lse.size(0) == n_query_cols && grad_col_lse.size(0) == n_query_cols,
              "column statistics must be [n_query_cols]");
  TORCH_CHECK(col_mass_lb.numel() == 0 || col_mass_lb.size(0) == cols.K,
              "col_mass_lb must be empty or [K] lower bounds of every column's log row-softmax mass");
  TORCH_CHECK(tile_max.numel() == 0 ||
                  (tile_max.scalar_type() == rows.scalar_type() && tile_max.is_contiguous() &&
                   tile_max.numel() == ceil_div(rows.size(0), block_rows) * cols.n_tiles()),
              "tile_max must be empty or the forward's [row blocks, column blocks] tensor for these block sizes");
  at::NoGradGuard no_grad;
  if (rows.scalar_type() == at::kDouble)
    return backward_impl<double>(rows, cols, scale, col_bias, n_query_cols, row_lse, col_lse, col_mass_lb, tile_max,
                                 grad_row_lse, grad_col_lse, need_rows, need_cols, need_scale, block_rows,
                                 block_cols, grad_filter_eps, positives);
  return backward_impl<float>(rows, cols, scale, col_bias, n_query_cols, row_lse, col_lse, col_mass_lb, tile_max,
                              grad_row_lse, grad_col_lse, need_rows, need_cols, need_scale, block_rows, block_cols,
                              grad_filter_eps, positives);
}

bool has_avx2() {
#ifdef SEMCLIP_HAVE_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace semclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU kernel of the SemCLIP partitions (row and query-column log-sum-exps of tau*A*C^T)";
  m.def("forward", &semclip::forward, "(rows, cols, scale, col_bias, n_query_cols, block_rows, block_cols, "
        "positives: flat (first_col, per_row) bands left out of both partitions) -> "
        "[row_lse [M] (float64), col_lse [K] (float64, every column), tile_max (each tile's max logit)]; cols is a "
        "list of [K_j, d] blocks, tiled block by block");
  m.def("backward", &semclip::backward,
        "(rows, cols, scale, col_bias, n_query_cols, row_lse [M] f64, col_lse [Kq] f64, col_mass_lb [K] f64 or "
        "empty, tile_max or empty, grad_row_lse, grad_col_lse, need_rows, "
        "need_cols, need_scale, block_rows, block_cols, grad_filter_eps, positives) -> [grad_rows, grad_scale, stats, "
        "*grad_cols "
        "(one per block)] with "
        "stats = (tiles, skipped tiles, exactly recomputed rows+columns)]");
  m.def("has_avx2", &semclip::has_avx2, "whether the vectorized exp was compiled in");
  m.def("sigmoid_pairs", &semclip::sigmoid_pairs,
        "(rows, cols, scale, bias, col_weight [K], col_owner [K] int64, need_rows, need_cols, need_scale, "
        "need_bias, block_rows, block_cols, grad_filter_eps) -> [pair_sum (f64), grad_rows, grad_cols, "
        "grad_scale (f64), grad_bias (f64), stats = (tiles, skipped tiles)] (csrc/sigmoid_cpu.cpp)");
}
