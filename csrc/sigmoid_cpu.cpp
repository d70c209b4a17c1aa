// Fused CPU kernel of the sigmoid pair loss (docs/contract.md §8):
//
//   pair_sum = Σ_i Σ_c a_c·softplus(s_ic·l_ic),   l = τ·A·Cᵀ + b,   s_ic = −1 where owner_c = i, else +1
//
// and, in the same pass, its gradients: each pair's gradient g_ic = s_ic·a_c·σ(s_ic·l_ic) is local (no row
// or column statistic), so a tile's gradient products follow its elementwise pass at once:
//
//   grad_A[r] += τ·G·C[c],   grad_C[c] += τ·Gᵀ·A[r],   dτ = Σ G ⊙ (A·Cᵀ) = Σ G ⊙ S / τ,   db = Σ G
//
// Work is split over row blocks as in semclip_cpu.cpp (cpu_parts.h: one part per thread, its rows' gradients
// its own; column gradients deposited in part order, so results depend only on the thread count). Each tile
// of S = τ·A·Cᵀ (block_rows × block_cols) is one BLAS call on views of A and C; nothing of M × K exists.
// Gradient filtering: a tile whose every |g| is below eps (and whose loss is finite: a NaN is never
// filtered) skips its two gradient products.
#include "sigmoid_cpu.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "cpu_parts.h"
#include "sigmoid_math.h"

