"""The one autograd layer over every backend (docs/backends.md).

For each backend whose kernels are not plain differentiable torch ops, `register_primitive` registers,
from the primitive's codec (how its values travel as flat tensor/int/float lists):

    semclip::<primitive>_<backend>_forward(Tensor[] problem, SymInt[] ints, float[] floats) -> Tensor[]
    semclip::<primitive>_<backend>_backward(Tensor[] problem, SymInt[] ints, float[] floats,
                                            Tensor[] stats, Tensor[] stat_grads, SymInt[] grad_ints,
                                            bool[] needs) -> Tensor[]

their fake implementations (torch.compile), autograd on the forward (its backward calls the backward op
and casts each gradient to its input's dtype), and the same double-backward refusal for every backend.
The backward statistics of every backward call (through autograd or `backward` directly) are recorded
here, in eager mode, for `last_backward_stats`.

Nothing here knows the partitions primitive beyond its codec (`PARTITIONS`, from
`values.PARTITIONS_FLAT_FORM`): a second primitive registers its own codec and kernels the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .values import PARTITIONS_FLAT_FORM, BackwardStats, Needs

_LIBRARY = torch.library.Library("semclip", "FRAGMENT")  # noqa: TOR901 (the one owner of semclip:: ops)


@dataclass(frozen=True)
class Codec:
    """How one primitive's values travel through custom ops (flat lists of tensors, ints and floats).

    encode_problem(problem) -> (tensors, ints, floats); decode_problem(tensors, ints, floats) -> problem
    encode_stats(stats) -> tensors; decode_stats(tensors) -> stats
    encode_stat_grads(stat_grads) -> (tensors, ints); decode_stat_grads(tensors, ints) -> stat_grads
    stat_grads_of_outputs(output_grads) -> stat_grads   (the gradient arriving at the forward's outputs)
    encode_grads(grads, problem, needs) -> tensors; decode_grads(tensors, problem, needs) -> grads
    grads_like(problem, needs) -> tensors                (fake backward outputs)
    tensor_grads(grads, problem) -> gradient of every problem tensor, in its dtype (None where none)
    needs_of(flags, problem) -> Needs                    (from autograd's needs_input_grad of the tensors)
    stats_of_grads(grads) -> BackwardStats               (what the backward did)
    """

    name: str
    encode_problem: Callable[[Any], tuple[list[torch.Tensor], list[int], list[float]]]
    decode_problem: Callable[[list[torch.Tensor], list[int], list[float]], Any]
    encode_stats: Callable[[Any], list[torch.Tensor]]
    decode_stats: Callable[[list[torch.Tensor]], Any]
    encode_stat_grads: Callable[[Any], tuple[list[torch.Tensor], list[int]]]
    decode_stat_grads: Callable[[list[torch.Tensor], list[int]], Any]
    stat_grads_of_outputs: Callable[[list[torch.Tensor | None]], Any]
    encode_grads: Callable[[Any, Any, Needs], list[torch.Tensor]]
    decode_grads: Callable[[list[torch.Tensor], Any, Needs], Any]
    grads_like: Callable[[Any, Needs], list[torch.Tensor]]
    tensor_grads: Callable[[Any, Any], list[torch.Tensor | None]]
    needs_of: Callable[[list[bool], Any], Needs]


@dataclass(frozen=True)
class _Registered:
    kernels: Any
    codec: Codec
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


def register_primitive(codec: Codec, name: str, kernels: Any) -> None:
    """Register backend `name`'s kernels of the primitive `codec.name` (once; later calls are no-ops)."""
    key = (codec.name, name)
    if key in _registered:
        return
    if kernels.differentiable:
        _registered[key] = _Registered(kernels, codec, None, None)
        return
    op = f"{codec.name}_{name}"
    _LIBRARY.define(f"{op}_forward(Tensor[] problem, SymInt[] ints, float[] floats) -> Tensor[]")
    _LIBRARY.define(
        f"{op}_backward(Tensor[] problem, SymInt[] ints, float[] floats, Tensor[] stats, Tensor[] stat_grads, "
        "SymInt[] grad_ints, bool[] needs) -> Tensor[]"
    )

    def forward_impl(tensors, ints, floats):
        with torch.no_grad():
            stats = kernels.forward(codec.decode_problem(list(tensors), list(ints), list(floats)))
        return _distinct(codec.encode_stats(stats))

    def forward_fake(tensors, ints, floats):
        return codec.encode_stats(kernels.stats_like(codec.decode_problem(list(tensors), list(ints), list(floats))))

    def backward_impl(tensors, ints, floats, stats, stat_grads, grad_ints, needs):
        problem = codec.decode_problem(list(tensors), list(ints), list(floats))
        needs = Needs(*needs)
        with torch.no_grad():
            grads = kernels.backward(
                problem, codec.decode_stats(list(stats)), codec.decode_stat_grads(list(stat_grads), list(grad_ints)),
                needs,
            )  # fmt: skip
        return _distinct(codec.encode_grads(grads, problem, needs))

    def backward_fake(tensors, ints, floats, stats, stat_grads, grad_ints, needs):
        return codec.grads_like(codec.decode_problem(list(tensors), list(ints), list(floats)), Needs(*needs))

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
        tensors, stats = list(saved[: ctx.n_tensors]), list(saved[ctx.n_tensors :])
        problem = codec.decode_problem(tensors, ctx.ints, ctx.floats)
        flags = ctx.needs_input_grad[0]  # the Tensor[] input's flags, one per tensor
        flags = list(flags) if isinstance(flags, (list, tuple)) else list(ctx.needs_input_grad[: ctx.n_tensors])
        needs = codec.needs_of([bool(flag) for flag in flags], problem)
        stat_grads = codec.stat_grads_of_outputs(list(output_grads))
        grad_tensors, grad_ints = codec.encode_stat_grads(stat_grads)
        flat = backward_op(tensors, ctx.ints, ctx.floats, stats, grad_tensors, grad_ints, _needs_list(needs))
        grads = codec.decode_grads(list(flat), problem, needs)
        _record(name, grads)
        return codec.tensor_grads(grads, problem), None, None

    torch.library.register_autograd(f"semclip::{op}_backward", _no_double_backward(name), lib=_LIBRARY)
    torch.library.register_autograd(
        f"semclip::{op}_forward", forward_backward, setup_context=setup_context, lib=_LIBRARY
    )
    _registered[key] = _Registered(kernels, codec, forward_op, backward_op)


def _needs_list(needs: Needs) -> list[bool]:
    return [needs.rows, needs.cols, needs.scale]


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


# The partitions primitive's codec (docs/contract.md §7): the default of every entry point.
PARTITIONS = Codec("partitions", *PARTITIONS_FLAT_FORM)


def _entry(name: str, codec: Codec = PARTITIONS) -> _Registered:
    return _registered[(codec.name, name)]


def forward(problem: Any, name: str, codec: Codec = PARTITIONS) -> Any:
    """The statistics of `problem` by backend `name`, differentiable in the problem's tensors."""
    entry = _entry(name, codec)
    if entry.forward is None:
        return entry.kernels.forward(problem)
    tensors, ints, floats = codec.encode_problem(problem)
    return codec.decode_stats(list(entry.forward(tensors, ints, floats)))


def backward(problem: Any, stats: Any, stat_grads: Any, needs: Needs, name: str, codec: Codec = PARTITIONS) -> Any:
    """The backward alone: gradients (statistics dtype) of the problem's tensors given statistics computed
    elsewhere (`Stats.rebased`) and the gradient arriving at them."""
    entry = _entry(name, codec)
    if entry.backward is None:
        grads = entry.kernels.backward(problem, stats, stat_grads, needs)
    else:
        tensors, ints, floats = codec.encode_problem(problem)
        grad_tensors, grad_ints = codec.encode_stat_grads(stat_grads)
        flat = entry.backward(
            tensors, ints, floats, codec.encode_stats(stats), grad_tensors, grad_ints, _needs_list(needs)
        )
        grads = codec.decode_grads(list(flat), problem, needs)
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
