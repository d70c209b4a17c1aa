"""What a backend is: pure kernels of one primitive, and whether they run here (docs/backends.md).

A backend module satisfies `Kernels`. It holds no autograd, no `torch.library` registration and
no module state: `backends/ops.py` is the one autograd layer over every backend, and
`backends/__init__.py` the one dispatch point. The loss layer never imports a backend module.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .values import BackwardStats, Grads, Needs, Problem, StatGrads, Stats

__all__ = ["BackwardStats", "Kernels"]


class Kernels(Protocol):
    """The partitions primitive's kernels (docs/contract.md §7, docs/backends.md)."""

    #: True only for a backend written in differentiable torch ops (second derivatives): `ops` then calls
    #: `forward` under autograd instead of registering custom ops.
    differentiable: bool

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        """Whether the backend runs on `device` here, and if not, why (a sentence for the user)."""
        ...

    def forward(self, problem: Problem) -> Stats:
        """The statistics of `problem` (inputs are read, never differentiated)."""
        ...

    def stats_like(self, problem: Problem) -> Stats:
        """Empty tensors of the shapes and dtypes `forward` returns (fake implementations, torch.compile)."""
        ...

    def backward(self, problem: Problem, stats: Stats, grads: StatGrads, needs: Needs) -> Grads:
        """Gradients of `Σ g_row·row_lse + Σ g_query·query_lse + Σ_bands g·S[band]` for `needs`.

        `stats` may come from elsewhere (`Stats.rebased`: a block against a distributed batch's global
        statistics). Gradients in the statistics dtype; what the backward did in `Grads.stats`.
        """
        ...