namespace semclip {
namespace {

template <typename T>
std::vector<at::Tensor> sigmoid_impl(const at::Tensor& rows, const at::Tensor& cols, double scale, double bias,
                                     const at::Tensor& col_weight, const at::Tensor& col_owner, bool need_rows,
                                     bool need_cols, bool need_scale, bool need_bias, int64_t br, int64_t bc,
                                     double eps) {
  const int64_t M = rows.size(0), K = cols.size(0), d = rows.size(1);
  const auto opts = rows.options();
  const int64_t n_rb = ceil_div(M, br), n_cb = ceil_div(K, bc);
  const bool need_grad = need_rows || need_cols || need_scale || need_bias;
  at::Tensor grad_rows = need_rows ? at::zeros_like(rows) : at::Tensor();
  at::Tensor grad_cols = need_cols ? at::zeros_like(cols) : at::Tensor();
  const T* w = col_weight.data_ptr<T>();
  const int64_t* owner = col_owner.data_ptr<int64_t>();

  const Parts parts(n_rb);
  // Below 1e-30, τ·dS·C (the feature gradients dτ is read off) falls into float32's subnormals, which flush to
  // zero: dτ then takes the products themselves, as the softmax kernel does.
  const bool tiny_scale = std::abs(scale) < 1e-30;
  std::vector<double> loss(parts.count, 0.0), grad_dot(parts.count, 0.0), grad_dot_raw(parts.count, 0.0),
      grad_sum(parts.count, 0.0);
  std::atomic<int64_t> skipped{0};
  ColumnDeposits deposits(parts.count, need_cols ? n_cb : 0);
  parts.run([&](int64_t part) {
    try {
      const FlushDenormals flush_denormals;
      at::Tensor s_buffer = at::empty({br * bc}, opts);
      at::Tensor g_buffer = need_grad ? at::empty({br * bc}, opts) : at::Tensor();
      at::Tensor col_grad_buffer = need_cols ? at::empty({bc, d}, opts) : at::Tensor();
      std::vector<T> signs(bc, T(1));
      std::vector<int64_t> first_positive(br + 1), positive_cols;
      for (int64_t cb = 0; cb < n_cb; ++cb) {
        const int64_t c0 = cb * bc, nc = std::min(bc, K - c0);
        const at::Tensor col_tile = cols.narrow(0, c0, nc);
        bool col_grad_live = false;  // whether col_grad_buffer holds this column block's sum yet
        for (int64_t rb = parts.begin(part); rb < parts.end(part); ++rb) {
          const int64_t r0 = rb * br, nr = std::min(br, M - r0);
          const at::Tensor row_tile = rows.narrow(0, r0, nr);
          at::Tensor S_tile = s_buffer.narrow(0, 0, nr * nc).view({nr, nc});
          // beta = 0: the buffer's old content is ignored (not even NaNs propagate).
          at::addmm_out(S_tile, S_tile, row_tile, col_tile.t(), /*beta=*/0, /*alpha=*/scale);
          const T* S = S_tile.data_ptr<T>();
          T* G = need_grad ? g_buffer.data_ptr<T>() : nullptr;
          // The tile's positives, grouped by row (a counting sort of the columns owned by these rows).
          std::fill(first_positive.begin(), first_positive.begin() + nr + 1, 0);
          for (int64_t c = 0; c < nc; ++c) {
            const int64_t o = owner[c0 + c] - r0;
            if (0 <= o && o < nr) ++first_positive[o + 1];
          }
          for (int64_t i = 0; i < nr; ++i) first_positive[i + 1] += first_positive[i];
          positive_cols.resize(first_positive[nr]);
          {
            std::vector<int64_t> fill(first_positive.begin(), first_positive.begin() + nr);
            for (int64_t c = 0; c < nc; ++c) {
              const int64_t o = owner[c0 + c] - r0;
              if (0 <= o && o < nr) positive_cols[fill[o]++] = c;
            }
          }
          double tile_loss = 0, tile_dot = 0, tile_sum = 0, tile_max = 0;
          for (int64_t i = 0; i < nr; ++i) {
            for (int64_t k = first_positive[i]; k < first_positive[i + 1]; ++k) signs[positive_cols[k]] = T(-1);
            const SigmoidRowSums sums =
                sigmoid_row<T>(S + i * nc, w + c0, signs.data(), nc, T(bias), G ? G + i * nc : nullptr);
            for (int64_t k = first_positive[i]; k < first_positive[i + 1]; ++k) signs[positive_cols[k]] = T(1);
            tile_loss += sums.loss;
            tile_dot += sums.grad_dot;
            tile_sum += sums.grad_sum;
            tile_max = std::max(tile_max, sums.grad_max);
          }
          loss[part] += tile_loss;
          if (!need_grad) continue;
          if (eps > 0 && tile_max < eps && std::isfinite(tile_loss)) {
            skipped.fetch_add(1, std::memory_order_relaxed);
            continue;
          }
          grad_dot[part] += tile_dot;
          grad_sum[part] += tile_sum;
          const at::Tensor G_tile = g_buffer.narrow(0, 0, nr * nc).view({nr, nc});
          if (need_scale && tiny_scale) grad_dot_raw[part] += (G_tile * at::mm(row_tile, col_tile.t())).sum().item<double>();
          if (need_rows) grad_rows.narrow(0, r0, nr).addmm_(G_tile, col_tile, /*beta=*/1, /*alpha=*/scale);
          if (need_cols) {
            at::Tensor col_grad = col_grad_buffer.narrow(0, 0, nc);
            col_grad.addmm_(G_tile.t(), row_tile, /*beta=*/col_grad_live ? 1 : 0, /*alpha=*/scale);
            col_grad_live = true;
          }
        }
        if (need_cols) {
          deposits.deposit(part, cb, col_grad_live,
                           [&] { grad_cols.narrow(0, c0, nc).add_(col_grad_buffer.narrow(0, 0, nc)); });
        }
      }
    } catch (...) {
      deposits.fail();
      throw;
    }
  });

  double total = 0, dot = 0, sum = 0;
  for (int64_t part = 0; part < parts.count; ++part) {  // in part order: deterministic
    total += loss[part];
    dot += tiny_scale ? grad_dot_raw[part] : grad_dot[part] / scale;
    sum += grad_sum[part];
  }
  const auto f64 = opts.dtype(at::kDouble);
  at::Tensor stats = at::empty({2}, at::kLong);
  stats[0] = need_grad ? n_rb * n_cb : 0;
  stats[1] = skipped.load();
  return {at::scalar_tensor(total, f64), grad_rows, grad_cols,
          need_scale ? at::scalar_tensor(dot, f64) : at::Tensor(), need_bias ? at::scalar_tensor(sum, f64) : at::Tensor(),
          stats};
}

}  // namespace

std::vector<at::Tensor> sigmoid_pairs(const at::Tensor& rows, const at::Tensor& cols, double scale, double bias,
                                      const at::Tensor& col_weight, const at::Tensor& col_owner, bool need_rows,
                                      bool need_cols, bool need_scale, bool need_bias, int64_t block_rows,
                                      int64_t block_cols, double grad_filter_eps) {
  TORCH_CHECK(rows.device().is_cpu() && cols.device().is_cpu(), "semclip_kernels._C runs on CPU tensors");
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2 && rows.size(1) == cols.size(1), "rows [M, d], cols [K, d]");
  TORCH_CHECK(rows.scalar_type() == cols.scalar_type() && rows.scalar_type() == col_weight.scalar_type(),
              "rows, cols and col_weight must share one dtype");
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble,
              "semclip_kernels._C computes in float32 or float64 (upcast half precision first)");
  TORCH_CHECK(rows.is_contiguous() && cols.is_contiguous() && col_weight.is_contiguous() && col_owner.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(col_weight.dim() == 1 && col_weight.size(0) == cols.size(0), "col_weight must be [K]");
  TORCH_CHECK(col_owner.scalar_type() == at::kLong && col_owner.dim() == 1 && col_owner.size(0) == cols.size(0),
              "col_owner must be [K] int64");
  TORCH_CHECK(block_rows >= 1 && block_cols >= 1, "block sizes must be positive");
  at::NoGradGuard no_grad;
  if (rows.scalar_type() == at::kDouble)
    return sigmoid_impl<double>(rows, cols, scale, bias, col_weight, col_owner, need_rows, need_cols, need_scale,
                                need_bias, block_rows, block_cols, grad_filter_eps);
  return sigmoid_impl<float>(rows, cols, scale, bias, col_weight, col_owner, need_rows, need_cols, need_scale,
                             need_bias, block_rows, block_cols, grad_filter_eps);
}

}  // namespace semclip
