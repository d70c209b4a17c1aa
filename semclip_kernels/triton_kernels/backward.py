"""Backward: dS panels, then GEMMs that own their outputs. No atomics; deterministic.

For the rows i and columns c of `S = τ·A·Cᵀ` (docs/contract.md §7):

    p_ic = exp(S_ic + bias_c − row_lse_i)                  row softmax (every column)
    q_ic = exp(S_ic − col_lse_c)          for c < Kq       column softmax (query columns)
    dS_ic = g_row_i · p_ic + g_col_c · q_ic
    grad_rows = τ·dS @ C      grad_cols = τ·dSᵀ @ A      grad_τ = Σ dS ⊙ (A·Cᵀ)

The columns are cut into panels of `panel_blocks·BLOCK_N` columns. Per panel:

1. `ds_panel_kernel`, one program per tile of the panel: recompute the tile's logits
   (`tl_utils.tile_logits`, the forward's tile: bitwise the forward's logits), form dS,
   decide whether the tile is kept (gradient filter), store `dS·2^e` in the operand
   dtype into the panel (kept tiles only), its keep bit, and grad_τ's per-tile partial
   (below). One product.
2. `grad_gemm.write_grad_cols`: `grad_cols[panel] = τ·2^-e · dS_panelᵀ @ A`, one product
   over the kept tiles.
3. `grad_gemm.add_grad_rows`: `grad_rows += τ·2^-e · dS_panel @ C_panel`, one product
   over the kept tiles.

grad_τ, per line: each line's weights are taken relative to a shift r of its own,

    grad_τ = Σ_ic g_row_i·p_ic·(dots_ic − r_i) + Σ_ic g_col_c·q_ic·(dots_ic − r_c) + Σ_i g_row_i·r_i + Σ_c g_col_c·r_c

exact when the statistics are the problem's own (`Stats.own`: Σ_c p_ic = Σ_i q_ic = 1), with
r = lse/τ clamped to ±|a|·max|c| (about each line's weighted mean dot). The last two sums are
taken in float64 on the host. Why: a float32 log-partition is one rounding (7.6e-6 at 100)
off, which scales all of a line's weights alike; in `Σ p·dots` that error multiplies the
line's mean dot (~1), in `Σ p·(dots − r)` only the dots' spread around it, which is small
exactly where τ's gradient is small (a peaked, trained-like batch). Given statistics from
elsewhere (a distributed batch's global ones) the weights sum to a share only: r = 0 there.

So the backward costs 3 products unfiltered and 1 + 2f with a fraction f of kept tiles.
Every output element has one owner program; the panels run in order; grad_τ is the sum
of the per-tile partials in a fixed order. Identical inputs give identical bits.

float16: at large batches the weights dS are far below float16's smallest subnormal
(~1e-8 at B = 32768 against 6e-8). The panel stores `dS·2^e`, with `2^e` the largest power
of two that keeps `max|g_row| + max|g_col|` (a bound on |dS|, since p, q ≤ 1) under 2^14;
the GEMMs multiply their float32 accumulators by `τ·2^-e`. Exact (powers of two), and
it keeps every weight within 2^-38 of the largest normal.

Gradient filtering (FILTER): a tile is skipped (not stored, not multiplied) when every
weight of the tile, measured against the softmax mass its row or column gradient is
made of and times its line's |g|, is below `filter_eps·G` (G = the largest |g_row|, |g_col|):

    |g_row_i|·p_ic               (row i's mass Σ_c p_ic is 1)
    |g_col_c|·q_ic               (query column c's mass Σ_i q_ic is 1)
    |g_row_i|·p_ic / mass_lb_c   (column c's row-direction mass Σ_i p_ic ≥ mass_lb_c = exp(col_mass_lb_c),
                                  the lower bound `Stats.col_mass_lb` carries, see backends/values.py;
                                  a query column with a column gradient counts mass 1, as in cpp)

The third term protects columns that are nobody's query (negations): their gradient is
made only of row-softmax weights, which may all be tiny. The factor 1/mass_lb_c is
clamped at e^80 (so p_ic·factor cannot overflow float32). The |g| factor lets a line whose
gradient is negligible next to the others' (a query column's off-positive share, e^-45 of
the rows' in a trained batch) be skipped. NaN weights compare false and are never
filtered. The filter needs g_row and every column's mass bound.

Excluded entries (`Problem.positives`: the loss's positives, left out of the partitions by
the forward) get dS = 0 here; the loss's own gradient of those logits is added to the
float32 gradients outside the kernel (`values.add_positive_terms`), never rounded to the
16-bit panel.

Memory: the panel holds `n_rows × panel_cols` operand-dtype elements; by default no more
elements than the features (`(M + K)·d`) or a fixed 2^22 (small d), so docs/contract.md §3 holds. Plus per panel
`n_row_blocks × panel_blocks` keep bits and grad_τ partials, and a float32 `grad_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .config import GemmConfig, Launch, TileConfig, tile_launch
from .grad_gemm import add_grad_rows, write_grad_cols
from .tl_utils import band_entries, grouped_tile_ids, tile_logits

# |dS·2^e| stays below 2^14: float16's largest finite is 65504 ≈ 2^16.
_DS_HEADROOM_LOG2 = 14.0


@triton.jit
def ds_panel_kernel(
    rows_ptr,
    cols_ptr,
    scale_ptr,
    col_bias_ptr,
    row_lse_ptr,
    query_lse_ptr,  # [n_query_cols]: column partitions of the query columns
    col_mass_lb_ptr,  # [n_cols]: lower bounds of log Σ_i p_ic (FILTER only)
    grad_max_ptr,  # [1]: G = max(|g_row|, |g_col|) (FILTER only)
    row_shift_ptr,  # [n_rows]: each row's shift r of grad_τ's partial (NEED_GRAD_SCALE only)
    query_shift_ptr,  # [n_query_cols]: each query column's shift (NEED_GRAD_SCALE and HAS_COL_GRAD only)
    row_residual_ptr,  # [panel_blocks, n_rows]: Σ_c (dS − panel entry) per tile row (ROW_RESIDUAL only)
    grad_row_lse_ptr,
    grad_col_lse_ptr,
    ds_scale_ptr,  # [1]: 2^e
    panel_ptr,  # [n_rows, panel_blocks·BLOCK_N], operand dtype
    keep_ptr,  # [n_row_blocks, panel_blocks] int32
    grad_scale_parts_ptr,  # [n_row_blocks, panel_blocks]: Σ dS ⊙ dots per tile
    filter_eps,
    n_rows,
    n_cols,
    n_query_cols,
    dim,
    first_col_block,
    panel_blocks,
    excl0_first,  # excluded band 0 (N_EXCLUDED ≥ 1): entries (i, excl0_first + i·excl0_per_row + p)
    excl0_per_row,
    excl1_first,  # excluded band 1 (N_EXCLUDED = 2)
    excl1_per_row,
    stride_row_m,
    stride_row_d,
    stride_col_n,
    stride_col_d,
    stride_panel,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_ROW_GRAD: tl.constexpr,  # g_row given (the row direction contributes)
    HAS_COL_GRAD: tl.constexpr,  # g_col given and Kq > 0 (the column direction contributes)
    NEED_PANEL: tl.constexpr,  # a feature gradient is wanted: store dS
    NEED_GRAD_SCALE: tl.constexpr,
    FILTER: tl.constexpr,
    N_EXCLUDED: tl.constexpr,  # bands of entries left out of the partitions: dS = 0 there (0, 1 or 2)
    ROW_RESIDUAL: tl.constexpr,  # store each tile row's rounding residual of the 16-bit panel
):
    row_block, panel_block = grouped_tile_ids(n_rows, panel_blocks * BLOCK_N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = panel_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = first_col_block * BLOCK_N + offs_p
    row_in = offs_m < n_rows
    col_in = offs_n < n_cols
    scale = tl.load(scale_ptr).to(ACC_DTYPE)
    dots, logits = tile_logits(
        rows_ptr, cols_ptr, scale, offs_m, offs_n, n_rows, n_cols, dim,
        stride_row_m, stride_row_d, stride_col_n, stride_col_d,
        BLOCK_D, ACC_DTYPE, UPCAST_DOT, DOT_PRECISION,
    )  # fmt: skip

    # Each weight tile is folded into dS and the filter's maximum as soon as it exists, so at
    # most dots, logits, dS and one weight tile are live (registers: see config.py).
    # Excluded entries get logit -inf, as in the forward: both weights are 0 there (their rows' and
    # columns' statistics are finite wherever anything is left; `where` below keeps 0·NaN out).
    grad_logits = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    live = row_in[:, None] & col_in[None, :]
    if N_EXCLUDED >= 1:
        live = live & ~band_entries(offs_m, offs_n, excl0_first, excl0_per_row)
    if N_EXCLUDED >= 2:
        live = live & ~band_entries(offs_m, offs_n, excl1_first, excl1_per_row)
    max_weight = tl.zeros((), dtype=ACC_DTYPE)
    scale_part = tl.zeros((), dtype=ACC_DTYPE)  # grad_τ's partial: Σ weight·(dots − the line's shift)
    if FILTER:
        mass_lb = tl.load(col_mass_lb_ptr + offs_n, mask=col_in, other=0.0).to(ACC_DTYPE)
    if HAS_ROW_GRAD:
        col_bias = tl.load(col_bias_ptr + offs_n, mask=col_in, other=0.0).to(ACC_DTYPE)
        row_lse = tl.load(row_lse_ptr + offs_m, mask=row_in, other=0.0).to(ACC_DTYPE)
        g_row = tl.load(grad_row_lse_ptr + offs_m, mask=row_in, other=0.0).to(ACC_DTYPE)
        row_softmax = tl.exp(logits + col_bias[None, :] - row_lse[:, None])
        row_softmax = tl.where(live, row_softmax, 0.0)
        grad_logits += g_row[:, None] * row_softmax
        if NEED_GRAD_SCALE:
            row_shift = tl.load(row_shift_ptr + offs_m, mask=row_in, other=0.0).to(ACC_DTYPE)
            scale_part += tl.sum(g_row[:, None] * row_softmax * (dots - row_shift[:, None]))
        if FILTER:
            # Relative to a lower bound of column c's row-softmax mass, exp(col_mass_lb):
            # the factor is clamped at e^80 so that the product stays finite.
            inv_mass = tl.exp(tl.minimum(-mass_lb, 80.0))
            weight = row_softmax * tl.maximum(inv_mass, 1.0)[None, :] * tl.abs(g_row)[:, None]
            max_weight = tl.maximum(max_weight, tl.max(weight))
        else:
            max_weight = tl.maximum(max_weight, tl.max(row_softmax))
    if HAS_COL_GRAD:
        is_query = offs_n < n_query_cols
        g_col = tl.load(grad_col_lse_ptr + offs_n, mask=is_query, other=0.0).to(ACC_DTYPE)
        query_lse = tl.load(query_lse_ptr + offs_n, mask=is_query, other=0.0).to(ACC_DTYPE)
        col_softmax = tl.exp(logits - query_lse[None, :])
        col_softmax = tl.where(live & is_query[None, :], col_softmax, 0.0)
        grad_logits += g_col[None, :] * col_softmax
        if NEED_GRAD_SCALE:
            query_shift = tl.load(query_shift_ptr + offs_n, mask=is_query, other=0.0).to(ACC_DTYPE)
            scale_part += tl.sum(g_col[None, :] * col_softmax * (dots - query_shift[None, :]))
        max_weight = tl.maximum(max_weight, tl.max(col_softmax * tl.abs(g_col)[None, :]))
    tile = row_block * panel_blocks + panel_block
    if NEED_GRAD_SCALE:  # every tile, kept or not: grad_τ never depends on the filter
        tl.store(grad_scale_parts_ptr + tile, scale_part)
    # (The caller sets FILTER only with HAS_ROW_GRAD, which defines row_softmax and col_bias.)
    skip = False
    if FILTER:
        skip = max_weight < filter_eps * tl.load(grad_max_ptr).to(ACC_DTYPE)
    if skip:
        tl.store(keep_ptr + tile, 0)
    else:
        tl.store(keep_ptr + tile, 1)
        if NEED_PANEL:
            ds_scale = tl.load(ds_scale_ptr).to(ACC_DTYPE)
            panel_ptrs = panel_ptr + offs_m[:, None].to(tl.int64) * stride_panel + offs_p[None, :]
            scaled = grad_logits * ds_scale
            if panel_ptr.dtype.element_ty.primitive_bitwidth == 16:
                # Round to nearest even, stated: the interpreter's default cast truncates (a bias of one sign
                # in every weight); on the GPU this is the cast it compiles anyway.
                panel_tile = scaled.to(panel_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            else:
                panel_tile = scaled.to(panel_ptr.dtype.element_ty)
            tl.store(panel_ptrs, panel_tile, mask=row_in[:, None])
            if ROW_RESIDUAL:  # what the 16-bit cast lost, summed per row (float32): see partitions_backward
                residual = tl.sum(scaled - panel_tile.to(ACC_DTYPE), axis=1) / ds_scale
                tl.store(row_residual_ptr + panel_block * n_rows + offs_m, residual, mask=row_in)


def ds_panel_launch(
    tile: TileConfig, dtype: torch.dtype, precision: str, *, has_row_grad: bool, has_col_grad: bool,
    need_panel: bool, need_grad_scale: bool, filtering: bool, n_excluded: int = 0, row_residual: bool = False,
) -> Launch:  # fmt: skip
    """The launch of `ds_panel_kernel` for one combination of its feature flags."""
    return tile_launch(
        tile, dtype, precision, GROUP_M=tile.group_m, HAS_ROW_GRAD=has_row_grad, HAS_COL_GRAD=has_col_grad,
        NEED_PANEL=need_panel, NEED_GRAD_SCALE=need_grad_scale, FILTER=filtering, N_EXCLUDED=n_excluded,
        ROW_RESIDUAL=row_residual,
    )  # fmt: skip


@dataclass(frozen=True)
class BackwardResult:
    grad_rows: torch.Tensor | None  # statistics dtype
    grad_cols: torch.Tensor | None  # statistics dtype
    grad_scale: torch.Tensor | None  # 0-dim, statistics dtype
    tiles: int
    row_residual: torch.Tensor | None  # [M] float32: Σ_c (dS − its 16-bit panel entry), when asked for
    kept_tiles: torch.Tensor  # 0-dim int64 on the device (read lazily: reading synchronizes)


# The panel's floor, in elements, for small d (8 MB in 16-bit): a fixed buffer, independent of the batch.
MIN_PANEL_ELEMENTS = 1 << 22


def default_panel_cols(n_rows: int, n_cols: int, dim: int, block_n: int) -> int:
    """Widest panel (a multiple of BLOCK_N) within `max((M + K)·d, MIN_PANEL_ELEMENTS)` elements."""
    budget = max((n_rows + n_cols) * dim, MIN_PANEL_ELEMENTS) // max(n_rows, 1)
    return max(block_n, budget // block_n * block_n)


def ds_scale_for(grad_row_lse: torch.Tensor | None, grad_col_lse: torch.Tensor | None, like: torch.Tensor):
    """`2^e` with `(max|g_row| + max|g_col|)·2^e ≤ 2^14` (a bound on |dS|; clamped to 2^±126; a 1-element
    device tensor, no sync)."""
    bound = torch.zeros((), dtype=torch.float32, device=like.device)
    for grad in (grad_row_lse, grad_col_lse):
        if grad is not None and grad.numel():
            bound = bound + grad.detach().abs().amax().float()
    exponent = torch.floor(_DS_HEADROOM_LOG2 - torch.log2(bound)).clamp(-126.0, 126.0)
    return torch.exp2(exponent).reshape(1)


_NORM_CHUNK = 4096  # rows per float32 chunk of `_line_norms`


def _line_norms(features: torch.Tensor) -> torch.Tensor:
    """Each row's float32 norm, a chunk of rows at a time (no float32 copy of 16-bit features)."""
    chunks = [torch.linalg.vector_norm(chunk.float(), dim=1) for chunk in features.split(_NORM_CHUNK)]
    return torch.cat(chunks) if chunks else features.new_zeros(0, dtype=torch.float32)


