"""The single-process SemCLIP loss as ONE autograd node (docs/backends.md).

    forward:  the partitions of `S = τ·I·[T; P; N]ᵀ` (the columns passed as the blocks T, P, N: never
              joined by this layer), the positive logits, and `algebra.combine_partitions`
    backward: the gradient arriving at every statistic and every positive logit, handed to the backend's
              backward in ONE call (the positives as bands of dS, added in float32), and each input's
              float32 gradient cast to its dtype once.

The partitions leave the positive entries out (`Problem.positives`) and the loss is written as `log1p` of
each line's off-positive mass relative to its positive logits (`algebra.combine_partitions`): float32 keeps
its relative precision at any loss, where `Z − s` would keep one float32 step of the largest logit.

Gradients go to exactly the inputs that require them (a view made under `no_grad` gets none, as with
plain autograd). Autograd adds no buffer of its own: each input receives one gradient, from this node.
"""

from __future__ import annotations

import torch

from .algebra import build_columns, combine_partitions, off_positive_gradients, positive_bands, positive_logits
from .backends import backward as backend_backward
from .backends import forward as backend_forward
from .backends.options import PartitionOptions
from .backends.values import Needs, PositiveBand, Problem, StatGrads, Stats
from .validation import SemCLIPInputs


def _problem(image, text, paraphrase, negation, scale, paraphrase_weight: float, hard_negative_weight: float,
             options: PartitionOptions, directions: str) -> Problem:  # fmt: skip
    """The partitions problem of the batch: the columns laid out by `algebra.build_columns`, as blocks, the
    positives left out of both partitions (the loss adds them itself, in its log1p form)."""
    inputs = SemCLIPInputs(image, text, paraphrase, negation, scale)
    columns = build_columns(inputs, paraphrase_weight, hard_negative_weight, directions)
    n_para = 0 if paraphrase is None else paraphrase.shape[1]
    return Problem(image, columns.blocks, scale, columns.col_bias, columns.n_query_cols, options,
                   positive_bands(image.shape[0], n_para))  # fmt: skip


def _loss_of(row_lse: torch.Tensor, query_lse: torch.Tensor, text_pos: torch.Tensor, para_pos: torch.Tensor | None,
             paraphrase_weight: float, directions: str) -> torch.Tensor:  # fmt: skip
    """The loss from off-positive partitions in float64 (O(B·(1 + Pn)²) work): the float64 statistics of the
    torch and cpp backends and the float64 positive logits keep their digits."""
    precise = torch.float64
    return combine_partitions(row_lse.to(precise), query_lse.to(precise), text_pos.to(precise),
                              None if para_pos is None else para_pos.to(precise), paraphrase_weight, directions,
                              positives_excluded=True)  # fmt: skip


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
        n_para = 0 if paraphrase is None else paraphrase.shape[1]
        problem = _problem(image, text, paraphrase, negation, scale, paraphrase_weight, hard_negative_weight, options,
                           directions)  # fmt: skip
        stats = backend_forward(problem, backend)  # off-positive partitions: the positives are left out
        inputs = SemCLIPInputs(image, text, paraphrase, negation, scale)
        text_pos, para_pos = positive_logits(inputs, paraphrase_weight, torch.float64)
        loss = _loss_of(stats.row_lse, stats.query_lse, text_pos, para_pos, paraphrase_weight, directions)
        loss = loss.to(scale.dtype)
        present = [t for t in (paraphrase, negation) if t is not None]
        positive = [text_pos] if para_pos is None else [text_pos, para_pos]
        ctx.save_for_backward(image, text, *present, scale, *positive, stats.row_lse, stats.query_lse,
                              stats.col_mass_lb, *stats.aux)  # fmt: skip
        ctx.layout = (paraphrase is not None, negation is not None, n_para, len(stats.aux), stats.own)
        ctx.settings = (paraphrase_weight, hard_negative_weight, options, backend, directions)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        has_para, has_neg, n_para, n_aux, own_stats = ctx.layout
        paraphrase_weight, hard_negative_weight, options, backend, directions = ctx.settings
        saved = list(ctx.saved_tensors)
        image, text = saved[0], saved[1]
        paraphrase = saved.pop(2) if has_para else None
        negation = saved.pop(2) if has_neg else None
        scale, text_pos = saved[2], saved[3]
        para_pos = saved[4] if n_para else None
        row_lse, query_lse, col_mass_lb, *aux = saved[4 + (1 if n_para else 0) :]
        stats = Stats(row_lse, query_lse, col_mass_lb, tuple(aux), own_stats)
        batch = image.shape[0]
        problem = _problem(image, text, paraphrase, negation, scale, paraphrase_weight, hard_negative_weight, options,
                           directions)  # fmt: skip

        # The gradient arriving at each off-positive partition and each positive logit, in closed form (float64,
        # O(B·(1 + Pn)²)): sums of small terms, no cancellation near convergence.
        precise = torch.float64
        g_row, g_query, g_text, g_para = off_positive_gradients(
            row_lse.to(precise), query_lse.to(precise), text_pos.to(precise),
            None if para_pos is None else para_pos.to(precise), paraphrase_weight, directions,
        )  # fmt: skip
        scale_by = grad_loss.to(precise)
        g_row, g_query = g_row * scale_by, g_query * scale_by
        bands = [PositiveBand(0, 1, (g_text * scale_by)[:, None].contiguous())]
        if n_para:
            bands.append(PositiveBand(batch, n_para, (g_para * scale_by).contiguous()))
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
