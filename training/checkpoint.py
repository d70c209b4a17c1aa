"""Checkpoints: written atomically (training/atomic_files.py), with the RNG states an exact `--resume` needs."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .atomic_files import atomic_write


def atomic_save(obj: Any, path: str) -> None:
    """`torch.save(obj, path)` that never leaves a partial file at `path`."""
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def load_checkpoint(path: str) -> dict[str, Any]:
    # Our own checkpoints hold numpy RNG state and plain config dicts: not weights-only.
    return torch.load(path, map_location="cpu", weights_only=False)
