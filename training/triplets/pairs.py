"""Reading (image, caption) CSV/TSV files and writing CSVs atomically (the triplet format: semclip_kernels.triplets).

Input is open_clip-style: a header row, one column with the image path (`--img-key`, default
`filepath`) and one with the caption (`--caption-key`, default `caption`), any other columns ignored,
`--separator` (default: tab for `.tsv` files, else comma). Every row that cannot be used (undecodable
bytes, wrong number of fields, empty caption or path) is reported with its file and line; nothing is
dropped silently.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from ..atomic_files import atomic_write

FAILED_COLUMNS = ("line", "filepath", "caption", "reason")


class InputError(ValueError):
    """The input file cannot be used; the message names the file and line(s)."""


@dataclass(frozen=True)
class PairRow:
    line: int  # 1-based line where the row starts in the input file
    filepath: str  # as written to the output: relative to the output's folder, or absolute
    caption: str


def resolve_separator(separator: str | None, path: str) -> str:
    """`None` picks by extension; shell-escaped `\\t` is a tab."""
    if separator is None:
        return "\t" if path.lower().endswith(".tsv") else ","
    separator = {"\\t": "\t", "tab": "\t", "comma": ","}.get(separator, separator)
    if len(separator) != 1:
        raise InputError(f"--separator must be one character, got {separator!r}")
    return separator


def _decoded_lines(path: str, data: bytes) -> tuple[list[str], dict[int, str]]:
    """The file's lines as text, and {line number: problem} for lines that are not UTF-8."""
    if data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is tolerated (§6)
        data = data[3:]
    lines: list[str] = []
    undecodable: dict[int, str] = {}
    for number, raw in enumerate(io.BytesIO(data).readlines(), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            undecodable[number] = f"undecodable bytes (not UTF-8) at column {error.start + 1}"
            lines.append(raw.decode("utf-8", errors="replace"))
    return lines, undecodable


def read_pairs(path: str, img_key: str = "filepath", caption_key: str = "caption", separator: str | None = None,
               bad_rows: str = "error", image_root: str | None = None,
               output_dir: str | None = None) -> tuple[list[PairRow], list[tuple[int, str]]]:
    """The usable rows of `path`, and the (line, reason) of the skipped ones.

    Args:
        bad_rows: `"error"` raises InputError listing every bad row; `"skip"` returns them as skipped.
        image_root: folder that relative image paths are relative to (default: the input file's folder).
        output_dir: folder the output CSV will live in; image paths are rewritten relative to it (§6).
    """
    if bad_rows not in ("error", "skip"):
        raise InputError(f"--bad-rows must be 'error' or 'skip', got {bad_rows!r}")
    delimiter = resolve_separator(separator, path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise InputError(f"{path}: cannot read input: {error}") from error
    lines, undecodable = _decoded_lines(path, data)
    reader = csv.reader(lines, delimiter=delimiter, strict=False)
    header = next(reader, None)
    if header is None:
        raise InputError(f"{path}:1: empty file (expected a header with {img_key!r} and {caption_key!r})")
    if 1 in undecodable:
        raise InputError(f"{path}:1: {undecodable[1]}")
    header = [name.strip() for name in header]
    missing = [key for key in (img_key, caption_key) if key not in header]
    if missing:
        hint = ""
        if len(header) == 1 and any(sep in header[0] for sep in "\t,;|" if sep != delimiter):
            hint = f" (the header is one field: is the separator {delimiter!r} right? see --separator)"
        raise InputError(f"{path}:1: missing column(s) {', '.join(map(repr, missing))}; header has "
                         f"{', '.join(map(repr, header))}{hint} (see --img-key, --caption-key)")
    image_column, caption_column = header.index(img_key), header.index(caption_key)
    root = os.path.abspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    out_dir = os.path.abspath(output_dir) if output_dir is not None else root

    rows: list[PairRow] = []
    problems: list[tuple[int, str]] = []
    previous_end = reader.line_num
    for record in reader:
        line = previous_end + 1  # where this record starts (a quoted field may span lines)
        previous_end = reader.line_num
        if not record or record == [""]:
            continue  # a blank line is no row
        problem = next((undecodable[n] for n in range(line, previous_end + 1) if n in undecodable), None)
        if problem is None and len(record) != len(header):
            problem = f"{len(record)} field(s), the header has {len(header)}"
        if problem is None and not record[caption_column].strip():
            problem = f"empty {caption_key!r}"
        if problem is None and not record[image_column].strip():
            problem = f"empty {img_key!r}"
        if problem is not None:
            problems.append((line, problem))
            continue
        image = record[image_column].strip()
        if not os.path.isabs(image):
            image = os.path.relpath(os.path.join(root, image), out_dir)
        rows.append(PairRow(line, image, " ".join(record[caption_column].split())))
    if problems and bad_rows == "error":
        listing = "\n".join(f"  {path}:{line}: {reason}" for line, reason in problems)
        raise InputError(f"{len(problems)} bad row(s) in {path} (pass --bad-rows skip to skip them):\n{listing}")
    return rows, problems


def atomic_write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a UTF-8 CSV that appears complete or not at all (training/atomic_files.py)."""

    def write(f: TextIO) -> None:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)

    atomic_write(path, "w", write, newline="")
