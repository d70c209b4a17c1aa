"""The SemCLIP loss over the global batch of a `torch.distributed` job (SPEC section 5).

The global batch is every rank's batch concatenated in rank order. Each rank
computes the partitions of *its own* rows against *all* columns, with the
backend primitive's arbitrary rows/columns form (never a local × global matrix):

    row_lse[i]   = Z_i  = log Σ_{c ∈ all columns} exp(τ<I_i, C_c> + bias_c)   local images i
    query_lse[q] = Y(q) = log Σ_{k ∈ all images}  exp(τ<Q_q, I_k>)            local queries q = [T; P]

and `loss.combine_partitions` turns them into this rank's share `loss_r` of
section 1 (local means). With equal local batches, mean_r loss_r is the global loss.

Two ways to bring the other ranks' features:
- "gather": all-gather every rank's images and text columns, then two primitive calls.
- "ring": the blocks `[C_s; I_s]` of the ranks travel around the ring with
  point-to-point sends overlapped with the computation on the current block
  (forward and backward, Inf-CL style); partial log-sum-exps are combined
  exactly with logaddexp. A rank holds at most two feature blocks at once.

Gradient semantics follow open_clip's `ClipLoss` for all four combinations of
`local_loss` and `gather_with_grad` (see docs/distributed.md for the table).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .backends import BACKENDS, partitions
from .backends.options import PartitionOptions
from .loss import DISTRIBUTED_MODES as MODES
from .loss import build_columns, combine_partitions, positive_logits
from .validation import SUPPORTED_DTYPES, SemCLIPInputs, check_inputs, check_weight

_DATA_TAG, _GRAD_TAG = 7301, 7302  # distinct tags: feature blocks and gradient blocks never match each other

# Collectives under their current names, with the older names as fallback.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------- collectives with autograd


class _AllGather(torch.autograd.Function):
    """`cat(all ranks' tensor)`; backward sums every rank's gradient of our slice (as open_clip's)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world_size: int) -> torch.Tensor:
        ctx.world_size = world_size
        return _gather(tensor, world_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.world_size, *grad.shape[1:]))
        _reduce_scatter_single(out, grad)
        return out, None


def _gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    tensor = tensor.contiguous()
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor)
    return out


