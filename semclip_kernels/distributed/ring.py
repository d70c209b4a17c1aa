"""The ring: column blocks travel rank to rank instead of being all-gathered (Inf-CL's way).

At step t rank r holds the block `[C_s; I_s]` of rank s = r − t. It posts the send of that
block to r + 1 and the receive of the next one from r − 1 before computing on it, so the
transfer overlaps the tile computation; partial log-sum-exps are combined exactly with
logaddexp. A rank holds at most two feature blocks at once.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..backends import partitions
from ..backends.options import PartitionOptions

_DATA_TAG, _GRAD_TAG = 7301, 7302  # distinct tags: feature blocks and gradient blocks never match each other


@dataclasses.dataclass(frozen=True)
class RingConfig:
    rank: int
    world_size: int
    n_query_cols: int
    backend: str
    options: PartitionOptions
    remote_grad: bool  # gradients of the other ranks' blocks travel home (else: local rows only)

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size


def _post(ops: list[dist.P2POp]) -> list[dist.Work]:
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()


def _block_partitions(
    image: torch.Tensor,
    queries: torch.Tensor,
    block_cols: torch.Tensor,
    block_images: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    config: RingConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial partitions against one travelling block `[C_s; I_s]`: local images × C_s, local queries × I_s."""
    image_bias = torch.zeros(block_images.shape[0], dtype=col_bias.dtype, device=col_bias.device)
    row_part, _ = partitions(image, block_cols, scale, col_bias, 0, backend=config.backend, options=config.options)
    query_part, _ = partitions(
        queries, block_images, scale, image_bias, 0, backend=config.backend, options=config.options
    )
    return row_part, query_part


