"""Collectives with autograd for the distributed loss (docs/contract.md §5).

Each one is a leaf: it moves tensors between ranks and says how gradients move back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Collectives under their current names, with the older names as fallback.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class AllGather(torch.autograd.Function):
    """`cat(all ranks' tensor)`; backward sums every rank's gradient of our slice (as open_clip's)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world_size: int) -> torch.Tensor:
        ctx.world_size = world_size
        return gather(tensor, world_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.world_size, *grad.shape[1:]))
        _reduce_scatter_single(out, grad)
        return out, None


def gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    tensor = tensor.contiguous()
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor)
    return out


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
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad * ctx.factor, None


class MeanOverRanks(torch.autograd.Function):
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
