"""Triplet CSVs (docs/contract.md §6): columns `filepath, caption, paraphrase, negation`.

Paths are relative to the CSV's folder; a cell holds several paraphrases or
negations separated by ` || ` (space, two bars, space: a bare `||` is text). Files are
UTF-8, with or without a byte-order mark. Every bad row (a byte that is not UTF-8, a NUL
byte, missing or unreadable image, empty caption, no paraphrase, no negation) is reported
with its line number; with `bad_rows="skip"` the rows are dropped (and reported), with
`"error"` loading fails listing them all. Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

COLUMNS = ("filepath", "caption", "paraphrase", "negation")
SEPARATOR = " || "
# Invalid UTF-8 bytes are decoded with "surrogateescape" (byte 0xNN -> U+DCNN, NN >= 0x80) so that the row
# holding them can be reported and skipped; NUL bytes become U+DC00, which that decoding never produces,
# because Python 3.10's csv reader refuses NUL outright and we want to name the row instead.
NUL_MARK = "\udc00"


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
    """The texts of a paraphrase or negation cell: split on ` || ` only, each stripped, empty ones dropped."""
    if cell is None:
        return ()
    return tuple(part.strip() for part in cell.split(SEPARATOR) if part.strip())


def byte_problem(row: dict[str | None, str | list[str] | None]) -> str | None:
    """A NUL byte or a byte that is not UTF-8 in any field of the row (see NUL_MARK), or None."""
    for column, value in row.items():
        for field in value if isinstance(value, list) else [value]:  # extra fields come as a list
            for char in field or "":
                if char == NUL_MARK:
                    return f"NUL byte in {column or 'an extra field'}"
                if "\udc80" <= char <= "\udcff":
                    return f"byte 0x{ord(char) - 0xDC00:02x} in {column or 'an extra field'} is not UTF-8"
    return None


def row_problem(row: dict[str, str | None], image_path: str, check_images: bool) -> str | None:
    """Why a row cannot be used, or None."""
    problem = byte_problem(row)
    if problem is not None:
        return problem
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


def records(reader: csv.DictReader, path: str) -> Iterator[dict]:
    """The reader's rows; a CSV syntax error (the reader cannot go on past it) names the file and line."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise ValueError(f"{path}:{reader.line_num}: unreadable CSV ({error})") from error


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
    # "utf-8-sig" drops a leading byte-order mark (Excel writes one) and reads files without one unchanged.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader((text.replace("\0", NUL_MARK) for text in f), skipinitialspace=True)
        try:
            header = [name.strip() for name in (reader.fieldnames or [])]
        except csv.Error as error:
            raise ValueError(f"{path}:1: unreadable header ({error})") from error
        if sorted(header) != sorted(COLUMNS):
            raise ValueError(f"{path}: expected columns {', '.join(COLUMNS)}; got {', '.join(header) or 'none'}")
        reader.fieldnames = header
        previous_end = reader.line_num
        for row in records(reader, path):
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
