"""Triplet CSVs (docs/contract.md §6): parsing, bad rows, encodings and separators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

# training/ lives at the repository root and is not part of the installed package.
from semclip_kernels.triplets import BadRowsError, read_triplet_csv  # noqa: E402
from training.csv_data import CsvTriplets, read_rows  # noqa: E402


def write_png(path, color=(255, 0, 0)) -> None:
    Image.new("RGB", (8, 8), color).save(path)


def test_csv_parsing_and_bad_rows(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    write_png(tmp_path / "img" / "a.png")
    write_png(tmp_path / "img" / "b.png", (0, 0, 255))
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png")
    csv_path = tmp_path / "triplets.csv"
    csv_path.write_text(
        "filepath,caption,paraphrase,negation\n"  # line 1
        "img/a.png,a red square,a square that is red || red box,a blue square || no red square\n"  # 2: ok
        "img/missing.png,a cat,a feline,no cat\n"  # 3: missing image
        'img/b.png,"a blue\nsquare",a square in blue,a red square\n'  # 4-5: ok, quoted newline
        "img/a.png,,a red box,no red box\n"  # 6: empty caption
        "img/corrupt.png,a thing,an object,no thing\n"  # 7: unreadable image
        "img/b.png,a blue square,,a red square\n"  # 8: no paraphrase
        "img/b.png,a blue square,a blue box,\n",  # 9: no negation
        encoding="utf-8",
    )
    rows = read_rows(str(csv_path), bad_rows="skip")  # images checked with PIL
    report = capsys.readouterr().err
    assert [r.line for r in rows] == [2, 4]
    assert rows[0].paraphrases == ("a square that is red", "red box")
    assert rows[0].negations == ("a blue square", "no red square")
    assert rows[1].caption == "a blue\nsquare"
    assert rows[0].image_path == str(tmp_path / "img" / "a.png")
    for line, word in [(3, "missing image"), (6, "empty caption"), (7, "unreadable image"), (8, "no paraphrase"),
                       (9, "no negation")]:
        assert f"triplets.csv:{line}: skipped bad row: {word}" in report
    assert "skipped 5 bad row(s), kept 2" in report

    with pytest.raises(BadRowsError) as error:
        read_rows(str(csv_path), bad_rows="error")
    assert [line for line, _ in error.value.problems] == [3, 6, 7, 8, 9]
    with pytest.raises(BadRowsError) as error:
        read_triplet_csv(str(csv_path), bad_rows="error")  # images must exist, but are not opened
    assert [line for line, _ in error.value.problems] == [3, 6, 8, 9]

    dataset = CsvTriplets(str(csv_path), transform=lambda im: torch.tensor(np.asarray(im)).permute(2, 0, 1))
    image, caption, paraphrases, negations = dataset[1]
    assert image.shape == (3, 8, 8) and image[2].min() == 255 and caption == "a blue\nsquare"
    assert paraphrases == ["a square in blue"] and negations == ["a red square"]


def test_csv_rejects_wrong_header(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("image,caption\nfoo.png,bar\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected columns"):
        read_triplet_csv(str(path))




# ----------------------------------------------------------------------------- encodings and separators (issue 17)


def write_triplets(folder, body: bytes, header: bytes = b"filepath,caption,paraphrase,negation\n") -> str:
    """A CSV (header + `body`, raw bytes) next to img/a.png; returns its path."""
    (folder / "img").mkdir(exist_ok=True)
    write_png(folder / "img" / "a.png")
    path = folder / "triplets.csv"
    path.write_bytes(header + body)
    return str(path)


GOOD_ROW = b"img/a.png,a red square,a square in red,a blue square\n"


def test_csv_byte_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    path = write_triplets(tmp_path, GOOD_ROW + b"img/a.png,a caf\xe9 sign,a sign,no sign\n" + GOOD_ROW)
    with pytest.raises(BadRowsError, match=r"triplets\.csv:3: byte 0xe9 in caption is not UTF-8"):
        read_triplet_csv(path, bad_rows="error")
    rows = read_triplet_csv(path, bad_rows="skip")
    assert [row.line for row in rows] == [2, 4]
    assert "triplets.csv:3: skipped bad row: byte 0xe9 in caption is not UTF-8" in capsys.readouterr().err


def test_csv_tolerates_a_utf8_byte_order_mark(tmp_path):
    path = write_triplets(tmp_path, GOOD_ROW, header=b"\xef\xbb\xbffilepath,caption,paraphrase,negation\n")
    rows = read_triplet_csv(path, bad_rows="error")
    assert [(row.line, row.caption, row.paraphrases) for row in rows] == [(2, "a red square", ("a square in red",))]


def test_csv_splits_texts_on_spaced_double_bar_only(tmp_path):
    path = write_triplets(tmp_path, b"img/a.png,a cat || not split,feline||kitty || a small cat,a dog||x\n")
    (row,) = read_triplet_csv(path, bad_rows="error")
    assert row.caption == "a cat || not split"  # captions are never split
    assert row.paraphrases == ("feline||kitty", "a small cat")
    assert row.negations == ("a dog||x",)


def test_csv_nul_byte_names_file_and_line(tmp_path, capsys):
    path = write_triplets(tmp_path, GOOD_ROW + GOOD_ROW + b"img/a.png,a red\x00square,a square in red,no square\n")
    with pytest.raises(BadRowsError, match=r"triplets\.csv:4: NUL byte in caption"):
        read_triplet_csv(path, bad_rows="error")
    rows = read_triplet_csv(path, bad_rows="skip")
    assert [row.line for row in rows] == [2, 3]
    assert "triplets.csv:4: skipped bad row: NUL byte in caption" in capsys.readouterr().err
