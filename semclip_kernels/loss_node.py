"""The single-process SemCLIP loss as ONE autograd node (docs/backends.md, issue 20 item 3).

    forward:  the partitions of `S = τ·I·[T; P; N]ᵀ` (the columns passed as the blocks T, P, N: never
              joined by this layer), the positive logits, and `algebra.combine_partitions`
    backward: the gradient arriving at every statistic and every positive logit, written analytically,
              handed to the backend's backward in ONE call (the positives as bands of dS, so that they
              cancel against the softmax weights in float32 before any 16-bit cast), and each input's
              float32 gradient cast to its dtype once.

Gradients go to exactly the inputs that require them (a view made under `no_grad` gets none, as with
plain autograd). Autograd adds no buffer of its own: each input receives one gradient, from this node.
"""

from __future__ import annotations

import math

import torch

from .algebra import combine_partitions, positive_logits
from .backends import backward as backend_backward
from .backends import forward as backend_forward
from .backends.options import PartitionOptions
from .backends.values import Needs, PositiveBand, Problem, StatGrads, Stats
from .validation import SemCLIPInputs


def _blocks(
    text: torch.Tensor, paraphrase: torch.Tensor | None, negation: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """The column blocks `[T], [P], [N]` as `[n, d]` (views where the layout allows; absent blocks left out)."""
    dim = text.shape[1]
    blocks = [text]
    for extra in (paraphrase, negation):
        if extra is not None:
            blocks.append(extra.reshape(-1, dim))
    return tuple(blocks)


def _col_bias(batch: int, n_para: int, n_neg: int, beta: float, like: torch.Tensor) -> torch.Tensor:
    n_query = batch * (1 + n_para)
    col_bias = torch.zeros(n_query + batch * n_neg, dtype=like.dtype, device=like.device)
    if n_neg:
        col_bias[n_query:] = math.log(beta)
    return col_bias


def _n_query_cols(batch: int, n_para: int, directions: str) -> int:
    """The captions and paraphrases are queries of the text → image half; without it there are none."""
    return batch * (1 + n_para) if directions == "both" else 0


class SemCLIPNode(torch.autograd.Function):
    """`L` of docs/contract.md §1 for one batch; `paraphrase`/`negation` already None where their weight is 0."""

    @staticmethod
    def forward(
        ctx,
        image: torch.Tensor,
        text: torch.Tensor,
        paraphrase: torch.Tensor | None,
        negation: torch.Tensor | None,
        scale: torch.Tensor,
        paraphrase_weight: float,
        hard_negative_weight: float,
        options: PartitionOptions,
        backend: str,
        directions: str,
    ) -> torch.Tensor:
        batch = image.shape[0]
        n_para = 0 if paraphrase is None else paraphrase.shape[1]
        n_neg = 0 if negation is None else negation.shape[1]
        problem = Problem(image, _blocks(text, paraphrase, negation), scale,
                          _col_bias(batch, n_para, n_neg, hard_negative_weight, scale),
                          _n_query_cols(batch, n_para, directions), options)  # fmt: skip
        stats = backend_forward(problem, backend)
        inputs = SemCLIPInputs(image, text, paraphrase, negation, scale)
        text_pos, para_pos = positive_logits(inputs, paraphrase_weight)
        row_lse, query_lse = stats.row_lse.to(scale.dtype), stats.query_lse.to(scale.dtype)
        loss = combine_partitions(row_lse, query_lse, text_pos, para_pos, paraphrase_weight, directions)
        present = [t for t in (paraphrase, negation) if t is not None]
        ctx.save_for_backward(image, text, *present, scale, stats.row_lse, stats.query_lse, stats.col_mass_lb,
                              *stats.aux)  # fmt: skip
        ctx.layout = (paraphrase is not None, negation is not None, n_para, len(stats.aux))
        ctx.settings = (paraphrase_weight, hard_negative_weight, options, backend, directions)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        has_para, has_neg, n_para, n_aux = ctx.layout
        paraphrase_weight, hard_negative_weight, options, backend, directions = ctx.settings
        saved = list(ctx.saved_tensors)
        image, text = saved[0], saved[1]
        paraphrase = saved.pop(2) if has_para else None
        negation = saved.pop(2) if has_neg else None
        scale, row_lse, query_lse, col_mass_lb, *aux = saved[2:]
        stats = Stats(row_lse, query_lse, col_mass_lb, tuple(aux))
        batch = image.shape[0]
        n_neg = 0 if negation is None else negation.shape[1]
        n_query = _n_query_cols(batch, n_para, directions)
        problem = Problem(image, _blocks(text, paraphrase, negation), scale,
                          _col_bias(batch, n_para, n_neg, hard_negative_weight, scale), n_query,
                          options)  # fmt: skip

        # L = (mean_i i2t_i + mean_j t2i_j) / (2n), n = 1 + w·Pn (algebra.combine_partitions): per unit of L,
        # dZ_i = n/(2nB), dY(T_j) = 1/(2nB), dY(P_jp) = w/(2nB), d s(I_i,T_i) = −2/(2nB), d s(I_i,P_ip) = −2w/(2nB).
        # With one direction, L = mean_i i2t_i / n: the same with 2 → 1 and no Y terms.
        n_directions = 2.0 if n_query else 1.0
        stat = scale.dtype
        unit = grad_loss.to(stat) / (n_directions * (1.0 + paraphrase_weight * n_para) * batch)
        g_row = (unit * (1.0 + paraphrase_weight * n_para)).expand(batch).contiguous()
        g_query = unit.expand(n_query).clone()
        g_query[batch:] *= paraphrase_weight
        bands = [PositiveBand(0, 1, (-n_directions * unit).expand(batch, 1).contiguous())]
        if n_para:
            para_grad = (-n_directions * paraphrase_weight * unit).expand(batch, n_para).contiguous()
            bands.append(PositiveBand(batch, n_para, para_grad))
        need_image, need_text, need_para, need_neg, need_scale = ctx.needs_input_grad[:5]
        needs = Needs(rows=need_image, cols=need_text or need_para or need_neg, scale=need_scale)
        grads = backend_backward(problem, stats, StatGrads(g_row, g_query, tuple(bands)), needs, backend)

        def cast(grad: torch.Tensor | None, like: torch.Tensor | None, need: bool) -> torch.Tensor | None:
            return None if grad is None or like is None or not need else grad.reshape(like.shape).to(like.dtype)

        cols = list(grads.cols) if grads.cols is not None else [None, None, None]
        grad_text = cast(cols.pop(0), text, need_text)
        grad_para = cast(cols.pop(0), paraphrase, need_para) if has_para else None
        grad_neg = cast(cols.pop(0), negation, need_neg) if has_neg else None
        return (
            cast(grads.rows, image, need_image), grad_text, grad_para, grad_neg,
            cast(grads.scale, scale, need_scale), None, None, None, None, None,
        )  # fmt: skip


def node_loss(inputs: SemCLIPInputs, paraphrase_weight: float, hard_negative_weight: float,
              options: PartitionOptions, backend: str, directions: str = "both") -> torch.Tensor:  # fmt: skip
    """The loss through `SemCLIPNode` (extras of weight 0 left out, docs/contract.md §1)."""
    paraphrase = inputs.paraphrase if paraphrase_weight > 0 else None
    negation = inputs.negation if hard_negative_weight > 0 else None
    return SemCLIPNode.apply(inputs.image, inputs.text, paraphrase, negation, inputs.logit_scale,
                             paraphrase_weight, hard_negative_weight, options, backend, directions)  # fmt: skip
