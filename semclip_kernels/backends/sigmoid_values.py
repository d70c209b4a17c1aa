"""The values of the sigmoid pair primitive (docs/contract.md §8, docs/backends.md), and the adapter that
turns a pure sigmoid kernel (`base.SigmoidPairKernels`) into the layer's kernels.

    SigmoidProblem    rows [M, d], cols (blocks [K_j, d]), scale_bias [2] = (τ, b), col_weight [K],
                      col_owner [K] int64, options, forward_needs
    SigmoidStats      pair_sum (0-dim) and the gradients the forward computed (forward_needs), counts
    SigmoidStatGrads  the gradient arriving at pair_sum (0-dim)
    PairSums          what a pure sigmoid kernel returns: the sum and the gradients asked for
    Needs, Grads      the layer's (`values.py`); `scale` stands for the pair (τ, b): Grads.scale is [2]

    pair_sum = Σ_i Σ_c a_c·softplus(s_ic·(τ·<A_i, C_c> + b)),   s_ic = −1 if owner_c = i, else +1

Each pair's gradient is local, so a fused kernel may compute the gradients in its forward's one pass
(`forward_needs`); the backward then scales them by the incoming gradient, or recomputes the pass where
the forward computed none (or not the ones asked for).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch

from .dtypes import stat_dtype
from .flat import flat_value
from .options import PartitionOptions
from .values import Grads, Needs, split_cols


@flat_value
@dataclass(frozen=True)
class SigmoidProblem:
    rows: torch.Tensor  # [M, d]
    cols: tuple[torch.Tensor, ...]  # blocks [K_j, d], the rows' dtype, logically concatenated
    scale_bias: torch.Tensor  # [2], statistics dtype: (τ, b)
    col_weight: torch.Tensor  # [K], statistics dtype
    col_owner: torch.Tensor  # [K], int64: the row whose positive the column is (−1: none)
    options: PartitionOptions = dataclasses.field(default_factory=PartitionOptions)
    forward_needs: Needs = Needs(False, False, False)  # gradients the forward computes as well

    # `scale` in `Needs` and `Grads` stands for the pair (τ, b).
    GRADIENT_FIELDS: ClassVar[dict[str, str]] = {"rows": "rows", "cols": "cols", "scale_bias": "scale"}

    @property
    def stat_dtype(self) -> torch.dtype:
        return stat_dtype(self.rows.dtype)

    @property
    def scale(self) -> torch.Tensor:
        return self.scale_bias[0]

    @property
    def bias(self) -> torch.Tensor:
        return self.scale_bias[1]

    def joined_cols(self) -> torch.Tensor:
        return self.cols[0] if len(self.cols) == 1 else torch.cat(self.cols)


@flat_value
@dataclass(frozen=True)
class SigmoidStats:
    pair_sum: torch.Tensor  # 0-dim, statistics dtype
    grad_rows: torch.Tensor  # [M, d] statistics dtype, or [0] where the forward computed none
    grad_cols: tuple[torch.Tensor, ...]  # per block, or [0]s
    grad_scale_bias: torch.Tensor  # [2], or [0]
    counts: torch.Tensor  # [3] int64: the forward's gradient pass (tiles, skipped tiles, 0)

    STAT_GRAD_FIELDS: ClassVar[dict[str, str]] = {"pair_sum": "pair_sum"}  # differentiable outputs


@flat_value
@dataclass(frozen=True)
class SigmoidStatGrads:
    pair_sum: torch.Tensor | None = None  # 0-dim; None: zero


@dataclass(frozen=True)
class PairSums:
    """A pure sigmoid kernel's result: the sum (statistics dtype) and, where `needs` asked, the gradients of
    rows and of the joined columns (the features' dtypes), of τ and of b; the tiles its gradient pass visited
    and of those, the tiles the filter skipped."""

    total: torch.Tensor
    grad_rows: torch.Tensor | None
    grad_cols: torch.Tensor | None
    grad_scale: torch.Tensor | None
    grad_bias: torch.Tensor | None
    tiles: tuple[int, int]


# --------------------------------------------------------------------------- the adapter


class SigmoidKernels:
    """The layer's kernels for a pure sigmoid kernel module (`base.SigmoidPairKernels`), whose
    `pair_sum(problem, needs)` returns the sum and the gradients asked for in one pass."""

    differentiable = False

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.DEFAULT_BLOCK_ROWS = module.DEFAULT_BLOCK_ROWS
        self.DEFAULT_BLOCK_COLS = module.DEFAULT_BLOCK_COLS

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        return self.module.is_available(device)

    def _pass(self, problem: SigmoidProblem, needs: Needs) -> tuple:
        """`(total, grad_rows, grad_cols blocks, grad_scale_bias [2], counts)`, None where not asked."""
        sums = self.module.pair_sum(problem, needs)
        stat = problem.stat_dtype
        grad_cols = None if sums.grad_cols is None else split_cols(sums.grad_cols.to(stat), problem)
        grad_scale_bias = None if sums.grad_scale is None else torch.stack([sums.grad_scale, sums.grad_bias]).to(stat)
        grad_rows = None if sums.grad_rows is None else sums.grad_rows.to(stat)
        return sums.total.to(stat), grad_rows, grad_cols, grad_scale_bias, _counts(sums.tiles)

    def forward(self, problem: SigmoidProblem) -> SigmoidStats:
        total, grad_rows, grad_cols, grad_scale_bias, counts = self._pass(problem, problem.forward_needs)
        empty = problem.rows.new_empty((0,), dtype=problem.stat_dtype)
        return SigmoidStats(
            total,
            empty if grad_rows is None else grad_rows,
            tuple(empty.clone() for _ in problem.cols) if grad_cols is None else _own_blocks(grad_cols),
            empty.clone() if grad_scale_bias is None else grad_scale_bias,
            counts,
        )

    def stats_like(self, problem: SigmoidProblem) -> SigmoidStats:
        stat, fwd, new = problem.stat_dtype, problem.forward_needs, problem.rows.new_empty
        return SigmoidStats(
            new((), dtype=stat),
            new(problem.rows.shape if fwd.rows else (0,), dtype=stat),
            tuple(new(c.shape if fwd.cols else (0,), dtype=stat) for c in problem.cols),
            new((2,) if fwd.scale else (0,), dtype=stat),
            torch.empty(3, dtype=torch.int64),
        )

    def backward(self, problem: SigmoidProblem, stats: SigmoidStats, grads: SigmoidStatGrads, needs: Needs) -> Grads:
        stat = problem.stat_dtype
        g = torch.zeros((), dtype=stat) if grads.pair_sum is None else grads.pair_sum.to(stat)
        fwd = problem.forward_needs
        if (needs.rows <= fwd.rows) and (needs.cols <= fwd.cols) and (needs.scale <= fwd.scale):
            counts = stats.counts  # the forward's pass did the work: scale its gradients
            grad_rows, grad_cols, grad_scale_bias = stats.grad_rows, stats.grad_cols, stats.grad_scale_bias
        else:  # recompute the pass with gradients
            _, grad_rows, grad_cols, grad_scale_bias, counts = self._pass(problem, needs)
        return Grads(
            grad_rows.to(stat) * g if needs.rows else None,
            tuple(block * g for block in grad_cols) if needs.cols else None,
            grad_scale_bias * g if needs.scale else None,
            counts.clone(),
        )


def _own_blocks(blocks: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Column-gradient blocks that are outputs of a custom op may not alias each other: each its own copy.

    (`ops._distinct` copies views too, but under functionalization, as in AOT autograd, the split blocks
    need not report themselves as views.)"""
    return blocks if len(blocks) == 1 else tuple(block.clone() for block in blocks)


def _counts(tiles: tuple[int, int]) -> torch.Tensor:
    """`Grads.counts` of a gradient pass: (tiles visited, tiles skipped by the filter, 0)."""
    return torch.tensor([*tiles, 0], dtype=torch.int64)
