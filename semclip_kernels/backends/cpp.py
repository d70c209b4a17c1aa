"""The compiled, fused CPU kernel (csrc/, built as `semclip_kernels._C`): pure kernels (docs/backends.md).

Tiles of `S = τ·A·Cᵀ` that stay in cache, both directions' partitions from one pass, backward by
recomputation with gradient filtering; nothing of `M × K` elements is ever allocated. The design and its
measured speed are in docs/cpu_kernel.md.

Computes in float32 (float64 for float64 inputs); float16/bfloat16 features are upcast to float32 (an
`O((M + K)·d)` temporary) and the gradients come back in float32. The entries of `Problem.positives` are
left out of the partitions (set to -inf in each tile); the positive bands are added to the float32 gradients
(`values.add_positive_terms`): exact to float32, as the kernel's own accumulation.
"""

from __future__ import annotations

import torch

from .values import Grads, Needs, Problem, StatGrads, Stats, add_positive_terms, column_mass_bounds

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

differentiable = False


def is_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the cpp backend runs on CPU tensors only, got {device.type}"
    if _C is None:
        return False, (
            f"the C++ extension semclip_kernels._C is not built ({_IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` from the repository root"
        )
    return True, ""


def extension():
    """The compiled extension module (`semclip_kernels._C`), or None where it is not built."""
    return _C


def _blocks(problem: Problem) -> tuple[int, int]:
    """The tile (the layer resolved the options: `options.resolved`)."""
    return problem.options.block_rows, problem.options.block_cols


def _n_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def _check_available(rows: torch.Tensor) -> None:
    ok, reason = is_available(rows.device)
    if not ok:
        raise RuntimeError(f"backend='cpp' cannot run: {reason}")


def _flat(positives: tuple[tuple[int, int], ...]) -> list[int]:
    """`Problem.positives` as the kernel takes them: flat (first_col, per_row) pairs."""
    return [value for band in positives for value in band]


def _kernel_inputs(problem: Problem) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """`rows`, the column blocks and `col_bias` in the kernel's dtype (float32, or float64 for float64),
    contiguous: the caller's tensors themselves when they already are (the kernel tiles each block in place,
    no `[K, d]` concatenation)."""
    dtype = problem.stat_dtype
    rows = problem.rows.detach().to(dtype).contiguous()
    cols = [block.detach().to(dtype).contiguous() for block in problem.cols]
    return rows, cols, problem.col_bias.detach().to(dtype).contiguous()


def _n_col_tiles(problem: Problem, block_cols: int) -> int:
    """Column tiles of the kernel: each block is tiled on its own (a tile never straddles two blocks)."""
    return sum(_n_blocks(block.shape[0], block_cols) for block in problem.cols)


def forward(problem: Problem) -> Stats:
    """Row and query-column log-partitions (float64), every column's mass bound, and each tile's max (aux)."""
    _check_available(problem.rows)
    rows, cols, bias = _kernel_inputs(problem)
    row_lse, col_lse, tile_max = _C.forward(
        rows, cols, float(problem.scale), bias, problem.n_query_cols, *_blocks(problem), _flat(problem.positives),
    )  # fmt: skip
    bounds = column_mass_bounds(problem.col_bias.detach().double(), col_lse, row_lse)
    return Stats(row_lse, col_lse[: problem.n_query_cols].clone(), bounds, (tile_max,), own=True)


def stats_like(problem: Problem) -> Stats:
    block_rows, block_cols = _blocks(problem)
    new = problem.rows.new_empty
    tile_max = new((_n_blocks(problem.n_rows, block_rows), _n_col_tiles(problem, block_cols)),
                   dtype=problem.stat_dtype)  # fmt: skip
    return Stats(new((problem.n_rows,), dtype=torch.float64), new((problem.n_query_cols,), dtype=torch.float64),
                 new((problem.n_cols,), dtype=torch.float64), (tile_max,), own=True)  # fmt: skip


def _line_grad(grad: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    """An incoming statistic gradient in the kernel's dtype, contiguous (zeros if None)."""
    if grad is None:
        return torch.zeros(n, dtype=dtype)
    return grad.detach().to(dtype).contiguous()


def backward(problem: Problem, stats: Stats, grads: StatGrads, needs: Needs) -> Grads:
    """Gradients in float32 (float64), filtered by `grad_filter_eps` (default: exact to float32).

    With the forward's tile maxima (`stats.aux`) a skipped tile costs no product; without them (statistics
    from elsewhere) each tile's shift is its own max, recomputed. Columns without a mass bound
    (`stats.col_mass_lb` empty) are never skipped.
    """
    _check_available(problem.rows)
    rows, cols, bias = _kernel_inputs(problem)
    dtype = rows.dtype
    block_rows, block_cols = _blocks(problem)
    eps = problem.options.grad_filter_eps
    tile_max = stats.aux[0] if stats.aux else rows.new_empty(0)
    grad_rows, grad_scale, counts, *grad_cols = _C.backward(
        rows, cols, float(problem.scale), bias, problem.n_query_cols,
        stats.row_lse.detach().double().contiguous(), stats.query_lse.detach().double().contiguous(),
        stats.col_mass_lb.detach().double().contiguous(), tile_max.detach().contiguous(),
        _line_grad(grads.row, problem.n_rows, dtype), _line_grad(grads.query, problem.n_query_cols, dtype),
        needs.rows, needs.cols, needs.scale, block_rows, block_cols, float(eps), _flat(problem.positives),
    )  # fmt: skip
    result = Grads(
        grad_rows if needs.rows else None, tuple(_shaped(g, b.shape) for g, b in zip(grad_cols, problem.cols))
        if needs.cols else None,
        grad_scale if needs.scale else None, counts,
    )  # fmt: skip
    return add_positive_terms(problem, grads.positives, result, needs)


def _shaped(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The kernel's gradient of a block in the block's shape: itself where it has it (a view would be copied
    on its way out of the custom op, a second gradient-sized buffer)."""
    return grad if grad.shape == shape else grad.view(shape)
