"""An append-only, crash-safe answer cache: one JSON object per line, keyed by caption and settings.

Each answer is appended and fsync'ed as soon as it arrives, so a crash or a kill loses at most the
requests still in flight; a torn last line (the process died mid-write) is ignored on load. A rerun
with the same settings reads the file and never asks again for a cached caption.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, TextIO


def cache_key(caption: str, settings: dict[str, Any]) -> str:
    """Stable across runs and machines: sha256 of the caption and the settings that shape the answer."""
    payload = json.dumps({"caption": caption, "settings": settings}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AnswerCache:
    """`{key: {"caption", "paraphrases", "negations"}}` persisted as JSON lines at `path`."""

    def __init__(self, path: str, report: TextIO | None = None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        report = report or sys.stderr
        needs_newline = False
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            needs_newline = bool(text) and not text.endswith("\n")
            lines = text.split("\n")
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    if number == len(lines):  # the last line of a killed run: expected, not worth a warning
                        continue
                    print(f"{path}:{number}: ignored unreadable cache line", file=report)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        if needs_newline:  # start after the torn line, never glued to it
            self._file.write("\n")

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, caption: str, paraphrases: list[str], negations: list[str]) -> None:
        entry = {"key": key, "caption": caption, "paraphrases": paraphrases, "negations": negations}
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries[key] = entry

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
