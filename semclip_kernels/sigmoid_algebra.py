"""The algebra of the sigmoid loss (docs/contract.md §8), written once for every backend and process layout.

The backends compute one weighted sum over pairs (`backends/sigmoid_dispatch.py`):

    pair_sum = Σ_i Σ_c a_c · softplus(s_ic · l_ic),   l_ic = τ·<A_i, C_c> + b,   s_ic = −1 if owner_c = i, else +1

(`softplus(s·l) = −log σ(z·l)` with the label `z = −s`). This module lays out the text columns
`C = [T; P; N]` with their weights `a` (1, `w`, `β`) and owners (the image whose positive each column is;
−1 for negations) and turns the pair sum into the loss. It knows nothing of backends or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .validation import SemCLIPInputs

NO_OWNER = -1  # the owner of a column that is no image's positive (a negation)


@dataclass(frozen=True)
class SigmoidColumns:
    """The text columns of one batch, `[T; P; N]`, with each column's weight and owner."""

    cols: torch.Tensor  # [K, d]
    col_weight: torch.Tensor  # [K], statistics dtype: 1 on captions, w on paraphrases, β on negations
    col_owner: torch.Tensor  # [K], int64: the row whose positive the column is, NO_OWNER for none


def build_sigmoid_columns(
    inputs: SemCLIPInputs, paraphrase_weight: float, hard_negative_weight: float
) -> SigmoidColumns:
    """Lay out `[T; P; N]` (paraphrase `p` of image `j` is column `B + j·Pn + p`) with weights and owners.

    Extras whose weight is 0 are left out: in the sigmoid loss every pair is weighted, so leaving them out
    and weighting them 0 are the same loss (docs/contract.md §8), and leaving them out costs nothing.
    """
    batch, dim = inputs.image.shape
    device, stat = inputs.image.device, inputs.logit_scale.dtype
    blocks, weights, owners = [inputs.text], [torch.ones(batch, dtype=stat, device=device)], []
    rows = torch.arange(batch, device=device)
    owners.append(rows)
    if inputs.paraphrase is not None and paraphrase_weight > 0:
        n_para = inputs.paraphrase.shape[1]
        blocks.append(inputs.paraphrase.reshape(-1, dim))
        weights.append(torch.full((batch * n_para,), paraphrase_weight, dtype=stat, device=device))
        owners.append(rows.repeat_interleave(n_para))
    if inputs.negation is not None and hard_negative_weight > 0:
        n_neg = inputs.negation.shape[1]
        blocks.append(inputs.negation.reshape(-1, dim))
        weights.append(torch.full((batch * n_neg,), hard_negative_weight, dtype=stat, device=device))
        owners.append(torch.full((batch * n_neg,), NO_OWNER, dtype=torch.long, device=device))
    # One [K, d] copy when there are extras (O(K·d), within docs/contract.md §3's budget).
    cols = torch.cat(blocks, dim=0) if len(blocks) > 1 else blocks[0]
    return SigmoidColumns(cols, torch.cat(weights), torch.cat(owners))


def sigmoid_loss_from_pair_sum(pair_sum: torch.Tensor, batch: int) -> torch.Tensor:
    """docs/contract.md §8's `L = pair_sum / B` (per rank: `B` is the local batch, as open_clip's SigLipLoss)."""
    return pair_sum / batch
