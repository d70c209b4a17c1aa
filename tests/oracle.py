"""An independent float64 evaluation of docs/contract.md §1, term by term.

It shares no code with `semclip_kernels`: it builds every similarity
`s(I_i, x)` explicitly and writes Z, Y, L_i2t and L_t2i as docs/contract.md §1 does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def semclip_loss_float64(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    paraphrase: torch.Tensor | None = None,
    negation: torch.Tensor | None = None,
    paraphrase_weight: float = 1.0,
    hard_negative_weight: float = 1.0,
    directions: str = "both",
    logits_out: dict | None = None,
) -> torch.Tensor:
    """docs/contract.md §1's `L`: `(L_i2t + L_t2i) / 2`, or `L_i2t` alone with `directions="image_to_text"`.

    logits_out: if given, receives the logit blocks `"text"` `[B, B]`, `"paraphrase"` `[B, B, Pn]`, `"negation"`
    `[B, B, Mn]` (gradients retained), for a caller that wants `∂L/∂S`."""
    image, text = image.double(), text.double()
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale))
    tau = logit_scale.double().reshape(())
    batch = image.shape[0]
    w, beta = paraphrase_weight, hard_negative_weight
    if paraphrase is not None and paraphrase.dim() == 2:
        paraphrase = paraphrase[:, None]
    if negation is not None and negation.dim() == 2:
        negation = negation[:, None]
    if w == 0:  # docs/contract.md §1: "w = 0 removes paraphrases"
        paraphrase = None
    if beta == 0:  # docs/contract.md §1: "beta = 0 removes negations"
        negation = None

    s_text = tau * image @ text.double().T  # s_text[i, j] = s(I_i, T_j)
    terms = [s_text]  # each [B, columns], combined in log space for Z
    s_para = None
    if paraphrase is not None:
        s_para = tau * torch.einsum("id,jpd->ijp", image, paraphrase.double())  # s(I_i, P_jp)
        terms.append(s_para.reshape(batch, -1))
    if negation is not None:
        s_neg = tau * torch.einsum("id,jmd->ijm", image, negation.double())
        terms.append(s_neg.reshape(batch, -1) + math.log(beta))
    if logits_out is not None:
        blocks = {"text": s_text, "paraphrase": s_para, "negation": None if negation is None else s_neg}
        for name, block in blocks.items():
            if block is not None and block.requires_grad:
                block.retain_grad()
                logits_out[name] = block
    z = torch.logsumexp(torch.cat(terms, dim=1), dim=1)  # Z_i

    n_para = 0 if s_para is None else s_para.shape[2]
    idx = torch.arange(batch)
    i2t = z - s_text[idx, idx]
    t2i = torch.logsumexp(s_text, dim=0) - s_text[idx, idx]  # Y(T_j) - s(I_j, T_j)
    if s_para is not None:
        own = s_para[idx, idx]  # [B, Pn] = s(I_j, P_jp)
        i2t = i2t + w * (z[:, None] - own).sum(1)
        t2i = t2i + w * (torch.logsumexp(s_para, dim=0) - own).sum(1)  # Y(P_jp) - s(I_j, P_jp)
    norm = 1.0 + w * n_para
    if directions == "image_to_text":
        return (i2t / norm).mean()
    return ((i2t / norm).mean() + (t2i / norm).mean()) / 2


@dataclass
class Case:
    image: torch.Tensor
    text: torch.Tensor
    paraphrase: torch.Tensor | None
    negation: torch.Tensor | None
    logit_scale: torch.Tensor

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.image, self.text, self.paraphrase, self.negation, self.logit_scale) if t is not None]


def make_case(
    batch: int,
    dim: int,
    n_para: int | None,
    n_neg: int | None,
    tau: float,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    normalize: bool = False,
    extra_as_2d: bool = False,
) -> Case:
    """Random unnormalized features (norms spread over ~0.3..3) that require grad.

    n_para / n_neg: None for absent, an int for `[B, n, d]` (or `[B, d]` when 1 and extra_as_2d).
    """
    gen = torch.Generator().manual_seed(seed)

    def feats(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, dim, generator=gen, dtype=torch.float64)
        if normalize:
            x = x / x.norm(dim=-1, keepdim=True)
        else:
            x = x / math.sqrt(dim) * torch.empty(*shape, 1, dtype=torch.float64).uniform_(0.3, 3.0, generator=gen)
        return x.to(dtype).requires_grad_()

    def extra(n: int | None) -> torch.Tensor | None:
        if n is None:
            return None
        if n == 1 and extra_as_2d:
            return feats(batch)
        return feats(batch, n)

    scale = torch.tensor(tau, dtype=torch.float32, requires_grad=True)
    return Case(feats(batch), feats(batch), extra(n_para), extra(n_neg), scale)


def max_norm_rel_err(actual: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    """Per-tensor max-norm relative error (docs/contract.md §4); None counts as zeros."""
    if actual is None and expected is None:
        return 0.0
    if expected is None:
        expected = torch.zeros_like(actual)
    if actual is None:
        actual = torch.zeros_like(expected)
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual.double() - expected).abs().max() / scale)


def float32_logit_rounding_of_scale_gradient(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float,
    paraphrase: torch.Tensor | None = None,
    negation: torch.Tensor | None = None,
    paraphrase_weight: float = 1.0,
    hard_negative_weight: float = 1.0,
) -> float:
    """`2^-24·√d·Σ |∂L/∂S_ij|·|a_i|·|c_j|` over the entries that are no line's positive (float64): what float32
    products `<a_i, c_j>` (each `2^-24·√d·|a_i||c_j|` off, a d-term float32 dot) move `∂L/∂τ = Σ ∂L/∂S·<a, c>`
    by. The positives' products are float64 in every backend; docs/contract.md §4."""
    scale = torch.tensor(float(logit_scale), dtype=torch.float64, requires_grad=True)
    image = image.detach().double()
    blocks: dict = {}
    loss = semclip_loss_float64(image, text.detach().double(), scale,
                                None if paraphrase is None else paraphrase.detach().double(),
                                None if negation is None else negation.detach().double(),
                                paraphrase_weight, hard_negative_weight, logits_out=blocks)  # fmt: skip
    loss.backward()
    row_norm = image.norm(dim=-1)
    batch, dim = image.shape
    own = torch.eye(batch, dtype=torch.bool)
    total = 0.0
    for name, cols in (("text", text), ("paraphrase", paraphrase), ("negation", negation)):
        if name not in blocks:
            continue
        grad = blocks[name].grad
        col_norm = cols.detach().double().norm(dim=-1)  # [B] or [B, n]
        weight = row_norm[:, None] * col_norm[None]  # [B, B] or [B, B, n]
        if name != "negation":  # a row's own caption and paraphrases: its positives
            grad = grad.masked_fill(own if grad.dim() == 2 else own[:, :, None], 0.0)
        total += float((grad.abs() * weight).sum())
    return 2.0**-24 * math.sqrt(dim) * total