class RingPartitions(torch.autograd.Function):
    """`(row_lse [B], query_lse [n_query_cols])` of this rank's rows against every rank's block.

    At step t rank r holds the block of rank r−t. Before computing on it, it posts
    the send of that block to r+1 and the receive of the next one from r−1, so the
    transfer overlaps the tile computation. The backward recomputes each block's
    partial partitions and backpropagates through the primitive with the exact
    weights `g · exp(partial − lse)`; the gradient of the travelling block's
    features travels with it (sent after each step, overlapping the next step's
    computation) and arrives home after a full turn.
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
        stat_dtype = scale.dtype
        queries = cols[: config.n_query_cols]
        row_lse = torch.full((image.shape[0],), -float("inf"), dtype=stat_dtype, device=image.device)
        query_lse = torch.full((config.n_query_cols,), -float("inf"), dtype=stat_dtype, device=image.device)
        block = torch.cat([cols, image])  # what travels: [C_s; I_s]
        for step in range(config.world_size):
            incoming, works = None, []
            if step < config.world_size - 1:
                incoming = torch.empty_like(block)
                works = _post(
                    [
                        dist.P2POp(dist.isend, block, config.next_rank, tag=_DATA_TAG),
                        dist.P2POp(dist.irecv, incoming, config.prev_rank, tag=_DATA_TAG),
                    ]
                )
            n_cols = cols.shape[0]
            row_part, query_part = _block_partitions(
                image, queries, block[:n_cols], block[n_cols:], scale, col_bias, config
            )
            torch.logaddexp(row_lse, row_part, out=row_lse)
            torch.logaddexp(query_lse, query_part, out=query_lse)
            _wait(works)
            block = incoming
        ctx.save_for_backward(image, cols, scale, col_bias, row_lse, query_lse)
        ctx.config = config
        return row_lse, query_lse

    @staticmethod
    def backward(ctx, grad_row_lse: torch.Tensor | None, grad_query_lse: torch.Tensor | None):
        image, cols, scale, col_bias, row_lse, query_lse = ctx.saved_tensors
        config: RingConfig = ctx.config
        need_image, need_cols, need_scale = ctx.needs_input_grad[:3]
        stat_dtype = scale.dtype
        n_cols, n_query = cols.shape[0], config.n_query_cols
        grad_row_lse = torch.zeros_like(row_lse) if grad_row_lse is None else grad_row_lse
        grad_query_lse = torch.zeros_like(query_lse) if grad_query_lse is None else grad_query_lse
        # The other ranks' blocks need gradients only for the inputs that require them here
        # (every rank has the same requires_grad flags: checked in the forward).
        remote_grad = config.remote_grad and (need_image or need_cols)

        grad_image = torch.zeros(image.shape, dtype=stat_dtype, device=image.device)
        grad_cols = torch.zeros(cols.shape, dtype=stat_dtype, device=cols.device)
        grad_scale = torch.zeros((), dtype=stat_dtype, device=scale.device)
        block = torch.cat([cols, image]).detach()
        outgoing, outgoing_works = None, []
        for step in range(config.world_size):
            # Order of posts per peer pair: [gradient of step t−1, block of step t+1], then the
            # gradient of step t; the same order on both sides (needed by NCCL, harmless on Gloo).
            # (A Gloo work must be waited on exactly once: a second wait() on a receive blocks.)
            incoming, incoming_grad, grad_works, works = None, None, [], []
            if remote_grad and step > 0:
                incoming_grad = torch.empty(block.shape, dtype=stat_dtype, device=block.device)
                grad_works = _post([dist.P2POp(dist.irecv, incoming_grad, config.prev_rank, tag=_GRAD_TAG)])
            if step < config.world_size - 1:
                incoming = torch.empty_like(block)
                works = _post(
                    [
                        dist.P2POp(dist.isend, block, config.next_rank, tag=_DATA_TAG),
                        dist.P2POp(dist.irecv, incoming, config.prev_rank, tag=_DATA_TAG),
                    ]
                )

            with torch.enable_grad():
                rows = image.detach().requires_grad_(need_image)
                queries = cols[:n_query].detach().requires_grad_(need_cols)
                # Only what requires grad on every rank gets gradient work (a frozen tower costs none).
                block_cols = block[:n_cols].detach().requires_grad_(remote_grad and need_cols)
                block_images = block[n_cols:].detach().requires_grad_(remote_grad and need_image)
                tau = scale.detach().requires_grad_(need_scale)
                row_part, query_part = _block_partitions(rows, queries, block_cols, block_images, tau, col_bias, config)
                # lse = logaddexp over blocks of the partials, so d lse / d partial = exp(partial − lse).
                # Backpropagated as a scalar surrogate Σ partial·weight: the same gradient, and no
                # grad_outputs tensor (whose first use imports sympy, seconds per process).
                surrogate = None
                for part, lse, grad in ((row_part, row_lse, grad_row_lse), (query_part, query_lse, grad_query_lse)):
                    if part.requires_grad:
                        term = (part * (grad * torch.exp(part.detach() - lse))).sum()
                        surrogate = term if surrogate is None else surrogate + term
                leaves = [leaf for leaf in (rows, queries, block_cols, block_images, tau) if leaf.requires_grad]
                grads = torch.autograd.grad(surrogate, leaves, allow_unused=True) if surrogate is not None else ()
            grad_of = {id(leaf): grad for leaf, grad in zip(leaves, grads)}
            if grad_of.get(id(rows)) is not None:
                grad_image += grad_of[id(rows)]
            if grad_of.get(id(queries)) is not None:
                grad_cols[:n_query] += grad_of[id(queries)]
            if grad_of.get(id(tau)) is not None:
                grad_scale += grad_of[id(tau)]

            if remote_grad:
                block_grad = torch.zeros(block.shape, dtype=stat_dtype, device=block.device)
                for part, leaf in ((block_grad[:n_cols], block_cols), (block_grad[n_cols:], block_images)):
                    if grad_of.get(id(leaf)) is not None:
                        part.copy_(grad_of[id(leaf)])
                if incoming_grad is not None:
                    _wait(grad_works)  # the gradient of this block accumulated by the previous ranks
                    block_grad += incoming_grad
                _wait(outgoing_works)
                outgoing = block_grad
                outgoing_works = _post([dist.P2POp(dist.isend, outgoing, config.next_rank, tag=_GRAD_TAG)])
            _wait(works)
            block = incoming

        if remote_grad:  # our own block's gradient, after a full turn
            home = torch.empty((n_cols + image.shape[0], image.shape[1]), dtype=stat_dtype, device=image.device)
            home_works = _post([dist.P2POp(dist.irecv, home, config.prev_rank, tag=_GRAD_TAG)])
            _wait(home_works)
            _wait(outgoing_works)
            grad_cols += home[:n_cols]
            grad_image += home[n_cols:]
        return (
            grad_image.to(image.dtype) if need_image else None,
            grad_cols.to(cols.dtype) if need_cols else None,
            grad_scale.to(scale.dtype) if need_scale else None,
            None,
            None,
        )
