"""The values of the sigmoid pair primitive (docs/contract.md §8, docs/backends.md), their flat form for
`ops`, and the adapter that turns a pure sigmoid kernel into the layer's `Kernels`.

    SigmoidProblem    rows [M, d], cols (blocks [K_j, d]), scale_bias [2] = (τ, b), col_weight [K],
                      col_owner [K] int64, options, forward_needs
    SigmoidStats      pair_sum (0-dim) and the gradients the forward computed (forward_needs), counts
    SigmoidStatGrads  the gradient arriving at pair_sum (0-dim)
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

import torch

from .dtypes import stat_dtype
from .options import PartitionOptions, resolve_options
from .values import Grads, Needs, split_cols

_DEFAULT = -1  # an option left to the backend (block sizes and eps are never negative)


@dataclass(frozen=True)
class SigmoidProblem:
    rows: torch.Tensor  # [M, d]
    cols: tuple[torch.Tensor, ...]  # blocks [K_j, d], the rows' dtype, logically concatenated
    scale_bias: torch.Tensor  # [2], statistics dtype: (τ, b)
    col_weight: torch.Tensor  # [K], statistics dtype
    col_owner: torch.Tensor  # [K], int64: the row whose positive the column is (−1: none)
    options: PartitionOptions = dataclasses.field(default_factory=PartitionOptions)
    forward_needs: Needs = Needs(False, False, False)  # gradients the forward computes as well

    @property
    def stat_dtype(self) -> torch.dtype:
        return stat_dtype(self.rows.dtype)

    def joined_cols(self) -> torch.Tensor:
        return self.cols[0] if len(self.cols) == 1 else torch.cat(self.cols)


@dataclass(frozen=True)
class SigmoidStats:
    pair_sum: torch.Tensor  # 0-dim, statistics dtype
    grad_rows: torch.Tensor  # [M, d] statistics dtype, or [0] where the forward computed none
    grad_cols: tuple[torch.Tensor, ...]  # per block, or [0]s
    grad_scale_bias: torch.Tensor  # [2], or [0]
    counts: torch.Tensor  # [3] int64: the forward's gradient pass (tiles, skipped tiles, 0)


@dataclass(frozen=True)
class SigmoidStatGrads:
    pair_sum: torch.Tensor | None = None  # 0-dim; None: zero


# --------------------------------------------------------------------------- the adapter


class SigmoidKernels:
    """The layer's `Kernels` for a pure sigmoid kernel module (`sigmoid_torch`, `sigmoid_cpp`), whose one
    function `pair_sum(rows, cols, scale, bias, col_weight, col_owner, needs4, block_rows, block_cols, eps)`
    returns the sum and the gradients asked for; `DEFAULT_BLOCK_ROWS/COLS` are its default tile."""

    differentiable = False

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        return self.module.is_available(device)

    def _pass(self, problem: SigmoidProblem, needs: Needs):
        cols = problem.joined_cols()
        block_rows, block_cols, eps = resolve_options(
            problem.options, problem.rows.shape[0], cols.shape[0], problem.rows.dtype,
            self.module.DEFAULT_BLOCK_ROWS, self.module.DEFAULT_BLOCK_COLS,
        )  # fmt: skip
        scale, bias = problem.scale_bias[0], problem.scale_bias[1]
        return self.module.pair_sum(
            problem.rows, cols, scale, bias, problem.col_weight, problem.col_owner,
            (needs.rows, needs.cols, needs.scale, needs.scale), block_rows, block_cols, eps,
        )  # fmt: skip

    def forward(self, problem: SigmoidProblem) -> SigmoidStats:
        total, grad_rows, grad_cols, grad_scale, grad_bias, tiles = self._pass(problem, problem.forward_needs)
        stat, empty = problem.stat_dtype, problem.rows.new_empty((0,), dtype=problem.stat_dtype)
        no_cols = tuple(empty.clone() for _ in problem.cols)
        return SigmoidStats(
            total.to(stat),
            empty if grad_rows is None else grad_rows.to(stat),
            no_cols if grad_cols is None else _own_blocks(split_cols(grad_cols.to(stat), problem)),
            empty.clone() if grad_scale is None else torch.stack([grad_scale, grad_bias]).to(stat),
            _counts(tiles),
        )  # fmt: skip

    def stats_like(self, problem: SigmoidProblem) -> SigmoidStats:
        return SigmoidStats(*_stats_like(problem))

    def backward(self, problem: SigmoidProblem, stats: SigmoidStats, grads: SigmoidStatGrads, needs: Needs) -> Grads:
        stat = problem.stat_dtype
        g = torch.zeros((), dtype=stat) if grads.pair_sum is None else grads.pair_sum.to(stat)
        fwd = problem.forward_needs
        if (needs.rows <= fwd.rows) and (needs.cols <= fwd.cols) and (needs.scale <= fwd.scale):
            counts = stats.counts  # the forward's pass did the work: scale its gradients
            grad_rows, grad_cols, grad_scale_bias = stats.grad_rows, stats.grad_cols, stats.grad_scale_bias
        else:  # recompute the pass with gradients
            _, grad_rows, grad_cols, grad_scale, grad_bias, tiles = self._pass(problem, needs)
            counts = _counts(tiles)
            grad_cols = None if grad_cols is None else split_cols(grad_cols.to(stat), problem)
            grad_scale_bias = None if grad_scale is None else torch.stack([grad_scale, grad_bias]).to(stat)
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


def _stats_like(p: SigmoidProblem) -> tuple:
    stat, fwd = p.stat_dtype, p.forward_needs
    return (
        p.rows.new_empty((), dtype=stat),
        p.rows.new_empty(p.rows.shape if fwd.rows else (0,), dtype=stat),
        tuple(p.rows.new_empty(c.shape if fwd.cols else (0,), dtype=stat) for c in p.cols),
        p.rows.new_empty((2,) if fwd.scale else (0,), dtype=stat),
        torch.empty(3, dtype=torch.int64),
    )


# --------------------------------------------------------------------------- the flat form (custom ops)


def _or_default(value):
    return _DEFAULT if value is None else value


def _option(value):
    return None if value == _DEFAULT else value


def _encode_problem(p: SigmoidProblem):
    o, fwd = p.options, p.forward_needs
    ints = [_or_default(o.block_rows), _or_default(o.block_cols), int(fwd.rows), int(fwd.cols), int(fwd.scale)]
    return [p.rows, p.scale_bias, p.col_weight, p.col_owner, *p.cols], ints, [float(_or_default(o.grad_filter_eps))]


def _decode_problem(tensors, ints, floats) -> SigmoidProblem:
    rows, scale_bias, col_weight, col_owner, *cols = tensors
    block_rows, block_cols, *fwd = ints
    options = PartitionOptions(_option(block_rows), _option(block_cols), _option(floats[0]))
    return SigmoidProblem(rows, tuple(cols), scale_bias, col_weight, col_owner, options, Needs(*map(bool, fwd)))


def _encode_stats(s: SigmoidStats):
    return [s.pair_sum, s.grad_rows, s.grad_scale_bias, s.counts, *s.grad_cols]


def _decode_stats(tensors) -> SigmoidStats:
    pair_sum, grad_rows, grad_scale_bias, counts, *grad_cols = tensors
    return SigmoidStats(pair_sum, grad_rows, tuple(grad_cols), grad_scale_bias, counts)


def _encode_stat_grads(g: SigmoidStatGrads):
    return ([torch.empty(0)] if g.pair_sum is None else [g.pair_sum]), [int(g.pair_sum is not None)]


def _decode_stat_grads(tensors, ints) -> SigmoidStatGrads:
    return SigmoidStatGrads(tensors[0] if ints[0] else None)


def _stat_grads_of_outputs(output_grads) -> SigmoidStatGrads:
    return SigmoidStatGrads(output_grads[0])  # the precomputed gradients are not differentiable outputs


def _encode_grads(g: Grads, p: SigmoidProblem, needs: Needs):
    empty = p.rows.new_empty((0,), dtype=p.stat_dtype)
    cols = list(g.cols) if needs.cols and g.cols is not None else [empty.clone() for _ in p.cols]
    return [
        g.rows if needs.rows and g.rows is not None else empty.clone(),
        g.scale if needs.scale and g.scale is not None else empty.clone(),
        *cols,
        g.counts,
    ]


def _decode_grads(tensors, p: SigmoidProblem, needs: Needs) -> Grads:
    rows, scale_bias, *rest = tensors
    cols, counts = rest[:-1], rest[-1]
    return Grads(
        rows if needs.rows else None, tuple(cols) if needs.cols else None, scale_bias if needs.scale else None, counts
    )


def _grads_like(p: SigmoidProblem, needs: Needs):
    stat = p.stat_dtype
    return [
        p.rows.new_empty(p.rows.shape if needs.rows else (0,), dtype=stat),
        p.rows.new_empty((2,) if needs.scale else (0,), dtype=stat),
        *(p.rows.new_empty(c.shape if needs.cols else (0,), dtype=stat) for c in p.cols),
        torch.empty(3, dtype=torch.int64),
    ]


def _tensor_grads(g: Grads, p: SigmoidProblem):
    """Gradients of [rows, scale_bias, col_weight, col_owner, *cols] in their dtypes."""
    cols = [None] * len(p.cols) if g.cols is None else [grad.to(c.dtype) for grad, c in zip(g.cols, p.cols)]
    return [
        None if g.rows is None else g.rows.to(p.rows.dtype),
        None if g.scale is None else g.scale.to(p.scale_bias.dtype),
        None,
        None,
        *cols,
    ]


def _needs_of(flags, p: SigmoidProblem) -> Needs:
    return Needs(rows=flags[0], cols=any(flags[4:]), scale=flags[1])


SIGMOID_FLAT_FORM = (
    _encode_problem, _decode_problem, _encode_stats, _decode_stats, _encode_stat_grads, _decode_stat_grads,
    _stat_grads_of_outputs, _encode_grads, _decode_grads, _grads_like, _tensor_grads, _needs_of,
)  # fmt: skip
