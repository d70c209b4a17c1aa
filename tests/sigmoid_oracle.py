"""An independent float64 evaluation of docs/contract.md §8 (the sigmoid loss), term by term.

It shares no code with `semclip_kernels`: every logit `l(I_i, x) = τ·<I_i, x> + b` is built explicitly,
with its label `z` and weight, and the loss is `−(1/B) Σ weight·log σ(z·l)` as §8 writes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def semsiglip_loss_float64(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    paraphrase: torch.Tensor | None = None,
    negation: torch.Tensor | None = None,
    paraphrase_weight: float = 1.0,
    hard_negative_weight: float = 1.0,
    global_batch_texts: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
    row_offset: int = 0,
) -> torch.Tensor:
    """§8's `L` in float64. Differentiable in every tensor argument (float64 copies keep the graph).

    `global_batch_texts = (T, P, N)` of a larger (distributed) batch whose rows `row_offset + i` are this
    image batch's own texts: the per-rank loss of open_clip's distributed SigLipLoss (normalised by this
    image batch's size).
    """
    tau = torch.as_tensor(logit_scale).double().reshape(())
    bias = torch.as_tensor(logit_bias).double().reshape(())
    image = image.double()
    if global_batch_texts is None:
        global_batch_texts = (text, paraphrase, negation)
    texts, paras, negs = global_batch_texts
    batch, n_texts = image.shape[0], texts.shape[0]

    def as_3d(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else (x[:, None] if x.dim() == 2 else x).double()

    paras, negs = as_3d(paras), as_3d(negs)
    # z[i, j] = +1 where text j belongs to image i.
    z = -torch.ones(batch, n_texts, dtype=torch.float64)
    z[torch.arange(batch), torch.arange(batch) + row_offset] = 1.0
    total = F.logsigmoid(z * (tau * image @ texts.double().T + bias)).sum()
    if paras is not None:
        logits = tau * torch.einsum("id,jpd->ijp", image, paras) + bias
        total = total + paraphrase_weight * F.logsigmoid(z[:, :, None] * logits).sum()
    if negs is not None:
        logits = tau * torch.einsum("id,jmd->ijm", image, negs) + bias
        total = total + hard_negative_weight * F.logsigmoid(-logits).sum()
    return -total / batch
