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


def scale_gradient_rounding_terms(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float,
    paraphrase: torch.Tensor | None = None,
    negation: torch.Tensor | None = None,
    paraphrase_weight: float = 1.0,
    hard_negative_weight: float = 1.0,
) -> dict[str, float]:
    """`{"R": …, "R_H": …, "R_K": …}` (float64, absolute), whose sum is docs/contract.md §4's floor: to first
    order, what float32 logits and log-partitions move `∂L/∂τ = Σ G·D` by, `G = ∂L/∂S`, `D_ij = <a_i, c_j>`,
    sums over the entries that are no line's positive (every backend takes the positives' terms in float64):

        R   = 2^-24·√d·Σ |G_ij|·|a_i||c_j|                          each product D, a d-term float32 dot, rounded
        R_H = 2^-24·τ·Σ |H_ij|·(|D_ij| + √d·|a_i||c_j|)             the same and τ·D's rounding inside the logit
                                                                     S_ij, through the weights: H = ∂(Σ G·D)/∂S
        R_K = 2^-24·Σ_lines |lse|·|Σ_off G_line|·|d̄_off − d̄|       each off-positive log-partition rounded to
                                                                     float32 (a line whose weights sum to 1)

    `H_ij = G_row_ij·(D_ij − d̄_i) + G_col_ij·(D_ij − d̄_j)` (|·| taken per direction), `G_row = P/2B` (P a row's
    softmax over all its columns, positives and log β included), `G_col = w_q·Q/(2B·(1 + w·Pn))` (Q a query
    column's softmax), `d̄` a line's softmax-weighted mean dot (`d̄_off`: over its off-positive entries). Measured
    (benchmarks/tau_gradient_floor.py, 795 peaked float32 draws): every backend comes within 0.07 of R alone or
    beyond it on near-duplicate batches (triton 1.23 R, reference 1.04 R, torch 0.98 R, cpp 0.93 R; the logits'
    rounding through H is 1.06 R of torch's 0.95 R on one of them); against this sum the worst is 0.37 (reference)."""
    image, text = image.detach().double(), text.detach().double()
    w, beta = paraphrase_weight, hard_negative_weight
    paraphrase = None if paraphrase is None or w == 0 else paraphrase.detach().double()
    negation = None if negation is None or beta == 0 else negation.detach().double()
    batch, dim = image.shape
    tau = float(logit_scale)
    n_para = 0 if paraphrase is None else paraphrase.reshape(batch, -1, dim).shape[1]
    blocks = [text] + ([paraphrase.reshape(-1, dim)] if paraphrase is not None else [])
    blocks += [negation.reshape(-1, dim)] if negation is not None else []
    cols = torch.cat(blocks)
    n_pos, n_cols = batch * (1 + n_para), cols.shape[0]
    dots = image @ cols.T
    logits = tau * dots
    bias = torch.zeros(n_cols, dtype=torch.float64)
    bias[n_pos:] = math.log(beta) if n_cols > n_pos else 0.0
    positive = torch.zeros(batch, n_cols, dtype=torch.bool)
    rows = torch.arange(batch)
    positive[rows, rows] = True
    for p in range(n_para):
        positive[rows, batch + rows * n_para + p] = True
    off = ~positive
    query_weight = torch.cat([torch.ones(batch), torch.full((batch * n_para,), w)]).double()
    row_weights = torch.softmax(logits + bias, 1)
    col_weights = torch.softmax(logits[:, :n_pos], 0)
    grad_row = row_weights / (2 * batch)
    grad_col = torch.zeros_like(grad_row)
    grad_col[:, :n_pos] = col_weights * query_weight / (2 * batch * (1 + w * n_para))
    mean_row = (row_weights * dots).sum(1)
    mean_col = (col_weights * dots[:, :n_pos]).sum(0)
    sensitivity = grad_row.abs() * (dots - mean_row[:, None]).abs()
    sensitivity[:, :n_pos] += grad_col[:, :n_pos].abs() * (dots[:, :n_pos] - mean_col).abs()
    norms = image.norm(dim=1)[:, None] * cols.norm(dim=1)[None]
    unit = 2.0**-24
    r_products = unit * math.sqrt(dim) * float(((grad_row + grad_col) * norms)[off].sum())
    r_logits = unit * abs(tau) * float((sensitivity * (dots.abs() + math.sqrt(dim) * norms))[off].sum())
    masked = logits.masked_fill(positive, -math.inf)
    row_lse, query_lse = torch.logsumexp(masked + bias, 1), torch.logsumexp(masked[:, :n_pos], 0)
    off_dots = dots.masked_fill(positive, 0.0)
    off_mean_row = (torch.softmax(masked + bias, 1) * off_dots).sum(1)
    off_mean_col = (torch.softmax(masked[:, :n_pos], 0) * off_dots[:, :n_pos]).sum(0)
    row_shift = grad_row.masked_fill(positive, 0.0).sum(1) * (off_mean_row - mean_row)
    col_shift = grad_col[:, :n_pos].masked_fill(positive[:, :n_pos], 0.0).sum(0) * (off_mean_col - mean_col)
    finite = torch.isfinite  # a line made only of positives has no off-positive partition
    r_partitions = unit * float((row_shift.abs() * row_lse.abs())[finite(row_lse)].sum()
                                + (col_shift.abs() * query_lse.abs())[finite(query_lse)].sum())  # fmt: skip
    return {"R": r_products, "R_H": r_logits, "R_K": r_partitions}
