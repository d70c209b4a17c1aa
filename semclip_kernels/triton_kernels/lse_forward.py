"""Forward kernel: row and query-column log-partitions of `S = τ·A·Cᵀ` without materializing S.

One program per [BLOCK_M, BLOCK_N] tile. It computes the tile's dots on chip
(looping over d), then reduces the tile both ways:

    row direction:    logsumexp_c (S_ic + bias_c)   over every column c of the tile
    column direction: logsumexp_i S_ic             over every row i, for every column

and merges each partial result into the global `row_lse` / `col_lse` with an exact
log-add-exp, under a per-row-block (per-column-block) lock, as Cut Cross-Entropy
does. A program holds at most one lock at a time, so there is no deadlock. Both
directions come from the same tile: the forward costs one M×K×d product.

The column direction runs on every column, not only the query columns: the
partitions of the other columns (negations) cost no product and give the
backward's gradient filter a lower bound on each column's softmax mass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tl_utils import acquire, grouped_tile_ids, logaddexp, logsumexp, release, tile_dots


@triton.jit
def lse_forward_kernel(
    rows_ptr,
    cols_ptr,
    scale_ptr,
    col_bias_ptr,
    row_lse_ptr,  # [n_rows], initialised to -inf
    col_lse_ptr,  # [n_cols], initialised to -inf
    row_locks_ptr,  # [cdiv(n_rows, BLOCK_M)] int32 zeros
    col_locks_ptr,  # [cdiv(n_cols, BLOCK_N)] int32 zeros
    n_rows,
    n_cols,
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

    # Column direction first: columns see the unbiased logits of the real rows.
    tile_col_lse = logsumexp(tl.where(row_in[:, None], logits, float("-inf")), axis=0)
    acquire(col_locks_ptr + col_block)
    col_lse = tl.load(col_lse_ptr + offs_n, mask=col_in, other=float("-inf"), cache_modifier=".cg")
    tl.store(col_lse_ptr + offs_n, logaddexp(col_lse, tile_col_lse), mask=col_in)
    release(col_locks_ptr + col_block)

    # Row direction: every real column, with its bias (log β on negations, or -inf).
    col_bias = tl.load(col_bias_ptr + offs_n, mask=col_in, other=float("-inf")).to(ACC_DTYPE)
    tile_row_lse = logsumexp(logits + col_bias[None, :], axis=1)
    acquire(row_locks_ptr + row_block)
    row_lse = tl.load(row_lse_ptr + offs_m, mask=row_in, other=float("-inf"), cache_modifier=".cg")
    tl.store(row_lse_ptr + offs_m, logaddexp(row_lse, tile_row_lse), mask=row_in)
    release(row_locks_ptr + row_block)
