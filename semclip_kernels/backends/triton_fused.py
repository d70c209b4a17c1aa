"""backend="triton": the partitions primitive (docs/contract.md §7) on the fused Triton kernels, as pure
kernels (docs/backends.md): argument checks and the calls of the launchers.

The kernels and their launchers live in `semclip_kernels.triton_kernels` (`lse_forward`, `backward`,
`grad_gemm`), their launch configurations in `triton_kernels.config`; docs/triton.md describes the design.

Forward: one product, no locks or atomics. Backward: three products (1 + 2f with a fraction f of tiles
kept by the gradient filter), no atomics. The entries of `Problem.positives` are left out of both (their
logits -inf in the tile); the positive bands are added to the float32 gradients, `O(M·n·d)` products
outside the kernels.
Identical inputs give bitwise identical results.

On CUDA tensors the kernels run compiled. On CPU tensors they run through Triton's interpreter, which
must be switched on (`TRITON_INTERPRET=1`) before this module is first imported.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from ..triton_kernels import tl_utils
from ..triton_kernels.backward import partitions_backward as _launch_backward
from ..triton_kernels.config import dot_precision, gemm_config
from ..triton_kernels.lse_forward import lse_forward
from ..triton_kernels.tuning import select_tile
from .values import Grads, Needs, Problem, StatGrads, Stats, add_positive_terms, column_mass_bounds, split_cols

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

differentiable = False


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


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def check_operands(rows: torch.Tensor, cols: torch.Tensor) -> None:
    """The kernels' operands: one supported dtype, one device (TypeError/ValueError naming them)."""
    if rows.dtype not in SUPPORTED_DTYPES or cols.dtype != rows.dtype:
        raise TypeError(
            f"backend='triton' needs rows and cols of one dtype among {SUPPORTED_DTYPES}, "
            f"got {rows.dtype} and {cols.dtype}"
        )
    if rows.device != cols.device:
        raise ValueError(f"rows and cols must share a device, got {rows.device} and {cols.device}")


def _tile(problem: Problem):
    """The tile of the forward and of the dS panel: the same for both (bitwise recompute); tuned per GPU."""
    return select_tile(problem.rows.shape[1], problem.rows.dtype, problem.rows.device, problem.options.block_rows,
                       problem.options.block_cols)  # fmt: skip


def forward(problem: Problem) -> Stats:
    """`row_lse`, `query_lse` and every column's mass bound, in the statistics dtype.

    The dots' precision (TF32 or not) is read here and again by the backward: both from the same global
    setting of the same process, so the backward recomputes the forward's logits bitwise.
    """
    cols = problem.joined_cols()
    check_operands(problem.rows, cols)
    stat = problem.stat_dtype
    scale = problem.scale.detach().to(stat).reshape(1).contiguous()
    bias = problem.col_bias.detach().to(stat).contiguous()
    with on_device(problem.rows):
        row_lse, col_lse = lse_forward(problem.rows.detach(), cols.detach(), scale, bias, _tile(problem),
                                       dot_precision(problem.rows.dtype), excluded=problem.positives)  # fmt: skip
    bounds = column_mass_bounds(bias, col_lse, row_lse)
    return Stats(row_lse, col_lse[: problem.n_query_cols].contiguous(), bounds, own=True)


def stats_like(problem: Problem) -> Stats:
    return Stats.like(problem)


def backward(problem: Problem, stats: Stats, grads: StatGrads, needs: Needs) -> Grads:
    """Gradients in the statistics dtype; the positive bands added in float32; filtered where the bounds allow."""
    cols = problem.joined_cols().detach()
    rows = problem.rows.detach()
    check_operands(rows, cols)
    stat = problem.stat_dtype
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    eps = problem.options.grad_filter_eps
    tile = _tile(problem)

    def stat_vector(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(stat).contiguous()

    with on_device(rows):
        result = _launch_backward(
            rows, cols, problem.scale.detach().to(stat).reshape(1).contiguous(),
            problem.col_bias.detach().to(stat).contiguous(), problem.n_query_cols, stat_vector(stats.row_lse),
            stat_vector(stats.query_lse), stat_vector(stats.col_mass_lb), stat_vector(grads.row),
            stat_vector(grads.query), (needs.rows, needs.cols, needs.scale), dot_precision(rows.dtype), float(eps),
            tile, gemm_config(dim, rows.dtype), excluded=problem.positives,
            row_residual=bool(problem.positives) and problem.positives[0][1] >= 1, own_stats=stats.own,
        )  # fmt: skip
    if result.row_residual is not None:
        # What the 16-bit panel lost of each row's weights, added back in float32 along the row's first left-out
        # column (the loss's caption): every column that carries weight in a near-converged row is within a
        # few percent of it, so the rounding's sum is what did not cancel (a hard negative at cosine 0.98).
        first, per_row = problem.positives[0]
        reference = cols[first + torch.arange(n_rows, device=rows.device) * per_row].to(stat)
        result.grad_rows.add_(reference * (result.row_residual.to(stat) * problem.scale.detach().to(stat))[:, None])
    tiles = triton.cdiv(n_rows, tile.block_m) * triton.cdiv(n_cols, tile.block_n)
    skipped = tiles - result.kept_tiles
    counts = torch.stack([torch.full_like(skipped, tiles), skipped, torch.zeros_like(skipped)])
    result_grads = Grads(
        result.grad_rows if needs.rows else None,
        split_cols(result.grad_cols, problem) if needs.cols else None,
        result.grad_scale.reshape(()) if needs.scale else None,
        counts,
    )
    # The bands in float32, outside the 16-bit panel: a paraphrase nearly equal to its caption makes the image
    # gradient a small difference of O(1) band entries, which bfloat16 would round (O(M·n·d) products).
    return add_positive_terms(problem, grads.positives, result_grads, needs)
