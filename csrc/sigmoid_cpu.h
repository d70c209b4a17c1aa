// The fused CPU kernel of the sigmoid pair loss (docs/contract.md §8), bound into semclip_kernels._C.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace semclip {

// pair_sum = Σ_i Σ_c a_c·softplus(s_ic·(τ·<A_i, C_c> + b)), s_ic = −1 where owner_c = i, else +1; and, for
// the inputs asked for, its gradients. Returns {pair_sum (0-dim f64), grad_rows, grad_cols, grad_scale (0-dim
// f64), grad_bias (0-dim f64), stats [2] int64 = (tiles, skipped tiles)}; undefined tensors where not needed.
std::vector<at::Tensor> sigmoid_pairs(const at::Tensor& rows, const at::Tensor& cols, double scale, double bias,
                                      const at::Tensor& col_weight, const at::Tensor& col_owner, bool need_rows,
                                      bool need_cols, bool need_scale, bool need_bias, int64_t block_rows,
                                      int64_t block_cols, double grad_filter_eps);

}  // namespace semclip
