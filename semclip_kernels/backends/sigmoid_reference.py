"""The materialized sigmoid pair sum: the whole `M × K` logits matrix, plain autograd.

Written for clarity, not speed; second derivatives come from autograd. The fast backends are tested
against it and against an independent float64 evaluation of the loss (tests/sigmoid_oracle.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sigmoid_values import SigmoidProblem, SigmoidStats

# Plain differentiable torch ops, called under autograd by `ops` (second derivatives); the forward computes
# the sum alone.
differentiable = True
gradients_in_forward = False
DEFAULT_BLOCK_ROWS = DEFAULT_BLOCK_COLS = None  # no tiles: the whole logits matrix


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def forward(problem: SigmoidProblem) -> SigmoidStats:
    """`Σ_ic a_c·softplus(s_ic·(τ·<A_i, C_c> + b))` with `s_ic = −1` where `owner_c = i`, differentiable
    (autograd through the materialized logits)."""
    dtype = problem.stat_dtype
    rows, cols = problem.rows.to(dtype), problem.joined_cols().to(dtype)
    logits = problem.scale.to(dtype) * (rows @ cols.T) + problem.bias.to(dtype)  # [M, K]
    positive = problem.col_owner[None, :] == torch.arange(rows.shape[0], device=rows.device)[:, None]
    signs = 1.0 - 2.0 * positive.to(dtype)
    # −log σ(−x), not softplus(x): torch's softplus returns x above x = 20 (an error of up to 2e-9 per pair).
    total = (-F.logsigmoid(-signs * logits) * problem.col_weight.to(dtype)).sum()
    empty = problem.rows.new_empty((0,), dtype=dtype)
    return SigmoidStats(total, empty, tuple(empty for _ in problem.cols), empty, torch.zeros(3, dtype=torch.int64))
