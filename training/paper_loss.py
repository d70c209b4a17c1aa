"""The SemCLIP authors' released objective, as a training option (`--loss paper`), for comparison.

The public SemCLIP code (github.com/aaai26-paper12649/SemCLIP, `NegationParaphraseProjectionLoss`)
trains with open_clip's `ClipLoss` on the captions only, plus two text-text terms computed on a
fixed random 2-D orthonormal projection `p(x) = normalize(Qᵀ normalize(x))` of the text embeddings
(`Q`: `d × 2`, orthonormal columns, drawn once and never trained):

    paraphrase term  L_p = mean_i [ 1 − cos(p(T_i), p(P_i)) ]
    negation term    L_n = mean_i [ max(0, cos(p(T_i), p(N_i))) ]
    L = (w_c · L_clip + w_p · L_p + w_n · L_n) / (w_c + w_p + w_n)      (all weights 1 by default)

Paraphrases and negations never enter the softmax: unlike `semclip_kernels.SemCLIPLoss`
(docs/contract.md §1), the image never sees them. This lives in `training/`, not in the kernel
package, because it is a baseline to measure against, not part of the contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semclip_kernels import SemCLIPLoss

# The authors normalise with this epsilon (F.normalize(..., eps=1e-6)) before and after projecting.
NORMALIZE_EPS = 1e-6


def orthonormal_basis(dim: int, rank: int, seed: int) -> torch.Tensor:
    """`[dim, rank]` with orthonormal columns, a deterministic function of `seed` (float32)."""
    if rank < 1 or rank > dim:
        raise ValueError(f"projection rank must be in [1, dim={dim}], got {rank}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)  # Gram-Schmidt of Gaussian vectors, as the authors draw them
    return q.float()


def _flatten_extra(name: str, extra: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(caption rows repeated, extra rows)`, both `[B·n, d]`, for `extra` of shape `[B, d]` or `[B, n, d]`."""
    if extra.dim() == 2:
        extra = extra.unsqueeze(1)
    if extra.dim() != 3 or extra.shape[0] != text.shape[0] or extra.shape[2] != text.shape[1]:
        raise ValueError(f"{name} must be [B, d] or [B, n, d] with B={text.shape[0]}, d={text.shape[1]}; "
                         f"got {tuple(extra.shape)}")
    count = extra.shape[1]
    return text.repeat_interleave(count, dim=0), extra.reshape(-1, text.shape[1])


class PaperLoss(nn.Module):
    """The authors' objective with `SemCLIPLoss`'s call signature, so a training loop can swap it in.

    `forward(image, caption, logit_scale, paraphrase_features=P, negation_features=N)`:
    `P`, `N` are `[B, d]` or `[B, n, d]` (each extra is paired with its own caption). A missing
    extra drops its term from both the sum and the normalisation.
    """

    def __init__(
        self,
        embed_dim: int | None = None,
        *,
        contrastive_weight: float = 1.0,
        paraphrase_weight: float = 1.0,
        negation_weight: float = 1.0,
        projection_rank: int = 2,
        projection_seed: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("contrastive_weight", contrastive_weight), ("paraphrase_weight", paraphrase_weight),
                            ("negation_weight", negation_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.contrastive_weight = float(contrastive_weight)
        self.paraphrase_weight = float(paraphrase_weight)
        self.negation_weight = float(negation_weight)
        self.projection_rank = projection_rank
        self.projection_seed = projection_seed
        # Drawn from the seed alone, so a loop that does not know d up front (embed_dim=None) gets
        # the same basis on its first call as one built with embed_dim.
        basis = None if embed_dim is None else orthonormal_basis(embed_dim, projection_rank, projection_seed)
        self.register_buffer("basis", basis)
        # Captions only: SemCLIPLoss without extras is exactly open_clip's ClipLoss (docs/contract.md §1).
        self.clip_loss = SemCLIPLoss(backend=backend)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`normalize(Qᵀ normalize(x))` per row."""
        unit = F.normalize(features, dim=-1, eps=NORMALIZE_EPS)
        if self.basis is None or self.basis.shape[0] != unit.shape[-1]:
            if self.basis is not None:
                raise ValueError(f"PaperLoss was built for d={self.basis.shape[0]}, got features of d={unit.shape[-1]}")
            self.basis = orthonormal_basis(unit.shape[-1], self.projection_rank, self.projection_seed).to(unit.device)
        return F.normalize(unit @ self.basis.to(unit.dtype), dim=-1, eps=NORMALIZE_EPS)

    def terms(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        paraphrase_features: torch.Tensor | None = None,
        negation_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The three terms (absent extras are left out of the dict)."""
        out = {"contrastive": self.clip_loss(image_features, text_features, logit_scale)}
        if paraphrase_features is not None:
            text, para = _flatten_extra("paraphrase_features", paraphrase_features, text_features)
            out["paraphrase"] = (1.0 - (self.project(text) * self.project(para)).sum(-1)).mean()
        if negation_features is not None:
            text, neg = _flatten_extra("negation_features", negation_features, text_features)
            out["negation"] = (self.project(text) * self.project(neg)).sum(-1).clamp_min(0.0).mean()
        return out

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
        terms = self.terms(image_features, text_features, logit_scale, paraphrase_features, negation_features)
        weights = {"contrastive": self.contrastive_weight, "paraphrase": self.paraphrase_weight,
                   "negation": self.negation_weight}
        total_weight = sum(weights[name] for name in terms)
        if total_weight == 0:
            raise ValueError("PaperLoss: every present term has weight 0")
        loss = sum(weights[name] * value for name, value in terms.items()) / total_weight
        return {"contrastive_loss": loss} if output_dict else loss
