"""Small `@triton.jit` helpers shared by the kernels: tile order, the tile logits, running statistics."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton decides at decoration time whether `@triton.jit` functions run compiled or
# through the interpreter, so the kernels remember which one they are.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def grouped_tile_ids(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to a (row block, column block) tile.

    Consecutive programs walk GROUP_M row blocks down one column block before moving
    right, so a column tile is reused from L2 by GROUP_M programs in a row.
    """
    pid = tl.program_id(axis=0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    n_col_blocks = tl.cdiv(n_cols, BLOCK_N)
    tiles_per_group = GROUP_M * n_col_blocks
    first_row_block = (pid // tiles_per_group) * GROUP_M
    group_rows = min(n_row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (pid % tiles_per_group) % group_rows
    col_block = (pid % tiles_per_group) // group_rows
    return row_block, col_block


@triton.jit
def dot_operand(x, UPCAST_DOT: tl.constexpr):
    """A dot operand as the kernel feeds it to `tl.dot`.

    UPCAST_DOT is set only under TRITON_INTERPRET: the interpreter multiplies
    bfloat16 bit patterns as integers (triton#11584), so 16-bit operands go to
    float32 there. Compiled kernels keep 16-bit operands for the tensor cores.
    """
    if UPCAST_DOT:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def tile_logits(
    rows_ptr,
    cols_ptr,
    scale,
    offs_m,
    offs_n,
    n_rows,
    n_cols,
    dim,
    stride_row_m,
    stride_row_d,
    stride_col_n,
    stride_col_d,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """`(dots, logits)` of the tile: `A[offs_m]·C[offs_n]ᵀ` and `scale·dots`, [len(offs_m), len(offs_n)] each
    (the offsets give the tile's shape).

    The one place logits are computed: the forward and the backward call it with the same
    tile configuration, so the backward's recomputed logits are bitwise the forward's.
    Loops over d in BLOCK_D slices. Out-of-range rows, columns and features load as
    zeros, so any d works and ragged edges give dots of 0 (the callers mask them out).
    """
    offs_d = tl.arange(0, BLOCK_D)
    row_ptrs = rows_ptr + offs_m[:, None].to(tl.int64) * stride_row_m + offs_d[None, :] * stride_row_d
    # Columns are read as a [BLOCK_D, BLOCK_N] slice of Cᵀ.
    col_ptrs = cols_ptr + offs_n[None, :].to(tl.int64) * stride_col_n + offs_d[:, None] * stride_col_d
    row_in = offs_m[:, None] < n_rows
    col_in = offs_n[None, :] < n_cols
    dots = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(dim, BLOCK_D)):
        d_left = dim - k * BLOCK_D
        a = tl.load(row_ptrs, mask=row_in & (offs_d[None, :] < d_left), other=0.0)
        c = tl.load(col_ptrs, mask=col_in & (offs_d[:, None] < d_left), other=0.0)
        dots = tl.dot(
            dot_operand(a, UPCAST_DOT),
            dot_operand(c, UPCAST_DOT),
            dots,
            input_precision=DOT_PRECISION,
            out_dtype=ACC_DTYPE,
        )
        row_ptrs += BLOCK_D * stride_row_d
        col_ptrs += BLOCK_D * stride_col_d
    return dots, dots * scale


@triton.jit
def band_entries(offs_m, offs_n, first_col, per_row):
    """`[BLOCK_M, BLOCK_N]`: whether entry (i, c) is in the band `c = first_col + i·per_row + p`, `p < per_row`
    (`Problem.positives`; int32 offsets: a band has M·per_row < 2^31 entries)."""
    slot = offs_n[None, :] - first_col - offs_m[:, None] * per_row
    return (slot >= 0) & (slot < per_row)


@triton.jit
def finite_or_zero(x):
    """Replace -inf (an empty log-sum-exp) by 0 so that `y - x` never forms `-inf - -inf`."""
    return tl.where(x == float("-inf"), 0.0, x)


@triton.jit
def online_update(running_max, running_sum, x, axis: tl.constexpr):
    """Fold the tile `x` into running (max, Σ exp(· − max)) statistics along `axis` (one exp per element).

    All -inf stays (-inf, 0), never NaN: the shift of an empty line is 0.
    """
    new_max = tl.maximum(running_max, tl.max(x, axis=axis))
    shift = finite_or_zero(new_max)
    if axis == 0:
        tile_sum = tl.sum(tl.exp(x - shift[None, :]), axis=0)
    else:
        tile_sum = tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return new_max, running_sum * tl.exp(running_max - shift) + tile_sum
