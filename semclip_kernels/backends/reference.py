"""The materialized partitions: the whole `M × K` logits matrix, plain autograd.

Written for clarity, not speed; the fast backends are tested against it (and
against an independent float64 evaluation of the loss).
"""

from __future__ import annotations

import torch

from .base import BackwardStats, stat_dtype
from .options import PartitionOptions


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def last_backward_stats() -> BackwardStats:
    """The materialized backward visits the whole logits matrix as one tile, and filters nothing."""
    return BackwardStats(tiles=1)


def partitions(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    options: PartitionOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = stat_dtype(scale.dtype)
    logits = scale * (rows.to(dtype) @ cols.to(dtype).T)  # [M, K]
    row_lse = torch.logsumexp(logits + col_bias, dim=1)
    col_lse = torch.logsumexp(logits[:, :n_query_cols], dim=0)
    return row_lse, col_lse
