"""Fused Triton kernels of the partitions primitive (SPEC section 7), one module per phase.

- `lse_forward`: one pass over tiles of `S = τ·A·Cᵀ` giving `row_lse` and `col_lse`.
- `backward`: recompute each tile once, apply both directions' softmax weights,
  accumulate the gradients of the rows, the columns and `τ`.
- `heuristics`: block sizes per feature dimension and dtype.
- `tl_utils`: small `@triton.jit` helpers shared by the kernels.

Importing this package requires Triton. Set `TRITON_INTERPRET=1` before the
import to run the kernels on CPU tensors through Triton's interpreter.
"""