def scale_grad_shifts(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor, query_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's and query column's shift r of grad_τ's partials (module docstring): `lse/τ` (0 where that
    is not a number), clamped to ±|a|·max|c| so that `dots − r` stays within the dots' own range at any τ.
    `rows` and `cols` are not empty (the launcher returns before)."""
    row_norms, col_norms = _line_norms(rows).to(row_lse.dtype), _line_norms(cols).to(row_lse.dtype)

    def shift(lse: torch.Tensor, norms: torch.Tensor, other_max: torch.Tensor) -> torch.Tensor:
        bound = norms * other_max
        return torch.clamp((lse / scale).nan_to_num(0.0), -bound, bound).contiguous()

    row_shift = shift(row_lse, row_norms, col_norms.amax())
    query_shift = shift(query_lse, col_norms[: query_lse.shape[0]], row_norms.amax())
    return row_shift, query_shift


def partitions_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    row_lse: torch.Tensor,
    query_lse: torch.Tensor,
    col_mass_lb: torch.Tensor,
    grad_row_lse: torch.Tensor | None,
    grad_col_lse: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    precision: str,
    filter_eps: float,
    tile: TileConfig,
    gemm: GemmConfig,
    panel_cols: int | None = None,
    excluded: tuple[tuple[int, int], ...] = (),
    row_residual: bool = False,
    own_stats: bool = False,
) -> BackwardResult:
    """Gradients of `Σ g_row·row_lse + Σ g_col·query_lse` for rows, cols and scale.

    `scale` [1] and `col_bias` [K] in the statistics dtype; `query_lse` [Kq]; `col_mass_lb` [K] (the filter's
    column-mass bounds; empty: no filtering); `excluded`: up to two bands `(first_col, per_row)` left out of
    the partitions (the forward's; dS = 0 there). `precision` must be the forward's (bitwise recompute).
    Gradients in the statistics dtype. `row_residual` (16-bit panels, rows wanted): also return, per row, the
    sum of what the 16-bit cast of its dS entries lost, in float32 (the caller adds it back along a column the
    row's weights concentrate on: a near-duplicate hard negative's weight is O(1) and its columns are all
    within a few percent of the image, so that sum is the part of the rounding that does not cancel).
    `own_stats`: `row_lse` and `query_lse` are this problem's own partitions (`Stats.own`): grad_τ is then
    summed relative to each line's shift (module docstring).
    """
    need_rows, need_cols, need_scale = needs
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    device, stat = rows.device, scale.dtype
    has_row_grad = grad_row_lse is not None
    has_col_grad = grad_col_lse is not None and n_query_cols > 0
    n_row_blocks, n_col_blocks = triton.cdiv(n_rows, tile.block_m), triton.cdiv(n_cols, tile.block_n)
    if len(excluded) > 2:
        raise ValueError(f"the Triton backward leaves out at most 2 bands of entries, got {len(excluded)}")
    grad_rows = torch.zeros((n_rows, dim), dtype=stat, device=device) if need_rows else None
    grad_cols = torch.empty((n_cols, dim), dtype=stat, device=device) if need_cols else None
    # float64 sum of the per-tile partials (and the shifts' terms), one rounding to `stat` at the end.
    grad_scale = torch.zeros((), dtype=torch.float64, device=device) if need_scale else None
    kept_tiles = torch.zeros((), dtype=torch.int64, device=device)
    tiles = n_row_blocks * n_col_blocks
    if not (has_row_grad or has_col_grad) or tiles == 0 or not any(needs):
        if need_cols:
            grad_cols.zero_()
        return BackwardResult(grad_rows, grad_cols, None if grad_scale is None else grad_scale.to(stat), tiles, None,
                              kept_tiles)  # fmt: skip

    # The filter needs every column's mass bound (unknown: nothing is skipped).
    filtering = filter_eps > 0 and has_row_grad and col_mass_lb.shape[0] >= n_cols
    need_panel = need_rows or need_cols
    panel_cols = panel_cols or default_panel_cols(n_rows, n_cols, dim, tile.block_n)
    panel_width = max(1, min(triton.cdiv(panel_cols, tile.block_n), n_col_blocks))
    panel = torch.empty((n_rows, panel_width * tile.block_n), dtype=rows.dtype, device=device) if need_panel else None
    keep = torch.empty((n_row_blocks, panel_width), dtype=torch.int32, device=device)
    grad_scale_parts = torch.empty((n_row_blocks, panel_width), dtype=stat, device=device)
    ds_scale = ds_scale_for(grad_row_lse, grad_col_lse, rows)
    mass_lb, grad_max = col_mass_lb, scale
    if filtering:
        # A query column with a column gradient: its column softmax alone has mass 1 (as in cpp).
        mass_lb = col_mass_lb.clone()
        if has_col_grad:
            mass_lb[:n_query_cols] = torch.where(grad_col_lse != 0, 0.0, mass_lb[:n_query_cols])
        grad_max = grad_row_lse.detach().abs().amax().float()
        if has_col_grad:
            grad_max = torch.maximum(grad_max, grad_col_lse.detach().abs().amax().float())
        grad_max = grad_max.to(stat).reshape(1)
    factor = (scale.detach().float() / ds_scale).to(stat)  # τ·2^-e
    dummy = scale  # stands in for pointers a constexpr flag keeps unused
    row_shift = query_shift = dummy
    if need_scale:
        if own_stats:
            row_shift, query_shift = scale_grad_shifts(rows, cols, scale, row_lse, query_lse)
            for grad, shift in ((grad_row_lse, row_shift), (grad_col_lse if has_col_grad else None, query_shift)):
                if grad is not None:
                    grad_scale += torch.dot(grad.double(), shift.double())
        else:
            row_shift = torch.zeros(n_rows, dtype=stat, device=device)
            query_shift = torch.zeros(max(n_query_cols, 1), dtype=stat, device=device)
    bands = [*excluded, (0, 1), (0, 1)][:2]  # unused slots: any valid band (the constexpr skips them)
    row_residual = row_residual and need_rows and rows.dtype.itemsize == 2
    residual_parts = torch.zeros((panel_width, n_rows), dtype=torch.float32, device=device) if row_residual else None
    residual = torch.zeros(n_rows, dtype=torch.float32, device=device) if row_residual else None
    launch = ds_panel_launch(
        tile, rows.dtype, precision, has_row_grad=has_row_grad, has_col_grad=has_col_grad, need_panel=need_panel,
        need_grad_scale=need_scale, filtering=filtering, n_excluded=len(excluded), row_residual=row_residual,
    )  # fmt: skip
    for first_block in range(0, n_col_blocks, panel_width):
        blocks = min(panel_width, n_col_blocks - first_block)
        ds_panel_kernel[(n_row_blocks * blocks,)](
            rows, cols, scale, col_bias, row_lse, query_lse if query_lse.numel() else dummy,
            mass_lb if filtering else dummy, grad_max if filtering else dummy, row_shift,
            query_shift if query_shift.numel() else dummy,
            residual_parts if row_residual else dummy,
            grad_row_lse.contiguous() if has_row_grad else dummy,
            grad_col_lse.contiguous() if has_col_grad else dummy,
            ds_scale, panel if need_panel else dummy, keep, grad_scale_parts, filter_eps,
            n_rows, n_cols, n_query_cols, dim, first_block, blocks, *bands[0], *bands[1],
            rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1), panel.stride(0) if need_panel else 0,
            **launch.kwargs(),
        )  # fmt: skip
        # The kernel indexes tiles as row_block·blocks + panel_block: the first n_row_blocks·blocks entries.
        panel_keep = keep.view(-1)[: n_row_blocks * blocks].view(n_row_blocks, blocks)
        kept_tiles += panel_keep.sum()
        if row_residual:  # a skipped tile leaves its zeros; summed in a fixed order
            residual += residual_parts[:blocks].sum(0)
            residual_parts.zero_()
        if need_scale:
            grad_scale += grad_scale_parts.view(-1)[: n_row_blocks * blocks].double().sum()
        sparse_keep = panel_keep if filtering else None
        first_col = first_block * tile.block_n
        if need_cols:
            write_grad_cols(grad_cols, panel, rows, factor, sparse_keep, first_col, blocks, tile, gemm, precision)
        if need_rows:
            add_grad_rows(grad_rows, panel, cols, factor, sparse_keep, first_col, blocks, tile, gemm, precision)
    if need_scale:
        grad_scale = grad_scale.to(stat)
    return BackwardResult(grad_rows, grad_cols, grad_scale, tiles, residual, kept_tiles)
