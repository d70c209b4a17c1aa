"""The ring: feature blocks travel rank to rank instead of being all-gathered (Inf-CL's way).

Each rank's *block* `[C_r; I_r]` (its text columns and images) travels around a ring of
`n_steps` ranks. At step t a rank holds the block that started t places back; it posts the send
of that block to the next rank and the receive of the next one before computing on it, so the
transfer overlaps the computation. Partial log-sum-exps are combined exactly with logaddexp.

"hierarchical" mode runs one ring per position in a group of `group_size` consecutive ranks (a
node): rank g·G + l exchanges with the ranks at position l of groups g ± 1, so the G ranks of a
node use their G inter-node links at once, each carrying one block, and no block crosses the
network twice. At every step the group all-gathers the blocks its members hold (the block of a
whole group, over the fast intra-node links) and each rank computes against all of them. In the
backward the group reduce-scatters that group block's gradient, so each rank sends on only the
gradient of the block it holds. "ring" mode is the same with groups of one.

"gather" mode is the same with one group of every rank: one step, the blocks all-gathered.

The backward passes the blocks around again and differentiates each group block with the
primitive's backward-only entry (`backends.backward`, docs/backends.md) against the *global*
statistics of the forward (each step's forward `Stats` rebased on them): no forward is recomputed.
The gradient of each travelling block travels with it and reaches its owner after a full turn.

The positive logits `s(I_i, T_i)`, `s(I_i, P_ip)` are outputs of the same node (always local: a rank's
images and its own captions; float64, O(B·(1 + Pn)·d)). The partitions leave them out (`Problem.positives`):
the own group's step puts the diagonal block (own images against own columns, own query columns first) in
one problem with both directions and its positive entries excluded from both partitions, so that the loss
can be written as `log1p` of each line's off-positive mass (`algebra.combine_partitions`), exact at any
loss. The statistics are combined in float64. The positives' gradients enter that problem's backward as
positive bands of dS, summed in float32 before each input's one cast (as in the single-process loss node).
With open_clip's one-sided gradients (local_loss without gather_with_grad) the two directions differentiate
different inputs: the diagonal problem's backward runs once per direction (the image→text weights and the
positives' image→text share to the images, the text→image ones to the own queries). A query's term depends
on its positive logit only through `query_lse − s`, so the positive's text→image share is minus the
gradient arriving at its `query_lse`.

The gradient filter (cpp, triton) measures each weight against the mass of the gradients it feeds, as in
one process. A column's gradient is made of every rank's row-softmax weights plus, for a caption or
paraphrase, its own column softmax (mass 1) on its owner; an image's, of its own row softmax (mass 1) plus
every rank's query-softmax weights. The row-softmax masses of disjoint row sets add: at the start of the
backward each rank adds its lower bounds of the masses of the columns and images it saw (rebased on the
global statistics) and the unit mass of its own lines that receive a gradient into one
`[world_size, K + B]` float64 table, summed over ranks by one all-reduce (`world_size·(K + B)` floats, no
product). Every backward call gets the global bounds of its block, and the single process's threshold
`grad_filter_eps` (a line of the global batch has the global batch's count of weights). The filter weighs
each line's weights by its gradient `|g|` against the largest `|g|` of the problem, `G`; a call's own
largest can be far below the global batch's (a query problem's lines are off-positive shares, e^-45 of the
rows' in a trained batch), so each call's threshold is scaled by `G_global / G_call` (one all-reduce of two
scalars): the single process's criterion `weight·|g| < eps·G_global·mass`, `G_global` over the lines that
feed the same gradient tensors (one direction's with open_clip's one-sided gradients). A call that computes
no column gradient (the other ranks' columns and images with one-sided gradients) measures its row weights
against their row's mass alone: a negation's small column mass protects a gradient nobody computes.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..algebra import positive_bands, positive_logits
from ..backends import backward as partitions_backward
from ..backends import forward as partitions
from ..backends import summed_backward_stats
from ..backends.options import PartitionOptions
from ..backends.values import Needs, PositiveBand, StatGrads, Stats, problem
from ..validation import SemCLIPInputs
from .collectives import exchange, explain_peer_failure, gather, post, reduce_scatter, wait

_DATA_TAG, _GRAD_TAG = 7301, 7302  # distinct tags: feature blocks and gradient blocks never match each other


@dataclasses.dataclass(frozen=True)
class RingConfig:
    next_rank: int  # global ranks of the neighbours in the ring
    prev_rank: int
    n_steps: int  # blocks around the ring (ranks in "ring" mode, groups in "hierarchical" mode)
    n_query_cols: int  # this rank's query columns: the first rows of its `cols` (0: no text → image half)
    n_positive_cols: int  # this rank's captions and paraphrases, `cols[:n_positive_cols]`
    backend: str
    options: PartitionOptions
    remote_grad: bool  # gradients of the other ranks' blocks travel home (else: own rows only)
    group_size: int = 1  # ranks whose blocks are all-gathered at every step (1: plain ring)
    group: dist.ProcessGroup | None = None  # their process group (None: the default group, or group_size 1)
    owner_rank: tuple[int, ...] = ()  # owner_rank[t·group_size + m]: whose block is member m's at step t
    world_size: int = 1
    # "gather" mode: keep the forward's gathered blocks for the backward (as an all-gather with autograd
    # does: W blocks of memory, no second all-gather).
    keep_gathered: bool = False
    position: int = 0  # where this rank's own block sits among the blocks of step 0 (its own group's)


def _exchange(block: torch.Tensor, config: RingConfig) -> tuple[torch.Tensor, list[dist.Work]]:
    """Post the send of `block` to the next rank and the receive of the next block from the previous one."""
    return exchange(block, config.next_rank, config.prev_rank, _DATA_TAG)


def _zero_bias(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n, dtype=like.dtype, device=like.device)


def _group_block(block: torch.Tensor, n_cols: int, config: RingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns and images of the blocks that this rank's group holds now (its own block alone
    in a plain ring), members in group-rank order."""
    if config.group_size == 1:
        return block[:n_cols], block[n_cols:]
    gathered = gather(block, config.group_size, config.group, "the all-gather of the travelling blocks in the group")
    per_member = gathered.view(config.group_size, block.shape[0], block.shape[1])
    return per_member[:, :n_cols].reshape(-1, block.shape[1]), per_member[:, n_cols:].reshape(-1, block.shape[1])


