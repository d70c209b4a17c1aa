"""What a backend is: pure kernels, one `Protocol` per primitive (docs/backends.md).

A backend module holds no autograd, no `torch.library` registration and no module state: `ops.py` is the
one autograd layer over every backend and primitive, and `backends/__init__.py` (its `BACKEND_TABLE`) the
one dispatch point. The loss layer never imports a backend module. The values a kernel reads and returns
are documented where they are defined (`values.py`, `sigmoid_values.py`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .sigmoid_values import PairSums, SigmoidProblem
from .values import BackwardStats, Grads, Needs, Problem, StatGrads, Stats

__all__ = ["BackwardStats", "Kernels", "PartitionKernels", "SigmoidPairKernels"]


class PartitionKernels(Protocol):
    """The partitions primitive's kernels (docs/contract.md §7): the softmax loss's statistics."""

    #: True only for a backend written in differentiable torch ops (second derivatives): `ops` then calls
    #: `forward` under autograd instead of registering custom ops.
    differentiable: bool
    #: The tile used where the caller gives none (None: the kernel's launch configuration decides).
    DEFAULT_BLOCK_ROWS: int | None
    DEFAULT_BLOCK_COLS: int | None

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        """Whether the backend runs on `device` here, and if not, why (a sentence for the user)."""
        ...

    def forward(self, problem: Problem) -> Stats:
        """The statistics of `problem` (inputs are read, never differentiated). `problem.options` is resolved:
        concrete tiles and filter threshold (`options.resolved`)."""
        ...

    def stats_like(self, problem: Problem) -> Stats:
        """Empty tensors of the shapes and dtypes `forward` returns (fake implementations, torch.compile)."""
        ...

    def backward(self, problem: Problem, stats: Stats, grads: StatGrads, needs: Needs) -> Grads:
        """Gradients of `Σ g_row·row_lse + Σ g_query·query_lse + Σ_bands g·S[band]` for `needs`.

        `stats` may come from elsewhere (`Stats.rebased`: a block against a distributed batch's global
        statistics). Gradients in the statistics dtype; what the backward did in `Grads.counts`.
        """
        ...


class SigmoidPairKernels(Protocol):
    """The sigmoid pair primitive's kernel (docs/contract.md §8): one pass computes the pair sum and the
    gradients asked for (each pair's gradient is local). `sigmoid_values.SigmoidKernels` makes it the
    layer's kernels; a differentiable module (the reference) instead gives `forward(problem) -> SigmoidStats`."""

    DEFAULT_BLOCK_ROWS: int | None
    DEFAULT_BLOCK_COLS: int | None
    #: Whether the forward's pass computes the gradients too (then the backward only scales them).
    gradients_in_forward: bool

    def is_available(self, device: torch.device) -> tuple[bool, str]: ...

    def pair_sum(self, problem: SigmoidProblem, needs: Needs) -> PairSums:
        """The sum and, for `needs` (`scale` standing for τ and b), its gradients; options resolved."""
        ...


Kernels = PartitionKernels  # the name the softmax family has used
