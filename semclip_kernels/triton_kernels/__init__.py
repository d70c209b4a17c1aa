"""Fused Triton kernels of the partitions primitive (docs/contract.md §7), one module per phase.

Each module holds its kernels and their launchers; none uses a lock or an atomic.

- `lse_forward`: strips of tiles of `S = τ·A·Cᵀ` → partial statistics → `row_lse`, `col_lse`.
- `backward`: per column panel, the dS tiles (recomputed exactly as the forward computed them),
  then the gradient GEMMs of `grad_gemm`; grad_τ from per-tile partials.
- `grad_gemm`: `grad_rows += dS @ C`, `grad_cols = dSᵀ @ A`, one program per output tile.
- `config`: block sizes per dtype and d, and the one builder of every launch's constexprs.
- `tl_utils`: `@triton.jit` helpers shared by the kernels (the tile logits, running statistics).

Importing this package requires Triton. Set `TRITON_INTERPRET=1` before the
import to run the kernels on CPU tensors through Triton's interpreter.
"""
