"""semclip_kernels: fused, memory-lean SemCLIP (CLIP + paraphrases + negations) losses."""

from .backends import BACKENDS, available_backends, backend_status
from .backends.options import PartitionOptions
from .loss import SemCLIPLoss, semclip_loss

__all__ = [
    "BACKENDS",
    "PartitionOptions",
    "SemCLIPLoss",
    "available_backends",
    "backend_status",
    "semclip_loss",
]
__version__ = "0.1.0"
