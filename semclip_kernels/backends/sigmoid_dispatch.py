"""The sigmoid loss's primitive: dispatch, operator registration and autograd (docs/contract.md §8).

    pair_sum(rows A [M, d], cols C [K, d], scale τ, bias b, col_weight a [K], col_owner o [K])
        = Σ_i Σ_c a_c · softplus(s_ic·(τ·<A_i, C_c> + b)),   s_ic = −1 if o_c = i, else +1

differentiable in `A`, `C`, `τ` and `b`. The kernels (`sigmoid_torch`, `sigmoid_cpp`) are pure functions
that return the sum and, for the inputs asked for, its gradients in one pass; `sigmoid_reference`
materializes the logits and differentiates with autograd. This module is the only place that registers
them with torch (one custom operator, a fake implementation for `torch.compile`, autograd):

- gradients computed during the forward (`GRADIENTS_IN_FORWARD`): each pair's gradient is local, so the
  forward's one pass over the tiles can run the two gradient products as well (three products in all,
  nothing recomputed); the backward multiplies the saved gradients by the incoming scalar gradient;
- otherwise the forward computes the sum alone (one product) and the backward runs the pass again with
  gradients (three more).

The default is what docs/siglip.md measured faster per backend. Second derivatives: the fused backends raise
(`reference` has them).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import resolve_backend
from .options import PartitionOptions

_MODULES = {
    "torch": "semclip_kernels.backends.sigmoid_torch",
    "cpp": "semclip_kernels.backends.sigmoid_cpp",
    "reference": "semclip_kernels.backends.sigmoid_reference",
}
# Whether the forward computes the gradients too (see above); measured in docs/siglip.md.
GRADIENTS_IN_FORWARD = {"torch": True, "cpp": True}
_resolved: dict[tuple[str, str], str] = {}
_loaded: dict[str, ModuleType] = {}  # imported once, at resolution: a compiled graph traces no import machinery


def _load(name: str) -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    _loaded[name] = module
    return module, ""


def sigmoid_backend_status(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether the sigmoid kernels of concrete backend `name` run on `device`, and if not, why."""
    if name == "triton":
        return False, "the sigmoid loss has no Triton kernels yet (docs/siglip.md); use backend='torch' on GPUs"
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
        _resolved[key] = concrete
    return _resolved[key]


def resolve_sigmoid_backend(name: str, device: torch.device) -> str:
    """The concrete backend that runs the sigmoid loss for `name` on `device` ("auto": the fastest there)."""
    return _resolved_name(name, device.type, device.index)


def _kernel(name: str) -> ModuleType:
    """The kernel module of a resolved backend (loaded by `sigmoid_backend_status` during resolution)."""
    if name not in _loaded:
        _load(name)
    return _loaded[name]


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
    if name == "reference":
        return _kernel(name).pair_sum(rows, cols, scale, bias, col_weight, col_owner)
    block_rows, block_cols, eps = _kernel(name).resolve_options(
        options or PartitionOptions(), rows.shape[0], cols.shape[0], rows.dtype
    )
    wants = [torch.is_grad_enabled() and t.requires_grad for t in (rows, cols, scale, bias)]
    fused = GRADIENTS_IN_FORWARD[name] and any(wants)
    outputs = sigmoid_pairs(
        rows, cols, scale, bias, col_weight, col_owner, name, wants if fused else [False] * 4,
        block_rows, block_cols, eps, fused,
    )  # fmt: skip
    return outputs[0]


# ---------------------------------------------------------------------------------------------------
# Registration: one operator for every fused backend, its fake, its autograd.


