"""What a backend is: one primitive, whether it can run here, and what its last backward did.

A backend is a module that satisfies `Backend` (docs/contract.md §7). The dispatch
point (`backends/__init__.py`) is the only caller; the loss layer never imports a
backend module directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # annotations only: options.py uses stat_dtype, so no runtime import back
    from .options import PartitionOptions


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every softmax statistic for features of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class BackwardStats:
    """What the most recent backward of a backend did (informative; not thread-safe).

    tiles: tiles of `S = τ·A·Cᵀ` the backward visited.
    skipped_tiles: of those, how many the gradient filter skipped (0 without filtering).
    exact_lines: rows or columns recomputed with per-line shifts because the tile's shared
        shift was unsafe for them (backends without a shared shift report 0).
    """

    tiles: int = 0
    skipped_tiles: int = 0
    exact_lines: int = 0

    @property
    def skipped_fraction(self) -> float:
        return self.skipped_tiles / self.tiles if self.tiles else 0.0


class Backend(Protocol):
    """The contract every backend module fulfils (docs/contract.md §7)."""

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        """Whether the backend runs on `device` here, and if not, why (a sentence for the user)."""
        ...

    def partitions(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scale: torch.Tensor,
        col_bias: torch.Tensor,
        n_query_cols: int,
        options: PartitionOptions,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(row_lse [M], col_lse [n_query_cols])` of `scale·rows·colsᵀ`, differentiable in rows, cols, scale."""
        ...

    def partitions_backward(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scale: torch.Tensor,
        col_bias: torch.Tensor,
        n_query_cols: int,
        row_lse: torch.Tensor,
        col_lse: torch.Tensor,
        grad_row_lse: torch.Tensor | None,
        grad_col_lse: torch.Tensor | None,
        needs: tuple[bool, bool, bool],
        options: PartitionOptions,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The backward alone, given statistics computed elsewhere (docs/contract.md §7).

        `row_lse [M]` and `col_lse [n_query_cols]` may be the global statistics of a larger batch
        (a distributed ring differentiates each travelling block against them without recomputing
        its forward). Returns `(grad_rows, grad_cols, grad_scale)` of
        `Σ_i g_row_i·row_lse_i + Σ_q g_col_q·col_lse_q` with the weights `exp(S + bias − row_lse)` and
        `exp(S − col_lse)` of this block, for `needs = (need_rows, need_cols, need_scale)`; None where
        not needed. Gradients come back in the inputs' dtypes.
        """
        ...

    def last_backward_stats(self) -> BackwardStats:
        """What the most recent backward did."""
        ...