def _own_share(group_grad: torch.Tensor, config: RingConfig) -> torch.Tensor:
    """The gradient of the block this rank holds, summed over its group (group_grad: [G, R, d])."""
    if config.group_size == 1:
        return group_grad[0]
    return reduce_scatter(group_grad.view(-1, group_grad.shape[-1]), config.group_size, config.group)


class RingPartitions(torch.autograd.Function):
    """`(row_lse [B], query_lse [n_query_cols], text_pos [B], para_pos [B, Pn])`: the off-positive partitions
    of this rank's rows against every rank's block (each line's own positives left out) and the positive
    logits `τ<I_i, T_i>`, `τ<I_i, P_ip>`, all float64.

    Inputs are this rank's `image [B, d]` and `cols [K, d]` (`[T; P; N]`, queries first) and the columns'
    bias. Gradients reach the own rows directly and, when `config.remote_grad`, through the
    own block's gradient that comes home after a full turn of the ring. Each input's gradient is summed in
    float32 and cast once.

    Positives (open_clip's semantics): each positive logit enters an image→text and a text→image term
    (`algebra.combine_partitions`). With `remote_grad` both terms' gradients reach the image and the text;
    without, the image→text term's reaches the image only, the text→image term's the text only.
    """

    @staticmethod
    def forward(
        ctx,
        image: torch.Tensor,
        cols: torch.Tensor,
        scale: torch.Tensor,
        col_bias: torch.Tensor,
        config: RingConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = cols[: config.n_query_cols]
        n_cols = cols.shape[0]
        # float64: the partial partitions combine without losing the float64 statistics of the cpp and torch
        # backends (the log1p form of the loss keeps their digits near convergence).
        row_lse = torch.full((image.shape[0],), -float("inf"), dtype=torch.float64, device=image.device)
        query_lse = torch.full((config.n_query_cols,), -float("inf"), dtype=torch.float64, device=image.device)
        block = torch.cat([cols, image]).detach()  # what travels: [C_s; I_s]
        step_stats, step_owners = [], []
        for step in range(config.n_steps):
            incoming, works = None, []
            if step < config.n_steps - 1:
                incoming, works = _exchange(block, config)
            group_cols, group_images = _group_block(block, n_cols, config)
            if config.keep_gathered:
                ctx.gathered = (group_cols, group_images)
            row_problem, query_problem, owners = _step_problems(image, queries, group_cols, group_images, scale,
                                                                col_bias, config, step)  # fmt: skip
            row_stats = partitions(row_problem, config.backend)
            query_stats = None if query_problem is None else partitions(query_problem, config.backend)
            torch.logaddexp(row_lse, row_stats.row_lse.to(row_lse.dtype), out=row_lse)
            if row_problem.n_query_cols:  # the diagonal block's column partitions
                torch.logaddexp(query_lse, row_stats.query_lse.to(query_lse.dtype), out=query_lse)
            if query_stats is not None:
                torch.logaddexp(query_lse, query_stats.row_lse.to(query_lse.dtype), out=query_lse)
            step_stats.append((row_stats, query_stats))
            step_owners.append(owners)
            wait(works, f"the ring's exchange of feature blocks (forward, step {step + 1} of {config.n_steps - 1})")
            block = incoming
        ctx.save_for_backward(image, cols, scale, col_bias, row_lse, query_lse)
        ctx.config = config
        ctx.step_owners = step_owners
        ctx.step_stats = [(rows.rebased(row_lse, query_lse if rows.query_lse.numel() else rows.query_lse),
                           None if queries is None else queries.rebased(query_lse, queries.query_lse))
                          for rows, queries in step_stats]  # fmt: skip
        text_pos, para_pos = _positive_logits(image, cols, scale, config.n_positive_cols)
        return row_lse, query_lse, text_pos, para_pos

    @staticmethod
    def backward(ctx, grad_row_lse, grad_query_lse, grad_text_pos, grad_para_pos):
        # Every block's backward call adds to what `last_backward_stats` reports for this backward.
        with summed_backward_stats(ctx.config.backend, ctx.saved_tensors[0].device):
            return _backward(ctx, grad_row_lse, grad_query_lse, grad_text_pos, grad_para_pos)


def _step_problems(image, queries, group_cols, group_images, scale, col_bias, config: RingConfig, step: int):
    """A ring step's row problem (own images against the group's columns), its query problem (own queries
    against the group's images, None if there are none) and the owner ranks of their column blocks, in order.

    Step 0 holds the own block: its row problem takes the own columns first, with their column partitions
    (the diagonal block in both directions in one problem, as in one process) and each line's positives left
    out of both partitions (`Problem.positives`), and the query problem gets the other members' images only.
    """
    size, n_cols, batch, options = config.group_size, col_bias.shape[0], image.shape[0], config.options
    owners = config.owner_rank[step * size : (step + 1) * size]
    row_bias = col_bias.repeat(size)  # every rank's columns are laid out [T; P; N] alike
    if step > 0:
        rows = problem(image, group_cols, scale, row_bias, 0, options)
        if not queries.shape[0]:  # directions="image_to_text": no text → image half
            return rows, None, (owners, ())
        query_problem = problem(queries, group_images, scale, _zero_bias(size * batch, col_bias), 0, options)
        return rows, query_problem, (owners, owners)
    own = config.position
    before, after = slice(0, own), slice(own + 1, size)  # the other members, in member order
    col_blocks = [group_cols[own * n_cols : (own + 1) * n_cols], group_cols[: own * n_cols],
                  group_cols[(own + 1) * n_cols :]]  # fmt: skip
    positives = positive_bands(batch, config.n_positive_cols // batch - 1)
    rows = problem(image, [b for b in col_blocks if b.shape[0]], scale, row_bias, config.n_query_cols, options,
                   positives)  # fmt: skip
    others = (*owners[before], *owners[after])
    if not others:
        return rows, None, ((owners[own],), ())
    if not queries.shape[0]:  # directions="image_to_text": no text → image half
        return rows, None, ((owners[own], *others), ())
    image_blocks = [b for b in (group_images[: own * batch], group_images[(own + 1) * batch :]) if b.shape[0]]
    query_problem = problem(queries, image_blocks, scale, _zero_bias(len(others) * batch, col_bias), 0, options)
    return rows, query_problem, ((owners[own], *others), others)


def _positive_logits(
    image: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, n_positive_cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`τ<I_i, T_i>` `[B]` and `τ<I_i, P_ip>` `[B, Pn]` (Pn may be 0) in float64 (`algebra.positive_logits`)."""
    batch, dim = image.shape
    n_para = n_positive_cols // batch - 1
    paraphrase = cols[batch:n_positive_cols].detach().view(batch, n_para, dim) if n_para else None
    inputs = SemCLIPInputs(image.detach(), cols[:batch].detach(), paraphrase, None, scale.detach())
    text_pos, para_pos = positive_logits(inputs, 1.0, torch.float64)  # a paraphrase column has weight > 0
    return text_pos, text_pos.new_zeros((batch, 0)) if para_pos is None else para_pos


def _positive_bands(grad_text_pos, grad_para_pos, batch: int, n_para: int, like: torch.Tensor):
    """The positive bands of the diagonal problem (`positive_bands`' layout) carrying the gradients arriving
    at the positive logits (None: zero)."""
    text = torch.zeros(batch, dtype=like.dtype, device=like.device) if grad_text_pos is None else grad_text_pos
    grads = (text.detach()[:, None].contiguous(),)
    if n_para:
        para = (torch.zeros(batch, n_para, dtype=like.dtype, device=like.device) if grad_para_pos is None
                else grad_para_pos.detach())  # fmt: skip
        grads += (para.contiguous(),)
    return tuple(
        PositiveBand(first, per_row, grad) for (first, per_row), grad in zip(positive_bands(batch, n_para), grads)
    )


def _backward(ctx, grad_row_lse, grad_query_lse, grad_text_pos, grad_para_pos):
    """`RingPartitions.backward`: the blocks travel again, each differentiated against the global statistics."""
    image, cols, scale, col_bias, row_lse, query_lse = ctx.saved_tensors
    config: RingConfig = ctx.config
    need_image, need_cols, need_scale = ctx.needs_input_grad[:3]
    stat_dtype = scale.dtype
    n_query, n_cols, size = config.n_query_cols, cols.shape[0], config.group_size
    queries = cols[:n_query]
    no_stats = row_lse.new_empty(0)  # one direction per call: the other's statistics are empty
    name = config.backend
    grad_row_lse = torch.zeros_like(row_lse) if grad_row_lse is None else grad_row_lse
    grad_query_lse = torch.zeros_like(query_lse) if grad_query_lse is None else grad_query_lse
    batch = image.shape[0]
    n_para = config.n_positive_cols // batch - 1
    bands = _positive_bands(grad_text_pos, grad_para_pos, batch, n_para, row_lse)
    # open_clip's one-sided gradients: the diagonal problem's backward once per direction (module docstring).
    one_sided = not config.remote_grad and n_query > 0
    if one_sided:
        # A query's term depends on its positive logit only through `query_lse − s`: the positive's
        # text→image share is minus the gradient at its query_lse, the rest is its image→text share.
        t2i_bands = _positive_bands(-grad_query_lse[:batch], -grad_query_lse[batch:].view(batch, n_para), batch,
                                    n_para, row_lse)  # fmt: skip
        bands = tuple(PositiveBand(b.first_col, b.per_row, b.grad - t.grad) for b, t in zip(bands, t2i_bands))
    # The other ranks' blocks need gradients only for the inputs that require them here
    # (every rank has the same requires_grad flags: checked in distributed_loss), so all agree.
    remote_grad = config.remote_grad and (need_image or need_cols)

    grad_image = torch.zeros(image.shape, dtype=stat_dtype, device=image.device)
    grad_cols = torch.zeros(cols.shape, dtype=stat_dtype, device=cols.device)
    grad_scale = torch.zeros((), dtype=stat_dtype, device=scale.device)
    step_stats = _global_bounds(ctx.step_stats, ctx.step_owners, grad_row_lse, grad_query_lse, n_cols, batch, config)
    largest = _largest_line_grads(step_stats, grad_row_lse, grad_query_lse)
    block = torch.cat([cols, image]).detach()
    home, outgoing_works = None, []
    for step in range(config.n_steps):
        # Order of posts per peer pair: [gradient of step t−1, block of step t+1], then the
        # gradient of step t; the same order on both sides (needed by NCCL, harmless on Gloo).
        incoming, incoming_grad, grad_works, works = None, None, [], []
        if remote_grad and step > 0:
            incoming_grad = torch.empty(block.shape, dtype=stat_dtype, device=block.device)
            grad_works = post([dist.P2POp(dist.irecv, incoming_grad, config.prev_rank, tag=_GRAD_TAG)])
        if step < config.n_steps - 1:
            incoming, works = _exchange(block, config)

        # The primitive's backward alone, with the global statistics: the weights
        # exp(S + bias − row_lse) and exp(S − query_lse) of this block, no forward recompute.
        if config.keep_gathered:
            group_cols, group_images = ctx.gathered
        else:
            group_cols, group_images = _group_block(block, n_cols, config)
        row_problem, query_problem, (row_owners, query_owners) = _step_problems(
            image, queries, group_cols, group_images, scale, col_bias, config, step)  # fmt: skip
        row_stats, query_stats = step_stats[step]
        both = row_problem.n_query_cols > 0  # the diagonal block: both directions in one call
        row_mass = _fed_mass(row_stats.col_mass_lb, remote_grad and need_cols)
        row_problem_stats = Stats(row_lse, query_lse if both else no_stats, row_mass, row_stats.aux)
        row_directions = ("row", "query") if both and not one_sided else ("row",)
        rows_grads = partitions_backward(
            _global_threshold(row_problem, largest, row_directions, one_sided), row_problem_stats,
            StatGrads(row=grad_row_lse, query=grad_query_lse if both and not one_sided else None,
                      positives=bands if step == 0 else ()),
            Needs(need_image, remote_grad and need_cols, need_scale), name,
        )  # fmt: skip
        own_query_grads = None
        if step == 0 and one_sided:  # the text→image direction of the diagonal block, to the own queries only
            own_query_grads = partitions_backward(
                _global_threshold(row_problem, largest, ("query",), one_sided), row_problem_stats,
                StatGrads(query=grad_query_lse, positives=t2i_bands), Needs(False, need_cols, need_scale), name,
            )  # fmt: skip
            if own_query_grads.cols is not None:
                grad_cols[:n_query] += own_query_grads.cols[0][:n_query]
        query_grads = None
        if query_problem is not None:
            query_grads = partitions_backward(
                _global_threshold(query_problem, largest, ("query",), one_sided),
                Stats(query_lse, no_stats, _fed_mass(query_stats.col_mass_lb, remote_grad and need_image),
                      query_stats.aux),
                StatGrads(row=grad_query_lse), Needs(need_cols, remote_grad and need_image, need_scale), name,
            )  # fmt: skip
        if rows_grads.rows is not None:
            grad_image += rows_grads.rows
        if query_grads is not None and query_grads.rows is not None:
            grad_cols[:n_query] += query_grads.rows
        for grads in (rows_grads, query_grads, own_query_grads):
            if grads is not None and grads.scale is not None:
                grad_scale += grads.scale

        if remote_grad:
            group_grad = torch.zeros((size, *block.shape), dtype=stat_dtype, device=block.device)
            member = {rank: m for m, rank in enumerate(config.owner_rank[step * size : (step + 1) * size])}
            if rows_grads.cols is not None:
                index = [member[rank] for rank in row_owners]
                group_grad[index, :n_cols] = torch.cat(rows_grads.cols).view(len(index), n_cols, -1)
            if query_grads is not None and query_grads.cols is not None:
                index = [member[rank] for rank in query_owners]
                group_grad[index, n_cols:] = torch.cat(query_grads.cols).view(len(index), batch, -1)
            block_grad = _own_share(group_grad, config)
            if incoming_grad is not None:
                wait(grad_works, f"the ring's exchange of gradient blocks (backward, step {step + 1})")
                block_grad += incoming_grad  # this block's gradient from the ranks it visited before
            wait(outgoing_works, f"the ring's exchange of gradient blocks (backward, step {step})")
            if config.n_steps == 1:
                home = block_grad  # a ring of one: the block never left
            else:
                outgoing_works = post([dist.P2POp(dist.isend, block_grad, config.next_rank, tag=_GRAD_TAG)])
        wait(works, f"the ring's exchange of feature blocks (backward, step {step + 1} of {config.n_steps - 1})")
        block = incoming

    if remote_grad and home is None:  # our own block's gradient, after a full turn
        home = torch.empty((n_cols + image.shape[0], image.shape[1]), dtype=stat_dtype, device=image.device)
        home_works = post([dist.P2POp(dist.irecv, home, config.prev_rank, tag=_GRAD_TAG)])
        wait(home_works, "the ring's return of this rank's gradient block (end of the backward)")
        wait(outgoing_works, "the ring's exchange of gradient blocks (end of the backward)")
    if home is not None:
        grad_cols += home[:n_cols]
        grad_image += home[n_cols:]
    return _cast_grads(grad_image, grad_cols, grad_scale, image, cols, scale, ctx.needs_input_grad)


def _fed_mass(col_mass_lb: torch.Tensor, cols_differentiated: bool) -> torch.Tensor:
    """The log-mass bounds the filter measures a call's row weights against: the columns' own where the call
    differentiates its columns, else at least 0 (a row weight then feeds its row's gradient alone, of mass 1;
    NaN stays NaN)."""
    return col_mass_lb if cols_differentiated else col_mass_lb.clamp_min(0)


def _cast_grads(grad_image, grad_cols, grad_scale, image, cols, scale, needs_input_grad):
    """The float32 gradients cast once to the inputs' dtypes (None where not needed)."""
    need_image, need_cols, need_scale = needs_input_grad[:3]
    return (
        grad_image.to(image.dtype) if need_image else None,
        grad_cols.to(cols.dtype) if need_cols else None,
        grad_scale.to(scale.dtype) if need_scale else None,
        None,
        None,
    )


def _largest_line_grads(step_stats, grad_row_lse: torch.Tensor, grad_query_lse: torch.Tensor) -> dict | None:
    """This rank's largest |g_row| and |g_query| (`"row"`, `"query"`) and the largest of each over every rank
    (`"global row"`, `"global query"`; one all-reduce of two scalars), or None where the filter has no bounds
    (no exchange)."""
    if any(rows.col_mass_lb.numel() == 0 or (queries is not None and queries.col_mass_lb.numel() == 0)
           for rows, queries in step_stats):  # fmt: skip
        return None
    largest = {name: float(g.detach().abs().max()) if g.numel() else 0.0
               for name, g in (("row", grad_row_lse), ("query", grad_query_lse))}  # fmt: skip
    total = torch.tensor([largest["row"], largest["query"]], dtype=torch.float64, device=grad_row_lse.device)
    with explain_peer_failure("the all-reduce of the largest line gradients (start of the backward)"):
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
    largest["global row"], largest["global query"] = total.tolist()
    return largest


def _global_threshold(step_problem, largest: dict | None, directions: tuple[str, ...], one_sided: bool):
    """`step_problem` with its filter threshold scaled by `G_global / G_call` (module docstring): `G_call` the
    largest |g| of the lines it differentiates (`directions`), `G_global` that of every rank's lines feeding the
    same gradient tensors: both directions', or with open_clip's one-sided gradients (`one_sided`: an image's
    gradient holds image→text lines only, a caption's text→image lines only) the same direction's. Capped at
    0.5 (a threshold must stay below 1; the cap only skips less). Unchanged without bounds, without a
    threshold, or with non-finite gradients."""
    eps = step_problem.options.grad_filter_eps
    if largest is None or not eps:
        return step_problem
    own = max(largest[name] for name in directions)
    reference = max(largest[f"global {name}"] for name in (directions if one_sided else ("row", "query")))
    if not (0 < own < reference < float("inf")):
        return step_problem
    threshold = min(eps * reference / own, 0.5)
    return dataclasses.replace(step_problem, options=dataclasses.replace(step_problem.options,
                                                                         grad_filter_eps=threshold))  # fmt: skip


def _global_bounds(step_stats, step_owners, grad_row_lse, grad_query_lse, n_cols: int, batch: int,
                   config: RingConfig):  # fmt: skip
    """Each step's `(row, query)` statistics with global mass bounds (see the module docstring).

    Masses, not their logs, are summed: `exp(bound)` of every column and image this rank saw, per block
    owner (`step_owners`: the owners of each step's row and query column blocks, in order), plus 1 on its own
    queries and images whose statistic receives a gradient (their own softmax); a `[world_size, K + B]` float64
    table, all-reduced by sum. A mass below float64's range adds 0, a NaN bound stays NaN (never lets a tile
    be skipped). Backends without bounds (no filter) skip the exchange.
    """
    if any(rows.col_mass_lb.numel() == 0 or (queries is not None and queries.col_mass_lb.numel() == 0)
           for rows, queries in step_stats):  # fmt: skip
        return step_stats
    device = grad_row_lse.device
    table = torch.zeros((config.world_size, n_cols + batch), dtype=torch.float64, device=device)
    for (rows, queries), (row_owners, query_owners) in zip(step_stats, step_owners):
        table[:, :n_cols].index_add_(0, torch.tensor(row_owners, device=device),
                                     rows.col_mass_lb.double().view(len(row_owners), n_cols).exp())  # fmt: skip
        if queries is not None:
            table[:, n_cols:].index_add_(0, torch.tensor(query_owners, device=device),
                                         queries.col_mass_lb.double().view(len(query_owners), batch).exp())  # fmt: skip
    rank = config.owner_rank[config.position]
    table[rank, : config.n_query_cols] += (grad_query_lse.detach() != 0).double()
    table[rank, n_cols:] += (grad_row_lse.detach() != 0).double()
    with explain_peer_failure("the all-reduce of the column-mass bounds (start of the backward)"):
        dist.all_reduce(table)
    bounds = table.log()
    result = []
    for (rows, queries), (row_owners, query_owners) in zip(step_stats, step_owners):
        row_bounds = bounds[list(row_owners), :n_cols].reshape(-1).to(rows.col_mass_lb.dtype)
        query_stats = None
        if queries is not None:
            query_bounds = bounds[list(query_owners), n_cols:].reshape(-1).to(queries.col_mass_lb.dtype)
            query_stats = Stats(queries.row_lse, queries.query_lse, query_bounds, queries.aux)
        result.append((Stats(rows.row_lse, rows.query_lse, row_bounds, rows.aux), query_stats))
    return result
