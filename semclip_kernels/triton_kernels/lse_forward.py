"""Forward: row and column log-partitions of `S = τ·A·Cᵀ` from one product, without locks or atomics.

    row_lse_i = log Σ_c exp(S_ic + bias_c)        col_lse_c = log Σ_i exp(S_ic)

The tiles of S form an `n_row_blocks × n_col_blocks` grid. The kernel runs
`row_strips × col_strips` programs; program (r, s) owns row strip r (row blocks r, r + R,
r + 2R, …) and column strip s (column blocks s, s + S, …) and visits every tile of
their product, one at a time, rows outer:

- row direction: the running (max, Σ exp) of its BLOCK_M rows over the strip's columns
  stays on chip; one plain store per row block into `row_partials[s]` when the strip ends;
- column direction: the running (max, Σ exp) of each column over the strip's rows lives in
  `col_partials[r]`, read and written by this program only (no other program touches
  row strip r's entries of column strip s).

No two programs write the same element, so there is nothing to lock. A fixed-order
reduction over the strips (`merge_partials`, plain torch ops) gives the log-partitions.
Scratch: `(M·S + K·R)` (max, sum) pairs, bounded by the strip counts, not by the
number of tiles. Both directions come from the same tile: one M×K×d product.

The column direction runs on every column, not only the query columns: the partitions
of the other columns (negations) cost no product and give the backward's gradient
filter a lower bound on each column's softmax mass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import Launch, TileConfig, tile_launch
from .tl_utils import band_entries, online_update, tile_logits


@triton.jit
def lse_forward_kernel(
    rows_ptr,
    cols_ptr,
    scale_ptr,
    col_bias_ptr,
    row_max_ptr,  # [col_strips, n_rows]: running max of each row over column strip s
    row_sum_ptr,  # [col_strips, n_rows]: Σ exp(S + bias − max) over column strip s
    col_max_ptr,  # [row_strips, n_cols], initialised to -inf
    col_sum_ptr,  # [row_strips, n_cols], initialised to 0
    n_rows,
    n_cols,
    dim,
    row_strips,
    col_strips,
    stride_row_m,
    stride_row_d,
    stride_col_n,
    stride_col_d,
    excl0_first,  # excluded band 0 (N_EXCLUDED ≥ 1): entries (i, excl0_first + i·excl0_per_row + p)
    excl0_per_row,
    excl1_first,  # excluded band 1 (N_EXCLUDED = 2)
    excl1_per_row,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    N_EXCLUDED: tl.constexpr,  # bands of entries left out of both partitions (0, 1 or 2)
):
    pid = tl.program_id(axis=0)
    row_strip = pid // col_strips
    col_strip = pid % col_strips
    n_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    n_col_blocks = tl.cdiv(n_cols, BLOCK_N)
    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    col_partial = row_strip.to(tl.int64) * n_cols
    for row_block in range(row_strip, n_row_blocks, row_strips):
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = offs_m < n_rows
        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
        row_sum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
        for col_block in range(col_strip, n_col_blocks, col_strips):
            offs_n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
            col_in = offs_n < n_cols
            _, logits = tile_logits(
                rows_ptr, cols_ptr, scale, offs_m, offs_n, n_rows, n_cols, dim,
                stride_row_m, stride_row_d, stride_col_n, stride_col_d,
                BLOCK_D, ACC_DTYPE, UPCAST_DOT, DOT_PRECISION,
            )  # fmt: skip
            if N_EXCLUDED >= 1:
                logits = tl.where(band_entries(offs_m, offs_n, excl0_first, excl0_per_row), float("-inf"), logits)
            if N_EXCLUDED >= 2:
                logits = tl.where(band_entries(offs_m, offs_n, excl1_first, excl1_per_row), float("-inf"), logits)

            # Row direction: every real column, with its bias (log β on negations, or -inf).
            col_bias = tl.load(col_bias_ptr + offs_n, mask=col_in, other=float("-inf")).to(ACC_DTYPE)
            row_max, row_sum = online_update(row_max, row_sum, logits + col_bias[None, :], axis=1)

            # Column direction: unbiased logits of the real rows, into this program's own partials.
            col_max = tl.load(col_max_ptr + col_partial + offs_n, mask=col_in, other=float("-inf"))
            col_sum = tl.load(col_sum_ptr + col_partial + offs_n, mask=col_in, other=0.0)
            col_max, col_sum = online_update(col_max, col_sum, tl.where(row_in[:, None], logits, float("-inf")), axis=0)
            tl.store(col_max_ptr + col_partial + offs_n, col_max, mask=col_in)
            tl.store(col_sum_ptr + col_partial + offs_n, col_sum, mask=col_in)
            # The next row block reads these entries back, possibly from other threads of the
            # program (replicated layouts store from one replica): order the store before them.
            tl.debug_barrier()
        row_partial = col_strip.to(tl.int64) * n_rows
        tl.store(row_max_ptr + row_partial + offs_m, row_max, mask=row_in)
        tl.store(row_sum_ptr + row_partial + offs_m, row_sum, mask=row_in)


def strip_counts(n_row_blocks: int, n_col_blocks: int, programs: int) -> tuple[int, int]:
    """(row strips R, column strips S) with R·S ≤ `programs`, as square as the tile grid allows."""
    row_strips = max(1, min(n_row_blocks, math.isqrt(max(programs, 1))))
    col_strips = max(1, min(n_col_blocks, programs // row_strips))
    return row_strips, col_strips


def default_programs(device: torch.device) -> int:
    """One wave of programs: one per multiprocessor (the 16-bit tile kernel fits one CTA per SM).

    Under the interpreter programs run one at a time: 4 keeps several strips in every test.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def merge_partials(maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """`log Σ_p sums[p]·exp(maxes[p])` over dim 0, in a fixed order (deterministic); -inf when empty."""
    top = maxes.amax(dim=0)
    shift = torch.where(top == -math.inf, torch.zeros_like(top), top)
    return shift + torch.log((sums * torch.exp(maxes - shift)).sum(dim=0))


def forward_launch(tile: TileConfig, dtype: torch.dtype, precision: str, n_excluded: int = 0) -> Launch:
    """The launch of `lse_forward_kernel` with `n_excluded` bands left out of the partitions."""
    return tile_launch(tile, dtype, precision, N_EXCLUDED=n_excluded)


def lse_forward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    tile: TileConfig,
    precision: str,
    programs: int | None = None,
    excluded: tuple[tuple[int, int], ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(row_lse [M], col_lse [K])` of `scale·rows·colsᵀ` (+ `col_bias` in the row direction).

    `scale` [1] and `col_bias` [K] are in the statistics dtype, which the results take.
    `programs` bounds the scratch: `(M·S + K·R)` (max, sum) pairs with R·S ≤ programs.
    `excluded`: up to two bands `(first_col, per_row)` left out of both partitions (`Problem.positives`).
    """
    if len(excluded) > 2:
        raise ValueError(f"the Triton forward leaves out at most 2 bands of entries, got {len(excluded)}")
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    stat = scale.dtype
    if n_rows == 0 or n_cols == 0:
        return (torch.full((n_rows,), -math.inf, dtype=stat, device=rows.device),
                torch.full((n_cols,), -math.inf, dtype=stat, device=rows.device))  # fmt: skip
    row_strips, col_strips = strip_counts(
        triton.cdiv(n_rows, tile.block_m), triton.cdiv(n_cols, tile.block_n),
        programs or default_programs(rows.device),
    )  # fmt: skip
    row_max = torch.empty((col_strips, n_rows), dtype=stat, device=rows.device)
    row_sum = torch.empty_like(row_max)
    col_max = torch.full((row_strips, n_cols), -math.inf, dtype=stat, device=rows.device)
    col_sum = torch.zeros_like(col_max)
    launch = forward_launch(tile, rows.dtype, precision, len(excluded))
    bands = [*excluded, (0, 1), (0, 1)][:2]  # unused slots: any valid band (the constexpr skips them)
    lse_forward_kernel[(row_strips * col_strips,)](
        rows, cols, scale, col_bias, row_max, row_sum, col_max, col_sum,
        n_rows, n_cols, dim, row_strips, col_strips,
        rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1), *bands[0], *bands[1],
        **launch.kwargs(),
    )  # fmt: skip
    return merge_partials(row_max, row_sum), merge_partials(col_max, col_sum)
