"""The one dispatch point: pick a backend, call the primitive through the autograd layer (docs/backends.md).

Every backend is a module of pure kernels that satisfies `base.Kernels` (`is_available`, `forward`,
`backward`, `stats_like`); `ops` registers each one's custom ops and autograd when it is first loaded.

    forward(problem, backend) -> Stats                          differentiable in rows, cols, scale
    backward(problem, stats, grads, needs, backend) -> Grads    the backward alone (statistics from elsewhere)
    partitions(rows, cols, scale, col_bias, n_query_cols) -> (row_lse [M], query_lse [Kq])
    last_backward_stats(backend) -> BackwardStats

Backends are imported lazily so that a missing Triton or an unbuilt C++ extension never breaks
`import semclip_kernels`.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from . import ops
from .base import Kernels
from .options import PartitionOptions
from .values import BackwardStats, Grads, Needs, Problem, StatGrads, Stats, problem

BACKENDS = ("auto", "triton", "cpp", "torch", "reference")

_MODULES = {
    "triton": "semclip_kernels.backends.triton_fused",
    "cpp": "semclip_kernels.backends.cpp",
    "torch": "semclip_kernels.backends.torch_tiled",
    "reference": "semclip_kernels.backends.reference",
}
# What "auto" tries, fastest first, per device type.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
_warned_fallbacks: set[str] = set()
# Loaded backend modules and resolved names: availability does not change within a process.
_loaded: dict[str, ModuleType] = {}
_resolved: dict[tuple[str, str, int | None], str] = {}


def check_backend_name(name: object) -> str:
    """The only check of a backend name: one of `BACKENDS`."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def _load(name: str) -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as error:  # backend not built / dependency not installed
        return None, f"{type(error).__name__}: {error}"
    if name not in _loaded:
        ops.register_primitive(ops.PARTITIONS, name, module)
        _loaded[name] = module
    return module, ""


def _concrete_status(name: str, device: torch.device) -> tuple[bool, str]:
    module, reason = _load(name)
    if module is None:
        return False, reason
    return module.is_available(device)


def _auto_choice(device: torch.device) -> tuple[str, list[tuple[str, str]]]:
    """What `"auto"` picks on `device`, and the faster candidates it passed over with their reasons."""
    passed_over = []
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        ok, reason = _concrete_status(candidate, device)
        if ok:
            return candidate, passed_over
        passed_over.append((candidate, reason))
    return "torch", passed_over


def backend_status(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether backend `name` can run on `device`, and if not, why.

    For `"auto"`: always runnable; the reason says which backend it picks there and why.
    """
    check_backend_name(name)
    device = torch.device(device)
    if name != "auto":
        return _concrete_status(name, device)
    choice, passed_over = _auto_choice(device)
    why = "; ".join(f"{candidate!r} unavailable: {reason}" for candidate, reason in passed_over)
    return True, f"auto picks {choice!r} on {device.type}" + (f" ({why})" if why else " (the fastest there)")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that run on `device` here, fastest first."""
    return [name for name in _MODULES if _concrete_status(name, torch.device(device))[0]]


def _resolve(name: str, device: torch.device) -> str:
    if name != "auto":
        ok, reason = _concrete_status(name, device)
        if not ok:
            raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
        return name
    choice, passed_over = _auto_choice(device)
    for candidate, reason in passed_over:
        if candidate not in _warned_fallbacks:
            _warned_fallbacks.add(candidate)
            warnings.warn(
                f"semclip_kernels: backend {candidate!r} is unavailable on {device.type} ({reason}); "
                f"falling back to {choice!r}.",
                stacklevel=5,
            )
    return choice


@torch.compiler.assume_constant_result
def _resolved_name(name: str, device_type: str, device_index: int | None) -> str:
    key = (name, device_type, device_index)
    if key not in _resolved:
        _resolved[key] = _resolve(name, torch.device(device_type, device_index))
    return _resolved[key]


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn `"auto"` into a concrete backend; check that an explicit request can run.

    Resolved once per (name, device) and process; under `torch.compile` the answer is a constant
    of the graph (no import machinery to trace).
    """
    check_backend_name(name)
    return _resolved_name(name, device.type, device.index)


def backend_module(name: str, device: torch.device) -> Kernels:
    """The kernels of the backend that `name` resolves to on `device`."""
    return _loaded[resolve_backend(name, device)]


def forward(problem: Problem, backend: str = "auto") -> Stats:
    """The statistics of `problem` (docs/backends.md), differentiable in its rows, column blocks and scale."""
    return ops.forward(problem, resolve_backend(backend, problem.rows.device))


def backward(problem: Problem, stats: Stats, grads: StatGrads, needs: Needs, backend: str = "auto") -> Grads:
    """The backward alone, against statistics computed elsewhere (`Stats.rebased`); gradients in the
    statistics dtype."""
    return ops.backward(problem, stats, grads, needs, resolve_backend(backend, problem.rows.device))


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


def summed_backward_stats(backend: str, device: torch.device):
    """A context in which the backward calls of `backend` add up to one `last_backward_stats` (a distributed
    backward makes many)."""
    return ops.summed_backward_stats(resolve_backend(backend, device))


def last_backward_stats(backend: str, device: torch.device | str = "cpu") -> BackwardStats:
    """What the most recent backward of `backend` (as resolved on `device`) did: the sum over its calls in a
    distributed backward. The reference backend (plain autograd) reports one tile, never filtered."""
    name = resolve_backend(backend, torch.device(device))
    if _loaded[name].differentiable:
        return BackwardStats(tiles=1)
    return ops.last_backward_stats(name)