class _SumScaleGradOverRanks(torch.autograd.Function):
    """Identity on `τ`; backward all-reduces its gradient and multiplies by `factor`.

    Used with `local_loss=False`: every rank returns the global loss, but each
    rank differentiates only its own share, so `τ`'s gradient is the sum of the shares.
    """

    @staticmethod
    def forward(ctx, scale: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return scale.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad * ctx.factor, None


class _MeanOverRanks(torch.autograd.Function):
    """Forward: the mean of every rank's `loss_r` (the global loss). Backward: `grad_weight · g`
    to this rank's own share only (the other shares are differentiated on their ranks)."""

    @staticmethod
    def forward(ctx, loss_r: torch.Tensor, world_size: int, grad_weight: float) -> torch.Tensor:
        ctx.grad_weight = grad_weight
        total = loss_r.detach().clone()
        dist.all_reduce(total)
        return total / world_size

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.grad_weight, None, None


# --------------------------------------------------------------------------- ring


@dataclasses.dataclass(frozen=True)
class _RingConfig:
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
    config: _RingConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial partitions against one travelling block `[C_s; I_s]`: local images × C_s, local queries × I_s."""
    image_bias = torch.zeros(block_images.shape[0], dtype=col_bias.dtype, device=col_bias.device)
    row_part, _ = partitions(image, block_cols, scale, col_bias, 0, backend=config.backend, options=config.options)
    query_part, _ = partitions(
        queries, block_images, scale, image_bias, 0, backend=config.backend, options=config.options
    )
    return row_part, query_part


class _RingPartitions(torch.autograd.Function):
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
        config: _RingConfig,
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
                works = _post([
                    dist.P2POp(dist.isend, block, config.next_rank, tag=_DATA_TAG),
                    dist.P2POp(dist.irecv, incoming, config.prev_rank, tag=_DATA_TAG),
                ])
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
        config: _RingConfig = ctx.config
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
                works = _post([
                    dist.P2POp(dist.isend, block, config.next_rank, tag=_DATA_TAG),
                    dist.P2POp(dist.irecv, incoming, config.prev_rank, tag=_DATA_TAG),
                ])

            with torch.enable_grad():
                rows = image.detach().requires_grad_(need_image)
                queries = cols[:n_query].detach().requires_grad_(need_cols)
                # Only what requires grad on every rank gets gradient work (a frozen tower costs none).
                block_cols = block[:n_cols].detach().requires_grad_(remote_grad and need_cols)
                block_images = block[n_cols:].detach().requires_grad_(remote_grad and need_image)
                tau = scale.detach().requires_grad_(need_scale)
                row_part, query_part = _block_partitions(
                    rows, queries, block_cols, block_images, tau, col_bias, config
                )
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


# --------------------------------------------------------------------------- checks


def _needs_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def _check_layout_across_ranks(
    inputs: SemCLIPInputs, cols: torch.Tensor, n_query_cols: int, world_size: int
) -> None:
    """Every rank must have the same local layout; all ranks see the same table, so all raise together."""
    fields = {
        "local batch size B (image_features.shape[0])": inputs.batch,
        "feature dim d": inputs.image.shape[1],
        "paraphrases per image Pn": inputs.n_paraphrases,
        "negations per image Mn": inputs.n_negations,
        "text columns K": cols.shape[0],
        "query columns": n_query_cols,
        "feature dtype": SUPPORTED_DTYPES.index(inputs.image.dtype),
        "image_features requires grad": int(_needs_grad(inputs.image)),
        "text/paraphrase/negation requires grad": int(_needs_grad(cols)),
        "logit_scale requires grad": int(_needs_grad(inputs.logit_scale)),
    }
    local = torch.tensor(list(fields.values()), dtype=torch.int64, device=inputs.image.device)
    table = _gather(local[None], world_size).cpu()  # [world_size, n_fields]
    for column, name in enumerate(fields):
        values = table[:, column].tolist()
        if len(set(values)) == 1:
            continue
        if column == 0:
            raise ValueError(
                f"distributed SemCLIP loss needs the same local batch size on every rank, got {values} "
                "(ranks 0..world_size-1); drop or pad the last incomplete batch (e.g. DataLoader(drop_last=True))"
            )
        raise ValueError(f"distributed SemCLIP loss: {name} differs across ranks: {values}")


# --------------------------------------------------------------------------- the loss


def distributed_semclip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    paraphrase_features: torch.Tensor | None,
    negation_features: torch.Tensor | None,
    *,
    paraphrase_weight: float,
    hard_negative_weight: float,
    backend: str,
    options: PartitionOptions,
    rank: int,
    world_size: int,
    local_loss: bool,
    gather_with_grad: bool,
    mode: str = "gather",
) -> torch.Tensor:
    """This rank's SemCLIP loss of the global batch (SPEC section 5), open_clip's semantics.

    - `local_loss=False`: every rank returns the global loss `L`.
    - `local_loss=True`: rank r returns `loss_r` (its rows and queries against all
      columns and images); the mean over ranks is `L`.
    Gradient on this rank's features (and `τ`):
        local_loss, gather_with_grad = False, False: dL/d(own features), dL/dτ
                                       False, True:  world_size · dL/d(own features), dL/dτ
                                       True,  True:  world_size · dL/d(own features), d loss_r/dτ
                                       True,  False: own rows only (image→text for images,
                                                     text→image for queries), d loss_r/dτ
    `mode`: "gather" (all-gather the features) or "ring" (blocks passed around).
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "world_size > 1 needs torch.distributed: call torch.distributed.init_process_group first"
        )
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(
            f"rank={rank}, world_size={world_size} do not match torch.distributed's "
            f"rank={dist.get_rank()}, world_size={dist.get_world_size()}"
        )
    inputs = check_inputs(image_features, text_features, logit_scale, paraphrase_features, negation_features)
    w = check_weight("paraphrase_weight", paraphrase_weight)
    beta = check_weight("hard_negative_weight", hard_negative_weight)
    cols, col_bias, n_query_cols = build_columns(inputs, w, beta)
    _check_layout_across_ranks(inputs, cols, n_query_cols, world_size)

    # Gradients of the other ranks' features come home unless open_clip's
    # local_loss=True, gather_with_grad=False (gathered copies are constants there).
    remote_grad = gather_with_grad or not local_loss
    # With local_loss=False each rank differentiates its own share loss_r of L = mean_r loss_r
    # with weight grad_weight; the sum over ranks then gives open_clip's feature gradients
    # (world_size·dL with gather_with_grad, dL without), and τ's gradient is all-reduced to dL/dτ.
    grad_weight = 1.0 if gather_with_grad else 1.0 / world_size
    if not local_loss and _needs_grad(inputs.logit_scale):
        scale = _SumScaleGradOverRanks.apply(inputs.logit_scale, 1.0 / (grad_weight * world_size))
        inputs = dataclasses.replace(inputs, logit_scale=scale)
    scale = inputs.logit_scale

    if remote_grad:
        text_pos, para_pos = positive_logits(inputs, w)
    else:
        # open_clip: s(I_i, T_i) in image→text differentiates the image only, in text→image the
        # text only. Both directions weigh the positives alike, so the mean of the two one-sided
        # copies (bitwise equal values) carries exactly those gradients.
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        image_side = positive_logits(
            dataclasses.replace(inputs, text=inputs.text.detach(), paraphrase=detach(inputs.paraphrase)), w
        )
        text_side = positive_logits(dataclasses.replace(inputs, image=inputs.image.detach()), w)
        text_pos = (image_side[0] + text_side[0]) / 2
        para_pos = None if image_side[1] is None else (image_side[1] + text_side[1]) / 2

    if mode == "gather":
        if remote_grad:
            all_images = _AllGather.apply(inputs.image, world_size) if _needs_grad(inputs.image) else _gather(
                inputs.image, world_size
            )
            all_cols = _AllGather.apply(cols, world_size) if _needs_grad(cols) else _gather(cols, world_size)
        else:
            all_images = _gather(inputs.image.detach(), world_size)
            all_cols = _gather(cols.detach(), world_size)
        all_bias = col_bias.repeat(world_size)  # every rank's block is laid out [T; P; N] alike
        image_bias = torch.zeros(all_images.shape[0], dtype=col_bias.dtype, device=col_bias.device)
        row_lse, _ = partitions(inputs.image, all_cols, scale, all_bias, 0, backend=backend, options=options)
        query_lse, _ = partitions(
            cols[:n_query_cols], all_images, scale, image_bias, 0, backend=backend, options=options
        )
    else:
        config = _RingConfig(rank, world_size, n_query_cols, backend, options, remote_grad)
        row_lse, query_lse = _RingPartitions.apply(inputs.image, cols, scale, col_bias, config)

    batch = inputs.batch
    para_query_lse = None if para_pos is None else query_lse[batch:].view(batch, -1)
    loss_r = combine_partitions(row_lse, query_lse[:batch], para_query_lse, text_pos, para_pos, w)
    if local_loss:
        return loss_r
    return _MeanOverRanks.apply(loss_r, world_size, grad_weight)
