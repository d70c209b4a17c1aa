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


def partitions_backward(
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
    """The backward alone, given statistics computed elsewhere: the weights `dS` materialized, then autograd
    through the logits (`Σ dS ⊙ S` has the gradients of `Σ g_row·row_lse + Σ g_col·col_lse`)."""
    dtype = stat_dtype(scale.dtype)
    leaves = [t.detach().requires_grad_(need) for t, need in zip((rows, cols, scale), needs)]
    with torch.enable_grad():
        logits = leaves[2].to(dtype) * (leaves[0].to(dtype) @ leaves[1].to(dtype).T)  # [M, K]
        with torch.no_grad():
            grad_logits = torch.zeros_like(logits)
            if grad_row_lse is not None:
                weights = torch.exp(logits + col_bias.to(dtype) - row_lse.to(dtype)[:, None])
                grad_logits += grad_row_lse.to(dtype)[:, None] * weights
            if grad_col_lse is not None:
                weights = torch.exp(logits[:, :n_query_cols] - col_lse.to(dtype))
                grad_logits[:, :n_query_cols] += grad_col_lse.to(dtype) * weights
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(logits, wanted, grad_logits) if wanted else ())
    return tuple(next(grads) if need else None for need in needs)
