"""Atomic checkpoints: write to a temporary file in the same folder, then `os.replace`.

A reader (or a `--resume` after a crash) therefore sees either the previous
complete checkpoint or the new complete one, never a torn file.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch


def temporary_prefix(path: str) -> str:
    """Name prefix of the temporary files an atomic write of `path` creates (in `path`'s folder)."""
    return ".tmp_" + os.path.basename(path)


def _atomic_write(path: str, mode: str, write: Callable[[IO], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=temporary_prefix(path), dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """`torch.save(obj, path)` that never leaves a partial file at `path`."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    """Write a text file atomically (metrics.json, a rewritten metrics.jsonl)."""
    _atomic_write(path, "w", lambda f: f.write(text))


def remove_orphaned_temporaries(path: str) -> list[str]:
    """Delete the temporary files that atomic writes of `path` left behind when killed mid-write.

    A write that completes renames its temporary file and one that fails removes it, so any left at
    the start of a run come from a process killed while writing (SIGKILL, pre-emption, power loss).
    Call it only while no other process writes `path`. Returns the removed paths.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = temporary_prefix(path)
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith(prefix):
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
    return removed


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def load_checkpoint(path: str) -> dict[str, Any]:
    # Our own checkpoints hold numpy RNG state and plain config dicts: not weights-only.
    return torch.load(path, map_location="cpu", weights_only=False)
