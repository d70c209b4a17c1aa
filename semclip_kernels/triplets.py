"""The triplet data format (docs/contract.md §6): its one owner.

A training triplet is an image with its caption, paraphrase(s) and negation(s). On disk: a CSV with the
header `filepath, caption, paraphrase, negation` (other names can be chosen, as open_clip's `--csv-*-key`
flags do), image paths absolute or relative to the CSV's folder, several paraphrases or negations in one
cell separated by ` || ` (space, two bars, space; a bare `||` inside a text is text). Files are UTF-8; a
byte-order mark is tolerated. A row that cannot be used is reported with the file and line: all of them at
once (`bad_rows="error"`), or skipped and listed (`bad_rows="skip"`). Nothing is dropped silently.

In a batch, the text tower encodes the captions, then `Pn` paraphrases per image, then `Mn` negations per
image (image-major): `text_views` splits its `[B·(1 + Pn + Mn), d]` output into the loss's three inputs.

No torch at module level: `python -m training.triplets` imports this without torch (`text_views` takes
tensors, but only calls their methods).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

COLUMNS = ("filepath", "caption", "paraphrase", "negation")
SEPARATOR = " || "
BAD_ROWS = ("skip", "error")
# Invalid UTF-8 bytes are decoded with "surrogateescape" (byte 0xNN -> U+DCNN, NN >= 0x80) so that the row
# holding them can be reported and skipped; NUL bytes become U+DC00, which that decoding never produces,
# because Python 3.10's csv reader refuses NUL outright and we want to name the row instead.
_NUL_MARK = "\udc00"


@dataclass(frozen=True)
class TripletColumns:
    """The CSV's column names; a paraphrase or negation column of None is not read (its texts are empty)."""

    filepath: str = "filepath"
    caption: str = "caption"
    paraphrase: str | None = "paraphrase"
    negation: str | None = "negation"

    def named(self) -> dict[str, str]:
        """{role: column name} of the columns that are read."""
        roles = {
            "filepath": self.filepath,
            "caption": self.caption,
            "paraphrase": self.paraphrase,
            "negation": self.negation,
        }
        return {role: name for role, name in roles.items() if name is not None}


@dataclass(frozen=True)
class TripletRow:
    line: int  # 1-based line where the row starts in the file (a quoted field may span lines)
    image_path: str  # absolute
    caption: str
    paraphrases: tuple[str, ...]
    negations: tuple[str, ...]


class BadRowsError(ValueError):
    """Rows that cannot be used; `problems` holds `(line, reason)` for each."""

    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        listing = "\n".join(f"  {path}:{line}: {reason}" for line, reason in problems)
        super().__init__(f"{len(problems)} bad row(s) in {path}:\n{listing}")


class MissingColumnsError(ValueError):
    """The header lacks columns; `missing` holds their roles (`"filepath"`, `"caption"`, …)."""

    def __init__(self, path: str, missing: dict[str, str], header: Sequence[str]) -> None:
        self.missing = tuple(missing)
        names = ", ".join(repr(name) for name in missing.values())
        super().__init__(
            f"{path}:1: expected columns {names} (the triplet format, docs/contract.md §6); "
            f"the header has {', '.join(map(repr, header)) or 'none'}"
        )


def split_cell(cell: str | None) -> tuple[str, ...]:
    """The texts of a paraphrase or negation cell: split on ` || ` only, each stripped, empty ones dropped."""
    if cell is None:
        return ()
    return tuple(part.strip() for part in cell.split(SEPARATOR) if part.strip())


def join_cell(texts: Sequence[str]) -> str:
    """One cell holding `texts` (the inverse of `split_cell` for stripped texts without ` || `)."""
    return SEPARATOR.join(texts)


def pick(texts: Sequence[str], count: int, rotation: int) -> list[str]:
    """`count` of a row's texts, cycling from `rotation`: epoch `e` uses rotation `e`, so a row with more
    texts than `count` shows different ones in successive epochs (and repeats its texts when it has fewer)."""
    if count > 0 and not texts:
        raise ValueError(f"texts must not be empty when count = {count} of them are asked for")
    return [texts[(rotation + k) % len(texts)] for k in range(count)]


def batch_texts(
    captions: Sequence[str],
    paraphrases: Sequence[Sequence[str]],
    negations: Sequence[Sequence[str]],
    n_paraphrases: int,
    n_negations: int,
    epoch: int,
) -> list[str]:
    """The texts of a batch in the text tower's order: the captions, then `n_paraphrases` of each item's
    paraphrases, then `n_negations` of each item's negations (item-major), picked for `epoch` (`pick`)."""
    texts = list(captions)
    texts += [text for item in paraphrases for text in pick(item, n_paraphrases, epoch)]
    texts += [text for item in negations for text in pick(item, n_negations, epoch)]
    return texts


