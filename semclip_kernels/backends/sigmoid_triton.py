"""backend="triton" for the sigmoid pair sum (docs/contract.md §8): the fused Triton kernels of
`triton_kernels/sigmoid_forward.py` as a pure kernel (`sigmoid_dispatch.py` wires it in).

One row-block kernel (loss, `grad_A`, per-row partials of `grad_τ`, `grad_b`) and, when `grad_C` is asked,
one column-block kernel recomputing the logits: no atomics, identical inputs give identical bits. The
per-row partials are summed here in float64, in order. Tiles come from `triton_kernels.config` (the softmax
kernels' tiles but float32's, `config.sigmoid_tile_config`; `block_rows`/`block_cols` override them).

On CUDA tensors the kernels run compiled; on CPU tensors through Triton's interpreter, which must be
switched on (`TRITON_INTERPRET=1`) before this module is first imported (as `triton_fused`).
"""

from __future__ import annotations

import torch

from ..triton_kernels.config import dot_precision, sigmoid_tile_config
from ..triton_kernels.sigmoid_forward import sigmoid_pairs
from .dtypes import stat_dtype
from .triton_fused import _SUPPORTED_DTYPES, _on_device
from .triton_fused import is_available as _triton_available

# No default tile here: `config.sigmoid_tile_config` decides (sized to d and dtype).
DEFAULT_BLOCK_ROWS: int | None = None
DEFAULT_BLOCK_COLS: int | None = None


def is_available(device: torch.device) -> tuple[bool, str]:
    return _triton_available(device)


def pair_sum(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    col_weight: torch.Tensor,
    col_owner: torch.Tensor,
    needs: tuple[bool, bool, bool, bool],
    block_rows: int | None,
    block_cols: int | None,
    grad_filter_eps: float,
) -> tuple:
    """`(pair_sum, grad_rows, grad_cols, grad_scale, grad_bias, (tiles, skipped_tiles))` (see
    `sigmoid_torch.pair_sum`)."""
    if rows.dtype not in _SUPPORTED_DTYPES or cols.dtype != rows.dtype:
        raise TypeError(
            f"backend='triton' needs rows and cols of one dtype among {_SUPPORTED_DTYPES}, "
            f"got {rows.dtype} and {cols.dtype}"
        )
    if rows.device != cols.device:
        raise ValueError(f"rows and cols must share a device, got {rows.device} and {cols.device}")
    need_rows, need_cols, need_scale, need_bias = needs
    stat = stat_dtype(rows.dtype)
    scale_bias = torch.stack([scale.detach().reshape(()), bias.detach().reshape(())]).to(stat).contiguous()
    tile = sigmoid_tile_config(rows.shape[1], rows.dtype, block_rows, block_cols)
    with _on_device(rows):
        row_loss, grad_rows, grad_cols, row_dscale, row_dbias, tiles = sigmoid_pairs(
            rows.detach(), cols.detach(), scale_bias, col_weight.detach().to(stat).contiguous(),
            col_owner.contiguous(), (need_rows, need_cols, need_scale or need_bias), tile,
            dot_precision(rows.dtype), grad_filter_eps,
        )  # fmt: skip
    return (
        row_loss.double().sum().to(stat_dtype(scale.dtype)),
        None if grad_rows is None else grad_rows.to(rows.dtype),
        None if grad_cols is None else grad_cols.to(cols.dtype),
        row_dscale.double().sum().to(scale.dtype) if need_scale else None,
        row_dbias.double().sum().to(bias.dtype) if need_bias else None,
        tiles,
    )
