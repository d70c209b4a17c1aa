"""Portable tiled partitions: plain PyTorch ops over tiles of `S = τ·A·Cᵀ`.

Runs on any device. Never holds more than a few `block_rows × block_cols`
tiles at a time (the logits, their exponentials and the weights).

Forward, one pass over the tiles:
    row_lse[i] = logaddexp over column tiles of logsumexp_c(S_ic + bias_c)
    col_lse[c] = logaddexp over row tiles    of logsumexp_i(S_ic)          (c < Kq)
Backward, recomputing each tile once:
    dS_ic   = g_row_i · exp(S_ic + bias_c − row_lse_i) + g_col_c · exp(S_ic − col_lse_c)
    grad_A += τ · dS @ C_tile,  grad_C += τ · dSᵀ @ A_tile,  grad_τ += Σ dS ⊙ (A·Cᵀ)

Speed comes from one exponential per element: with the tile's max `m`,
`e = exp(S − m)` feeds both directions (row sums `e·β`, column sums `Σ_i e`,
and in the backward `dS = e ⊙ (u ⊗ β + 1 ⊗ v)` with `u_i = g_row_i·e^{m−row_lse_i}`,
`v_c = g_col_c·e^{m−col_lse_c}`, `β = e^{bias}`). A shared shift is exact only
while every line of the tile lies near `m`; a tile where some line does not
(its sum underflows, or `m − lse` could overflow) takes the two-exponential
path with per-line shifts instead. The branch needs the tile's statistics on
the host, so CUDA tensors always take the per-line path (no syncs per tile).
"""

from __future__ import annotations

import math

import torch

from .base import BackwardStats, stat_dtype
from .options import PartitionOptions

DEFAULT_BLOCK_ROWS = 512
DEFAULT_BLOCK_COLS = 1024
# A shared-shift row/column sum below e^-50 has lost the line's own maximum to the
# tile's: recompute that tile with per-line shifts.
_MIN_SHARED_SUM = math.exp(-50.0)
# exp(m − lse) above e^20 could overflow once multiplied into a weight, and only then
# could a weight whose exp(S − m) underflowed matter: fall back beyond it.
_MAX_SHARED_EXCESS = 20.0


_last_stats = BackwardStats()