def text_views(features: Any, batch: int, n_paraphrases: int, n_negations: int) -> tuple[Any, Any, Any]:
    """`(captions [B, d], paraphrases [B, Pn, d] or None, negations [B, Mn, d] or None)`: views of a text-tower
    output `[B·(1 + Pn + Mn), d]` laid out as `batch_texts` orders the texts.

    The three are adjacent views of one buffer, already in the loss's `[T; P; N]` column order: the loss
    reads them in place as its column blocks, no copy (docs/backends.md).
    """
    expected = batch * (1 + n_paraphrases + n_negations)
    if features.dim() != 2 or features.shape[0] != expected:
        raise ValueError(
            f"text features must be [B·(1 + Pn + Mn), d] = [{expected}, d] for B = {batch}, "
            f"Pn = {n_paraphrases}, Mn = {n_negations}; got shape {tuple(features.shape)}"
        )
    dim = features.shape[1]
    end_paraphrases = batch * (1 + n_paraphrases)
    paraphrases = features[batch:end_paraphrases].view(batch, n_paraphrases, dim) if n_paraphrases else None
    negations = features[end_paraphrases:].view(batch, n_negations, dim) if n_negations else None
    return features[:batch], paraphrases, negations


# ----------------------------------------------------------------------------------------------------------------
# Reading a triplet CSV
# ----------------------------------------------------------------------------------------------------------------


def _byte_problem(record: dict[str | None, Any]) -> str | None:
    """A NUL byte or a byte that is not UTF-8 in any field of the record (see _NUL_MARK), or None."""
    for column, value in record.items():
        for field in value if isinstance(value, list) else [value]:  # extra fields come as a list
            for char in field or "":
                if char == _NUL_MARK:
                    return f"NUL byte in {column or 'an extra field'}"
                if "\udc80" <= char <= "\udcff":
                    return f"byte 0x{ord(char) - 0xDC00:02x} in {column or 'an extra field'} is not UTF-8"
    return None


def _records(reader: csv.DictReader, path: str) -> Iterator[tuple[int, dict]]:
    """(line where the record starts, record); a CSV syntax error (the reader cannot go on) names file and line."""
    previous_end = reader.line_num
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise ValueError(f"{path}:{reader.line_num}: unreadable CSV ({error})") from error
        yield previous_end + 1, record
        previous_end = reader.line_num


def _row_or_problem(
    record: dict, columns: dict[str, str], folder: str, line: int, image_problem: Callable[[str], str | None] | None
) -> TripletRow | str:
    problem = _byte_problem(record)
    if problem is not None:
        return problem
    if None in record or None in record.values():  # too many / too few fields
        return "wrong number of fields"
    image = record[columns["filepath"]].strip()
    caption = record[columns["caption"]].strip()
    paraphrases = split_cell(record[columns["paraphrase"]]) if "paraphrase" in columns else ()
    negations = split_cell(record[columns["negation"]]) if "negation" in columns else ()
    if not image:
        return f"empty filepath ({columns['filepath']})"
    if not caption:
        return f"empty caption ({columns['caption']})"
    if "paraphrase" in columns and not paraphrases:
        return f"no paraphrase ({columns['paraphrase']})"
    if "negation" in columns and not negations:
        return f"no negation ({columns['negation']})"
    image_path = os.path.join(folder, image)  # an absolute path stays as it is
    if not os.path.isfile(image_path):
        return f"missing image {image!r}"
    if image_problem is not None:
        problem = image_problem(image_path)
        if problem is not None:
            return f"unreadable image {image!r} ({problem})"
    return TripletRow(line, image_path, caption, paraphrases, negations)


def read_triplet_csv(
    path: str,
    columns: TripletColumns = TripletColumns(),
    delimiter: str = ",",
    bad_rows: str = "error",
    image_problem: Callable[[str], str | None] | None = None,
    report: TextIO | None = None,
) -> list[TripletRow]:
    """The rows of a triplet CSV (docs/contract.md §6), every bad one reported with the file and line.

    Args:
        columns: the column names (other columns are ignored).
        delimiter: the field separator, one character.
        bad_rows: `"error"` raises `BadRowsError` listing every bad row; `"skip"` drops them after listing
            them on `report` (default: stderr).
        image_problem: `f(image_path) -> None or why the image cannot be read`, to catch corrupt files
            before training starts (every row's image must exist in any case).
    """
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, got {bad_rows!r}")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"delimiter must be one character, got {delimiter!r}")
    named = columns.named()
    folder = os.path.dirname(os.path.abspath(path))
    rows: list[TripletRow] = []
    problems: list[tuple[int, str]] = []
    # "utf-8-sig" drops a leading byte-order mark (Excel writes one) and reads files without one unchanged.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(
            (text.replace("\0", _NUL_MARK) for text in f), delimiter=delimiter, skipinitialspace=True
        )
        try:
            header = [name.strip() for name in (reader.fieldnames or [])]
        except csv.Error as error:
            raise ValueError(f"{path}:1: unreadable header ({error})") from error
        missing = {role: name for role, name in named.items() if name not in header}
        if missing:
            raise MissingColumnsError(path, missing, header)
        reader.fieldnames = header
        for line, record in _records(reader, path):
            row = _row_or_problem(record, named, folder, line, image_problem)
            if isinstance(row, str):
                problems.append((line, row))
            else:
                rows.append(row)
    if problems:
        if bad_rows == "error":
            raise BadRowsError(path, problems)
        report = report or sys.stderr
        for line, reason in problems:
            print(f"{path}:{line}: skipped bad row: {reason}", file=report)
        print(f"{path}: skipped {len(problems)} bad row(s), kept {len(rows)}", file=report)
    if not rows:
        raise ValueError(f"{path}: no usable rows")
    return rows
