"""The one dispatch point: pick a backend, call its primitive (docs/contract.md §7).

Every backend is a module that satisfies `base.Backend`:

    is_available(device) -> (bool, reason)
    partitions(rows [M, d], cols [K, d], scale (0-dim), col_bias [K], n_query_cols,
               options) -> (row_lse [M], col_lse [n_query_cols])
    partitions_backward(...)     the backward alone, given statistics computed elsewhere
    last_backward_stats() -> BackwardStats

`partitions` is differentiable with respect to `rows`, `cols` and `scale`. Backends are
imported lazily so that a missing Triton or an unbuilt C++ extension never breaks
`import semclip_kernels`.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from types import ModuleType

import torch

from .base import Backend, BackwardStats
from .options import PartitionOptions

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


def backend_module(name: str, device: torch.device) -> Backend:
    """The module of the backend that `name` resolves to on `device`."""
    return _loaded[resolve_backend(name, device)]


def _fit_to_problem(options: PartitionOptions, n_rows: int, n_cols: int) -> PartitionOptions:
    """Tiles never larger than the problem: `block_rows = 10**9` must not allocate a 10**9-row tile."""
    block_rows = None if options.block_rows is None else min(options.block_rows, max(n_rows, 1))
    block_cols = None if options.block_cols is None else min(options.block_cols, max(n_cols, 1))
    if (block_rows, block_cols) == (options.block_rows, options.block_cols):
        return options
    return dataclasses.replace(options, block_rows=block_rows, block_cols=block_cols)


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
    """Row and query-column log-partitions of `scale·rows·colsᵀ` (docs/contract.md §7)."""
    module = backend_module(backend, rows.device)
    options = _fit_to_problem(options or PartitionOptions(), rows.shape[0], cols.shape[0])
    return module.partitions(rows, cols, scale, col_bias, n_query_cols, options)


def partitions_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    col_bias: torch.Tensor,
    n_query_cols: int,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    grad_row_lse: torch.Tensor | None,
    grad_col_lse: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    *,
    backend: str = "auto",
    options: PartitionOptions | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The primitive's backward alone, against statistics computed elsewhere (see `base.Backend`)."""
    module = backend_module(backend, rows.device)
    options = _fit_to_problem(options or PartitionOptions(), rows.shape[0], cols.shape[0])
    return module.partitions_backward(
        rows, cols, scale, col_bias, n_query_cols, row_lse, col_lse, grad_row_lse, grad_col_lse, needs, options
    )


def last_backward_stats(backend: str, device: torch.device | str = "cpu") -> BackwardStats:
    """What the most recent backward of `backend` (as resolved on `device`) did."""
    return backend_module(backend, torch.device(device)).last_backward_stats()
