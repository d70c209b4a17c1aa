"""Collectives with autograd for the distributed loss, and what a failed one says (docs/contract.md §5).

Each collective is a leaf: it moves tensors between ranks and says how gradients move back.
Every wait on another rank runs under `explain_peer_failure`, so a rank that raised, died or
never called the loss turns into an error on the others, within the process group's timeout,
that says which exchange failed and why (never a silent hang, never a bare Gloo/NCCL message).
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist

# Collectives under their current names, with the older names as fallback.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# What torch.distributed's error text says when a peer's connection went away (it exited: raised
# or died) and when nobody answered in time (a rank is elsewhere, stuck, or slower than the timeout).
_CLOSED_MARKERS = ("closed", "reset by peer", "broken pipe", "connection refused", "eof", "abort")
_TIMEOUT_MARKERS = ("timed out", "timeout", "time out")


class PeerFailure(RuntimeError):
    """An exchange with the other ranks failed: one of them raised, died or did not take part in time."""


def group_timeout(group: dist.ProcessGroup | None = None) -> datetime.timedelta | None:
    """The timeout of `group`'s backend (None if this torch build does not expose it)."""
    group = group or dist.group.WORLD
    try:
        device = torch.device("cuda" if dist.get_backend(group) == "nccl" else "cpu")
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None


def _what_happened(error: BaseException, timeout: datetime.timedelta | None) -> str:
    text = str(error).lower()
    within = f"within the process group's timeout ({timeout})" if timeout else "within the process group's timeout"
    if any(marker in text for marker in _CLOSED_MARKERS):
        return (
            "a peer closed its connection: another rank exited (it raised an exception or its process died) "
            "before taking part"
        )
    if any(marker in text for marker in _TIMEOUT_MARKERS):
        return (
            f"no answer {within}: another rank did not call the loss (or its backward), "
            "or is stuck or slower than the timeout"
        )
    return f"another rank raised, died, or did not take part {within}"


@contextlib.contextmanager
def explain_peer_failure(what: str, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Re-raise a failed exchange with other ranks as a `PeerFailure` that says what happened.

    Wraps communication calls only (never computation), so any RuntimeError here is the
    process group's. The original error stays chained (`__cause__`).
    """
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as error:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        world = dist.get_world_size() if dist.is_initialized() else "?"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PeerFailure(
            f"distributed SemCLIP loss, rank {rank} of {world}: {what} failed: "
            f"{_what_happened(error, group_timeout(group))}. "
            f"torch.distributed reported: {type(error).__name__}: {first_line}"
        ) from error


def gather(
    tensor: torch.Tensor,
    size: int,
    group: dist.ProcessGroup | None = None,
    what: str = "the all-gather of the features",
) -> torch.Tensor:
    """`cat` of every member's `tensor` in rank order, over `group` (`size` members); no autograd."""
    tensor = tensor.contiguous()
    out = tensor.new_empty((size * tensor.shape[0], *tensor.shape[1:]))
    with explain_peer_failure(what, group):
        _all_gather_single(out, tensor, group=group)
    return out


def reduce_scatter(
    tensor: torch.Tensor,
    size: int,
    group: dist.ProcessGroup | None = None,
    what: str = "the reduce-scatter of the gathered features' gradients",
) -> torch.Tensor:
    """Member m gets the sum over members of `tensor`'s m-th slice (of `size`); no autograd."""
    tensor = tensor.contiguous()
    out = tensor.new_empty((tensor.shape[0] // size, *tensor.shape[1:]))
    with explain_peer_failure(what, group):
        _reduce_scatter_single(out, tensor, group=group)
    return out


def post(ops: list[dist.P2POp]) -> list[dist.Work]:
    """Post point-to-point sends and receives at once; their works, to `wait` on."""
    with explain_peer_failure("posting the ring's sends and receives"):  # a closed peer can fail here already
        return dist.batch_isend_irecv(ops) if ops else []


def wait(works: list[dist.Work], what: str) -> None:
    """Wait for posted works; a failure says `what` failed (`explain_peer_failure`)."""
    # A Gloo work must be waited on exactly once: a second wait() on a receive blocks.
    with explain_peer_failure(what):
        for work in works:
            work.wait()


def exchange(tensor: torch.Tensor, send_to: int, receive_from: int, tag: int) -> tuple[torch.Tensor, list[dist.Work]]:
    """Post the send of `tensor` to rank `send_to` and the receive of a tensor like it from rank
    `receive_from`: the receiving tensor and the works to `wait` on."""
    incoming = torch.empty_like(tensor)
    send = dist.P2POp(dist.isend, tensor, send_to, tag=tag)
    return incoming, post([send, dist.P2POp(dist.irecv, incoming, receive_from, tag=tag)])


class RingShift(torch.autograd.Function):
    """Send `tensor` to the next rank of the ring and receive the previous rank's; the backward sends the
    received tensor's gradient back to the previous rank and receives ours from the next."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, next_rank: int, prev_rank: int, tag: int, what: str) -> torch.Tensor:
        ctx.ranks, ctx.tag, ctx.what = (prev_rank, next_rank), tag + 1, what
        incoming, works = exchange(tensor.contiguous(), next_rank, prev_rank, tag)
        wait(works, f"the ring exchange of {what}")
        return incoming

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        returned, works = exchange(grad.contiguous(), *ctx.ranks, ctx.tag)
        wait(works, f"the ring exchange of {ctx.what}' gradients")
        return returned, None, None, None, None


class AllGather(torch.autograd.Function):
    """`gather(tensor)` over `group`; backward sums every member's gradient of our slice (as open_clip's)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.size, ctx.group = size, group
        return gather(tensor, size, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter(grad, ctx.size, ctx.group), None, None


def all_reduce(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Sum `tensor` over every rank, in place."""
    with explain_peer_failure(what):
        dist.all_reduce(tensor)
    return tensor


class SumScaleGradOverRanks(torch.autograd.Function):
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
        grad = all_reduce(grad.clone(), "the all-reduce of logit_scale's gradient")
        return grad * ctx.factor, None


class MeanOverRanks(torch.autograd.Function):
    """Forward: the mean of every rank's `loss_r` (the global loss). Backward: `grad_weight · g`
    to this rank's own share only (the other shares are differentiated on their ranks)."""

    @staticmethod
    def forward(ctx, loss_r: torch.Tensor, world_size: int, grad_weight: float) -> torch.Tensor:
        ctx.grad_weight = grad_weight
        total = all_reduce(loss_r.detach().clone(), "the all-reduce of the per-rank losses")
        return total / world_size

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.grad_weight, None, None
