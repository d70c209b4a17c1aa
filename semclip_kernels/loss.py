"""SemCLIP loss: CLIP's contrastive loss with paraphrases as extra positives and negated
captions as weighted hard negatives (docs/contract.md §1, docs/loss.md).

One pipeline for every backend and every process layout:

    validate the arguments   (validation.py: once, here)
    single process           one autograd node for the whole loss (loss_node.py): the partitions of
                             [T; P; N] as blocks, the positives folded into the kernels' backward, one
                             float32 → input dtype cast per input. The reference backend (second
                             derivatives) runs as plain autograd, each input cast to float32 once.
    distributed              gathered or ring-passed column blocks (distributed/), combined by
                             algebra.combine_partitions

The whole forward runs with autocast off: inside `torch.autocast` the loss computes exactly what
it computes outside (its statistics are float32 by contract, and autocast would lower them). As
PyTorch recommends (and open_clip's trainer does), call `backward()` outside the autocast region.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .algebra import build_columns, combine_partitions, positive_bands, positive_logits
from .backends import backend_module, resolve_backend
from .backends import forward as backend_forward
from .backends.values import Problem
from .distributed import RankGroup, distributed_loss
from .loss_node import node_loss
from .validation import LossConfig, SemCLIPInputs, autocast_off, check_inputs, takes_loss_options


@takes_loss_options
def semclip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    paraphrase_features: torch.Tensor | None = None,
    negation_features: torch.Tensor | None = None,
    *,
    directions: str = "both",
    **options: object,
) -> torch.Tensor:
    """The SemCLIP loss of one (single-process) batch, as a float32 scalar.

    Args:
        image_features: `[B, d]`, used as given (not normalized here).
        text_features: `[B, d]`, caption `i` belongs to image `i`.
        logit_scale: `τ`, already exponentiated (open_clip's `logit_scale.exp()`).
        paraphrase_features: `[B, d]` or `[B, Pn, d]`, extra positives of each image.
        negation_features: `[B, d]` or `[B, Mn, d]`, hard negatives of each image.
        paraphrase_weight: `w ≥ 0`; 0 removes the paraphrases.
        hard_negative_weight: `β ≥ 0`; scales the negations' mass in `Z_i`; 0 removes them.
        backend: one of `"auto"`, `"triton"`, `"cpp"`, `"torch"`, `"reference"`.
        block_rows, block_cols, grad_filter_eps: tiling options (see `PartitionOptions`).
        directions: `"both"` (CLIP's `(L_i2t + L_t2i) / 2`) or `"image_to_text"` (`L_i2t` alone: each image
            against every column, as MultipleNegativesRankingLoss, LiT and Inf-CL compute it).
    """
    config = LossConfig.of("semclip_loss", options, directions)
    return _loss(config, None, image_features, text_features, logit_scale, paraphrase_features, negation_features)


class SemCLIPLoss(nn.Module):
    """Drop-in replacement for `open_clip.loss.ClipLoss` with paraphrases and negations.

    With no paraphrases and no negations it computes exactly `ClipLoss`; the
    extras are passed to `forward` as keyword arguments. The `B × K` logits
    matrix is never materialized by the chunked backends.
    """

    @takes_loss_options
    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        distributed_mode: str = "gather",
        group_size: int | None = None,
        directions: str = "both",
        **options: object,
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod is not supported: SemCLIPLoss runs on torch.distributed")
        self.config = LossConfig.of("SemCLIPLoss", options, directions)
        # group_size: ranks per all-gather group of distributed_mode="hierarchical" (default: LOCAL_WORLD_SIZE).
        group = RankGroup(rank, world_size, local_loss, gather_with_grad, distributed_mode, group_size)
        self.group = group if world_size > 1 else None
        # open_clip's attribute names, for code that reads them.
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: there are no labels to cache
        self.rank, self.world_size = rank, world_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        *,
        paraphrase_features: torch.Tensor | None = None,
        negation_features: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        # logit_bias is accepted for open_clip compatibility: a constant shift
        # of every logit cancels in every softmax of the loss.
        loss = _loss(
            self.config, self.group, image_features, text_features, logit_scale, paraphrase_features, negation_features
        )
        return {"contrastive_loss": loss} if output_dict else loss


def _loss(
    config: LossConfig,
    group: RankGroup | None,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    paraphrase_features: torch.Tensor | None,
    negation_features: torch.Tensor | None,
) -> torch.Tensor:
    """The pipeline: validate, lay out the columns, partitions (one process or many), combine."""
    inputs = check_inputs(image_features, text_features, logit_scale, paraphrase_features, negation_features)
    with autocast_off(inputs.image.device):
        if group is None:
            return _single_process_loss(inputs, config)
        columns = build_columns(inputs, config.paraphrase_weight, config.hard_negative_weight, config.directions)
        return distributed_loss(inputs, columns, config, group)


def _single_process_loss(inputs: SemCLIPInputs, config: LossConfig) -> torch.Tensor:
    name = resolve_backend(config.backend, inputs.image.device)
    w, beta = config.paraphrase_weight, config.hard_negative_weight
    if not backend_module(name, inputs.image.device).differentiable:
        return node_loss(inputs, w, beta, config.options, name, config.directions)
    # Plain autograd (the reference backend: second derivatives). Each input is cast to the statistics dtype
    # once, so that every path's gradient meets the others in float32 and is cast back once.
    stat = inputs.logit_scale.dtype
    inputs = dataclasses.replace(
        inputs, image=inputs.image.to(stat), text=inputs.text.to(stat),
        paraphrase=None if inputs.paraphrase is None else inputs.paraphrase.to(stat),
        negation=None if inputs.negation is None else inputs.negation.to(stat),
    )  # fmt: skip
    columns = build_columns(inputs, w, beta, config.directions)
    # As the loss node: float64 positives, and through one float64 τ, so that the τ gradients of a caption and
    # its near-duplicate paraphrase (O(1) and opposite) meet in float64 before the one cast to float32.
    precise = dataclasses.replace(inputs, logit_scale=inputs.logit_scale.double())
    text_pos, para_pos = positive_logits(precise, w, torch.float64)
    n_para = 0 if para_pos is None else para_pos.shape[1]
    problem = Problem(inputs.image, columns.blocks, inputs.logit_scale, columns.col_bias, columns.n_query_cols,
                      config.options, positive_bands(text_pos.shape[0], n_para))  # fmt: skip
    stats = backend_forward(problem, name)  # the partitions without the positives: the loss in log1p form
    loss = combine_partitions(stats.row_lse.double(), stats.query_lse.double(), text_pos, para_pos, w,
                              config.directions, positives_excluded=True)  # fmt: skip
    return loss.to(stat)
