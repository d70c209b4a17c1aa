"""The one statistics-dtype rule, shared by the API layer and every backend."""

from __future__ import annotations

import torch


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every softmax statistic for features of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
