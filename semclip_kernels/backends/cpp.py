"""The compiled, fused CPU kernel (csrc/, built as `semclip_kernels._C`).

Tiles of `S = τ·A·Cᵀ` that stay in cache, both directions' partitions from one
pass, backward by recomputation with gradient filtering; nothing of `M × K`
elements is ever allocated. The design and its measured speed are in
docs/cpu_kernel.md.

Computes in float32 (float64 for float64 inputs); float16/bfloat16 features
are upcast to float32 once (an `O((M + K)·d)` copy) and their gradients cast
back.
"""

from __future__ import annotations

import torch

from .base import BackwardStats, stat_dtype
from .options import PartitionOptions, default_grad_filter_eps

try:
    from semclip_kernels import _C
except ImportError as error:  # not built: `auto` falls back, `cpp` explains how to build
    _C = None
    _IMPORT_ERROR = f"{type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = ""

# 256 × 512 float32 logits (512 KiB) plus the gradient tile fit the 1 MiB L2 of a core; other shapes
# measured no faster (docs/cpu_kernel.md).
DEFAULT_BLOCK_ROWS = 256
DEFAULT_BLOCK_COLS = 512

_last_stats = BackwardStats()


def last_backward_stats() -> BackwardStats:
    """What the most recent backward did (tiles, skipped tiles, exactly recomputed lines)."""
    return _last_stats


def is_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the cpp backend runs on CPU tensors only, got {device.type}"
    if _C is None:
        return False, (
            f"the C++ extension semclip_kernels._C is not built ({_IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` from the repository root"
        )
    return True, ""


class CppPartitions(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scale: torch.Tensor,
        col_bias: torch.Tensor,
        n_query_cols: int,
        options: PartitionOptions,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        compute_dtype = stat_dtype(scale.dtype)
        rows_c = rows.detach().to(compute_dtype).contiguous()
        cols_c = cols.detach().to(compute_dtype).contiguous()
        col_bias_c = col_bias.detach().to(compute_dtype).contiguous()
        block_rows = options.block_rows or DEFAULT_BLOCK_ROWS
        block_cols = options.block_cols or DEFAULT_BLOCK_COLS
        tau = float(scale)
        row_lse, col_lse, tile_max = _C.forward(rows_c, cols_c, tau, col_bias_c, n_query_cols, block_rows, block_cols)
        ctx.save_for_backward(rows_c, cols_c, col_bias_c, row_lse, col_lse, tile_max)
        ctx.tau = tau
        ctx.n_query_cols = n_query_cols
        ctx.blocks = (block_rows, block_cols)
        ctx.grad_filter_eps = options.grad_filter_eps
        ctx.dtypes = (rows.dtype, cols.dtype, scale.dtype)
        return row_lse.to(scale.dtype), col_lse.to(scale.dtype)

    @staticmethod
    def backward(ctx, grad_row_lse: torch.Tensor | None, grad_col_lse: torch.Tensor | None):
        rows_c, cols_c, col_bias_c, row_lse, col_lse, tile_max = ctx.saved_tensors
        need_rows, need_cols, need_scale = ctx.needs_input_grad[:3]
        dtype = rows_c.dtype
        grad_row_lse = torch.zeros_like(row_lse) if grad_row_lse is None else grad_row_lse.to(dtype).contiguous()
        grad_col_lse = torch.zeros_like(col_lse) if grad_col_lse is None else grad_col_lse.to(dtype).contiguous()
        eps = ctx.grad_filter_eps
        if eps is None:
            eps = default_grad_filter_eps(rows_c.shape[0], cols_c.shape[0], dtype)
        grad_rows, grad_cols, grad_scale, stats = _C.backward(
            rows_c, cols_c, ctx.tau, col_bias_c, ctx.n_query_cols, row_lse, col_lse, tile_max,
            grad_row_lse, grad_col_lse, need_rows, need_cols, need_scale, *ctx.blocks, eps,
        )
        global _last_stats
        _last_stats = BackwardStats(*stats.tolist())
        rows_dtype, cols_dtype, scale_dtype = ctx.dtypes
        return (
            grad_rows.to(rows_dtype) if need_rows else None,
            grad_cols.to(cols_dtype) if need_cols else None,
            grad_scale.to(scale_dtype) if need_scale else None,
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
    """Row and query-column log-partitions of `scale·rows·colsᵀ` (SPEC section 7), fused on CPU."""
    ok, reason = is_available(rows.device)
    if not ok:
        raise RuntimeError(f"backend='cpp' cannot run: {reason}")
    return CppPartitions.apply(rows, cols, scale, col_bias, n_query_cols, options)
