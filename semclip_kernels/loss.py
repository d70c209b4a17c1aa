"""SemCLIP loss: CLIP's contrastive loss with paraphrases as extra positives and
negated captions as weighted hard negatives (SPEC section 1, docs/loss.md).

The loss is written here once. Backends compute only the log-partitions of the
logits matrix `S = τ·I·Cᵀ` against the text columns `C = [T; P; N]`:

    row_lse[i] = Z_i    = log Σ_c exp(S_ic + bias_c),  bias = log β on negations
    col_lse[q] = Y(C_q) = log Σ_i exp(S_iq),           for captions and paraphrases

and this module adds the O(B·d) positive logits, the weights and the means.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .backends import BACKENDS, partitions
from .backends.options import PartitionOptions
from .validation import SemCLIPInputs, check_inputs, check_weight

# "gather": all-gather the columns (open_clip's way); "ring": column blocks travel rank to rank (Inf-CL's way).
DISTRIBUTED_MODES = ("gather", "ring")


def build_columns(
    inputs: SemCLIPInputs, paraphrase_weight: float, hard_negative_weight: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lay out the text columns `[T; P; N]`, query columns first.

    Returns `(cols [K, d], col_bias [K], n_query_cols)`. Paraphrase `p` of image
    `j` is column `B + j·Pn + p`; negations carry the bias `log β`. Extras whose
    weight is 0 are left out entirely (SPEC: "w = 0 removes paraphrases").
    """
    stat_dtype = inputs.logit_scale.dtype
    device = inputs.image.device
    dim = inputs.image.shape[1]
    query = [inputs.text]
    if inputs.paraphrase is not None and paraphrase_weight > 0:
        query.append(inputs.paraphrase.reshape(-1, dim))
    n_query_cols = sum(block.shape[0] for block in query)
    blocks = list(query)
    if inputs.negation is not None and hard_negative_weight > 0:
        blocks.append(inputs.negation.reshape(-1, dim))
    cols = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)
    col_bias = torch.zeros(cols.shape[0], dtype=stat_dtype, device=device)
    col_bias[n_query_cols:] = math.log(hard_negative_weight) if cols.shape[0] > n_query_cols else 0.0
    return cols, col_bias, n_query_cols


def positive_logits(inputs: SemCLIPInputs, paraphrase_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`s(I_i, T_i)` as `[B]` and `s(I_i, P_ip)` as `[B, Pn]` (None without paraphrases), float32."""
    stat_dtype = inputs.logit_scale.dtype
    image = inputs.image.to(stat_dtype)
    text_pos = inputs.logit_scale * (image * inputs.text.to(stat_dtype)).sum(-1)
    if inputs.paraphrase is None or paraphrase_weight == 0:
        return text_pos, None
    para_pos = inputs.logit_scale * torch.einsum("bd,bpd->bp", image, inputs.paraphrase.to(stat_dtype))
    return text_pos, para_pos


def combine_partitions(
    row_lse: torch.Tensor,
    text_col_lse: torch.Tensor,
    para_col_lse: torch.Tensor | None,
    text_pos: torch.Tensor,
    para_pos: torch.Tensor | None,
    paraphrase_weight: float,
) -> torch.Tensor:
    """Section 1's `L = (L_i2t + L_t2i) / 2` from the partitions of this batch's rows and queries.

    row_lse [B]: Z_i; text_col_lse [B]: Y(T_j); para_col_lse [B, Pn]: Y(P_jp).
    """
    image_to_text = row_lse - text_pos
    text_to_image = text_col_lse - text_pos
    n_positives = 1.0
    if para_pos is not None:
        image_to_text = image_to_text + paraphrase_weight * (row_lse[:, None] - para_pos).sum(1)
        text_to_image = text_to_image + paraphrase_weight * (para_col_lse - para_pos).sum(1)
        n_positives += paraphrase_weight * para_pos.shape[1]
    return (image_to_text.mean() + text_to_image.mean()) / (2.0 * n_positives)


def semclip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    paraphrase_features: torch.Tensor | None = None,
    negation_features: torch.Tensor | None = None,
    *,
    paraphrase_weight: float = 1.0,
    hard_negative_weight: float = 1.0,
    backend: str = "auto",
    block_rows: int | None = None,
    block_cols: int | None = None,
    grad_filter_eps: float | None = None,
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
    """
    inputs = check_inputs(image_features, text_features, logit_scale, paraphrase_features, negation_features)
    w = check_weight("paraphrase_weight", paraphrase_weight)
    beta = check_weight("hard_negative_weight", hard_negative_weight)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    options = PartitionOptions(block_rows, block_cols, grad_filter_eps)

    cols, col_bias, n_query_cols = build_columns(inputs, w, beta)
    row_lse, col_lse = partitions(
        inputs.image, cols, inputs.logit_scale, col_bias, n_query_cols, backend=backend, options=options
    )
    text_pos, para_pos = positive_logits(inputs, w)
    batch = inputs.batch
    para_col_lse = None if para_pos is None else col_lse[batch:].view(batch, -1)
    return combine_partitions(row_lse, col_lse[:batch], para_col_lse, text_pos, para_pos, w)


class SemCLIPLoss(nn.Module):
    """Drop-in replacement for `open_clip.loss.ClipLoss` with paraphrases and negations.

    With no paraphrases and no negations it computes exactly `ClipLoss`; the
    extras are passed to `forward` as keyword arguments. The `B × K` logits
    matrix is never materialized by the chunked backends.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        paraphrase_weight: float = 1.0,
        hard_negative_weight: float = 1.0,
        backend: str = "auto",
        block_rows: int | None = None,
        block_cols: int | None = None,
        grad_filter_eps: float | None = None,
        distributed_mode: str = "gather",
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod is not supported: SemCLIPLoss runs on torch.distributed")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if distributed_mode not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed_mode must be one of {DISTRIBUTED_MODES}, got {distributed_mode!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: there are no labels to cache
        self.rank = rank
        self.world_size = world_size
        self.paraphrase_weight = check_weight("paraphrase_weight", paraphrase_weight)
        self.hard_negative_weight = check_weight("hard_negative_weight", hard_negative_weight)
        self.backend = backend
        self.options = PartitionOptions(block_rows, block_cols, grad_filter_eps)
        self.distributed_mode = distributed_mode

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
        features = (image_features, text_features, logit_scale, paraphrase_features, negation_features)
        weights = {"paraphrase_weight": self.paraphrase_weight, "hard_negative_weight": self.hard_negative_weight}
        if self.world_size > 1:
            from .distributed import distributed_semclip_loss

            loss = distributed_semclip_loss(
                *features, **weights, backend=self.backend, options=self.options, rank=self.rank,
                world_size=self.world_size, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                mode=self.distributed_mode,
            )
        else:
            loss = semclip_loss(*features, **weights, backend=self.backend, **dataclasses.asdict(self.options))
        return {"contrastive_loss": loss} if output_dict else loss
