"""Gradient GEMMs over one dS panel: one program owns each output tile, so nothing is added atomically.

The panel holds `dS·2^e` for the columns `[first_col, first_col + panel_blocks·BLOCK_N)`
of every row, as `[BLOCK_M, BLOCK_N]` tiles (see `backward.py`). With `factor = τ·2^-e`:

    grad_rows[i]  += factor · Σ_{kept tiles of row block i}    dS_tile  @ C_tile     (every panel)
    grad_cols[c]   = factor · Σ_{kept tiles of column block c} dS_tileᵀ @ A_tile     (one panel)

Each program reduces its tiles in a fixed order (ascending block index), in float32
(float64), and writes its output tile with plain stores; panels run one after another,
so `grad_rows` accumulates in a fixed order too. With `SPARSE`, a program visits only
the kept tiles of its row (column) block, listed by the launcher: the work is proportional
to the kept tiles and the loop has no branch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import GemmConfig, TileConfig, gemm_launch
from .tl_utils import dot_operand


@triton.jit
def grad_rows_kernel(
    panel_ptr,  # [n_rows, panel_blocks·BLOCK_N] dS·2^e in the operand dtype
    cols_ptr,
    factor_ptr,  # [1] τ·2^-e
    grad_rows_ptr,  # [n_rows, dim] float32 (float64) accumulator, contiguous
    kept_ptr,  # [n_row_blocks, panel_blocks] int32: kept panel blocks of each row block, first (SPARSE)
    kept_count_ptr,  # [n_row_blocks] int32 (SPARSE)
    n_rows,
    n_cols,
    dim,
    first_col,
    panel_blocks,
    stride_panel,
    stride_col_n,
    stride_col_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_OUT_D: tl.constexpr,
    BLOCK_K: tl.constexpr,  # reduction chunk of one dot (a divisor of the tile side)
    ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPARSE: tl.constexpr,
):
    # Consecutive programs share a row block (its dS tiles stay in L2) and walk d.
    pid = tl.program_id(axis=0)
    n_d_blocks = tl.cdiv(dim, BLOCK_OUT_D)
    row_block = pid // n_d_blocks
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (pid % n_d_blocks) * BLOCK_OUT_D + tl.arange(0, BLOCK_OUT_D)
    row_in = offs_m < n_rows
    d_in = offs_d < dim
    steps = panel_blocks
    if SPARSE:
        steps = tl.load(kept_count_ptr + row_block)
    acc = tl.zeros((BLOCK_M, BLOCK_OUT_D), dtype=ACC_DTYPE)
    for step in range(0, steps):
        panel_block = step
        if SPARSE:
            panel_block = tl.load(kept_ptr + row_block * panel_blocks + step)
        for chunk in tl.static_range(0, BLOCK_N, BLOCK_K):  # the tile's columns, BLOCK_K at a time
            offs_p = panel_block * BLOCK_N + chunk + tl.arange(0, BLOCK_K)
            offs_n = first_col + offs_p
            ds = tl.load(panel_ptr + offs_m[:, None].to(tl.int64) * stride_panel + offs_p[None, :],
                         mask=row_in[:, None], other=0.0)  # fmt: skip
            c = tl.load(cols_ptr + offs_n[:, None].to(tl.int64) * stride_col_n + offs_d[None, :] * stride_col_d,
                        mask=(offs_n < n_cols)[:, None] & d_in[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(dot_operand(ds, UPCAST_DOT), dot_operand(c, UPCAST_DOT), acc,
                         input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # fmt: skip
    out_ptrs = grad_rows_ptr + offs_m[:, None].to(tl.int64) * dim + offs_d[None, :]
    out_mask = row_in[:, None] & d_in[None, :]
    factor = tl.load(factor_ptr).to(ACC_DTYPE)
    tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + acc * factor, mask=out_mask)


@triton.jit
def grad_cols_kernel(
    panel_ptr,  # [n_rows, panel_blocks·BLOCK_N]
    rows_ptr,
    factor_ptr,
    grad_cols_ptr,  # [n_cols, dim] in the output dtype, contiguous: this panel's rows are written once
    kept_ptr,  # [panel_blocks, n_row_blocks] int32: kept row blocks of each panel block, first (SPARSE)
    kept_count_ptr,  # [panel_blocks] int32 (SPARSE)
    n_rows,
    n_cols,
    dim,
    first_col,
    stride_panel,
    stride_row_m,
    stride_row_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_OUT_D: tl.constexpr,
    BLOCK_K: tl.constexpr,  # reduction chunk of one dot (a divisor of the tile side)
    ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPARSE: tl.constexpr,
):
    pid = tl.program_id(axis=0)
    n_d_blocks = tl.cdiv(dim, BLOCK_OUT_D)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    panel_block = pid // n_d_blocks
    offs_p = panel_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = first_col + offs_p
    offs_d = (pid % n_d_blocks) * BLOCK_OUT_D + tl.arange(0, BLOCK_OUT_D)
    d_in = offs_d < dim
    steps = n_row_blocks
    if SPARSE:
        steps = tl.load(kept_count_ptr + panel_block)
    acc = tl.zeros((BLOCK_N, BLOCK_OUT_D), dtype=ACC_DTYPE)
    for step in range(0, steps):
        row_block = step
        if SPARSE:
            row_block = tl.load(kept_ptr + panel_block * n_row_blocks + step)
        for chunk in tl.static_range(0, BLOCK_M, BLOCK_K):  # the tile's rows, BLOCK_K at a time
            offs_m = row_block * BLOCK_M + chunk + tl.arange(0, BLOCK_K)
            row_in = offs_m < n_rows
            # The dS tile read transposed, as [BLOCK_N, BLOCK_K].
            ds_t = tl.load(panel_ptr + offs_m[None, :].to(tl.int64) * stride_panel + offs_p[:, None],
                           mask=row_in[None, :], other=0.0)  # fmt: skip
            a = tl.load(rows_ptr + offs_m[:, None].to(tl.int64) * stride_row_m + offs_d[None, :] * stride_row_d,
                        mask=row_in[:, None] & d_in[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(dot_operand(ds_t, UPCAST_DOT), dot_operand(a, UPCAST_DOT), acc,
                         input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # fmt: skip
    factor = tl.load(factor_ptr).to(ACC_DTYPE)
    out_ptrs = grad_cols_ptr + offs_n[:, None].to(tl.int64) * dim + offs_d[None, :]
    tl.store(out_ptrs, (acc * factor).to(grad_cols_ptr.dtype.element_ty),
             mask=(offs_n < n_cols)[:, None] & d_in[None, :])  # fmt: skip


def _kept_lists(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per line of `keep` [L, n] (0/1): the kept indices first, ascending (stable sort), and their count."""
    order = torch.argsort(1 - keep, dim=1, stable=True).to(torch.int32)
    return order.contiguous(), keep.sum(dim=1, dtype=torch.int32)


