"""The sigmoid (SigLIP-style) SemCLIP loss: SigLIP's pairwise sigmoid loss with paraphrases as extra
positives and negations as hard negatives (docs/contract.md §8, docs/siglip.md).

One pipeline for every backend and process layout, as the softmax loss's (loss.py):

    validate the arguments   (validation.py: the softmax loss's checks, and logit_bias as logit_scale)
    lay out the columns      (algebra.build_columns: [T; P; N], each column's weight and owner)
    pair sum                 single process: one primitive call (backends/sigmoid_dispatch.py);
                             distributed: gathered or ring-passed column blocks (distributed/sigmoid_global.py)
    normalise                (sigmoid_algebra.sigmoid_loss_from_pair_sum: / B)
"""

from __future__ import annotations

import torch
from torch import nn

from .algebra import build_columns
from .backends.sigmoid_dispatch import sigmoid_pair_sum
from .distributed import RankGroup
from .distributed.sigmoid_global import SIGMOID_MODES, distributed_sigmoid_loss
from .sigmoid_algebra import sigmoid_loss_from_pair_sum
from .validation import LossConfig, autocast_off, check_inputs, check_logit_bias, takes_loss_options

# open_clip's SigLipLoss(dist_impl=...) names, mapped onto our distributed modes (docs/contract.md §8).
DIST_IMPL_MODES = {"gather": "gather", "reduce": "gather", "bidir": "ring", "shift": "ring"}


@takes_loss_options
def semsiglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    paraphrase_features: torch.Tensor | None = None,
    negation_features: torch.Tensor | None = None,
    *,
    directions: None = None,
    **options: object,
) -> torch.Tensor:
    """The sigmoid SemCLIP loss of one (single-process) batch, as a float32 scalar (docs/contract.md §8).

    Args:
        image_features: `[B, d]`, used as given (not normalized here).
        text_features: `[B, d]`, caption `i` belongs to image `i`.
        logit_scale: `τ`, already exponentiated (open_clip's `logit_scale.exp()`).
        logit_bias: `b`, added to every logit (open_clip's `logit_bias`).
        paraphrase_features: `[B, d]` or `[B, Pn, d]`: positives of their own image, negatives of the others.
        negation_features: `[B, d]` or `[B, Mn, d]`: negatives of every image.
        paraphrase_weight: `w ≥ 0`, the weight of every paraphrase pair.
        hard_negative_weight: `β ≥ 0`, the weight of every negation pair.
        backend: one of `"auto"`, `"triton"`, `"cpp"`, `"torch"`, `"reference"` (or a registered backend).
        block_rows, block_cols, grad_filter_eps: tiling options (see `PartitionOptions`).
        directions: not accepted (an error if given): every pair is its own binary term, there is no direction.
    """
    _reject_directions(directions)
    config = LossConfig.of("semsiglip_loss", options)
    return _sigmoid_loss(
        config, None, image_features, text_features, logit_scale, logit_bias, paraphrase_features, negation_features
    )


class SemSigLipLoss(nn.Module):
    """Drop-in replacement for `open_clip.loss.SigLipLoss` with paraphrases and negations.

    With no paraphrases and no negations it computes exactly `SigLipLoss`; the extras are passed to
    `forward` as keyword arguments. The chunked backends never materialize the `B × K` logits.

    `dist_impl`: open_clip's names (`"bidir"`, `"shift"`, `"reduce"`, `"gather"`) mapped onto
    `distributed_mode` (`"ring"` or `"gather"`); give one or the other (default `"gather"`).
    """

    @takes_loss_options
    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        distributed_mode: str | None = None,
        directions: None = None,
        **options: object,
    ) -> None:
        super().__init__()
        _reject_directions(directions)
        self.config = LossConfig.of("SemSigLipLoss", options)
        mode = _distributed_mode(dist_impl, distributed_mode)
        group = RankGroup(rank, world_size, mode=mode)  # validates rank and world_size, as SemCLIPLoss does
        self.group = group if world_size > 1 else None
        # open_clip's attribute names, for code that reads them.
        self.cache_labels = cache_labels  # accepted for compatibility: there are no labels to cache
        self.rank, self.world_size = rank, world_size
        self.dist_impl = dist_impl or ("bidir" if mode == "ring" else "gather")

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        logit_bias: float | torch.Tensor,
        output_dict: bool = False,
        *,
        paraphrase_features: torch.Tensor | None = None,
        negation_features: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        loss = _sigmoid_loss(
            self.config, self.group, image_features, text_features, logit_scale, logit_bias,
            paraphrase_features, negation_features,
        )  # fmt: skip
        return {"contrastive_loss": loss} if output_dict else loss


def _reject_directions(directions: object) -> None:
    """The softmax loss's `directions` has no meaning here: a pairwise sigmoid term is symmetric in its image
    and its text, so the loss has no image → text or text → image half to drop."""
    if directions is not None:
        raise TypeError(
            f"directions={directions!r} does not apply to the sigmoid loss: each (image, text) pair is its own "
            "binary term, with no image → text or text → image direction; use semclip_loss / SemCLIPLoss "
            "(the softmax loss) for directions='image_to_text'"
        )


def _distributed_mode(dist_impl: str | None, distributed_mode: str | None) -> str:
    if dist_impl is not None and dist_impl not in DIST_IMPL_MODES:
        raise ValueError(f"dist_impl must be one of {tuple(DIST_IMPL_MODES)} or None, got {dist_impl!r}")
    if distributed_mode is not None and distributed_mode not in SIGMOID_MODES:
        raise ValueError(f"distributed_mode must be one of {SIGMOID_MODES} or None, got {distributed_mode!r}")
    if dist_impl is not None and distributed_mode is not None and DIST_IMPL_MODES[dist_impl] != distributed_mode:
        raise ValueError(
            f"dist_impl={dist_impl!r} means distributed_mode={DIST_IMPL_MODES[dist_impl]!r}, "
            f"but distributed_mode={distributed_mode!r} was given: pass one of them"
        )
    if distributed_mode is not None:
        return distributed_mode
    return DIST_IMPL_MODES[dist_impl] if dist_impl is not None else "gather"


def _sigmoid_loss(
    config: LossConfig,
    group: RankGroup | None,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    paraphrase_features: torch.Tensor | None,
    negation_features: torch.Tensor | None,
) -> torch.Tensor:
    """The pipeline: validate, lay out the columns, pair sum (one process or many), normalise."""
    inputs = check_inputs(image_features, text_features, logit_scale, paraphrase_features, negation_features)
    bias = check_logit_bias(logit_bias, inputs.image)
    with autocast_off(inputs.image.device):
        columns = build_columns(inputs, config.paraphrase_weight, config.hard_negative_weight)
        if group is not None:
            return distributed_sigmoid_loss(inputs, bias, columns, config, group)
        # One [K, d] copy when there are extras (O(K·d), within docs/contract.md §3's budget).
        pair_sum = sigmoid_pair_sum(
            inputs.image, columns.joined(), inputs.logit_scale, bias, columns.col_weight(), columns.col_owner(),
            backend=config.backend, options=config.options,
        )  # fmt: skip
        return sigmoid_loss_from_pair_sum(pair_sum, inputs.batch)
