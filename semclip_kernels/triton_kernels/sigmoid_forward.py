"""The sigmoid pair sum (docs/contract.md §8, docs/siglip.md) and its gradients: two kernels, no atomics.

    pair_sum = Σ_i Σ_c a_c·softplus(x_ic),   x_ic = s_ic·(τ·<A_i, C_c> + b),   s_ic = −1 if owner_c = i else +1
    dS_ic = a_c·s_ic·σ(x_ic)   (local to the pair: no statistic of a row or column)
    grad_A = τ·dS·C,   grad_C = τ·dSᵀ·A,   grad_τ = Σ dS ⊙ A·Cᵀ,   grad_b = Σ dS

1. `sigmoid_rows_kernel`, one program per row block, looping over the column tiles in order: the tile's
   logits (`tl_utils.tile_logits`), the weighted softplus summed per row, and, when asked, `grad_A` (the
   block's rows are this program's alone: read-modify-write of a float32 buffer, d in BLOCK_D slices) and
   the per-row partials of `grad_τ` and `grad_b`. Per-row partials go to `[M]` buffers that the host sums
   in float64, in order. 1 product, 2 with `grad_A`.
2. `sigmoid_cols_kernel` (only when `grad_C` is asked), one program per column block, looping over the
   row tiles in order: recomputes the same tiles (same helper, same tile: bitwise the same logits, so
   the same filter decisions) and accumulates `grad_C`. 2 products.

Every output element has one owner program: nothing to lock, identical inputs give identical bits.

One exponential per pair serves the loss and the gradient: `e = exp(−|x|)`, `softplus(x) = max(x, 0) +
log1p(e)`, `σ(x) = (x ≥ 0 ? 1 : e)/(1 + e)`. `log1p(e)` is `log(u)·e/(u − 1)` with `u = 1 + e` (exact
to a few ulps even where `u` rounds to 1), so pairs far beyond `x ≈ 17` still count.

16-bit operands: `dS` goes to the tensor cores in the features' dtype, multiplied by a power of two
`op_scale` that puts the largest column weight near 2^14 (float16's smallest subnormal is 6e-8; `dS`
values are `a·σ` and often far smaller); the host multiplies the float32 accumulators by `τ/op_scale`.

Gradient filter: a tile whose every `a·σ(x)` is below `filter_eps` skips its gradient products (a NaN
never compares below, so a tile with one is kept); its losses are always summed.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import Launch, TileConfig, tile_launch
from .tl_utils import dot_operand, tile_logits


@triton.jit
def _pair_terms(dots, scale, bias, weight, owner, offs_m, row_in, col_in):
    """`(weighted softplus, dS)` of a tile: masked entries (padding rows/columns) are exactly 0."""
    logits = dots * scale + bias
    positive = owner[None, :] == offs_m[:, None]
    x = tl.where(positive, -logits, logits)
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    denom = u - 1.0
    log1p_e = tl.where(denom == 0.0, e, tl.log(u) * (e / tl.where(denom == 0.0, 1.0, denom)))
    valid = row_in[:, None] & col_in[None, :]
    loss = tl.where(valid, weight[None, :] * (tl.maximum(x, 0.0) + log1p_e), 0.0)
    sig = tl.where(x >= 0, 1.0, e) / u
    grad = tl.where(valid, weight[None, :] * sig, 0.0)
    return loss, grad, positive


@triton.jit
def _kept(grad_mag, filter_eps, FILTER: tl.constexpr):
    """Whether a tile's gradient products run: some `a·σ` at or above the threshold, or a NaN."""
    if FILTER:
        return tl.sum(((grad_mag >= filter_eps) | (grad_mag != grad_mag)).to(tl.int32)) > 0
    else:
        return True


