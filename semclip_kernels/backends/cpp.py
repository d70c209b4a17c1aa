"""The compiled, fused CPU kernel (csrc/, built as `semclip_kernels._C`).

Tiles of `S = τ·A·Cᵀ` that stay in cache, both directions' partitions from one
pass, backward by recomputation with gradient filtering; nothing of `M × K`
elements is ever allocated. The design and its measured speed are in
docs/cpu_kernel.md.

Computes in float32 (float64 for float64 inputs); float16/bfloat16 features
are upcast to float32 once (an `O((M + K)·d)` copy) and their gradients cast
back. The kernels are the custom ops `semclip::cpp_forward` and
`semclip::cpp_backward` (fake implementations for `torch.compile`, autograd
registered on the forward; the backward raises if differentiated again).
"""

from __future__ import annotations

import torch

from .base import BackwardStats
from .dtypes import stat_dtype
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


def _blocks(options: PartitionOptions) -> tuple[int, int]:
    return options.block_rows or DEFAULT_BLOCK_ROWS, options.block_cols or DEFAULT_BLOCK_COLS


def _n_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


@torch.library.custom_op("semclip::cpp_forward", mutates_args=(), device_types="cpu")
def cpp_forward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    block_rows: int,
    block_cols: int,
    grad_filter_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(row_lse [M], col_lse [K], tile_max)` of contiguous float32/float64 inputs; the statistics in float64.

    `col_lse` covers every column (the query columns' are the primitive's output; the others bound the
    column masses for the backward's filter). `grad_filter_eps` is only used by the backward.
    """
    # detach: the kernel's out= products refuse inputs that require grad (autograd is registered below)
    row_lse, col_lse, tile_max = _C.forward(
        rows.detach(), cols.detach(), float(scale), col_bias.detach(), n_query_cols, block_rows, block_cols
    )
    return row_lse, col_lse, tile_max


@cpp_forward.register_fake
def _(rows, cols, scale, col_bias, n_query_cols, block_rows, block_cols, grad_filter_eps):
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    tile_max_shape = (_n_blocks(n_rows, block_rows), _n_blocks(n_cols, block_cols))
    return (
        rows.new_empty((n_rows,), dtype=torch.float64),
        cols.new_empty((n_cols,), dtype=torch.float64),
        rows.new_empty(tile_max_shape),
    )


@torch.library.custom_op("semclip::cpp_backward", mutates_args=(), device_types="cpu")
def cpp_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    col_mass_lse: torch.Tensor,
    tile_max: torch.Tensor,
    grad_row_lse: torch.Tensor,
    grad_col_lse: torch.Tensor,
    needs: list[bool],
    block_rows: int,
    block_cols: int,
    grad_filter_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(grad_rows, grad_cols, grad_scale)` in the inputs' compute dtype; empty where `needs` says no.

    `row_lse [M]`, `col_lse [n_query_cols]` (float64) may come from elsewhere; `col_mass_lse [K]` and
    `tile_max` are the forward's or empty (then the filter never skips a tile holding a column whose mass
    is unknown, and each tile's shift is its own max).
    """
    global _last_stats
    need_rows, need_cols, need_scale = needs
    if grad_filter_eps < 0:  # the default, resolved here on concrete sizes (see `_filter_eps`)
        grad_filter_eps = default_grad_filter_eps(rows.shape[0], cols.shape[0], rows.dtype)
    grad_rows, grad_cols, grad_scale, stats = _C.backward(
        rows.detach(), cols.detach(), float(scale), col_bias.detach(), n_query_cols, row_lse.detach(),
        col_lse.detach(), col_mass_lse.detach(), tile_max.detach(), grad_row_lse.detach(), grad_col_lse.detach(),
        need_rows, need_cols, need_scale, block_rows, block_cols, grad_filter_eps,
    )
    _last_stats = BackwardStats(*stats.tolist())
    return (  # separate empties: the outputs of a custom op must not alias each other
        grad_rows if need_rows else rows.new_empty((0,)),
        grad_cols if need_cols else rows.new_empty((0,)),
        grad_scale.to(scale.dtype),
    )


@cpp_backward.register_fake
def _(rows, cols, scale, col_bias, n_query_cols, row_lse, col_lse, col_mass_lse, tile_max, grad_row_lse,
      grad_col_lse, needs, block_rows, block_cols, grad_filter_eps):
    need_rows, need_cols, _ = needs
    return (
        torch.empty_like(rows) if need_rows else rows.new_empty((0,)),
        torch.empty_like(cols) if need_cols else rows.new_empty((0,)),
        scale.new_empty(()),
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "backend='cpp' does not support double backward (create_graph=True and differentiating the gradients "
        "again); use backend='reference' for second derivatives"
    )


torch.library.register_autograd("semclip::cpp_backward", _no_double_backward)


def _forward_setup_context(ctx, inputs, output) -> None:
    rows, cols, scale, col_bias, n_query_cols, block_rows, block_cols, grad_filter_eps = inputs
    row_lse, col_lse, tile_max = output
    ctx.save_for_backward(rows, cols, scale, col_bias, row_lse, col_lse, tile_max)
    ctx.settings = (n_query_cols, block_rows, block_cols, grad_filter_eps)


def _forward_backward(ctx, grad_row_lse, grad_col_lse, grad_tile_max):
    rows, cols, scale, col_bias, row_lse, col_lse, tile_max = ctx.saved_tensors
    n_query_cols, block_rows, block_cols, grad_filter_eps = ctx.settings
    needs = list(ctx.needs_input_grad[:3])
    grad_rows, grad_cols, grad_scale = cpp_backward(
        rows, cols, scale, col_bias, n_query_cols, row_lse, col_lse[:n_query_cols], col_lse, tile_max,
        _line_grad(grad_row_lse, rows.shape[0], rows.dtype), _line_grad(grad_col_lse, n_query_cols, rows.dtype),
        needs, block_rows, block_cols, grad_filter_eps,
    )
    return (
        grad_rows if needs[0] else None,
        grad_cols if needs[1] else None,
        grad_scale if needs[2] else None,
        None, None, None, None, None,
    )


def _line_grad(grad: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `n` entries of an incoming statistic gradient in the kernel's dtype (zeros if None)."""
    if grad is None:
        return torch.zeros(n, dtype=dtype)
    return grad[:n].to(dtype).contiguous()