def last_backward_stats() -> BackwardStats:
    """What the most recent backward did (this backend filters nothing)."""
    return _last_stats


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` in the operands' dtype with float32 (or float64) accumulation and output."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    # CPU half-precision GEMMs are slow and round their output: upcast the tile.
    return a.float() @ b.float()


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """`out += alpha · a @ b`, in place, with `b` brought to `a`'s dtype (see `_mm_f32`)."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_(_mm_f32(a, b.to(a.dtype)), alpha=alpha)


def _scaled_dots(a: torch.Tensor, b: torch.Tensor, tau: float, dtype: torch.dtype) -> torch.Tensor:
    """The logits tile `τ · a @ bᵀ` in float32 (float64), the scale folded into the product."""
    if a.dtype == dtype:
        return torch.addmm(torch.zeros((), dtype=dtype, device=a.device), a, b.T, beta=0, alpha=tau)
    return _mm_f32(a, b.T).mul_(tau)


def _tiles(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


def _per_line_lse(logits: torch.Tensor, bias: torch.Tensor, n_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.logsumexp(logits + bias, dim=1), torch.logsumexp(logits[:, :n_q], dim=0)


def _shared_shift_lse(logits: torch.Tensor, bias: torch.Tensor, n_q: int, tile_max: torch.Tensor):
    """Both directions' log-sum-exps from one `exp(S − m)`; None where the shared shift is unsafe."""
    exps = logits.sub_(tile_max).exp_()  # the logits are not needed afterwards
    row_sum = exps @ bias.exp() if bool(bias.any()) else exps.sum(1)
    col_sum = exps[:, :n_q].sum(0)
    smallest = min(float(row_sum.min()), float(col_sum.min()) if n_q else 1.0)
    if smallest < _MIN_SHARED_SUM:  # NaNs compare False and propagate through the fast path
        return None
    return row_sum.log_().add_(tile_max), col_sum.log_().add_(tile_max)


def _per_line_grad_logits(logits, bias, row_lse, col_lse, g_row, g_col) -> torch.Tensor:
    """`dS = g_row ⊙ row softmax + g_col ⊙ column softmax` with per-line shifts."""
    n_q = col_lse.shape[0]
    grad_logits = torch.exp(logits + bias - row_lse[:, None]).mul_(g_row[:, None])
    if n_q:
        col_softmax = torch.exp(logits[:, :n_q] - col_lse)
        grad_logits[:, :n_q].addcmul_(col_softmax, g_col)
    return grad_logits


def _shared_shift_grad_logits(logits, bias, row_lse, col_lse, g_row, g_col, tile_max) -> torch.Tensor | None:
    """`dS = exp(S − m) ⊙ (u ⊗ e^bias + 1 ⊗ v)`, one exponential per element; None where unsafe."""
    n_q = col_lse.shape[0]
    row_excess, col_excess = tile_max - row_lse, tile_max - col_lse
    largest = max(float(row_excess.max()), float(col_excess.max()) if n_q else -math.inf)
    if largest > _MAX_SHARED_EXCESS:
        return None
    u = g_row * row_excess.exp_()
    v = torch.zeros_like(bias)
    v[:n_q] = g_col * col_excess.exp_()
    weights = torch.addr(v, u, bias.exp())  # u_i·β_c + v_c
    return logits.sub_(tile_max).exp_().mul_(weights)


class TiledPartitions(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scale: torch.Tensor,
        col_bias: torch.Tensor,
        n_query_cols: int,
        block_rows: int,
        block_cols: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = stat_dtype(scale.dtype)
        tau = float(scale)
        n_rows, n_cols = rows.shape[0], cols.shape[0]
        shared_shift = not rows.is_cuda
        row_lse = torch.full((n_rows,), -math.inf, dtype=dtype, device=rows.device)
        col_lse = torch.full((n_query_cols,), -math.inf, dtype=dtype, device=rows.device)
        row_tiles, col_tiles = _tiles(n_rows, block_rows), _tiles(n_cols, block_cols)
        # Each tile's max, reused as the backward's shift (one number per tile).
        tile_maxes = torch.full((len(row_tiles), len(col_tiles)), math.nan, dtype=dtype, device=rows.device)
        for i, r in enumerate(row_tiles):
            for j, c in enumerate(col_tiles):
                logits = _scaled_dots(rows[r], cols[c], tau, dtype)
                n_q = max(0, min(c.stop, n_query_cols) - c.start)
                lse = None
                if shared_shift:
                    tile_maxes[i, j] = tile_max = logits.max()
                    lse = _shared_shift_lse(logits, col_bias[c], n_q, tile_max)
                    if lse is None:  # the shift consumed the logits: recompute them
                        logits = _scaled_dots(rows[r], cols[c], tau, dtype)
                tile_row_lse, tile_col_lse = lse or _per_line_lse(logits, col_bias[c], n_q)
                torch.logaddexp(row_lse[r], tile_row_lse, out=row_lse[r])
                if n_q:
                    q = slice(c.start, c.start + n_q)
                    torch.logaddexp(col_lse[q], tile_col_lse, out=col_lse[q])
        ctx.save_for_backward(rows, cols, scale, col_bias, row_lse, col_lse, tile_maxes)
        ctx.n_query_cols = n_query_cols
        ctx.shared_shift = shared_shift
        ctx.blocks = (block_rows, block_cols)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row_lse: torch.Tensor, grad_col_lse: torch.Tensor):
        rows, cols, scale, col_bias, row_lse, col_lse, tile_maxes = ctx.saved_tensors
        need_rows, need_cols, need_scale = ctx.needs_input_grad[:3]
        block_rows, block_cols = ctx.blocks
        n_query_cols = ctx.n_query_cols
        dtype = stat_dtype(scale.dtype)
        tau = float(scale)
        n_rows, n_cols = rows.shape[0], cols.shape[0]
        if grad_row_lse is None:
            grad_row_lse = torch.zeros_like(row_lse)
        if grad_col_lse is None:
            grad_col_lse = torch.zeros_like(col_lse)

        # grad_τ = Σ dS ⊙ A·Cᵀ = Σ_i <grad_A_i, A_i> / τ: read it off a feature gradient
        # after the loop, unless τ = 0 or no feature needs a gradient.
        scale_per_tile = need_scale and (tau == 0 or not (need_rows or need_cols))
        grad_rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device) if need_rows else None
        grad_cols = torch.zeros(cols.shape, dtype=dtype, device=cols.device) if need_cols else None
        grad_scale = torch.zeros((), dtype=dtype, device=rows.device)
        # Gradient products run in the inputs' dtype (tensor cores on GPU), like the logits.
        operand_dtype = rows.dtype if rows.is_cuda else dtype
        for i, r in enumerate(_tiles(n_rows, block_rows)):
            for j, c in enumerate(_tiles(n_cols, block_cols)):
                logits = _scaled_dots(rows[r], cols[c], tau, dtype)
                q = slice(c.start, max(c.start, min(c.stop, n_query_cols)))
                if scale_per_tile:
                    grad_scale += torch.dot(_per_line_grad_logits(
                        logits, col_bias[c], row_lse[r], col_lse[q], grad_row_lse[r], grad_col_lse[q]
                    ).view(-1), _mm_f32(rows[r], cols[c].T).view(-1))
                    if not (need_rows or need_cols):
                        continue
                grad_logits = None
                if ctx.shared_shift and not torch.isnan(tile_maxes[i, j]):
                    grad_logits = _shared_shift_grad_logits(
                        logits, col_bias[c], row_lse[r], col_lse[q], grad_row_lse[r], grad_col_lse[q], tile_maxes[i, j]
                    )
                if grad_logits is None:
                    grad_logits = _per_line_grad_logits(  # the shared path leaves logits intact when it declines
                        logits, col_bias[c], row_lse[r], col_lse[q], grad_row_lse[r], grad_col_lse[q]
                    )
                grad_logits = grad_logits.to(operand_dtype)
                if need_rows:
                    _add_product(grad_rows[r], grad_logits, cols[c], tau)
                if need_cols:
                    _add_product(grad_cols[c], grad_logits.T, rows[r], tau)
        global _last_stats
        _last_stats = BackwardStats(tiles=len(_tiles(n_rows, block_rows)) * len(_tiles(n_cols, block_cols)))
        if need_scale and not scale_per_tile:
            feature, grad = (rows, grad_rows) if need_rows else (cols, grad_cols)
            grad_scale = torch.dot(grad.view(-1), feature.to(dtype).reshape(-1)) / tau
        return (
            grad_rows.to(rows.dtype) if need_rows else None,
            grad_cols.to(cols.dtype) if need_cols else None,
            grad_scale.to(scale.dtype) if need_scale else None,
            None,
            None,
            None,
            None,
        )


def partitions(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    options: PartitionOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    return TiledPartitions.apply(
        rows,
        cols,
        scale,
        col_bias,
        n_query_cols,
        options.block_rows or DEFAULT_BLOCK_ROWS,
        options.block_cols or DEFAULT_BLOCK_COLS,
    )
