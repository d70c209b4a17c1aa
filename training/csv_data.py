"""Triplet CSVs (SPEC section 6): columns `filepath, caption, paraphrase, negation`.

Paths are relative to the CSV's folder; a cell holds several paraphrases or
negations separated by ` || `. Every bad row (missing or unreadable image, empty
caption, no paraphrase, no negation) is reported with its line number; with
`bad_rows="skip"` the rows are dropped (and reported), with `"error"` loading fails
listing them all. Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

COLUMNS = ("filepath", "caption", "paraphrase", "negation")
SEPARATOR = " || "


class BadRowsError(ValueError):
    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        listing = "\n".join(f"  {path}:{line}: {reason}" for line, reason in problems)
        super().__init__(f"{len(problems)} bad row(s) in {path}:\n{listing}")


@dataclass(frozen=True)
class TripletRow:
    line: int  # 1-based line of the row's start in the file
    image_path: str  # absolute
    caption: str
    paraphrases: tuple[str, ...]
    negations: tuple[str, ...]


def split_cell(cell: str | None) -> tuple[str, ...]:
    if cell is None:
        return ()
    return tuple(part.strip() for part in cell.split(SEPARATOR.strip()) if part.strip())


def row_problem(row: dict[str, str | None], image_path: str, check_images: bool) -> str | None:
    """Why a row cannot be used, or None."""
    if None in row.values() or None in row:  # too few / too many fields
        return "wrong number of fields"
    if not (row["filepath"] or "").strip():
        return "empty filepath"
    if not (row["caption"] or "").strip():
        return "empty caption"
    if not split_cell(row["paraphrase"]):
        return "no paraphrase"
    if not split_cell(row["negation"]):
        return "no negation"
    if not os.path.isfile(image_path):
        return f"missing image {row['filepath'].strip()!r}"
    if check_images:
        try:
            with Image.open(image_path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for corrupt files
            return f"unreadable image {row['filepath'].strip()!r} ({type(error).__name__}: {error})"
    return None


def read_triplet_csv(
    path: str, bad_rows: str = "skip", check_images: bool = True, report=None
) -> list[TripletRow]:
    """Parse a triplet CSV, reporting every bad row with its line number.

    Args:
        bad_rows: `"skip"` drops bad rows after reporting them; `"error"` raises `BadRowsError` listing all.
        check_images: also open each image header (catches corrupt files before training starts).
    """
    if bad_rows not in ("skip", "error"):
        raise ValueError(f"bad_rows must be 'skip' or 'error', got {bad_rows!r}")
    folder = os.path.dirname(os.path.abspath(path))
    rows: list[TripletRow] = []
    problems: list[tuple[int, str]] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [name.strip() for name in (reader.fieldnames or [])]
        if sorted(header) != sorted(COLUMNS):
            raise ValueError(f"{path}: expected columns {', '.join(COLUMNS)}; got {', '.join(header) or 'none'}")
        reader.fieldnames = header
        previous_end = reader.line_num
        for row in reader:
            line = previous_end + 1  # where this record starts (a quoted field may span lines)
            previous_end = reader.line_num
            image_path = os.path.join(folder, (row.get("filepath") or "").strip())
            problem = row_problem(row, image_path, check_images)
            if problem is not None:
                problems.append((line, problem))
                continue
            rows.append(TripletRow(line, image_path, row["caption"].strip(), split_cell(row["paraphrase"]),
                                   split_cell(row["negation"])))
    if problems:
        report = report or sys.stderr
        if bad_rows == "error":
            raise BadRowsError(path, problems)
        for line, reason in problems:
            print(f"{path}:{line}: skipped bad row: {reason}", file=report)
        print(f"{path}: skipped {len(problems)} bad row(s), kept {len(rows)}", file=report)
    if not rows:
        raise ValueError(f"{path}: no usable rows")
    return rows


class CsvTriplets(Dataset):
    """Items `(image tensor, caption, [paraphrases], [negations])` with an open_clip image transform."""

    def __init__(self, path: str, transform: Callable[[Image.Image], torch.Tensor], bad_rows: str = "skip") -> None:
        self.rows = read_triplet_csv(path, bad_rows=bad_rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, list[str], list[str]]:
        row = self.rows[index]
        with Image.open(row.image_path) as image:
            pixels = self.transform(image.convert("RGB"))
        return pixels, row.caption, list(row.paraphrases), list(row.negations)