@triton.jit
def _add_product(
    out_ptr, offs_out, out_in, weights, src_ptr, offs_src, src_in, dim, stride_src, stride_src_d,
    BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """`out[offs_out] += weights @ src[offs_src]`, every feature, BLOCK_D at a time (read-modify-write).

    `out` is a contiguous `[*, dim]` accumulator whose `offs_out` lines only this program writes; `weights`
    is the `[len(offs_out), len(offs_src)]` dot operand. Lines outside `out_in` / `src_in` are not touched.
    """
    offs_d = tl.arange(0, BLOCK_D)
    out_ptrs = out_ptr + offs_out[:, None].to(tl.int64) * dim + offs_d[None, :]
    src_ptrs = src_ptr + offs_src[:, None].to(tl.int64) * stride_src + offs_d[None, :] * stride_src_d
    for k in range(0, tl.cdiv(dim, BLOCK_D)):
        d_in = offs_d[None, :] < dim - k * BLOCK_D
        src = tl.load(src_ptrs, mask=src_in[:, None] & d_in, other=0.0)
        acc = tl.load(out_ptrs, mask=out_in[:, None] & d_in, other=0.0)
        acc = tl.dot(weights, dot_operand(src, UPCAST_DOT), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        tl.store(out_ptrs, acc, mask=out_in[:, None] & d_in)
        out_ptrs += BLOCK_D
        src_ptrs += BLOCK_D * stride_src_d
    # The next tile reads these entries back, possibly from other threads of the program
    # (replicated layouts store from one replica): order the store before them.
    tl.debug_barrier()


@triton.jit
def sigmoid_rows_kernel(
    rows_ptr,
    cols_ptr,
    scale_bias_ptr,  # [2]: τ, b in the statistics dtype
    weight_ptr,  # [K] column weights a_c
    owner_ptr,  # [K] int64: the row each column is a positive of (−1: none)
    row_loss_ptr,  # [M]: Σ_c a_c·softplus(x_ic)
    row_dscale_ptr,  # [M]: Σ_c dS_ic·<A_i, C_c>        (NEED_SCALE)
    row_dbias_ptr,  # [M]: Σ_c dS_ic                     (NEED_SCALE)
    grad_rows_ptr,  # [M, d] float32 (float64), zeros: Σ_c op_scale·dS_ic·C_c   (NEED_ROWS)
    skipped_ptr,  # [n_row_blocks] int32: tiles of this row block the filter skipped
    n_rows,
    n_cols,
    dim,
    op_scale,
    filter_eps,
    stride_row_m,
    stride_row_d,
    stride_col_n,
    stride_col_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NEED_ROWS: tl.constexpr,
    NEED_SCALE: tl.constexpr,
    FILTER: tl.constexpr,
):
    row_block = tl.program_id(axis=0)
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < n_rows
    scale = tl.load(scale_bias_ptr).to(ACC_DTYPE)
    bias = tl.load(scale_bias_ptr + 1).to(ACC_DTYPE)
    row_loss = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    row_dscale = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    row_dbias = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    skipped = 0
    for col_block in range(0, tl.cdiv(n_cols, BLOCK_N)):
        offs_n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_in = offs_n < n_cols
        dots, _ = tile_logits(
            rows_ptr, cols_ptr, scale, offs_m, offs_n, n_rows, n_cols, dim,
            stride_row_m, stride_row_d, stride_col_n, stride_col_d,
            BLOCK_D, ACC_DTYPE, UPCAST_DOT, DOT_PRECISION,
        )  # fmt: skip
        weight = tl.load(weight_ptr + offs_n, mask=col_in, other=0.0).to(ACC_DTYPE)
        owner = tl.load(owner_ptr + offs_n, mask=col_in, other=-1)
        loss, grad_mag, positive = _pair_terms(dots, scale, bias, weight, owner, offs_m, row_in, col_in)
        row_loss += tl.sum(loss, axis=1)
        if NEED_ROWS or NEED_SCALE:
            if _kept(grad_mag, filter_eps, FILTER):
                grad = tl.where(positive, -grad_mag, grad_mag)
                if NEED_SCALE:
                    row_dscale += tl.sum(grad * dots, axis=1)
                    row_dbias += tl.sum(grad, axis=1)
                if NEED_ROWS:
                    grad_op = dot_operand((grad * op_scale).to(rows_ptr.dtype.element_ty), UPCAST_DOT)
                    _add_product(grad_rows_ptr, offs_m, row_in, grad_op, cols_ptr, offs_n, col_in, dim,
                                 stride_col_n, stride_col_d, BLOCK_D, ACC_DTYPE, UPCAST_DOT, DOT_PRECISION)  # fmt: skip
            else:
                skipped += 1
    tl.store(row_loss_ptr + offs_m, row_loss, mask=row_in)
    if NEED_SCALE:
        tl.store(row_dscale_ptr + offs_m, row_dscale, mask=row_in)
        tl.store(row_dbias_ptr + offs_m, row_dbias, mask=row_in)
    tl.store(skipped_ptr + row_block, skipped)


@triton.jit
def sigmoid_cols_kernel(
    rows_ptr,
    cols_ptr,
    scale_bias_ptr,
    weight_ptr,
    owner_ptr,
    grad_cols_ptr,  # [K, d] float32 (float64), zeros: Σ_i op_scale·dS_ic·A_i
    skipped_ptr,  # [n_col_blocks] int32
    n_rows,
    n_cols,
    dim,
    op_scale,
    filter_eps,
    stride_row_m,
    stride_row_d,
    stride_col_n,
    stride_col_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FILTER: tl.constexpr,
):
    col_block = tl.program_id(axis=0)
    offs_n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = offs_n < n_cols
    scale = tl.load(scale_bias_ptr).to(ACC_DTYPE)
    bias = tl.load(scale_bias_ptr + 1).to(ACC_DTYPE)
    weight = tl.load(weight_ptr + offs_n, mask=col_in, other=0.0).to(ACC_DTYPE)
    owner = tl.load(owner_ptr + offs_n, mask=col_in, other=-1)
    skipped = 0
    for row_block in range(0, tl.cdiv(n_rows, BLOCK_M)):
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = offs_m < n_rows
        dots, _ = tile_logits(
            rows_ptr, cols_ptr, scale, offs_m, offs_n, n_rows, n_cols, dim,
            stride_row_m, stride_row_d, stride_col_n, stride_col_d,
            BLOCK_D, ACC_DTYPE, UPCAST_DOT, DOT_PRECISION,
        )  # fmt: skip
        _, grad_mag, positive = _pair_terms(dots, scale, bias, weight, owner, offs_m, row_in, col_in)
        if _kept(grad_mag, filter_eps, FILTER):
            grad = tl.where(positive, -grad_mag, grad_mag)
            grad_op = dot_operand(tl.trans((grad * op_scale).to(rows_ptr.dtype.element_ty)), UPCAST_DOT)
            _add_product(grad_cols_ptr, offs_n, col_in, grad_op, rows_ptr, offs_m, row_in, dim,
                         stride_row_m, stride_row_d, BLOCK_D, ACC_DTYPE, UPCAST_DOT, DOT_PRECISION)  # fmt: skip
        else:
            skipped += 1
    tl.store(skipped_ptr + col_block, skipped)


def rows_launch(tile: TileConfig, dtype: torch.dtype, precision: str, need_rows: bool, need_scale: bool,
                filter_: bool) -> Launch:  # fmt: skip
    """The launch of `sigmoid_rows_kernel`."""
    return tile_launch(tile, dtype, precision, NEED_ROWS=need_rows, NEED_SCALE=need_scale, FILTER=filter_)


def cols_launch(tile: TileConfig, dtype: torch.dtype, precision: str, filter_: bool) -> Launch:
    """The launch of `sigmoid_cols_kernel`."""
    return tile_launch(tile, dtype, precision, FILTER=filter_)


def operand_scale(col_weight: torch.Tensor, dtype: torch.dtype) -> float:
    """The power of two `dS` is multiplied by before its 16-bit cast (1 for float32/float64)."""
    if dtype.itemsize > 2 or col_weight.numel() == 0:
        return 1.0
    top = float(col_weight.abs().max())
    if not math.isfinite(top) or top == 0.0:
        return 1.0
    return 2.0 ** (14 - math.ceil(math.log2(top)))


def sigmoid_pairs(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale_bias: torch.Tensor,
    col_weight: torch.Tensor,
    col_owner: torch.Tensor,
    needs: tuple[bool, bool, bool],
    tile: TileConfig,
    precision: str,
    filter_eps: float,
) -> tuple:
    """`(row_loss [M], grad_rows, grad_cols, row_dscale [M], row_dbias [M], (tiles, skipped))`.

    `needs = (rows, cols, scale_and_bias)`; the gradients not asked for are None. `scale_bias` [2] and
    `col_weight` [K] are in the statistics dtype (float32, float64 for float64 features), which the per-row
    partials and the feature gradients (already multiplied by τ) take.
    """
    need_rows, need_cols, need_scale = needs
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    stat = scale_bias.dtype
    device = rows.device
    n_row_blocks, n_col_blocks = triton.cdiv(n_rows, tile.block_m), triton.cdiv(n_cols, tile.block_n)
    op_scale = operand_scale(col_weight, rows.dtype)
    filter_ = filter_eps > 0
    row_loss = torch.zeros(n_rows, dtype=stat, device=device)
    row_dscale = torch.zeros(n_rows if need_scale else 1, dtype=stat, device=device)
    row_dbias = torch.zeros_like(row_dscale)
    grad_rows = torch.zeros((n_rows, dim) if need_rows else (1, 1), dtype=stat, device=device)
    row_skipped = torch.zeros(max(n_row_blocks, 1), dtype=torch.int32, device=device)
    common = (n_rows, n_cols, dim, op_scale, filter_eps,
              rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1))  # fmt: skip
    if n_rows and n_cols:
        sigmoid_rows_kernel[(n_row_blocks,)](
            rows, cols, scale_bias, col_weight, col_owner, row_loss, row_dscale, row_dbias, grad_rows, row_skipped,
            *common, **rows_launch(tile, rows.dtype, precision, need_rows, need_scale, filter_).kwargs(),
        )  # fmt: skip
    grad_cols, skipped = None, int(row_skipped.sum())
    if need_cols:
        grad_cols = torch.zeros((n_cols, dim), dtype=stat, device=device)
        col_skipped = torch.zeros(max(n_col_blocks, 1), dtype=torch.int32, device=device)
        if n_rows and n_cols:
            sigmoid_cols_kernel[(n_col_blocks,)](
                rows, cols, scale_bias, col_weight, col_owner, grad_cols, col_skipped,
                *common, **cols_launch(tile, rows.dtype, precision, filter_).kwargs(),
            )  # fmt: skip
        if not (need_rows or need_scale):
            skipped = int(col_skipped.sum())
        grad_cols = grad_cols.mul_(scale_bias[0] / op_scale)
    if need_rows:
        grad_rows = grad_rows.mul_(scale_bias[0] / op_scale)
    tiles = n_row_blocks * n_col_blocks if any(needs) else 0
    return (
        row_loss,
        grad_rows if need_rows else None,
        grad_cols,
        row_dscale if need_scale else None,
        row_dbias if need_scale else None,
        (tiles, skipped if any(needs) else 0),
    )
