"""The loss algebra of docs/contract.md §1, written once for every backend and every distributed mode.

The backends compute only the log-partitions of `S = τ·I·Cᵀ` against the text columns
`C = [T; P; N]` (docs/contract.md §7):

    row_lse[i]   = Z_i    = log Σ_c exp(S_ic + bias_c),  bias = log β on negations
    query_lse[q] = Y(C_q) = log Σ_i exp(S_iq),           for captions and paraphrases

This module lays out the columns, computes the O(B·d) positive logits and turns the
partitions into the loss. It knows nothing of backends or ranks (`loss_node.py` is the
single-process loss as one autograd node over it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .validation import SemCLIPInputs


@dataclass(frozen=True)
class Columns:
    """The text columns of one batch, query columns first: `[T; P; N]`, as blocks (never joined here)."""

    blocks: tuple[torch.Tensor, ...]  # [B, d] captions, then [B·Pn, d] paraphrases, [B·Mn, d] negations
    col_bias: torch.Tensor  # [K]: 0 on captions and paraphrases, log β on negations
    n_query_cols: int  # captions and paraphrases: the queries of the text → image direction (0 without it)

    @property
    def n_cols(self) -> int:
        return self.col_bias.shape[0]

    def joined(self) -> torch.Tensor:
        """`[T; P; N]` as one `[K, d]` tensor (a copy when there are several blocks)."""
        return self.blocks[0] if len(self.blocks) == 1 else torch.cat(self.blocks, dim=0)


def build_columns(
    inputs: SemCLIPInputs, paraphrase_weight: float, hard_negative_weight: float, directions: str = "both"
) -> Columns:
    """Lay out the text columns `[T; P; N]`, query columns first.

    Paraphrase `p` of image `j` is column `B + j·Pn + p`; negations carry the bias `log β`.
    Extras whose weight is 0 are left out entirely (docs/contract.md §1: "w = 0 removes paraphrases").
    `directions="image_to_text"` has no text → image half: no column is a query (no column partition
    is computed at all).
    """
    dim = inputs.image.shape[1]
    blocks = [inputs.text]
    if inputs.paraphrase is not None and paraphrase_weight > 0:
        blocks.append(inputs.paraphrase.reshape(-1, dim))
    n_positive_cols = sum(block.shape[0] for block in blocks)
    if inputs.negation is not None and hard_negative_weight > 0:
        blocks.append(inputs.negation.reshape(-1, dim))
    n_cols = sum(block.shape[0] for block in blocks)
    col_bias = torch.zeros(n_cols, dtype=inputs.logit_scale.dtype, device=inputs.image.device)
    if n_cols > n_positive_cols:
        col_bias[n_positive_cols:] = math.log(hard_negative_weight)
    return Columns(tuple(blocks), col_bias, n_positive_cols if directions == "both" else 0)


def positive_logits(inputs: SemCLIPInputs, paraphrase_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`s(I_i, T_i)` as `[B]` and `s(I_i, P_ip)` as `[B, Pn]` (None without paraphrases), float32."""
    stat_dtype = inputs.logit_scale.dtype
    image = inputs.image.to(stat_dtype)
    text_pos = inputs.logit_scale * (image * inputs.text.to(stat_dtype)).sum(-1)
    if inputs.paraphrase is None or paraphrase_weight == 0:
        return text_pos, None
    para_pos = inputs.logit_scale * torch.einsum("bd,bpd->bp", image, inputs.paraphrase.to(stat_dtype))
    return text_pos, para_pos


def _at_least_zero(term: torch.Tensor) -> torch.Tensor:
    """`max(term, 0)` in value, the identity in gradient.

    Every term `Z_i − s(I_i, x)` and `Y(q) − s(I_q, q)` is ≥ 0 exactly: the partition contains the
    positive's own exponential and every other summand is ≥ 0 (β ≥ 0). A negative value is float32
    rounding of a log-sum-exp near its largest element (−4.8e-7 at ordinary logits, −0.0625 when
    |logit| ≈ 1e6, one ulp there). Clamping the value removes that impossible sign; the gradient is
    left as computed, since zeroing it would discard the (tiny, correct) softmax − one-hot direction.
    """
    return term + (term.detach().clamp_min(0) - term.detach())


def combine_partitions(
    row_lse: torch.Tensor,
    query_lse: torch.Tensor,
    text_pos: torch.Tensor,
    para_pos: torch.Tensor | None,
    paraphrase_weight: float,
    directions: str = "both",
) -> torch.Tensor:
    """docs/contract.md §1's `L = (L_i2t + L_t2i) / 2` (`directions="both"`) or `L = L_i2t`
    (`"image_to_text"`) from the partitions of this batch's rows and queries.

    row_lse [B]: Z_i. query_lse [B·(1 + Pn)]: Y(T_j) for the B captions, then Y(P_jp) image-major
    (`[0]` with `"image_to_text"`: not computed). text_pos [B], para_pos [B, Pn]: the positive logits
    (`positive_logits`).
    """
    batch = text_pos.shape[0]
    image_to_text = _at_least_zero(row_lse - text_pos)
    n_positives = 1.0
    if para_pos is not None:
        image_to_text = image_to_text + paraphrase_weight * _at_least_zero(row_lse[:, None] - para_pos).sum(1)
        n_positives += paraphrase_weight * para_pos.shape[1]
    if directions == "image_to_text":
        return image_to_text.mean() / n_positives
    text_to_image = _at_least_zero(query_lse[:batch] - text_pos)
    if para_pos is not None:
        para_query_lse = query_lse[batch:].view(batch, -1)
        text_to_image = text_to_image + paraphrase_weight * _at_least_zero(para_query_lse - para_pos).sum(1)
    return (image_to_text.mean() + text_to_image.mean()) / (2.0 * n_positives)
