"""The materialized sigmoid pair sum: the whole `M × K` logits matrix, plain autograd.

Written for clarity, not speed; second derivatives come from autograd. The fast backends are tested
against it and against an independent float64 evaluation of the loss (tests/sigmoid_oracle.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dtypes import stat_dtype
from .sigmoid_values import SigmoidProblem, SigmoidStats


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def pair_sum(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    col_weight: torch.Tensor,
    col_owner: torch.Tensor,
) -> torch.Tensor:
    """`Σ_ic a_c·softplus(s_ic·(τ·<A_i, C_c> + b))` with `s_ic = −1` where `owner_c = i` (differentiable)."""
    dtype = stat_dtype(scale.dtype)
    logits = scale.to(dtype) * (rows.to(dtype) @ cols.to(dtype).T) + bias.to(dtype)  # [M, K]
    positive = col_owner[None, :] == torch.arange(rows.shape[0], device=rows.device)[:, None]
    signs = 1.0 - 2.0 * positive.to(dtype)
    # −log σ(−x), not softplus(x): torch's softplus returns x above x = 20 (an error of up to 2e-9 per pair).
    return (-F.logsigmoid(-signs * logits) * col_weight.to(dtype)).sum()


# The layer's `Kernels` (docs/backends.md): plain differentiable torch ops, called under autograd by `ops`.
differentiable = True


def forward(problem: SigmoidProblem) -> SigmoidStats:
    """`SigmoidStats` whose `pair_sum` is differentiable (autograd through the materialized logits)."""
    total = pair_sum(
        problem.rows, problem.joined_cols(), problem.scale_bias[0], problem.scale_bias[1], problem.col_weight,
        problem.col_owner,
    )  # fmt: skip
    empty = problem.rows.new_empty((0,), dtype=problem.stat_dtype)
    return SigmoidStats(total, empty, tuple(empty for _ in problem.cols), empty, torch.zeros(3, dtype=torch.int64))