@torch.library.custom_op("semclip::sigmoid_pairs", mutates_args=())
def sigmoid_pairs(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    col_weight: torch.Tensor,
    col_owner: torch.Tensor,
    backend: str,
    needs: list[bool],
    block_rows: int,
    block_cols: int,
    grad_filter_eps: float,
    gradients_in_forward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(pair_sum, grad_rows, grad_cols, grad_scale, grad_bias)`; empty tensors where `needs` says no.

    `gradients_in_forward` only tells autograd (below) whether the gradients are the ones to save.
    """
    with torch.no_grad():
        result = _kernel(backend).pair_sum(
            rows, cols, scale, bias, col_weight, col_owner, tuple(needs), block_rows, block_cols, grad_filter_eps
        )
    return _with_empties(result, rows, scale)


def _with_empties(result, rows: torch.Tensor, scale: torch.Tensor):
    # Separate empties: the outputs of a custom op must not alias each other.
    total, *grads = result
    return (total, *(rows.new_empty((0,)) if g is None else g for g in grads))


@sigmoid_pairs.register_fake
def _(rows, cols, scale, bias, col_weight, col_owner, backend, needs, block_rows, block_cols, eps, fused):
    return (
        scale.new_empty(()),
        torch.empty_like(rows) if needs[0] else rows.new_empty((0,)),
        torch.empty_like(cols) if needs[1] else rows.new_empty((0,)),
        scale.new_empty(()) if needs[2] else rows.new_empty((0,)),
        bias.new_empty(()) if needs[3] else rows.new_empty((0,)),
    )


@torch.library.custom_op("semclip::sigmoid_scale_gradients", mutates_args=())
def sigmoid_scale_gradients(
    grad_output: torch.Tensor, grads: list[torch.Tensor], inputs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Every gradient of the pair sum times the incoming gradient.

    A separate operator that takes the primitive's `inputs` (unused) so that its outputs depend on them:
    differentiating the backward again (create_graph=True) reaches `_no_double_backward` and raises,
    instead of silently treating the gradients as constants of the inputs.
    """
    return [grad * grad_output.to(grad.dtype) for grad in grads]


@sigmoid_scale_gradients.register_fake
def _(grad_output, grads, inputs):
    return [torch.empty_like(grad) for grad in grads]


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "the sigmoid loss's fused backends (torch, cpp) do not support double backward (differentiating their "
        "gradients again, create_graph=True); use backend='reference' for second derivatives"
    )


torch.library.register_autograd("semclip::sigmoid_scale_gradients", _no_double_backward)


def _setup_context(ctx, inputs, output) -> None:
    rows, cols, scale, bias, col_weight, col_owner, backend, needs, block_rows, block_cols, eps, fused = inputs
    ctx.fused = fused
    ctx.kernel_args = (backend, block_rows, block_cols, eps)
    ctx.mark_non_differentiable(*output[1:])
    # The inputs are saved in both modes: recomputation needs them, and the gradients' scaling depends on them.
    ctx.save_for_backward(rows, cols, scale, bias, col_weight, col_owner, *(output[1:] if fused else ()))


def _backward(ctx, grad_sum, *unused):
    needs = list(ctx.needs_input_grad[:4])
    if not any(needs):
        return (None,) * 12
    inputs, grads = ctx.saved_tensors[:6], list(ctx.saved_tensors[6:])
    if ctx.fused:
        if any(need and grad.numel() == 0 for grad, need in zip(grads, needs)):
            raise RuntimeError(
                "semclip::sigmoid_pairs: a gradient was not computed in the forward (inputs whose "
                "requires_grad changed between the forward and the backward)"
            )
    else:
        backend, block_rows, block_cols, eps = ctx.kernel_args
        _, *grads = sigmoid_pairs(*inputs, backend, needs, block_rows, block_cols, eps, False)
    wanted = [grad for grad, need in zip(grads, needs) if need]
    scaled = iter(sigmoid_scale_gradients(grad_sum, wanted, list(inputs[:4])))
    return (*(next(scaled) if need else None for need in needs), *(None,) * 8)


torch.library.register_autograd("semclip::sigmoid_pairs", _backward, setup_context=_setup_context)
