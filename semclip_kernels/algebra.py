"""The loss algebra of docs/contract.md §1, written once for every backend and every distributed mode.

The backends compute only the log-partitions of `S = τ·I·Cᵀ` against the text columns
`C = [T; P; N]` (docs/contract.md §7):

    row_lse[i]   = Z_i    = log Σ_c exp(S_ic + bias_c),  bias = log β on negations
    query_lse[q] = Y(C_q) = log Σ_i exp(S_iq),           for captions and paraphrases

This module lays out the columns (`Columns`: one layout for both losses, the loss node and the
distributed layer), computes the O(B·d) positive logits and turns the partitions into the loss.
It knows nothing of backends or ranks (`loss_node.py` is the single-process loss as one
autograd node over it; `sigmoid_algebra.py` the sigmoid loss's algebra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .validation import SemCLIPInputs

NO_OWNER = -1  # the owner of a column that is no image's positive (a negation)


@dataclass(frozen=True)
class Columns:
    """The text columns of one batch, query columns first: `[T; P; N]`, as blocks (never joined here).

    Paraphrase `p` of image `j` is column `B + j·Pn + p`. The softmax loss reads `col_bias` and
    `n_query_cols`; the sigmoid loss each column's weight and owner (`col_weight`, `col_owner`).
    """

    blocks: tuple[torch.Tensor, ...]  # [B, d] captions, then [B·Pn, d] paraphrases, [B·Mn, d] negations
    col_bias: torch.Tensor  # [K], statistics dtype: 0 on captions and paraphrases, log β on negations
    n_positive_cols: int  # captions and paraphrases (the columns that are some image's positive)
    paraphrase_weight: float = 1.0  # w, β: the weights of the blocks kept (an extra of weight 0 is left out)
    hard_negative_weight: float = 1.0
    directions: str = "both"  # "image_to_text": no text → image half

    @property
    def n_query_cols(self) -> int:
        """The queries of the text → image direction: the positive columns, none with `"image_to_text"`."""
        return self.n_positive_cols if self.directions == "both" else 0

    @property
    def n_cols(self) -> int:
        return self.col_bias.shape[0]

    @property
    def batch(self) -> int:
        return self.blocks[0].shape[0]

    def col_weight(self) -> torch.Tensor:
        """`[K]`, statistics dtype: 1 on captions, `w` on paraphrases, `β` on negations."""
        weight = torch.ones_like(self.col_bias)
        weight[self.batch : self.n_positive_cols] = self.paraphrase_weight
        weight[self.n_positive_cols :] = self.hard_negative_weight
        return weight

    def col_owner(self) -> torch.Tensor:
        """`[K]` int64: the image whose positive each column is (`NO_OWNER` for negations)."""
        owner = torch.full((self.n_cols,), NO_OWNER, dtype=torch.long, device=self.col_bias.device)
        per_image = self.n_positive_cols // self.batch  # 1 + Pn
        rows = torch.arange(self.batch, device=owner.device)
        owner[: self.batch] = rows
        owner[self.batch : self.n_positive_cols] = rows.repeat_interleave(per_image - 1)
        return owner

    def joined(self) -> torch.Tensor:
        """`[T; P; N]` as one `[K, d]` tensor (a copy when there are several blocks)."""
        return self.blocks[0] if len(self.blocks) == 1 else torch.cat(self.blocks, dim=0)


def build_columns(
    inputs: SemCLIPInputs, paraphrase_weight: float, hard_negative_weight: float, directions: str = "both"
) -> Columns:
    """Lay out the text columns `[T; P; N]`, query columns first; negations carry the bias `log β`.

    Extras whose weight is 0 are left out entirely (docs/contract.md §1: "w = 0 removes paraphrases"; in the
    sigmoid loss every pair is weighted, so leaving them out and weighting them 0 are the same loss, §8).
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
    return Columns(tuple(blocks), col_bias, n_positive_cols, paraphrase_weight, hard_negative_weight, directions)


def positive_bands(batch: int, n_para: int) -> tuple[tuple[int, int], ...]:
    """Where each image's positives sit among the columns `[T; P; N]`, as `Problem.positives` takes them:
    its caption (column i) and its paraphrases (columns B + i·Pn + p)."""
    return ((0, 1), (batch, n_para)) if n_para else ((0, 1),)


POSITIVE_LOGITS_CHUNK = 1024  # rows per chunk of `positive_logits`


