"""backend="triton": the partitions primitive (docs/contract.md §7) on the fused Triton kernels.

A thin adapter: argument checks, the autograd Function, and the backend protocol
(`backends/base.py`). The kernels and their launchers live in
`semclip_kernels.triton_kernels` (`lse_forward`, `backward`, `grad_gemm`), their
launch configurations in `triton_kernels.config`; docs/triton.md describes the design.

Forward: one product, no locks or atomics. Backward: three products (1 + 2f with a
fraction f of tiles kept by the gradient filter), no atomics. Identical inputs give
bitwise identical results.

On CUDA tensors the kernels run compiled. On CPU tensors they run through Triton's
interpreter, which must be switched on (`TRITON_INTERPRET=1`) before this module is
first imported.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton  # noqa: F401  (ImportError here tells the dispatcher Triton is missing)

from ..triton_kernels import tl_utils
from ..triton_kernels.backward import BackwardResult
from ..triton_kernels.backward import partitions_backward as _launch_backward
from ..triton_kernels.config import dot_precision, gemm_config, tile_config
from ..triton_kernels.lse_forward import lse_forward
from .base import BackwardStats, stat_dtype
from .options import PartitionOptions, default_grad_filter_eps

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# The last backward's result (tile counts as device tensors; read lazily by last_backward_stats).
_last_backward: BackwardResult | None = None


def is_available(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        if tl_utils.INTERPRETED:
            return True, "running through the Triton interpreter (TRITON_INTERPRET=1)"
        return True, ""
    if device.type == "cpu":
        if not tl_utils.INTERPRETED:
            return False, "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, "TRITON_INTERPRET was unset after the kernels were defined"
        return True, ""
    return False, f"Triton kernels do not run on {device.type} tensors"


def last_backward_stats() -> BackwardStats:
    """Tiles of the last backward and how many the gradient filter skipped (synchronizes)."""
    if _last_backward is None:
        return BackwardStats()
    kept = int(_last_backward.kept_tiles.item())
    return BackwardStats(tiles=_last_backward.tiles, skipped_tiles=_last_backward.tiles - kept)


def _on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _check(rows: torch.Tensor, cols: torch.Tensor) -> None:
    if rows.dtype not in _SUPPORTED_DTYPES or cols.dtype != rows.dtype:
        raise TypeError(
            f"backend='triton' needs rows and cols of one dtype among {_SUPPORTED_DTYPES}, "
            f"got {rows.dtype} and {cols.dtype}"
        )
    if rows.device != cols.device:
        raise ValueError(f"rows and cols must share a device, got {rows.device} and {cols.device}")


def _stat_inputs(rows: torch.Tensor, scale: torch.Tensor, col_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    stat = stat_dtype(rows.dtype)
    return scale.detach().to(stat).reshape(1).contiguous(), col_bias.detach().to(stat).contiguous()


def _backward(
    rows, cols, scale_stat, col_bias, n_query_cols, row_lse, col_lse, grad_row_lse, grad_col_lse, needs,
    options: PartitionOptions, precision: str,
) -> BackwardResult:  # fmt: skip
    global _last_backward
    n_rows, dim = rows.shape
    eps = options.grad_filter_eps
    if eps is None:
        eps = default_grad_filter_eps(n_rows, cols.shape[0], rows.dtype)
    with _on_device(rows):
        result = _launch_backward(
            rows, cols, scale_stat, col_bias, n_query_cols, row_lse, col_lse, grad_row_lse, grad_col_lse, needs,
            precision, eps, tile_config(dim, rows.dtype, options.block_rows, options.block_cols),
            gemm_config(dim, rows.dtype),
        )  # fmt: skip
    _last_backward = result
    return result


class FusedPartitions(torch.autograd.Function):
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
        scale_stat, col_bias_stat = _stat_inputs(rows, scale, col_bias)
        tile = tile_config(rows.shape[1], rows.dtype, options.block_rows, options.block_cols)
        precision = dot_precision(rows.dtype)  # decided once: the backward recomputes with the same dots
        with _on_device(rows):
            # Partitions of every column (not only the queries): the backward's filter uses them.
            row_lse, all_col_lse = lse_forward(rows, cols, scale_stat, col_bias_stat, tile, precision)
        ctx.save_for_backward(rows, cols, scale_stat, col_bias_stat, row_lse, all_col_lse)
        ctx.n_query_cols = n_query_cols
        ctx.options = options
        ctx.precision = precision
        ctx.scale_dtype = scale.dtype
        return row_lse, all_col_lse[:n_query_cols].clone()

    @staticmethod
    def backward(ctx, grad_row_lse: torch.Tensor | None, grad_col_lse: torch.Tensor | None):
        rows, cols, scale_stat, col_bias, row_lse, all_col_lse = ctx.saved_tensors
        result = _backward(
            rows, cols, scale_stat, col_bias, ctx.n_query_cols, row_lse, all_col_lse, grad_row_lse, grad_col_lse,
            tuple(ctx.needs_input_grad[:3]), ctx.options, ctx.precision,
        )  # fmt: skip
        grad_scale = None if result.grad_scale is None else result.grad_scale.to(ctx.scale_dtype)
        return result.grad_rows, result.grad_cols, grad_scale, None, None, None


def partitions(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    options: PartitionOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(rows, cols)
    return FusedPartitions.apply(rows, cols, scale, col_bias, n_query_cols, options)


def partitions_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    grad_row_lse: torch.Tensor | None,
    grad_col_lse: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    options: PartitionOptions,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward alone, given statistics computed elsewhere (backends/base.py, docs/contract.md §7).

    The dots' precision is decided here as the forward decides it. With `col_lse` of the
    query columns only (`n_query_cols < K`) the gradient filter is off: its bound on the
    other columns' mass needs their partitions.
    """
    _check(rows, cols)
    scale_stat, col_bias_stat = _stat_inputs(rows, scale, col_bias)
    stat = scale_stat.dtype
    result = _backward(
        rows.detach(), cols.detach(), scale_stat, col_bias_stat, n_query_cols,
        row_lse.detach().to(stat).contiguous(), col_lse.detach().to(stat).contiguous(),
        None if grad_row_lse is None else grad_row_lse.detach().to(stat),
        None if grad_col_lse is None else grad_col_lse.detach().to(stat),
        tuple(needs), options, dot_precision(rows.dtype),
    )  # fmt: skip
    grad_scale = None if result.grad_scale is None else result.grad_scale.to(scale.dtype)
    return result.grad_rows, result.grad_cols, grad_scale
