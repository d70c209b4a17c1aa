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

import dataclasses

import torch
import torch.distributed as dist

from ..backends.sigmoid_dispatch import sigmoid_pair_sum
from ..sigmoid_algebra import NO_OWNER, SigmoidColumns, sigmoid_loss_from_pair_sum
from ..validation import SUPPORTED_DTYPES, LossConfig, SemCLIPInputs
from .collectives import AllGather, gather
from .global_batch import _check_process_group
from .ring import _post, _wait

SIGMOID_MODES = ("gather", "ring")
_DATA_TAG, _GRAD_TAG = 7311, 7312  # distinct from the softmax ring's tags


@dataclasses.dataclass(frozen=True)
class SigmoidRankGroup:
    """Where this process sits in the job, and how the columns travel."""

    rank: int
    world_size: int
    mode: str = "gather"

    def __post_init__(self) -> None:
        if self.mode not in SIGMOID_MODES:
            raise ValueError(f"distributed_mode must be one of {SIGMOID_MODES}, got {self.mode!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")


def distributed_sigmoid_loss(
    inputs: SemCLIPInputs,
    bias: torch.Tensor,
    columns: SigmoidColumns,
    config: LossConfig,
    group: SigmoidRankGroup,
) -> torch.Tensor:
    """This rank's loss: its images against every rank's columns, divided by its local batch."""
    _check_process_group(group)
    _check_layout_across_ranks(inputs, columns, config, group)
    foreign_owner = torch.full_like(columns.col_owner, NO_OWNER)
    if group.mode == "gather":
        cols = _all_columns(columns.cols, group)
        owners = [columns.col_owner if rank == group.rank else foreign_owner for rank in range(group.world_size)]
        pair_sum = sigmoid_pair_sum(
            inputs.image, cols, inputs.logit_scale, bias, columns.col_weight.repeat(group.world_size),
            torch.cat(owners), backend=config.backend, options=config.options,
        )  # fmt: skip
    else:
        pair_sum = None
        block = columns.cols
        for step in range(group.world_size):
            if step > 0:
                block = _RingShift.apply(block, group)
            term = sigmoid_pair_sum(
                inputs.image, block, inputs.logit_scale, bias, columns.col_weight,
                columns.col_owner if step == 0 else foreign_owner, backend=config.backend, options=config.options,
            )  # fmt: skip
            pair_sum = term if pair_sum is None else pair_sum + term
    return sigmoid_loss_from_pair_sum(pair_sum, inputs.batch)


def _all_columns(cols: torch.Tensor, group: SigmoidRankGroup) -> torch.Tensor:
    if torch.is_grad_enabled() and cols.requires_grad:
        return AllGather.apply(cols, group.world_size, None)
    return gather(cols, group.world_size, what="the all-gather of the text columns")


class _RingShift(torch.autograd.Function):
    """Send `block` to the next rank and receive the previous rank's; the backward sends the received
    block's gradient back to the previous rank and receives ours from the next."""

    @staticmethod
    def forward(ctx, block: torch.Tensor, group: SigmoidRankGroup) -> torch.Tensor:
        ctx.next_rank, ctx.prev_rank = (group.rank + 1) % group.world_size, (group.rank - 1) % group.world_size
        block = block.contiguous()
        incoming = torch.empty_like(block)
        works = _post([
            dist.P2POp(dist.isend, block, ctx.next_rank, tag=_DATA_TAG),
            dist.P2POp(dist.irecv, incoming, ctx.prev_rank, tag=_DATA_TAG),
        ])  # fmt: skip
        _wait(works, "the ring exchange of the text columns")
        return incoming

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        returned = torch.empty_like(grad)
        works = _post([
            dist.P2POp(dist.isend, grad, ctx.prev_rank, tag=_GRAD_TAG),
            dist.P2POp(dist.irecv, returned, ctx.next_rank, tag=_GRAD_TAG),
        ])  # fmt: skip
        _wait(works, "the ring exchange of the text columns' gradients")
        return returned, None


def _check_layout_across_ranks(
    inputs: SemCLIPInputs, columns: SigmoidColumns, config: LossConfig, group: SigmoidRankGroup
) -> None:
    """Every rank must have the same local layout and weights (one small all-gather; all ranks raise together)."""
    weight_bits = torch.tensor([config.paraphrase_weight, config.hard_negative_weight], dtype=torch.float64)
    fields = {
        "local batch size B (image_features.shape[0])": inputs.batch,
        "feature dim d": inputs.image.shape[1],
        "text columns K (captions, paraphrases, negations)": columns.cols.shape[0],
        "feature dtype": SUPPORTED_DTYPES.index(inputs.image.dtype),
        "text columns require grad": int(torch.is_grad_enabled() and columns.cols.requires_grad),
        "distributed_mode": SIGMOID_MODES.index(group.mode),
        "paraphrase_weight (bits)": int(weight_bits.view(torch.int64)[0]),
        "hard_negative_weight (bits)": int(weight_bits.view(torch.int64)[1]),
    }
    local = torch.tensor(list(fields.values()), dtype=torch.int64, device=inputs.image.device)
    table = gather(local[None], group.world_size, what="the exchange of every rank's batch layout").cpu()
    for column, name in enumerate(fields):
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            raise ValueError(
                f"distributed sigmoid loss: {name} differs across ranks: {values} (ranks 0..world_size-1); "
                "every rank must pass the same"
            )
