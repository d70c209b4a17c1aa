"""semclip_kernels: fused, memory-lean SemCLIP (CLIP + paraphrases + negations) losses."""

from .backends import BACKENDS, available_backends, backend_status
from .backends.options import PartitionOptions
from .loss import SemCLIPLoss, semclip_loss
from .sigmoid_loss import SemSigLipLoss, semsiglip_loss

__all__ = [
    "BACKENDS",
    "PartitionOptions",
    "SemCLIPLoss",
    "SemSigLipLoss",
    "available_backends",
    "backend_status",
    "semclip_loss",
    "semsiglip_loss",
]
__version__ = "0.1.0"
