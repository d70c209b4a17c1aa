"""The one dispatch point: which backend runs which primitive, and the calls through the autograd layer
(docs/backends.md).

`BACKEND_TABLE` maps each backend to the module holding its kernels of each primitive (`PARTITIONS`: the
softmax loss's log-partitions, docs/contract.md §7; `SIGMOID_PAIRS`: the sigmoid loss's pair sum, §8).
One load and one resolve serve every primitive: `"auto"` takes, per primitive, the first backend in the
table that runs it on the device; an explicit backend without kernels for a primitive is an error naming
the backend and the loss. `register_backend` adds a backend from outside the package.

    forward(problem, backend) -> Stats                          differentiable in rows, cols, scale
    backward(problem, stats, grads, needs, backend) -> Grads    the backward alone (statistics from elsewhere)
    partitions(rows, cols, scale, col_bias, n_query_cols) -> (row_lse [M], query_lse [Kq])
    last_backward_stats(backend) -> BackwardStats

Backend modules are imported lazily so that a missing Triton or an unbuilt C++ extension never breaks
`import semclip_kernels`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

import torch

from . import ops
from .base import Kernels, PartitionKernels, SigmoidPairKernels
from .ops import Primitive
from .options import PartitionOptions
from .sigmoid_values import SigmoidKernels, SigmoidStatGrads
from .values import BackwardStats, Grads, Needs, Problem, StatGrads, Stats, problem

__all__ = [
    "BACKENDS", "BACKEND_TABLE", "PARTITIONS", "SIGMOID_PAIRS", "Backend", "BackwardStats", "Grads", "Kernels",
    "Needs", "PartitionKernels", "PartitionOptions", "Problem", "SigmoidPairKernels", "StatGrads", "Stats",
    "available_backends", "backend_status", "backward", "forward", "last_backward_stats", "partitions",
    "register_backend", "resolve_backend",
]  # fmt: skip


def _sigmoid_kernels(module: ModuleType):
    # A pure pair-sum function becomes the layer's kernels through the adapter; the reference is plain autograd.
    return module if getattr(module, "differentiable", False) else SigmoidKernels(module)


PARTITIONS = Primitive("partitions", "the softmax loss", StatGrads)
SIGMOID_PAIRS = Primitive("sigmoid_pairs", "the sigmoid loss", SigmoidStatGrads, _sigmoid_kernels)
PRIMITIVES = (PARTITIONS, SIGMOID_PAIRS)
EVERY_DEVICE = ("*",)


@dataclass(frozen=True)
class Backend:
    """A backend: its kernel module (an import path, or the module) per primitive name, and the device types
    on which `"auto"` may pick it (`EVERY_DEVICE`: all; empty: only when asked for by name)."""

    kernels: Mapping[str, str | ModuleType]
    auto_on: tuple[str, ...] = ()


def _built_in(partitions: str, sigmoid_pairs: str) -> dict[str, str]:
    return {"partitions": f"{__name__}.{partitions}", "sigmoid_pairs": f"{__name__}.{sigmoid_pairs}"}


# Fastest first: "auto" tries them in this order.
BACKEND_TABLE: dict[str, Backend] = {
    "triton": Backend(_built_in("triton_fused", "sigmoid_triton"), auto_on=("cuda",)),
    "cpp": Backend(_built_in("cpp", "sigmoid_cpp"), auto_on=("cpu",)),
    "torch": Backend(_built_in("torch_tiled", "sigmoid_torch"), auto_on=EVERY_DEVICE),
    "reference": Backend(_built_in("reference", "sigmoid_reference")),
}
BACKENDS = ("auto", *BACKEND_TABLE)  # the built-in names; `backend_names()` includes registered ones
_FALLBACK = "torch"  # what "auto" runs when nothing faster does: runs everywhere, every primitive
_warned_fallbacks: set[tuple[str, str]] = set()
# Loaded kernels and resolved names: availability does not change within a process.
_loaded: dict[tuple[str, str], object] = {}
_resolved: dict[tuple[str, str, str, int | None], str] = {}


def register_backend(name: str, kernels: Mapping[str, str | ModuleType], auto_on: tuple[str, ...] = ()) -> None:
    """Add backend `name`: `kernels` maps primitive names (`"partitions"`, `"sigmoid_pairs"`) to a module (or
    its import path) satisfying `base.PartitionKernels` / `base.SigmoidPairKernels`; `"auto"` picks it on the
    device types `auto_on`, after the built-in backends."""
    if not isinstance(name, str) or not name or name == "auto" or name in BACKEND_TABLE:
        raise ValueError(f"backend name must be a new non-empty string other than 'auto', got {name!r}")
    unknown = set(kernels) - {primitive.name for primitive in PRIMITIVES}
    if unknown:
        raise ValueError(f"kernels must map primitive names {[p.name for p in PRIMITIVES]}, got {sorted(unknown)}")
    BACKEND_TABLE[name] = Backend(dict(kernels), tuple(auto_on))
    _resolved.clear()  # "auto" may pick it now


def backend_names() -> tuple[str, ...]:
    """Every name `backend=` accepts: `"auto"` and the table's backends."""
    return ("auto", *BACKEND_TABLE)