torch.library.register_autograd("semclip::cpp_forward", _forward_backward, setup_context=_forward_setup_context)


def _kernel_inputs(rows, cols, scale, col_bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rows`, `cols`, `col_bias` in the kernel's dtype (float32, or float64 for float64), contiguous."""
    dtype = stat_dtype(scale.dtype)
    return rows.to(dtype).contiguous(), cols.to(dtype).contiguous(), col_bias.detach().to(dtype).contiguous()


# A negative eps asks the backward op for the default threshold of its (concrete) sizes: computed out
# here from symbolic sizes under torch.compile, it would specialise the graph on the batch size.
_DEFAULT_EPS = -1.0


def _filter_eps(options: PartitionOptions) -> float:
    return _DEFAULT_EPS if options.grad_filter_eps is None else options.grad_filter_eps


def _check_available(rows: torch.Tensor) -> None:
    ok, reason = is_available(rows.device)
    if not ok:
        raise RuntimeError(f"backend='cpp' cannot run: {reason}")


def partitions(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    options: PartitionOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and query-column log-partitions of `scale·rows·colsᵀ` (docs/contract.md §7), fused on CPU."""
    _check_available(rows)
    rows_k, cols_k, bias_k = _kernel_inputs(rows, cols, scale, col_bias)
    eps = _filter_eps(options)
    row_lse, col_lse, _ = cpp_forward(rows_k, cols_k, scale, bias_k, n_query_cols, *_blocks(options), eps)
    return row_lse.to(scale.dtype), col_lse[:n_query_cols].to(scale.dtype)


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
    """The backward alone, given statistics computed elsewhere (see `base.Backend.partitions_backward`).

    Each tile's shift is its own max (recomputed), and the filter never skips a tile that holds a
    non-query column (or a query column without a column gradient): their gradients' mass is unknown here.
    """
    _check_available(rows)
    rows_k, cols_k, bias_k = _kernel_inputs(rows.detach(), cols.detach(), scale, col_bias)
    dtype = rows_k.dtype
    eps = _filter_eps(options)
    empty = torch.empty(0, dtype=torch.float64)
    grad_rows, grad_cols, grad_scale = cpp_backward(
        rows_k, cols_k, scale.detach(), bias_k, n_query_cols,
        row_lse.detach().double().contiguous(), col_lse.detach().double().contiguous(), empty, rows_k.new_empty(0),
        _line_grad(grad_row_lse, rows.shape[0], dtype), _line_grad(grad_col_lse, n_query_cols, dtype),
        list(needs), *_blocks(options), eps,
    )
    need_rows, need_cols, need_scale = needs
    return (
        grad_rows.to(rows.dtype) if need_rows else None,
        grad_cols.to(cols.dtype) if need_cols else None,
        grad_scale if need_scale else None,
    )
