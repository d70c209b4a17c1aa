"""Portable tiled partitions: plain PyTorch ops over tiles of `S = τ·A·Cᵀ`.

Runs on any device. Never holds more than one `block_rows × block_cols` tile
of logits (plus its softmax weights) at a time.

Forward, one pass over the tiles:
    row_lse[i] = logaddexp over column tiles of logsumexp_c(S_ic + bias_c)
    col_lse[c] = logaddexp over row tiles    of logsumexp_i(S_ic)          (c < Kq)
Backward, recomputing each tile once:
    dS_ic   = g_row_i · exp(S_ic + bias_c − row_lse_i) + g_col_c · exp(S_ic − col_lse_c)
    grad_A += τ · dS @ C_tile,  grad_C += τ · dSᵀ @ A_tile,  grad_τ += Σ dS ⊙ (A·Cᵀ)
"""

from __future__ import annotations

import torch

from .options import PartitionOptions

DEFAULT_BLOCK_ROWS = 256
DEFAULT_BLOCK_COLS = 1024


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


def _tiles(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


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
        stat_dtype = scale.dtype
        n_rows, n_cols = rows.shape[0], cols.shape[0]
        row_lse = torch.full((n_rows,), -float("inf"), dtype=stat_dtype, device=rows.device)
        col_lse = torch.full((n_query_cols,), -float("inf"), dtype=stat_dtype, device=rows.device)
        for r in _tiles(n_rows, block_rows):
            for c in _tiles(n_cols, block_cols):
                logits = _mm_f32(rows[r], cols[c].T).mul_(scale)
                # Query columns first: their column partitions see the unbiased logits.
                q = slice(c.start, min(c.stop, n_query_cols))
                if q.start < q.stop:
                    tile_col_lse = torch.logsumexp(logits[:, : q.stop - q.start], dim=0)
                    torch.logaddexp(col_lse[q], tile_col_lse, out=col_lse[q])
                tile_row_lse = torch.logsumexp(logits.add_(col_bias[c]), dim=1)
                torch.logaddexp(row_lse[r], tile_row_lse, out=row_lse[r])
        ctx.save_for_backward(rows, cols, scale, col_bias, row_lse, col_lse)
        ctx.n_query_cols = n_query_cols
        ctx.blocks = (block_rows, block_cols)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row_lse: torch.Tensor, grad_col_lse: torch.Tensor):
        rows, cols, scale, col_bias, row_lse, col_lse = ctx.saved_tensors
        need_rows, need_cols, need_scale = ctx.needs_input_grad[:3]
        block_rows, block_cols = ctx.blocks
        n_query_cols = ctx.n_query_cols
        stat_dtype = scale.dtype
        n_rows, n_cols = rows.shape[0], cols.shape[0]
        if grad_row_lse is None:
            grad_row_lse = torch.zeros_like(row_lse)
        if grad_col_lse is None:
            grad_col_lse = torch.zeros_like(col_lse)

        grad_rows = torch.zeros(rows.shape, dtype=stat_dtype, device=rows.device) if need_rows else None
        grad_cols = torch.zeros(cols.shape, dtype=stat_dtype, device=cols.device) if need_cols else None
        grad_scale = torch.zeros((), dtype=stat_dtype, device=rows.device)
        # Gradient products run in the inputs' dtype (tensor cores on GPU), like the logits.
        operand_dtype = rows.dtype if rows.is_cuda else stat_dtype
        for r in _tiles(n_rows, block_rows):
            for c in _tiles(n_cols, block_cols):
                dots = _mm_f32(rows[r], cols[c].T)
                logits = dots * scale
                # d row_lse_i / d S_ic is the row softmax (with the column bias) ...
                grad_logits = torch.exp(logits + col_bias[c] - row_lse[r, None])
                grad_logits.mul_(grad_row_lse[r, None])
                # ... and d col_lse_c / d S_ic the column softmax, on query columns only.
                q = slice(c.start, min(c.stop, n_query_cols))
                if q.start < q.stop:
                    n_q = q.stop - q.start
                    col_softmax = torch.exp(logits[:, :n_q] - col_lse[None, q])
                    grad_logits[:, :n_q].addcmul_(col_softmax, grad_col_lse[None, q])
                if need_scale:
                    grad_scale += (grad_logits * dots).sum()
                grad_dots = grad_logits.mul_(scale).to(operand_dtype)
                if need_rows:
                    grad_rows[r] += _mm_f32(grad_dots, cols[c].to(operand_dtype))
                if need_cols:
                    grad_cols[c] += _mm_f32(grad_dots.T, rows[r].to(operand_dtype))
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
