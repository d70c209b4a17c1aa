"""Fused Triton partitions: `row_lse`, `col_lse` of `S = τ·A·Cᵀ` and their backward, never writing S.

Forward: one M×K×d product (both directions from each on-chip tile, merged
across programs with exact log-add-exp under locks). Backward: three M×K×d
products (recompute, grad_rows, grad_cols), fewer with gradient filtering.
The kernels live in `semclip_kernels.triton_kernels`; block sizes come from
`triton_kernels.heuristics`.

On CUDA tensors the kernels run compiled. On CPU tensors they run through
Triton's interpreter, which must be switched on (`TRITON_INTERPRET=1`) before
this module is first imported.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton  # noqa: F401  (ImportError here tells the dispatcher Triton is missing)
import triton.language as tl

from ..triton_kernels import tl_utils
from ..triton_kernels.backward import backward_kernel
from ..triton_kernels.heuristics import KernelConfig, backward_config, forward_config
from ..triton_kernels.lse_forward import lse_forward_kernel
from .options import PartitionOptions, default_grad_filter_eps

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Counters of the last backward call, for reporting the gradient filter's effect.
_last_backward: dict[str, object] = {}


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


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use TF32 only when PyTorch's matmuls are allowed to (not under the interpreter)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not tl_utils.INTERPRETED:
        return "tf32"
    return "ieee"


def _upcast_dot(dtype: torch.dtype) -> bool:
    """Interpreter work-around for 16-bit tl.dot (see tl_utils.dot_operand)."""
    return tl_utils.INTERPRETED and dtype in (torch.float16, torch.bfloat16)


def last_backward_stats() -> dict[str, int]:
    """Tiles of the last backward and how many the gradient filter skipped (synchronizes)."""
    if not _last_backward:
        return {"tiles": 0, "skipped_tiles": 0}
    return {"tiles": int(_last_backward["tiles"]), "skipped_tiles": int(_last_backward["skipped_tiles"].item())}


def _on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _grid(n_rows: int, n_cols: int, config: KernelConfig) -> tuple[int]:
    return (triton.cdiv(n_rows, config.block_m) * triton.cdiv(n_cols, config.block_n),)


def _common_constexprs(dtype: torch.dtype, config: KernelConfig) -> dict[str, object]:
    launch = {} if config.maxnreg is None or tl_utils.INTERPRETED else {"maxnreg": config.maxnreg}
    return dict(
        **launch,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=config.block_d,
        GROUP_M=config.group_m,
        ACC_DTYPE=_acc_dtype(dtype),
        UPCAST_DOT=_upcast_dot(dtype),
        DOT_PRECISION=_dot_precision(dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


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
        n_rows, dim = rows.shape
        n_cols = cols.shape[0]
        stat_dtype = _stat_dtype(rows.dtype)
        scale_stat = scale.detach().to(stat_dtype).reshape(1).contiguous()
        col_bias = col_bias.detach().to(stat_dtype).contiguous()
        row_lse = torch.full((n_rows,), -math.inf, dtype=stat_dtype, device=rows.device)
        # Partitions of every column (not only the queries): the backward's filter uses them.
        all_col_lse = torch.full((n_cols,), -math.inf, dtype=stat_dtype, device=rows.device)
        config = forward_config(dim, rows.dtype, options.block_rows, options.block_cols)
        if n_rows > 0 and n_cols > 0:
            row_locks = torch.zeros(triton.cdiv(n_rows, config.block_m), dtype=torch.int32, device=rows.device)
            col_locks = torch.zeros(triton.cdiv(n_cols, config.block_n), dtype=torch.int32, device=rows.device)
            with _on_device(rows):
                lse_forward_kernel[_grid(n_rows, n_cols, config)](
                    rows, cols, scale_stat, col_bias, row_lse, all_col_lse, row_locks, col_locks,
                    n_rows, n_cols, dim,
                    rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
                    **_common_constexprs(rows.dtype, config),
                )  # fmt: skip
        ctx.save_for_backward(rows, cols, scale_stat, col_bias, row_lse, all_col_lse)
        ctx.n_query_cols = n_query_cols
        ctx.options = options
        ctx.scale_dtype = scale.dtype
        return row_lse, all_col_lse[:n_query_cols].clone()

    @staticmethod
    def backward(ctx, grad_row_lse: torch.Tensor | None, grad_col_lse: torch.Tensor | None):
        rows, cols, scale_stat, col_bias, row_lse, all_col_lse = ctx.saved_tensors
        need_rows, need_cols, need_scale = ctx.needs_input_grad[:3]
        n_rows, dim = rows.shape
        n_cols = cols.shape[0]
        n_query_cols = ctx.n_query_cols
        options: PartitionOptions = ctx.options
        stat_dtype = row_lse.dtype
        device = rows.device

        has_row_grad = grad_row_lse is not None
        has_col_grad = grad_col_lse is not None and n_query_cols > 0
        grad_rows = torch.zeros((n_rows, dim), dtype=stat_dtype, device=device) if need_rows else None
        grad_cols = torch.zeros((n_cols, dim), dtype=stat_dtype, device=device) if need_cols else None
        grad_scale = torch.zeros(1, dtype=stat_dtype, device=device)
        skipped_tiles = torch.zeros(1, dtype=torch.int32, device=device)
        config = backward_config(dim, rows.dtype, options.block_rows, options.block_cols)
        eps = options.grad_filter_eps
        if eps is None:
            eps = default_grad_filter_eps(n_rows, n_cols, rows.dtype)
        grid = _grid(n_rows, n_cols, config)
        max_row_lse = row_lse.max().reshape(1) if n_rows > 0 else grad_scale

        if (need_rows or need_cols or need_scale) and (has_row_grad or has_col_grad) and grid[0] > 0:
            dummy = grad_scale  # stands in for pointers a constexpr flag keeps unused
            with _on_device(rows):
                backward_kernel[grid](
                    rows, cols, scale_stat, col_bias, row_lse, all_col_lse, max_row_lse,
                    grad_row_lse.contiguous() if has_row_grad else dummy,
                    grad_col_lse.contiguous() if has_col_grad else dummy,
                    grad_rows if need_rows else dummy,
                    grad_cols if need_cols else dummy,
                    grad_scale, skipped_tiles, eps,
                    n_rows, n_cols, n_query_cols, dim,
                    rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
                    HAS_ROW_GRAD=has_row_grad,
                    HAS_COL_GRAD=has_col_grad,
                    NEED_GRAD_ROWS=need_rows,
                    NEED_GRAD_COLS=need_cols,
                    NEED_GRAD_SCALE=need_scale,
                    FILTER=eps > 0 and has_row_grad,  # see backward.py: the filter needs the row direction
                    **_common_constexprs(rows.dtype, config),
                )  # fmt: skip
        _last_backward.update(tiles=grid[0], skipped_tiles=skipped_tiles)
        return (
            grad_rows.to(rows.dtype) if need_rows else None,
            grad_cols.to(cols.dtype) if need_cols else None,
            grad_scale.reshape(()).to(ctx.scale_dtype) if need_scale else None,
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
    if rows.dtype not in _SUPPORTED_DTYPES or cols.dtype != rows.dtype:
        raise TypeError(
            f"backend='triton' needs rows and cols of one dtype among {_SUPPORTED_DTYPES}, "
            f"got {rows.dtype} and {cols.dtype}"
        )
    if rows.device != cols.device:
        raise ValueError(f"rows and cols must share a device, got {rows.device} and {cols.device}")
    return FusedPartitions.apply(rows, cols, scale, col_bias, n_query_cols, options)
