"""The one autograd layer over every backend and every primitive (docs/backends.md).

For each backend whose kernels are not plain differentiable torch ops, `register_primitive` registers

    semclip::<primitive>_<backend>_forward(Tensor[] problem, SymInt[] ints, float[] floats) -> Tensor[]
    semclip::<primitive>_<backend>_backward(Tensor[] problem, SymInt[] ints, float[] floats,
                                            Tensor[] stats, Tensor[] stat_grads, SymInt[] grad_ints,
                                            bool[] needs) -> Tensor[]

their fake implementations (torch.compile), autograd on the forward (its backward calls the backward op
and casts each gradient to its input's dtype), and the same double-backward refusal for every backend.
The values travel in their flat form (`flat.py`); the options are resolved (`options.resolved`) just
before a kernel sees the problem. The backward statistics of every backward call (through autograd or
`backward` directly) are recorded here, in eager mode, for `last_backward_stats`.

Nothing here knows a primitive beyond its `Primitive` record and its values' class attributes
(`GRADIENT_FIELDS` of the problem, `STAT_GRAD_FIELDS` of the statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from .flat import flatten, leaves, rebuild, tensor_fields, unflatten, unflatten_many
from .options import resolved
from .values import BackwardStats, Grads, Needs

_LIBRARY = torch.library.Library("semclip", "FRAGMENT")  # noqa: TOR901 (the one owner of semclip:: ops)


@dataclass(frozen=True)
class Primitive:
    """One primitive of the layer: what its operators are called and how a backend module becomes its kernels.

    name: the operators' prefix (`semclip::<name>_<backend>_forward`).
    loss: the loss that needs it, for error messages ("the sigmoid loss").
    stat_grads: the class of the gradient arriving at its statistics.
    kernels_of: a backend module -> the kernels `register_primitive` registers (the module itself, or an
        adapter around a pure function).
    """

    name: str
    loss: str
    stat_grads: type
    kernels_of: Callable[[ModuleType], Any] = lambda module: module


@dataclass(frozen=True)
class _Registered:
    kernels: Any
    forward: Any  # the forward op (OpOverloadPacket), None for a differentiable backend
    backward: Any


_registered: dict[tuple[str, str], _Registered] = {}
_last_backward: dict[str, torch.Tensor] = {}  # backend name -> its last backward's counts (Grads.counts)
_collecting: dict[str, list[torch.Tensor]] = {}


def _no_double_backward(name: str) -> Callable[..., Any]:
    def refuse(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(
            f"backend='{name}' does not support double backward (differentiating its gradients again, "
            "create_graph=True): it computes first derivatives only; use backend='reference' for second derivatives"
        )

    return refuse


def register_primitive(primitive: Primitive, name: str, kernels: Any) -> None:
    """Register backend `name`'s kernels of `primitive` (once; later calls are no-ops)."""
    key = (primitive.name, name)
    if key in _registered:
        return
    if kernels.differentiable:
        _registered[key] = _Registered(kernels, None, None)
        return
    op = f"{primitive.name}_{name}"
    _LIBRARY.define(f"{op}_forward(Tensor[] problem, SymInt[] ints, float[] floats) -> Tensor[]")
    _LIBRARY.define(
        f"{op}_backward(Tensor[] problem, SymInt[] ints, float[] floats, Tensor[] stats, Tensor[] stat_grads, "
        "SymInt[] grad_ints, bool[] needs) -> Tensor[]"
    )

    def forward_impl(tensors, ints, floats):
        with torch.no_grad():
            stats = kernels.forward(resolved(unflatten(tensors, ints, floats), kernels))
        return _distinct(leaves(stats))

    def forward_fake(tensors, ints, floats):
        return leaves(kernels.stats_like(resolved(unflatten(tensors, ints, floats), kernels, with_eps=False)))

    def backward_impl(tensors, ints, floats, stats, stat_grads, grad_ints, needs):
        problem = unflatten(tensors, ints, floats)
        stats, stat_grads = unflatten_many([stats, stat_grads], grad_ints)
        needs = Needs(*needs)
        with torch.no_grad():
            grads = kernels.backward(resolved(problem, kernels), stats, stat_grads, needs)
        return _distinct(leaves(Grads.like(problem, needs), grads, like=problem.rows))

    def backward_fake(tensors, ints, floats, stats, stat_grads, grad_ints, needs):
        problem = unflatten(tensors, ints, floats)
        return leaves(Grads.like(problem, Needs(*needs)), like=problem.rows)

    for suffix, impl, fake in (("forward", forward_impl, forward_fake), ("backward", backward_impl, backward_fake)):
        _LIBRARY.impl(f"{op}_{suffix}", impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"semclip::{op}_{suffix}", fake, lib=_LIBRARY)

    forward_op = getattr(torch.ops.semclip, f"{op}_forward")
    backward_op = getattr(torch.ops.semclip, f"{op}_backward")

    def setup_context(ctx, inputs, output):
        tensors, ints, floats = inputs
        ctx.save_for_backward(*tensors, *output)
        ctx.n_tensors, ctx.ints, ctx.floats = len(tensors), list(ints), list(floats)

    def forward_backward(ctx, output_grads):
        saved = ctx.saved_tensors
        tensors, outputs = list(saved[: ctx.n_tensors]), list(saved[ctx.n_tensors :])
        problem = unflatten(tensors, ctx.ints, ctx.floats)
        stats = rebuild(kernels.stats_like(resolved(problem, kernels, with_eps=False)), outputs)
        flags = ctx.needs_input_grad[0]  # the Tensor[] input's flags, one per tensor
        flags = list(flags) if isinstance(flags, (list, tuple)) else list(ctx.needs_input_grad[: ctx.n_tensors])
        needs = _needs_of(problem, [bool(flag) for flag in flags])
        grads = _call_backward(primitive, backward_op, problem, stats, _stat_grads_of(primitive, stats, output_grads),
                               needs)  # fmt: skip
        _record(name, grads)
        # torch reads an empty list input as a list of tensors: its gradient is an empty list, not None.
        return _tensor_grads(problem, grads), None, (None if ctx.floats else [])

    torch.library.register_autograd(f"semclip::{op}_backward", _no_double_backward(name), lib=_LIBRARY)
    torch.library.register_autograd(
        f"semclip::{op}_forward", forward_backward, setup_context=setup_context, lib=_LIBRARY
    )
    _registered[key] = _Registered(kernels, forward_op, backward_op)


