"""The sigmoid loss's primitive through the one dispatch point (`backends/__init__.py`) — docs/contract.md §8.

    pair_sum(rows A [M, d], cols C [K, d], scale τ, bias b, col_weight a [K], col_owner o [K])
        = Σ_i Σ_c a_c · softplus(s_ic·(τ·<A_i, C_c> + b)),   s_ic = −1 if o_c = i, else +1

differentiable in `A`, `C`, `τ` and `b`. The kernels (`sigmoid_torch`, `sigmoid_cpp`, `sigmoid_triton`) are
pure functions (`base.SigmoidPairKernels`) that return the sum and, for the inputs asked for, its gradients in
one pass; `sigmoid_reference` materializes the logits and differentiates with autograd (second derivatives).

Gradients in the forward (`GRADIENTS_IN_FORWARD`, from each kernel's `gradients_in_forward`): each pair's
gradient is local, so the forward's one pass over the tiles can run the two gradient products as well (three
products in all, nothing recomputed); the backward then multiplies the saved gradients by the incoming
scalar. Otherwise the forward computes the sum alone (one product) and the backward runs the pass again with
gradients (three more).
"""

from __future__ import annotations

import torch

from . import SIGMOID_PAIRS, backend_module, backend_status, last_backward_stats, ops, resolve_backend
from .dtypes import stat_dtype
from .options import PartitionOptions
from .sigmoid_values import SigmoidProblem
from .values import BackwardStats, Needs

# Per concrete backend: whether its forward computes the gradients too (filled from the kernels when a backend
# is first resolved; set an entry to override, as the benchmark does).
GRADIENTS_IN_FORWARD: dict[str, bool] = {}


def sigmoid_backend_status(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether the sigmoid kernels of backend `name` run on `device`, and if not, why."""
    return backend_status(name, device, SIGMOID_PAIRS)


def resolve_sigmoid_backend(name: str, device: torch.device) -> str:
    """The concrete backend that runs the sigmoid loss for `name` on `device` ("auto": the fastest there)."""
    concrete = resolve_backend(name, device, SIGMOID_PAIRS)
    if concrete not in GRADIENTS_IN_FORWARD and not torch.compiler.is_compiling():
        GRADIENTS_IN_FORWARD[concrete] = _kernels_compute_gradients_in_forward(concrete, device)
    return concrete


def _kernels_compute_gradients_in_forward(name: str, device: torch.device) -> bool:
    kernels = backend_module(name, device, SIGMOID_PAIRS)
    return bool(getattr(getattr(kernels, "module", kernels), "gradients_in_forward", False))


def sigmoid_pair_sum(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    col_weight: torch.Tensor,
    col_owner: torch.Tensor,
    *,
    backend: str = "auto",
    options: PartitionOptions | None = None,
) -> torch.Tensor:
    """The primitive's value (see the module docstring), differentiable in rows, cols, scale and bias."""
    name = resolve_sigmoid_backend(backend, rows.device)
    grad_on = torch.is_grad_enabled()
    scale_bias = torch.stack([scale.reshape(()), bias.reshape(())]).to(stat_dtype(rows.dtype))
    wants = Needs(
        grad_on and rows.requires_grad, grad_on and cols.requires_grad, grad_on and scale_bias.requires_grad
    )  # fmt: skip
    in_forward = GRADIENTS_IN_FORWARD.get(name)
    if in_forward is None:
        in_forward = _kernels_compute_gradients_in_forward(name, rows.device)
    forward_needs = wants if in_forward else Needs(False, False, False)
    problem = SigmoidProblem(
        rows,
        (cols,),
        scale_bias,
        col_weight.to(stat_dtype(rows.dtype)),
        col_owner,
        options or PartitionOptions(),
        forward_needs,
    )
    return ops.forward(problem, name, SIGMOID_PAIRS).pair_sum


def last_sigmoid_backward_stats(backend: str, device: torch.device | str = "cpu") -> BackwardStats:
    """What the most recent gradient pass of the sigmoid primitive on `backend` did (tiles, skipped tiles)."""
    return last_backward_stats(backend, device, SIGMOID_PAIRS)
