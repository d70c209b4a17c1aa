"""The sigmoid loss's primitive: which backend runs it, and its registration with the one autograd layer
(`ops`, docs/backends.md) — docs/contract.md §8.

    pair_sum(rows A [M, d], cols C [K, d], scale τ, bias b, col_weight a [K], col_owner o [K])
        = Σ_i Σ_c a_c · softplus(s_ic·(τ·<A_i, C_c> + b)),   s_ic = −1 if o_c = i, else +1

differentiable in `A`, `C`, `τ` and `b`. The kernels (`sigmoid_torch`, `sigmoid_cpp`) are pure functions
that return the sum and, for the inputs asked for, its gradients in one pass; `sigmoid_values.SigmoidKernels`
adapts them to the layer's `Kernels`, and `ops.register_primitive` registers them (custom operators, fakes,
autograd, the double-backward refusal) exactly as it registers the partitions primitive. `sigmoid_reference`
materializes the logits and differentiates with autograd (second derivatives).

Gradients in the forward (`GRADIENTS_IN_FORWARD`): each pair's gradient is local, so the forward's one pass
over the tiles can run the two gradient products as well (three products in all, nothing recomputed); the
backward then multiplies the saved gradients by the incoming scalar. Otherwise the forward computes the sum
alone (one product) and the backward runs the pass again with gradients (three more). The default is what
docs/siglip.md measured faster.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import ops, resolve_backend
from .dtypes import stat_dtype
from .options import PartitionOptions
from .sigmoid_values import SIGMOID_FLAT_FORM, SigmoidKernels, SigmoidProblem
from .values import Needs

SIGMOID = ops.Codec("sigmoid_pairs", *SIGMOID_FLAT_FORM)
_MODULES = {
    "torch": "semclip_kernels.backends.sigmoid_torch",
    "cpp": "semclip_kernels.backends.sigmoid_cpp",
    "reference": "semclip_kernels.backends.sigmoid_reference",
    "triton": "semclip_kernels.backends.sigmoid_triton",
}
# Whether the forward computes the gradients too (see above); measured in docs/siglip.md.
# triton: as the fused CPU kernel (its forward runs the gradient products in the same pass; not yet timed).
GRADIENTS_IN_FORWARD = {"torch": True, "cpp": True, "reference": False, "triton": True}
_resolved: dict[tuple[str, str], str] = {}


def _load(name: str) -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    differentiable = getattr(module, "differentiable", False)  # only the reference says so
    ops.register_primitive(SIGMOID, name, module if differentiable else SigmoidKernels(module))
    return module, ""


def sigmoid_backend_status(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether the sigmoid kernels of concrete backend `name` run on `device`, and if not, why."""
    module, reason = _load(name)
    if module is None:
        return False, reason
    return module.is_available(device)


@torch.compiler.assume_constant_result
def _resolved_name(name: str, device_type: str, device_index: int | None) -> str:
    key = (name, f"{device_type}:{device_index}")
    if key not in _resolved:
        device = torch.device(device_type, device_index)
        concrete = resolve_backend(name, device)  # the softmax loss's choice and its errors
        ok, reason = sigmoid_backend_status(concrete, device)
        if not ok:
            if name != "auto":
                raise RuntimeError(f"backend={name!r} cannot run the sigmoid loss on {device}: {reason}")
            concrete = "torch"  # "auto" never fails for lack of a backend
            sigmoid_backend_status(concrete, device)  # registers it
        _resolved[key] = concrete
    return _resolved[key]


def resolve_sigmoid_backend(name: str, device: torch.device) -> str:
    """The concrete backend that runs the sigmoid loss for `name` on `device` ("auto": the fastest there)."""
    return _resolved_name(name, device.type, device.index)


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
    forward_needs = wants if GRADIENTS_IN_FORWARD[name] else Needs(False, False, False)
    problem = SigmoidProblem(
        rows,
        (cols,),
        scale_bias,
        col_weight.to(stat_dtype(rows.dtype)),
        col_owner,
        options or PartitionOptions(),
        forward_needs,
    )
    return ops.forward(problem, name, SIGMOID).pair_sum


def last_sigmoid_backward_stats(backend: str, device: torch.device | str = "cpu"):
    """What the most recent gradient pass of the sigmoid primitive on `backend` did (tiles, skipped tiles)."""
    return ops.last_backward_stats(resolve_sigmoid_backend(backend, torch.device(device)))