def _call_backward(primitive: Primitive, backward_op: Any, problem: Any, stats: Any, stat_grads: Any,
                   needs: Needs) -> Grads:  # fmt: skip
    tensors, ints, floats = flatten(problem)
    stat_tensors, stat_ints, _ = flatten(stats)
    grad_tensors, grad_ints, _ = flatten(stat_grads)
    flat = backward_op(tensors, ints, floats, stat_tensors, grad_tensors, stat_ints + grad_ints,
                       [needs.rows, needs.cols, needs.scale])  # fmt: skip
    return rebuild(Grads.like(problem, needs), list(flat))


def _stat_grads_of(primitive: Primitive, stats: Any, output_grads: Any) -> Any:
    """The gradient arriving at the forward's outputs, as the primitive's `StatGrads` (gradients arriving at
    statistics that are not differentiable, e.g. `col_mass_lb`, are ignored)."""
    arriving = rebuild(stats, list(output_grads))
    return primitive.stat_grads(
        **{grad: getattr(arriving, stat) for stat, grad in type(stats).STAT_GRAD_FIELDS.items()}
    )


def _needs_of(problem: Any, flags: list[bool]) -> Needs:
    """`Needs` from autograd's flags, one per tensor of the flattened problem."""
    wanted = dict.fromkeys(type(problem).GRADIENT_FIELDS.values(), False)
    for (field, _), flag in zip(tensor_fields(problem), flags):
        if field in type(problem).GRADIENT_FIELDS:
            wanted[type(problem).GRADIENT_FIELDS[field]] |= flag
    return Needs(**wanted)


def _tensor_grads(problem: Any, grads: Grads) -> list[torch.Tensor | None]:
    """The gradient of every tensor of the flattened problem, in its dtype and shape (None where none)."""
    out = []
    tensors = flatten(problem)[0]
    for tensor, (field, index) in zip(tensors, tensor_fields(problem)):
        grad = getattr(grads, type(problem).GRADIENT_FIELDS[field]) if field in type(problem).GRADIENT_FIELDS else None
        if isinstance(grad, tuple):
            grad = grad[index]
        out.append(None if grad is None else grad.reshape(tensor.shape).to(tensor.dtype))
    return out


def _distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs of a custom op must not alias its inputs or each other: copy any that do (never large)."""
    seen: set[int] = set()
    out = []
    for tensor in tensors:
        if tensor._is_view() or id(tensor) in seen:
            tensor = tensor.clone()
        seen.add(id(tensor))
        out.append(tensor)
    return out


def forward(problem: Any, name: str, primitive: Primitive) -> Any:
    """The statistics of `problem` by backend `name`, differentiable in the problem's tensors."""
    entry = _registered[(primitive.name, name)]
    if entry.forward is None:
        return entry.kernels.forward(resolved(problem, entry.kernels))
    tensors, ints, floats = flatten(problem)
    template = entry.kernels.stats_like(resolved(problem, entry.kernels, with_eps=False))
    return rebuild(template, list(entry.forward(tensors, ints, floats)))


def backward(problem: Any, stats: Any, stat_grads: Any, needs: Needs, name: str, primitive: Primitive) -> Any:
    """The backward alone: gradients (statistics dtype) of the problem's tensors given statistics computed
    elsewhere (`Stats.rebased`) and the gradient arriving at them."""
    entry = _registered[(primitive.name, name)]
    if entry.backward is None:
        grads = entry.kernels.backward(resolved(problem, entry.kernels), stats, stat_grads, needs)
    else:
        grads = _call_backward(primitive, entry.backward, problem, stats, stat_grads, needs)
    _record(name, grads)
    return grads


def _record(name: str, grads: Any) -> None:
    if torch.compiler.is_compiling():  # a compiled graph must not mutate module state
        return
    stats = grads.counts
    if name in _collecting:
        _collecting[name].append(stats)
    else:
        _last_backward[name] = stats


@contextlib.contextmanager
def summed_backward_stats(name: str) -> Iterator[None]:
    """Within the block, backward calls of backend `name` add up; at its end their sum is the last backward's
    statistics (a distributed backward is many calls)."""
    if name in _collecting:  # nested: the outer block sums
        yield
        return
    _collecting[name] = []
    try:
        yield
    finally:
        parts = _collecting.pop(name)
        if parts:
            _last_backward[name] = torch.stack([part.to(parts[0].device) for part in parts]).sum(0)


def last_backward_stats(name: str) -> BackwardStats:
    """What the most recent backward of backend `name` did (reading a device counter synchronizes)."""
    counts = _last_backward.get(name)
    return BackwardStats() if counts is None else BackwardStats.of(counts)
