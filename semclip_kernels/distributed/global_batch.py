"""The SemCLIP loss over the global batch of a `torch.distributed` job (docs/contract.md §5).

The global batch is every rank's batch concatenated in rank order. Each rank computes
the partitions of *its own* rows against *all* columns, with the backend primitive's
arbitrary rows/columns form (never a local × global matrix):

    row_lse[i]   = Z_i  = log Σ_{c ∈ all columns} exp(τ<I_i, C_c> + bias_c)   local images i
    query_lse[q] = Y(q) = log Σ_{k ∈ all images}  exp(τ<Q_q, I_k>)            local queries q = [T; P]

with each line's own positives left out (`Problem.positives`), and `algebra.combine_partitions` turns them
and the float64 positive logits into this rank's share `loss_r` of §1 (local means) in its `log1p` form,
exact at any loss; its gradients are the algebra's closed form (`algebra.off_positive_gradients`: sums of
small terms). With equal local batches, mean_r loss_r is the global loss.

Three ways to bring the other ranks' features ("modes"), one implementation (ring.py):
- "gather": all-gather every rank's images and text columns, then two primitive calls (a ring of
  one step whose group is every rank).
- "ring": the blocks `[C_s; I_s]` travel around the ring (ring.py).
- "hierarchical": a ring across groups of `group_size` consecutive ranks (a node's NVLink
  domain), all-gathering within the group at each step (ring.py).

Gradient semantics follow open_clip's `ClipLoss` for all four combinations of
`local_loss` and `gather_with_grad` (docs/distributed.md has the table).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..algebra import Columns, combine_partitions, off_positive_gradients
from ..backends.options import PartitionOptions, default_grad_filter_eps
from ..validation import LossConfig, SemCLIPInputs
from .collectives import MeanOverRanks, SumScaleGradOverRanks, group_timeout
from .rank_group import MODES, RankGroup, check_layout_across_ranks, check_process_group, needs_grad
from .ring import RingConfig, RingPartitions

__all__ = ["MODES", "RankGroup", "distributed_loss"]


def distributed_loss(inputs: SemCLIPInputs, columns: Columns, config: LossConfig, group: RankGroup) -> torch.Tensor:
    """This rank's SemCLIP loss of the global batch, open_clip's semantics.

    - `local_loss=False`: every rank returns the global loss `L`.
    - `local_loss=True`: rank r returns `loss_r` (its rows and queries against all
      columns and images); the mean over ranks is `L`.
    Gradient on this rank's features (and `τ`):
        local_loss, gather_with_grad = False, False: dL/d(own features), dL/dτ
                                       False, True:  world_size · dL/d(own features), dL/dτ
                                       True,  True:  world_size · dL/d(own features), d loss_r/dτ
                                       True,  False: own rows only (image→text for images,
                                                     text→image for queries), d loss_r/dτ
    """
    check_process_group(group)
    check_layout_across_ranks(inputs, columns, config, group)
    if not group.local_loss and needs_grad(inputs.logit_scale):
        # Every rank returns the global loss but differentiates only its own share: τ's gradient
        # is the sum of the shares.
        scale = SumScaleGradOverRanks.apply(inputs.logit_scale, 1.0 / (group.grad_weight * group.world_size))
        inputs = dataclasses.replace(inputs, logit_scale=scale)

    row_lse, query_lse, text_pos, para_pos = _ring_partitions(inputs, columns, config, group)
    para_pos = para_pos if para_pos.shape[1] else None
    loss_r = OffPositiveShare.apply(row_lse, query_lse, text_pos, para_pos, config.paraphrase_weight,
                                    config.directions).to(inputs.logit_scale.dtype)  # fmt: skip
    if group.local_loss:
        return loss_r
    return MeanOverRanks.apply(loss_r, group.world_size, group.grad_weight)


class OffPositiveShare(torch.autograd.Function):
    """`loss_r` from this rank's off-positive partitions and positive logits (all float64), in the log1p form
    of `algebra.combine_partitions`; backward: its closed-form gradients (`algebra.off_positive_gradients`),
    no cancellation near convergence."""

    @staticmethod
    def forward(ctx, row_lse, query_lse, text_pos, para_pos, paraphrase_weight: float, directions: str):
        ctx.save_for_backward(row_lse, query_lse, text_pos, para_pos)
        ctx.settings = (paraphrase_weight, directions)
        return combine_partitions(row_lse, query_lse, text_pos, para_pos, paraphrase_weight, directions,
                                  positives_excluded=True)  # fmt: skip

    @staticmethod
    def backward(ctx, grad_loss):
        row_lse, query_lse, text_pos, para_pos = ctx.saved_tensors
        grads = off_positive_gradients(row_lse, query_lse, text_pos, para_pos, *ctx.settings)
        grad_row, grad_query, grad_text, grad_para = (None if g is None else g * grad_loss for g in grads)
        return grad_row, grad_query, grad_text, grad_para, None, None


def _ring_partitions(
    inputs: SemCLIPInputs, columns: Columns, config: LossConfig, group: RankGroup
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every mode (ring.py): one ring per position in a group of ranks. Returns the partitions and the
    positive logits (`[B, 0]` without paraphrases).

    Rank r = g·size + l sits at position l of group g; its ring is the ranks at position l of
    every group ("ring" mode: groups of one, a single ring of every rank; "gather": one group of
    every rank, a single step).
    """
    size = group.ring_group_size
    n_groups = group.world_size // size
    position, group_index = group.rank % size, group.rank // size
    # At step t this rank's group holds the blocks of group (g − t): their owners, in member order.
    owners = tuple((group_index - step) % n_groups * size + member for step in range(n_groups)
                   for member in range(size))  # fmt: skip
    ring = RingConfig(
        next_rank=(group_index + 1) % n_groups * size + position,
        prev_rank=(group_index - 1) % n_groups * size + position,
        n_steps=n_groups,
        n_query_cols=columns.n_query_cols,
        n_positive_cols=columns.n_positive_cols,
        backend=config.backend,
        options=_global_filter_eps(config.options, inputs, columns, group.world_size),
        remote_grad=group.remote_grad,
        group_size=size,
        group=_intra_group(size) if 1 < size < group.world_size else None,  # None: the default group
        owner_rank=owners,
        world_size=group.world_size,
        keep_gathered=group.mode == "gather",
        position=position,
    )
    return RingPartitions.apply(inputs.image, columns.joined(), inputs.logit_scale, columns.col_bias, ring)


def _global_filter_eps(
    options: PartitionOptions, inputs: SemCLIPInputs, columns: Columns, world_size: int
) -> PartitionOptions:
    """`options` with the single process's default filter threshold of the global batch: each call of the ring
    sees a part of a line's weights, but what the filter may drop is measured against the whole line."""
    if options.grad_filter_eps is not None:
        return options
    eps = default_grad_filter_eps(world_size * inputs.batch, world_size * columns.n_cols, inputs.image.dtype)
    return dataclasses.replace(options, grad_filter_eps=eps)


# This process's group of consecutive ranks, per (default process group, group size): creating
# groups is collective, so it happens once, on the first call of every rank.
_intra_groups: dict[tuple[dist.ProcessGroup, int], dist.ProcessGroup] = {}


def _intra_group(size: int) -> dist.ProcessGroup:
    key = (dist.group.WORLD, size)
    if key not in _intra_groups:
        # new_subgroups makes the groups [0, size), [size, 2·size), ...; with the default group's
        # timeout (a new group otherwise gets the backend's default, 30 minutes on Gloo).
        own, _ = dist.new_subgroups(group_size=size, timeout=group_timeout())
        _intra_groups[key] = own
    return _intra_groups[key]