def add_grad_rows(
    grad_rows: torch.Tensor,
    panel: torch.Tensor,
    cols: torch.Tensor,
    factor: torch.Tensor,
    keep: torch.Tensor | None,
    first_col: int,
    panel_blocks: int,
    tile: TileConfig,
    gemm: GemmConfig,
    precision: str,
) -> None:
    """`grad_rows += factor · dS_panel @ C_panel` over the kept tiles.

    `keep` [n_row_blocks, panel_blocks] (0/1), or None: every tile.
    """
    n_rows, dim = grad_rows.shape
    sparse = keep is not None
    kept, counts = _kept_lists(keep) if sparse else (factor, factor)  # unused pointers when dense
    launch = gemm_launch(tile, gemm, cols.dtype, precision, SPARSE=sparse)
    grid = (triton.cdiv(n_rows, tile.block_m) * triton.cdiv(dim, gemm.block_out_d),)
    grad_rows_kernel[grid](
        panel, cols, factor, grad_rows, kept, counts,
        n_rows, cols.shape[0], dim, first_col, panel_blocks, panel.stride(0), cols.stride(0), cols.stride(1),
        **launch.kwargs(),
    )  # fmt: skip


def write_grad_cols(
    grad_cols: torch.Tensor,
    panel: torch.Tensor,
    rows: torch.Tensor,
    factor: torch.Tensor,
    keep: torch.Tensor | None,
    first_col: int,
    panel_blocks: int,
    tile: TileConfig,
    gemm: GemmConfig,
    precision: str,
) -> None:
    """`grad_cols[panel] = factor · dS_panelᵀ @ A` over the kept tiles (None: all)."""
    n_cols, dim = grad_cols.shape
    sparse = keep is not None
    kept, counts = _kept_lists(keep.T) if sparse else (factor, factor)
    launch = gemm_launch(tile, gemm, rows.dtype, precision, SPARSE=sparse)
    grid = (panel_blocks * triton.cdiv(dim, gemm.block_out_d),)
    grad_cols_kernel[grid](
        panel, rows, factor, grad_cols, kept, counts,
        rows.shape[0], n_cols, dim, first_col, panel.stride(0), rows.stride(0), rows.stride(1),
        **launch.kwargs(),
    )  # fmt: skip
