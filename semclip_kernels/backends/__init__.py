"""The one dispatch point: pick a backend, call its `partitions` primitive.

Every backend is a module with

    is_available(device) -> (bool, reason)
    partitions(rows [M, d], cols [K, d], scale (0-dim), col_bias [K], n_query_cols,
               options) -> (row_lse [M], col_lse [n_query_cols])

differentiable with respect to `rows`, `cols` and `scale` (SPEC section 7).
Backends are imported lazily so that a missing Triton or an unbuilt C++
extension never breaks `import semclip_kernels`.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

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


def _load(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(_MODULES[name]), ""
    except ImportError as error:  # backend not built / dependency not installed
        return None, f"{type(error).__name__}: {error}"


def backend_status(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether backend `name` can run on `device`, and if not, why."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    module, reason = _load(name)
    if module is None:
        return False, reason
    return module.is_available(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that run on `device` here, fastest first."""
    return [name for name in _MODULES if backend_status(name, device)[0]]


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn `"auto"` into a concrete backend; check an explicit request can run."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        ok, reason = backend_status(name, device)
        if not ok:
            raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
        return name
    order = _AUTO_ORDER.get(device.type, ("torch",))
    for candidate in order:
        ok, reason = backend_status(candidate, device)
        if ok:
            return candidate
        if candidate not in _warned_fallbacks:
            _warned_fallbacks.add(candidate)
            warnings.warn(
                f"semclip_kernels: backend {candidate!r} is unavailable on {device.type} "
                f"({reason}); falling back to the next backend.",
                stacklevel=3,
            )
    return "torch"


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
    """Row and query-column log-partitions of `scale·rows·colsᵀ` (SPEC section 7)."""
    name = resolve_backend(backend, rows.device)
    module, _ = _load(name)
    return module.partitions(rows, cols, scale, col_bias, n_query_cols, options or PartitionOptions())
