"""Tiling and filtering options understood by the chunked backends, and their one resolution: a kernel sees
concrete values (`resolved`), whatever the primitive or backend."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from .dtypes import stat_dtype
from .flat import flat_value


@flat_value
@dataclass(frozen=True)
class PartitionOptions:
    """Knobs of the tiled partition kernels.

    `None` means "the backend's default for this shape and dtype"; backends
    ignore the knobs they do not have (the reference backend ignores all).

    block_rows, block_cols: tile of `S = τ·A·Cᵀ` held at once. They bound the
        working memory (block_rows × block_cols float32), independent of B.
    grad_filter_eps: skip a tile's gradient products when every softmax weight
        in it (both directions) is below this value (0 disables filtering).
        `None` picks the backend's exact-to-float32 default.
    """

    block_rows: int | None = None
    block_cols: int | None = None
    grad_filter_eps: float | None = None

    def __post_init__(self) -> None:
        for name in ("block_rows", "block_cols"):
            value = getattr(self, name)
            if value is None:
                continue
            # bool is an int subclass: block_rows=True must not silently mean a 1-row tile.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
            object.__setattr__(self, name, int(value))  # NumPy integers become plain ints, once
        eps = self.grad_filter_eps
        if eps is None:
            return
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"grad_filter_eps must be a float in [0, 1) or None, got {type(eps).__name__} {eps!r}")
        if not (0.0 <= eps < 1.0):  # NaN fails the comparison too
            raise ValueError(f"grad_filter_eps must be in [0, 1) or None, got {eps!r}")
        object.__setattr__(self, "grad_filter_eps", float(eps))


def default_grad_filter_eps(n_rows: int, n_cols: int, dtype: torch.dtype) -> float:
    """The gradient filter's exact-to-resolution threshold, shared by the fused backends.

    A row has at most `n_cols` softmax weights and a column at most `n_rows`. If every
    skipped weight is below `u / max(n_rows, n_cols)` of the mass of the row or column
    gradient it feeds (u = the unit roundoff of the statistics: 2^-24 in float32, 2^-53
    for float64 inputs), every row and column loses less than `u` of its mass: below
    the rounding that the unfiltered float32 accumulation makes anyway.
    """
    unit_roundoff = torch.finfo(stat_dtype(dtype)).eps / 2
    return unit_roundoff / max(n_rows, n_cols, 1)


def resolved(problem: Any, kernels: Any, *, with_eps: bool = True) -> Any:
    """`problem` with its options resolved for `kernels`, the one place where this happens:

    - a tile the caller gave is clamped to the problem (`block_rows = 10**9` never allocates a 10**9-row tile);
    - a tile left `None` becomes the kernels' `DEFAULT_BLOCK_ROWS`/`DEFAULT_BLOCK_COLS` (a `None` default
      stays `None`: the kernel's launch configuration decides, as Triton's does);
    - `grad_filter_eps=None` becomes `default_grad_filter_eps` of the problem's sizes (`with_eps`: on concrete
      sizes only, never symbolic ones under torch.compile; a kernel's `stats_like` does not need it).
    """
    options = problem.options
    n_rows, n_cols = problem.rows.shape[0], sum(block.shape[0] for block in problem.cols)
    given = (options.block_rows, options.block_cols)
    defaults = (getattr(kernels, "DEFAULT_BLOCK_ROWS", None), getattr(kernels, "DEFAULT_BLOCK_COLS", None))
    block_rows, block_cols = (
        default if tile is None else min(tile, max(n, 1)) for tile, default, n in zip(given, defaults, (n_rows, n_cols))
    )
    eps = options.grad_filter_eps
    if eps is None and with_eps:
        eps = default_grad_filter_eps(n_rows, n_cols, problem.rows.dtype)
    return dataclasses.replace(problem, options=PartitionOptions(block_rows, block_cols, eps))
