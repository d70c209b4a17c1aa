"""Tiling and filtering options understood by the chunked backends."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .dtypes import stat_dtype


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


def resolve_options(
    options: PartitionOptions,
    n_rows: int,
    n_cols: int,
    dtype: torch.dtype,
    default_block_rows: int | None,
    default_block_cols: int | None,
) -> tuple[int | None, int | None, float]:
    """`(block_rows, block_cols, grad_filter_eps)`: `options` with a backend's defaults where it says None
    (a None default tile stays None: the kernel's launch configuration decides)."""
    eps = options.grad_filter_eps
    return (
        options.block_rows or default_block_rows,
        options.block_cols or default_block_cols,
        default_grad_filter_eps(n_rows, n_cols, dtype) if eps is None else eps,
    )