def positive_logits(
    inputs: SemCLIPInputs, paraphrase_weight: float, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`s(I_i, T_i)` as `[B]` and `s(I_i, P_ip)` as `[B, Pn]` (None without paraphrases), in `dtype` (default:
    the statistics dtype, float32). O(B·(1 + Pn)·d): float64 costs nothing and keeps the positives' own
    rounding out of the log1p form near convergence."""
    stat_dtype = dtype or inputs.logit_scale.dtype
    with_paraphrases = inputs.paraphrase is not None and paraphrase_weight != 0
    text_parts, para_parts = [], []
    # In chunks of rows: casting whole features to float64 would be a temporary twice their size. Under
    # torch.compile one chunk: a loop over the rows would specialize the graph on the batch size.
    for rows in _row_chunks(inputs.image.shape[0]):
        image = inputs.image[rows].to(stat_dtype)
        text_parts.append((image * inputs.text[rows].to(stat_dtype)).sum(-1))
        if with_paraphrases:
            para_parts.append(torch.einsum("bd,bpd->bp", image, inputs.paraphrase[rows].to(stat_dtype)))
    text_pos = inputs.logit_scale * _joined(text_parts)
    if not with_paraphrases:
        return text_pos, None
    return text_pos, inputs.logit_scale * _joined(para_parts)


def _row_chunks(n_rows: int) -> list[slice]:
    if torch.compiler.is_compiling():
        return [slice(None)]
    return [slice(start, start + POSITIVE_LOGITS_CHUNK) for start in range(0, max(n_rows, 1), POSITIVE_LOGITS_CHUNK)]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _at_least_zero(term: torch.Tensor) -> torch.Tensor:
    """`max(term, 0)` in value, the identity in gradient.

    Every term `Z_i − s(I_i, x)` and `Y(q) − s(I_q, q)` is ≥ 0 exactly: the partition contains the
    positive's own exponential and every other summand is ≥ 0 (β ≥ 0). A negative value is float32
    rounding of a log-sum-exp near its largest element (−4.8e-7 at ordinary logits, −0.0625 when
    |logit| ≈ 1e6, one ulp there). Clamping the value removes that impossible sign; the gradient is
    left as computed, since zeroing it would discard the (tiny, correct) softmax − one-hot direction.
    """
    return term + (term.detach().clamp_min(0) - term.detach())


def log1p_sum_exp(excess: torch.Tensor) -> torch.Tensor:
    """`log(1 + Σ_k exp(excess_k))` over the last dim, to float precision relative to its (small) value.

    Where every `excess_k ≤ 0` it is `log1p` of a sum of terms ≤ 1 (no cancellation near 0); elsewhere it is
    shifted by the largest excess (no overflow). Both branches stay finite, so their gradients are too.
    """
    top = excess.amax(-1, keepdim=True)
    # masked_fill, not clamp_max: at an excess of exactly 0 (every logit equal, e.g. τ = 0) its gradient is 1
    small = torch.log1p(torch.exp(excess.masked_fill(excess > 0, 0.0)).sum(-1))
    shift = top.clamp_min(0)
    large = shift.squeeze(-1) + torch.log(torch.exp(-shift).squeeze(-1) + torch.exp(excess - shift).sum(-1))
    return torch.where(top.squeeze(-1) > 0, large, small)


def _off_positive_terms(off_lse: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """`[..., n]` terms `log(e^{off} + Σ_q e^{s_q}) − s_p = log1p(e^{off − s_p} + Σ_{q≠p} e^{s_q − s_p})`.

    off_lse `[...]`: the log-partition of a line without its positives; positives `[..., n]`: its n positive
    logits. O(n²) per line.
    """
    n = positives.shape[-1]
    others = positives[..., None, :] - positives[..., :, None]  # [..., p, q] = s_q − s_p
    others = others.masked_fill(torch.eye(n, dtype=torch.bool, device=positives.device), -math.inf)
    excess = torch.cat([(off_lse[..., None] - positives)[..., None], others], dim=-1)
    return log1p_sum_exp(excess)


def off_positive_gradients(
    row_lse: torch.Tensor,
    query_lse: torch.Tensor,
    text_pos: torch.Tensor,
    para_pos: torch.Tensor | None,
    paraphrase_weight: float,
    directions: str = "both",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradient of `combine_partitions(..., positives_excluded=True)` per unit of the loss, in closed form:
    `(d/d row_lse [B], d/d query_lse [B·(1 + Pn)], d/d text_pos [B], d/d para_pos [B, Pn] or None)`.

    With a row's off-positive share `π_off = e^{off}/E` and its positives' shares `π_q = e^{s_q}/E`
    (`E = e^{off} + Σ_q e^{s_q}`, one softmax), the row's weighted terms `Σ_p w_p·term_p` have
    `d/d off = W·π_off` and `d/d s_q = W·π_q − w_q = −w_q·π_off + Σ_{p≠q} (w_p·π_q − w_q·π_p)`: written as that
    sum of small terms, not as a difference near `w_q` (which keeps nothing of it near convergence). A query's
    term `log1p(e^{off − s})` has `d/d off = −d/d s = sigmoid(off − s)`. With `"image_to_text"` there are no
    query terms (`d/d query_lse` is `[0]`) and the rows' terms are not halved.
    """
    batch = text_pos.shape[0]
    positives = text_pos[:, None] if para_pos is None else torch.cat([text_pos[:, None], para_pos], dim=1)
    n_para = positives.shape[1] - 1
    weights = torch.full((n_para + 1,), paraphrase_weight, dtype=positives.dtype, device=positives.device)
    weights[0] = 1.0
    total = 1.0 + paraphrase_weight * n_para
    halves = 2.0 if directions == "both" else 1.0
    unit = 1.0 / (halves * total * batch)
    shares = torch.softmax(torch.cat([row_lse[:, None], positives], dim=1), dim=1)
    off_share, pos_share = shares[:, 0], shares[:, 1:]
    pairs = weights[None, None, :] * pos_share[:, :, None] - weights[None, :, None] * pos_share[:, None, :]
    grad_pos = unit * (pairs.sum(2) - weights * off_share[:, None])  # [B, 1 + Pn]
    if directions != "both":
        grad_para = None if para_pos is None else grad_pos[:, 1:]
        return unit * total * off_share, query_lse.new_zeros((0,)), grad_pos[:, 0], grad_para
    query_pos = positives[:, 0] if para_pos is None else torch.cat([text_pos, para_pos.reshape(-1)])
    query_weights = torch.cat([weights[:1].expand(batch), weights[1:].repeat(batch)])
    query_share = torch.sigmoid(query_lse - query_pos)
    grad_query = unit * query_weights * query_share
    grad_query_pos = -grad_query
    grad_pos[:, 0] += grad_query_pos[:batch]
    if para_pos is not None:
        grad_pos[:, 1:] += grad_query_pos[batch:].view(batch, n_para)
    grad_para = None if para_pos is None else grad_pos[:, 1:]
    return unit * total * off_share, grad_query, grad_pos[:, 0], grad_para


def combine_partitions(
    row_lse: torch.Tensor,
    query_lse: torch.Tensor,
    text_pos: torch.Tensor,
    para_pos: torch.Tensor | None,
    paraphrase_weight: float,
    directions: str = "both",
    *,
    positives_excluded: bool = False,
) -> torch.Tensor:
    """docs/contract.md §1's `L = (L_i2t + L_t2i) / 2` (`directions="both"`) or `L = L_i2t`
    (`"image_to_text"`) from the partitions of this batch's rows and queries.

    row_lse [B]: Z_i. query_lse [B·(1 + Pn)]: Y(T_j) for the B captions, then Y(P_jp) image-major
    (`[0]` with `"image_to_text"`: not computed). text_pos [B], para_pos [B, Pn]: the positive logits
    (`positive_logits`).

    positives_excluded: row_lse and query_lse are the partitions WITHOUT the positive entries
    (`Problem.positives`): each row's mass off its own caption and paraphrases, each query's off its own
    image. The terms are then `log1p` of sums of non-negative terms (`_off_positive_terms`), exact to float
    precision relative to their value at any loss, where `Z − s` loses all digits near convergence (one
    float32 step of a logit of 100 is 7.6e-6). Off-positive partitions of disjoint row or column sets
    (ranks) combine by log-sum-exp, as the full ones do.
    """
    batch = text_pos.shape[0]
    if positives_excluded:
        n_positives = 1.0
        row_positives = text_pos[:, None]
        if para_pos is not None:
            row_positives = torch.cat([row_positives, para_pos], dim=1)
        row_terms = _off_positive_terms(row_lse, row_positives)  # [B, 1 + Pn]
        if directions == "both":
            query_positives = text_pos if para_pos is None else torch.cat([text_pos, para_pos.reshape(-1)])
            query_terms = log1p_sum_exp((query_lse - query_positives)[:, None])
        image_to_text = row_terms[:, 0]
        if para_pos is not None:
            image_to_text = image_to_text + paraphrase_weight * row_terms[:, 1:].sum(1)
            n_positives += paraphrase_weight * para_pos.shape[1]
        if directions == "image_to_text":
            return image_to_text.mean() / n_positives
        text_to_image = query_terms[:batch]
        if para_pos is not None:
            text_to_image = text_to_image + paraphrase_weight * query_terms[batch:].view(batch, -1).sum(1)
        return (image_to_text.mean() + text_to_image.mean()) / (2.0 * n_positives)
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
