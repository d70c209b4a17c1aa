"""Backward kernel: recompute each tile of `S` once and apply both directions' softmax weights.

For the tile's rows i and columns c (SPEC section 7):

    p_ic = exp(S_ic + bias_c − row_lse_i)                  row softmax (every column)
    q_ic = exp(S_ic − col_lse_c)          for c < Kq       column softmax (query columns)
    dS_ic = g_row_i · p_ic + g_col_c · q_ic
    grad_rows[i] += τ · Σ_c dS_ic C_c     grad_cols[c] += τ · Σ_i dS_ic A_i
    grad_τ       += Σ dS_ic · <A_i, C_c>

Products per tile: one to recompute the dots, one for grad_rows, one for
grad_cols (three M×K×d products for the whole backward). The gradient products
loop over d in BLOCK_D slices and accumulate into float32 (float64) buffers with
atomic adds, so any d works and no program holds more than one tile.

Gradient filtering (FILTER): the tile's products are skipped (one relaxed
atomic increments the skipped-tile counter instead) when every weight of the
tile, measured against the softmax mass its row or column gradient is made of,
is below `filter_eps`:

    p_ic               (row i's mass Σ_c p_ic is 1)
    q_ic               (query column c's mass Σ_i q_ic is 1)
    p_ic / mass_lb_c   (column c's row-direction mass Σ_i p_ic ≥ mass_lb_c =
                        exp(bias_c + col_lse_c − max_i row_lse_i), col_lse over all rows)

The third term protects columns that are nobody's query (negations): their
gradient is made only of row-softmax weights, which may all be tiny. The
factor 1/mass_lb_c is clamped at e^80 (so p_ic·factor cannot overflow float32):
a weight skipped because of the clamp is below e^-80·filter_eps ≈ 2e-35·filter_eps,
under float32's normal range. `filter_eps` is chosen
by the caller; its default keeps every row's and column's dropped mass below
float32's unit roundoff (see `backends/triton_fused.py`). The filter assumes
the upstream gradients g_row are of one magnitude (they are all 1/(2B) in the
loss); the caller turns it off when there is no g_row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tl_utils import dot_operand, grouped_tile_ids, tile_dots


@triton.jit
def backward_kernel(
    rows_ptr,
    cols_ptr,
    scale_ptr,
    col_bias_ptr,
    row_lse_ptr,
    col_lse_ptr,  # [n_cols]: column partitions over every row, query or not
    max_row_lse_ptr,  # [1]: max_i row_lse_i (for the filter's column-mass bound)
    grad_row_lse_ptr,
    grad_col_lse_ptr,
    grad_rows_ptr,  # [n_rows, dim] accumulator (zeros), contiguous
    grad_cols_ptr,  # [n_cols, dim] accumulator (zeros), contiguous
    grad_scale_ptr,  # [1] accumulator (zero)
    skipped_tiles_ptr,  # [1] int32 counter
    filter_eps,
    n_rows,
    n_cols,
    n_query_cols,
    dim,
    stride_row_m,
    stride_row_d,
    stride_col_n,
    stride_col_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_ROW_GRAD: tl.constexpr,  # g_row given (the row direction contributes)
    HAS_COL_GRAD: tl.constexpr,  # g_col given and Kq > 0 (the column direction contributes)
    NEED_GRAD_ROWS: tl.constexpr,
    NEED_GRAD_COLS: tl.constexpr,
    NEED_GRAD_SCALE: tl.constexpr,
    FILTER: tl.constexpr,
):
    row_block, col_block = grouped_tile_ids(n_rows, n_cols, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = offs_m < n_rows
    col_in = offs_n < n_cols

    dots = tile_dots(
        rows_ptr, cols_ptr, offs_m, offs_n, n_rows, n_cols, dim,
        stride_row_m, stride_row_d, stride_col_n, stride_col_d,
        BLOCK_M, BLOCK_N, BLOCK_D, ACC_DTYPE, UPCAST_DOT, DOT_PRECISION,
    )  # fmt: skip
    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    logits = dots * scale

    grad_logits = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    max_weight = tl.zeros((), dtype=ACC_DTYPE)
    if HAS_ROW_GRAD:
        col_bias = tl.load(col_bias_ptr + offs_n, mask=col_in, other=0.0).to(ACC_DTYPE)
        row_lse = tl.load(row_lse_ptr + offs_m, mask=row_in, other=0.0).to(ACC_DTYPE)
        g_row = tl.load(grad_row_lse_ptr + offs_m, mask=row_in, other=0.0).to(ACC_DTYPE)
        row_softmax = tl.exp(logits + col_bias[None, :] - row_lse[:, None])
        row_softmax = tl.where(row_in[:, None] & col_in[None, :], row_softmax, 0.0)
        grad_logits += g_row[:, None] * row_softmax
        max_weight = tl.maximum(max_weight, tl.max(row_softmax))
    col_lse = tl.load(col_lse_ptr + offs_n, mask=col_in, other=0.0).to(ACC_DTYPE)
    if FILTER:
        # 1 / (lower bound of column c's row-softmax mass), as a per-column factor.
        max_row_lse = tl.load(max_row_lse_ptr).to(ACC_DTYPE)
        log_inv_mass = tl.minimum(max_row_lse - col_bias - col_lse, 80.0)
        col_relative = row_softmax * tl.exp(log_inv_mass)[None, :]
        col_relative = tl.where(row_softmax > 0, col_relative, 0.0)
        max_weight = tl.maximum(max_weight, tl.max(col_relative))
    if HAS_COL_GRAD:
        is_query = offs_n < n_query_cols
        g_col = tl.load(grad_col_lse_ptr + offs_n, mask=is_query, other=0.0).to(ACC_DTYPE)
        col_softmax = tl.exp(logits - col_lse[None, :])
        col_softmax = tl.where(row_in[:, None] & is_query[None, :], col_softmax, 0.0)
        grad_logits += g_col[None, :] * col_softmax
        max_weight = tl.maximum(max_weight, tl.max(col_softmax))

    # NaN weights compare false and are never filtered: they reach the gradients.
    # (The caller sets FILTER only with HAS_ROW_GRAD, which defines row_softmax and col_bias.)
    skip = False
    if FILTER:
        skip = max_weight < filter_eps
    if skip:
        tl.atomic_add(skipped_tiles_ptr, 1, sem="relaxed")
    else:
        if NEED_GRAD_SCALE:
            tl.atomic_add(grad_scale_ptr, tl.sum(grad_logits * dots), sem="relaxed")
        if NEED_GRAD_ROWS or NEED_GRAD_COLS:
            # dL/d<A_i, C_c> = τ·dS_ic, in the operands' dtype (tensor cores) with float32 accumulation.
            grad_dots = dot_operand((grad_logits * scale).to(rows_ptr.dtype.element_ty), UPCAST_DOT)
            offs_d = tl.arange(0, BLOCK_D)
            for k in range(0, tl.cdiv(dim, BLOCK_D)):
                d_in = offs_d < dim - k * BLOCK_D
                offs_kd = k * BLOCK_D + offs_d
                if NEED_GRAD_ROWS:
                    col_ptrs = cols_ptr + offs_n[:, None].to(tl.int64) * stride_col_n + offs_kd[None, :] * stride_col_d
                    c = tl.load(col_ptrs, mask=col_in[:, None] & d_in[None, :], other=0.0)
                    grad_rows_part = tl.dot(
                        grad_dots, dot_operand(c, UPCAST_DOT), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE
                    )
                    out_ptrs = grad_rows_ptr + offs_m[:, None].to(tl.int64) * dim + offs_kd[None, :]
                    tl.atomic_add(out_ptrs, grad_rows_part, mask=row_in[:, None] & d_in[None, :], sem="relaxed")
                if NEED_GRAD_COLS:
                    row_ptrs = rows_ptr + offs_m[:, None].to(tl.int64) * stride_row_m + offs_kd[None, :] * stride_row_d
                    a = tl.load(row_ptrs, mask=row_in[:, None] & d_in[None, :], other=0.0)
                    grad_cols_part = tl.dot(
                        tl.trans(grad_dots), dot_operand(a, UPCAST_DOT), input_precision=DOT_PRECISION,
                        out_dtype=ACC_DTYPE,
                    )
                    out_ptrs = grad_cols_ptr + offs_n[:, None].to(tl.int64) * dim + offs_kd[None, :]
                    tl.atomic_add(out_ptrs, grad_cols_part, mask=col_in[:, None] & d_in[None, :], sem="relaxed")
