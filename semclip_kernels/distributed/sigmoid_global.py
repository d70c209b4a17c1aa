"""The sigmoid loss over the global batch of a `torch.distributed` job (docs/contract.md §8).

open_clip's `SigLipLoss` semantics: each rank's images against every rank's text columns (captions,
paraphrases, negations), the per-rank loss normalised by the local batch. A column is a positive only of
its own image, so the columns of the other ranks are negatives of every local image (their owners become
`NO_OWNER` here). Gradients of the other ranks' columns travel home, so that each rank's gradient of its
own features is the sum over ranks of every per-rank loss's gradient: DDP's averaging then gives the
gradient of the mean of the per-rank losses, which is the single-process loss of the global batch.

Modes:
- "gather": all-gather every rank's columns (with autograd: the backward reduce-scatters their gradients),
  one primitive call against all of them (open_clip's `dist_impl="gather"` and `"reduce"`);
- "ring": the column blocks travel rank to rank (`world_size − 1` neighbour exchanges, each block's gradient
  sent back along the same path in the backward), one primitive call per block (open_clip's `"shift"` and
  `"bidir"`; one direction here).
"""

from __future__ import annotations

import torch

from ..algebra import NO_OWNER, Columns
from ..backends.sigmoid_dispatch import sigmoid_pair_sum
from ..sigmoid_algebra import sigmoid_loss_from_pair_sum
from ..validation import LossConfig, SemCLIPInputs
from .collectives import AllGather, RingShift, gather
from .rank_group import RankGroup, check_layout_across_ranks, check_process_group

SIGMOID_MODES = ("gather", "ring")
_TAG = 7311  # and 7312 for the gradients: distinct from the softmax ring's tags


def distributed_sigmoid_loss(
    inputs: SemCLIPInputs, bias: torch.Tensor, columns: Columns, config: LossConfig, group: RankGroup
) -> torch.Tensor:
    """This rank's loss: its images against every rank's columns, divided by its local batch."""
    check_process_group(group)
    check_layout_across_ranks(inputs, columns, config, group, "sigmoid loss")
    cols, col_weight, col_owner = columns.joined(), columns.col_weight(), columns.col_owner()
    foreign_owner = torch.full_like(col_owner, NO_OWNER)
    if group.mode == "gather":
        owners = [col_owner if rank == group.rank else foreign_owner for rank in range(group.world_size)]
        pair_sum = sigmoid_pair_sum(
            inputs.image, _all_columns(cols, group), inputs.logit_scale, bias, col_weight.repeat(group.world_size),
            torch.cat(owners), backend=config.backend, options=config.options,
        )  # fmt: skip
    else:
        pair_sum = None
        next_rank, prev_rank = (group.rank + 1) % group.world_size, (group.rank - 1) % group.world_size
        for step in range(group.world_size):
            if step > 0:
                cols = RingShift.apply(cols, next_rank, prev_rank, _TAG, "the text columns")
            term = sigmoid_pair_sum(
                inputs.image, cols, inputs.logit_scale, bias, col_weight, col_owner if step == 0 else foreign_owner,
                backend=config.backend, options=config.options,
            )  # fmt: skip
            pair_sum = term if pair_sum is None else pair_sum + term
    return sigmoid_loss_from_pair_sum(pair_sum, inputs.batch)


def _all_columns(cols: torch.Tensor, group: RankGroup) -> torch.Tensor:
    if torch.is_grad_enabled() and cols.requires_grad:
        return AllGather.apply(cols, group.world_size, None)
    return gather(cols, group.world_size, what="the all-gather of the text columns")