def check_backend_name(name: object) -> str:
    """The only check of a backend name."""
    if not isinstance(name, str) or name not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return name


def _load(name: str, primitive: Primitive = PARTITIONS) -> tuple[object | None, str]:
    """Backend `name`'s kernels of `primitive`, registered with the autograd layer; or None and why not."""
    key = (name, primitive.name)
    if key in _loaded:
        return _loaded[key], ""
    module = BACKEND_TABLE[name].kernels.get(primitive.name)
    if module is None:
        return None, f"backend {name!r} has no kernels for {primitive.loss}"
    if isinstance(module, str):
        try:
            module = importlib.import_module(module)
        except ImportError as error:  # backend not built / dependency not installed
            return None, f"{type(error).__name__}: {error}"
    kernels = primitive.kernels_of(module)
    ops.register_primitive(primitive, name, kernels)
    _loaded[key] = kernels
    return kernels, ""


def _concrete_status(name: str, device: torch.device, primitive: Primitive = PARTITIONS) -> tuple[bool, str]:
    kernels, reason = _load(name, primitive)
    if kernels is None:
        return False, reason
    return kernels.is_available(device)


def _auto_choice(device: torch.device, primitive: Primitive) -> tuple[str, list[tuple[str, str]]]:
    """What `"auto"` picks on `device` for `primitive`, and the faster candidates it passed over with why."""
    passed_over = []
    for candidate, backend in BACKEND_TABLE.items():
        if primitive.name not in backend.kernels:  # nothing to pass over: it never had this primitive
            continue
        if device.type not in backend.auto_on and backend.auto_on != EVERY_DEVICE:
            continue
        ok, reason = _concrete_status(candidate, device, primitive)
        if ok:
            return candidate, passed_over
        passed_over.append((candidate, reason))
    _concrete_status(_FALLBACK, device, primitive)  # registers it
    return _FALLBACK, passed_over


def backend_status(
    name: str, device: torch.device | str = "cpu", primitive: Primitive = PARTITIONS
) -> tuple[bool, str]:
    """Whether backend `name` can run `primitive` (default: the softmax loss's) on `device`, and if not, why.

    For `"auto"`: always runnable; the reason says which backend it picks there and why.
    """
    check_backend_name(name)
    device = torch.device(device)
    if name != "auto":
        return _concrete_status(name, device, primitive)
    choice, passed_over = _auto_choice(device, primitive)
    why = "; ".join(f"{candidate!r} unavailable: {reason}" for candidate, reason in passed_over)
    return True, f"auto picks {choice!r} on {device.type}" + (f" ({why})" if why else " (the fastest there)")


