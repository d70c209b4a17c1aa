"""Files that appear complete or not at all: write a temporary file in the same folder, fsync, then `os.replace`.

A reader (or a `--resume` after a crash) therefore sees either the previous complete file or the new
complete one, never a torn file. Torch-free: the triplet tool (`python -m training.triplets`) uses it too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO


def temporary_prefix(path: str) -> str:
    """Name prefix of the temporary files an atomic write of `path` creates (in `path`'s folder)."""
    return ".tmp_" + os.path.basename(path)


def atomic_write(path: str, mode: str, write: Callable[[IO], None], newline: str | None = None) -> None:
    """Open a temporary file in `path`'s folder with `mode`, let `write` fill it, fsync, then `os.replace`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=temporary_prefix(path), dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": newline})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def atomic_write_text(text: str, path: str) -> None:
    """Write a text file atomically (metrics.json, a rewritten metrics.jsonl)."""
    atomic_write(path, "w", lambda f: f.write(text))


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
