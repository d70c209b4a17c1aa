"""backend="triton" for the sigmoid pair sum (docs/contract.md §8): the fused Triton kernels of
`triton_kernels/sigmoid_forward.py` as a pure kernel (the layer's dispatch table lists it).

One row-block kernel (loss, `grad_A`, per-row partials of `grad_τ`, `grad_b`) and, when `grad_C` is asked,
one column-block kernel recomputing the logits: no atomics, identical inputs give identical bits. The
per-row partials are summed here in float64, in order. Tiles come from `triton_kernels.config` (the softmax
kernels' tiles but float32's, `config.sigmoid_tile_config`; `block_rows`/`block_cols` override them).

On CUDA tensors the kernels run compiled; on CPU tensors through Triton's interpreter, which must be
switched on (`TRITON_INTERPRET=1`) before this module is first imported (as `triton_fused`).
"""

from __future__ import annotations

from ..triton_kernels.config import dot_precision, sigmoid_tile_config
from ..triton_kernels.sigmoid_forward import sigmoid_pairs
from .sigmoid_values import PairSums, SigmoidProblem
from .triton_fused import check_operands, is_available, on_device
from .values import Needs

__all__ = ["is_available", "pair_sum"]

# No default tile here: `config.sigmoid_tile_config` decides (sized to d and dtype).
DEFAULT_BLOCK_ROWS: int | None = None
DEFAULT_BLOCK_COLS: int | None = None
gradients_in_forward = True  # as the fused CPU kernel: the forward runs the gradient products in the same pass


def pair_sum(problem: SigmoidProblem, needs: Needs) -> PairSums:
    """`base.SigmoidPairKernels.pair_sum` on the Triton kernels."""
    rows, cols, options = problem.rows.detach(), problem.joined_cols().detach(), problem.options
    check_operands(rows, cols)
    stat = problem.stat_dtype
    tile = sigmoid_tile_config(rows.shape[1], rows.dtype, options.block_rows, options.block_cols)
    with on_device(rows):
        row_loss, grad_rows, grad_cols, row_dscale, row_dbias, tiles = sigmoid_pairs(
            rows, cols, problem.scale_bias.detach().to(stat).contiguous(),
            problem.col_weight.detach().to(stat).contiguous(), problem.col_owner.contiguous(),
            (needs.rows, needs.cols, needs.scale), tile, dot_precision(rows.dtype), options.grad_filter_eps,
        )  # fmt: skip
    return PairSums(
        row_loss.double().sum(), None if grad_rows is None else grad_rows.to(rows.dtype),
        None if grad_cols is None else grad_cols.to(cols.dtype), row_dscale.double().sum() if needs.scale else None,
        row_dbias.double().sum() if needs.scale else None, tiles,
    )  # fmt: skip
