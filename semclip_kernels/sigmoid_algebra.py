"""The algebra of the sigmoid loss (docs/contract.md §8), written once for every backend and process layout.

The backends compute one weighted sum over pairs (`backends/sigmoid_dispatch.py`):

    pair_sum = Σ_i Σ_c a_c · softplus(s_ic · l_ic),   l_ic = τ·<A_i, C_c> + b,   s_ic = −1 if owner_c = i, else +1

(`softplus(s·l) = −log σ(z·l)` with the label `z = −s`). The text columns `C = [T; P; N]` are laid out as
for the softmax loss (`algebra.Columns`, with each column's weight `a` (1, `w`, `β`) and owner); this module
turns the pair sum into the loss. It knows nothing of backends or ranks.
"""

from __future__ import annotations

import torch


def sigmoid_loss_from_pair_sum(pair_sum: torch.Tensor, batch: int) -> torch.Tensor:
    """docs/contract.md §8's `L = pair_sum / B` (per rank: `B` is the local batch, as open_clip's SigLipLoss)."""
    return pair_sum / batch
