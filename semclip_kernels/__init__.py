"""semclip_kernels: fused, memory-lean SemCLIP (CLIP + paraphrases + negations) losses.

The public names below are imported on first use (PEP 562), so that the torch-free part of the package,
`semclip_kernels.triplets` (the triplet data format), loads without torch: `python -m training.triplets`
starts in a fraction of a second. `from semclip_kernels import SemCLIPLoss` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "BACKENDS": ".backends",
    "available_backends": ".backends",
    "backend_status": ".backends",
    "PartitionOptions": ".backends.options",
    "SemCLIPLoss": ".loss",
    "semclip_loss": ".loss",
}

__all__ = [
    "BACKENDS",
    "PartitionOptions",
    "SemCLIPLoss",
    "available_backends",
    "backend_status",
    "semclip_loss",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .backends import BACKENDS, available_backends, backend_status
    from .backends.options import PartitionOptions
    from .loss import SemCLIPLoss, semclip_loss


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'semclip_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups bypass this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
