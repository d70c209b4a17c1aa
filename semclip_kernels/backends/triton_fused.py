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
from ..triton_kernels.config import dot_precision, gemm_config
from ..triton_kernels.lse_forward import lse_forward
from ..triton_kernels.tuning import select_tile
from .base import BackwardStats
from .dtypes import stat_dtype
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


def _filter_eps(options: PartitionOptions, n_rows: int, n_cols: int, dtype: torch.dtype) -> float:
    eps = options.grad_filter_eps
    return default_grad_filter_eps(n_rows, n_cols, dtype) if eps is None else eps


# The kernels as torch.library custom ops: torch.compile sees opaque ops with fake (meta)
# implementations instead of tracing into Triton launches. Options travel as plain scalars.


@torch.library.custom_op("semclip::triton_lse", mutates_args=())
def _lse_op(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    block_rows: int | None,
    block_cols: int | None,
    grad_filter_eps: float | None,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(row_lse [M], col_lse [K])`: the column partitions of every column (the filter uses them).

    `n_query_cols` and `grad_filter_eps` are for the backward (saved by `_setup_context`).
    """
    tile = select_tile(rows.shape[1], rows.dtype, rows.device, block_rows, block_cols)
    with _on_device(rows):
        return lse_forward(rows, cols, scale.detach(), col_bias, tile, precision)


@_lse_op.register_fake
def _lse_fake(rows, cols, scale, col_bias, n_query_cols, block_rows, block_cols, grad_filter_eps, precision):
    stat = stat_dtype(rows.dtype)
    return rows.new_empty((rows.shape[0],), dtype=stat), rows.new_empty((cols.shape[0],), dtype=stat)


@torch.library.custom_op("semclip::triton_lse_backward", mutates_args=())
def _lse_backward_op(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    grad_row_lse: torch.Tensor | None,
    grad_col_lse: torch.Tensor | None,
    need_rows: bool,
    need_cols: bool,
    need_scale: bool,
    block_rows: int | None,
    block_cols: int | None,
    filter_eps: float,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(grad_rows, grad_cols, grad_scale [1], kept_tiles)`; an empty tensor for a gradient not needed."""
    dim = rows.shape[1]
    with _on_device(rows):
        result = _launch_backward(
            rows, cols, scale, col_bias, n_query_cols, row_lse, col_lse, grad_row_lse, grad_col_lse,
            (need_rows, need_cols, need_scale), precision, filter_eps,
            select_tile(dim, rows.dtype, rows.device, block_rows, block_cols), gemm_config(dim, rows.dtype),
        )  # fmt: skip
    return (  # (distinct empty tensors: the outputs of a custom op may not alias each other)
        rows.new_empty((0,)) if result.grad_rows is None else result.grad_rows,
        cols.new_empty((0,)) if result.grad_cols is None else result.grad_cols,
        scale.new_empty((0,)) if result.grad_scale is None else result.grad_scale.reshape(1),
        result.kept_tiles,
    )


@_lse_backward_op.register_fake
def _lse_backward_fake(rows, cols, scale, col_bias, n_query_cols, row_lse, col_lse, grad_row_lse, grad_col_lse,
                       need_rows, need_cols, need_scale, block_rows, block_cols, filter_eps, precision):  # fmt: skip
    return (
        rows.new_empty(rows.shape if need_rows else (0,)),
        cols.new_empty(cols.shape if need_cols else (0,)),
        scale.new_empty((1,) if need_scale else (0,)),
        rows.new_empty((), dtype=torch.int64),
    )


def _backward(
    rows, cols, scale_stat, col_bias, n_query_cols, row_lse, col_lse, grad_row_lse, grad_col_lse, needs,
    options: PartitionOptions, precision: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """The backward op, its statistics recorded for `last_backward_stats`; None for gradients not needed."""
    global _last_backward
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    grad_rows, grad_cols, grad_scale, kept_tiles = _lse_backward_op(
        rows, cols, scale_stat, col_bias, n_query_cols, row_lse, col_lse, grad_row_lse, grad_col_lse, *needs,
        options.block_rows, options.block_cols, _filter_eps(options, n_rows, n_cols, rows.dtype), precision,
    )  # fmt: skip
    tile = select_tile(dim, rows.dtype, rows.device, options.block_rows, options.block_cols)
    tiles = triton.cdiv(n_rows, tile.block_m) * triton.cdiv(n_cols, tile.block_n)
    _last_backward = BackwardResult(None, None, None, tiles, kept_tiles)
    need_rows, need_cols, need_scale = needs
    return (grad_rows if need_rows else None, grad_cols if need_cols else None,
            grad_scale.reshape(()) if need_scale else None)  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    rows, cols, scale, col_bias, n_query_cols, block_rows, block_cols, grad_filter_eps, precision = inputs
    row_lse, all_col_lse = output
    ctx.save_for_backward(rows, cols, scale, col_bias, row_lse, all_col_lse)
    ctx.n_query_cols = n_query_cols
    ctx.options = PartitionOptions(block_rows=block_rows, block_cols=block_cols, grad_filter_eps=grad_filter_eps)
    ctx.precision = precision  # decided once in the forward: the backward recomputes with the same dots


def _lse_op_backward(ctx, grad_row_lse: torch.Tensor | None, grad_all_col_lse: torch.Tensor | None):
    if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients are not differentiable again
        raise RuntimeError(
            "backend='triton' computes first derivatives only; for second derivatives (create_graph=True) "
            "use backend='reference'"
        )
    rows, cols, scale, col_bias, row_lse, all_col_lse = ctx.saved_tensors
    n_query_cols = ctx.n_query_cols
    grad_col_lse = None if grad_all_col_lse is None else grad_all_col_lse[:n_query_cols].contiguous()
    grad_rows, grad_cols, grad_scale = _backward(
        rows.detach(), cols.detach(), scale.detach(), col_bias, n_query_cols, row_lse, all_col_lse,
        grad_row_lse, grad_col_lse, tuple(ctx.needs_input_grad[:3]), ctx.options, ctx.precision,
    )  # fmt: skip
    grad_scale = None if grad_scale is None else grad_scale.reshape(scale.shape)
    return grad_rows, grad_cols, grad_scale, None, None, None, None, None, None


_lse_op.register_autograd(_lse_op_backward, setup_context=_setup_context)


def partitions(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    options: PartitionOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(rows, cols)
    stat = stat_dtype(rows.dtype)
    scale_stat = scale.to(stat).reshape(1)  # differentiable: autograd brings grad_τ back to scale's dtype
    row_lse, all_col_lse = _lse_op(
        rows, cols, scale_stat, col_bias.detach().to(stat).contiguous(), n_query_cols, options.block_rows,
        options.block_cols, options.grad_filter_eps, dot_precision(rows.dtype),
    )  # fmt: skip
    return row_lse, all_col_lse[:n_query_cols]


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
    grad_rows, grad_cols, grad_scale = _backward(
        rows.detach(), cols.detach(), scale_stat, col_bias_stat, n_query_cols,
        row_lse.detach().to(stat).contiguous(), col_lse.detach().to(stat).contiguous(),
        None if grad_row_lse is None else grad_row_lse.detach().to(stat),
        None if grad_col_lse is None else grad_col_lse.detach().to(stat),
        tuple(needs), options, dot_precision(rows.dtype),
    )  # fmt: skip
    return grad_rows, grad_cols, None if grad_scale is None else grad_scale.to(scale.dtype)