def available_backends(device: torch.device | str = "cpu", primitive: Primitive = PARTITIONS) -> list[str]:
    """Concrete backends that run `primitive` on `device` here, fastest first."""
    return [name for name in BACKEND_TABLE if _concrete_status(name, torch.device(device), primitive)[0]]


def _resolve(name: str, device: torch.device, primitive: Primitive) -> str:
    if name != "auto":
        ok, reason = _concrete_status(name, device, primitive)
        if not ok:
            where = "" if primitive is PARTITIONS else f" {primitive.loss}"
            raise RuntimeError(f"backend={name!r} cannot run{where} on {device}: {reason}")
        return name
    choice, passed_over = _auto_choice(device, primitive)
    for candidate, reason in passed_over:
        if (candidate, primitive.name) not in _warned_fallbacks:
            _warned_fallbacks.add((candidate, primitive.name))
            warnings.warn(
                f"semclip_kernels: backend {candidate!r} is unavailable on {device.type} ({reason}); "
                f"falling back to {choice!r}.",
                stacklevel=5,
            )
    return choice


@torch.compiler.assume_constant_result
def _resolved_name(name: str, device_type: str, device_index: int | None, primitive_name: str) -> str:
    key = (name, device_type, device_index, primitive_name)
    if key not in _resolved:
        primitive = next(p for p in PRIMITIVES if p.name == primitive_name)
        _resolved[key] = _resolve(name, torch.device(device_type, device_index), primitive)
    return _resolved[key]


def resolve_backend(name: str, device: torch.device, primitive: Primitive = PARTITIONS) -> str:
    """Turn `"auto"` into the concrete backend that runs `primitive` on `device`; check that an explicit
    request can run it.

    Resolved once per (name, device, primitive) and process; under `torch.compile` the answer is a constant
    of the graph (no import machinery to trace).
    """
    check_backend_name(name)
    return _resolved_name(name, device.type, device.index, primitive.name)


def backend_module(name: str, device: torch.device, primitive: Primitive = PARTITIONS) -> Kernels:
    """The kernels of the backend that `name` resolves to on `device`."""
    return _loaded[(resolve_backend(name, device, primitive), primitive.name)]


def forward(problem: Problem, backend: str = "auto") -> Stats:
    """The statistics of `problem` (docs/backends.md), differentiable in its rows, column blocks and scale."""
    return ops.forward(problem, resolve_backend(backend, problem.rows.device), PARTITIONS)


def backward(problem: Problem, stats: Stats, grads: StatGrads, needs: Needs, backend: str = "auto") -> Grads:
    """The backward alone, against statistics computed elsewhere (`Stats.rebased`); gradients in the
    statistics dtype."""
    return ops.backward(problem, stats, grads, needs, resolve_backend(backend, problem.rows.device), PARTITIONS)


def partitions(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    *,
    backend: str = "auto",
    options: PartitionOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(row_lse [M], query_lse [Kq])` of `scale·rows·colsᵀ` in the statistics dtype (docs/contract.md §7),
    differentiable in rows, cols and scale."""
    stats = forward(problem(rows, cols, scale, col_bias, n_query_cols, options), backend)
    dtype = scale.dtype if scale.is_floating_point() else torch.float32
    return stats.row_lse.to(dtype), stats.query_lse.to(dtype)


def summed_backward_stats(backend: str, device: torch.device, primitive: Primitive = PARTITIONS):
    """A context in which the backward calls of `backend` add up to one `last_backward_stats` (a distributed
    backward makes many)."""
    return ops.summed_backward_stats(resolve_backend(backend, device, primitive))


def last_backward_stats(
    backend: str, device: torch.device | str = "cpu", primitive: Primitive = PARTITIONS
) -> BackwardStats:
    """What the most recent backward of `backend` (as resolved on `device`) did: the sum over its calls in a
    distributed backward. A differentiable backend (plain autograd) reports one tile, never filtered."""
    name = resolve_backend(backend, torch.device(device), primitive)
    if _loaded[(name, primitive.name)].differentiable:
        return BackwardStats(tiles=1)
    return ops.last_backward_stats(name)
