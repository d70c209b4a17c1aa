"""semclip_kernels.triplets, the one owner of the triplet format (docs/contract.md §6): cells, the texts of a
batch, the text-tower views, the CSV reader with custom columns, and that it loads without torch."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from harness import REPO_ROOT

from semclip_kernels.triplets import (
    SEPARATOR,
    BadRowsError,
    MissingColumnsError,
    TripletColumns,
    batch_texts,
    join_cell,
    pick,
    read_triplet_csv,
    split_cell,
    text_views,
)

ROOT = REPO_ROOT


def test_cells_split_on_the_spaced_separator_only():
    assert SEPARATOR == " || "
    assert split_cell("a || b ||c") == ("a", "b ||c")
    assert split_cell("x||y") == ("x||y",)
    assert split_cell(" || a ||  || b ") == ("a", "b")  # empty texts dropped, each stripped
    assert split_cell(None) == () and split_cell("") == ()
    assert split_cell(join_cell(["one", "two || three"])) == ("one", "two", "three")
    assert join_cell(["p1", "p2"]) == "p1 || p2"


def test_pick_cycles_through_a_rows_texts_by_epoch():
    texts = ("t0", "t1", "t2")
    assert [pick(texts, 2, epoch) for epoch in range(4)] == [["t0", "t1"], ["t1", "t2"], ["t2", "t0"], ["t0", "t1"]]
    assert pick(("only",), 3, 5) == ["only"] * 3
    assert pick((), 0, 1) == []
    with pytest.raises(ValueError, match="texts must not be empty"):
        pick((), 1, 0)


def test_batch_texts_are_captions_then_paraphrases_then_negations_item_major():
    texts = batch_texts(["c0", "c1"], [("p0a", "p0b"), ("p1a",)], [("n0a", "n0b", "n0c"), ("n1a", "n1b")], 2, 1, 1)
    assert texts == ["c0", "c1", "p0b", "p0a", "p1a", "p1a", "n0b", "n1b"]
    assert batch_texts(["c0"], [("p",)], [("n",)], 0, 0, 3) == ["c0"]


def test_text_views_are_views_of_one_buffer_in_batch_texts_order():
    batch, n_para, n_neg, dim = 3, 2, 1, 4
    # Row r of the tower output encodes text r of batch_texts: the value tells which text it is.
    rows = torch.arange(batch * (1 + n_para + n_neg), dtype=torch.float64)[:, None].expand(-1, dim).contiguous()
    captions, paraphrases, negations = text_views(rows, batch, n_para, n_neg)
    assert captions[:, 0].tolist() == [0, 1, 2]
    assert paraphrases.shape == (batch, n_para, dim) and paraphrases[:, :, 0].tolist() == [[3, 4], [5, 6], [7, 8]]
    assert negations.shape == (batch, n_neg, dim) and negations[:, :, 0].tolist() == [[9], [10], [11]]
    for view in (captions, paraphrases, negations):
        assert view.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()  # no copy
    assert text_views(rows[:3], batch, 0, 0)[1:] == (None, None)
    with pytest.raises(ValueError, match=r"\[12, d\] for B = 3, Pn = 2, Mn = 1; got shape \(11, 4\)"):
        text_views(rows[:11], batch, n_para, n_neg)


def test_reader_with_custom_columns_and_delimiter(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "pairs.tsv"
    path.write_text(
        "\ufeffimage\tsentence\tneg\tnotes\na.png\tA cat.\tno cat || a dog\tignored\na.png\tA bird.\t\tx\n",
        encoding="utf-8",
    )
    columns = TripletColumns("image", "sentence", None, "neg")
    with pytest.raises(BadRowsError, match=r"pairs\.tsv:3: no negation \(neg\)"):
        read_triplet_csv(str(path), columns, delimiter="\t")
    report = io.StringIO()
    (row,) = read_triplet_csv(str(path), columns, delimiter="\t", bad_rows="skip", report=report)
    assert f"{path}:3: skipped bad row: no negation (neg)" in report.getvalue()
    assert (row.line, row.image_path, row.caption, row.paraphrases, row.negations) == (
        2,
        str(tmp_path / "a.png"),
        "A cat.",
        (),
        ("no cat", "a dog"),
    )
    with pytest.raises(MissingColumnsError) as error:
        read_triplet_csv(str(path), TripletColumns("image", "caption", None, "negation"), delimiter="\t")
    assert error.value.missing == ("caption", "negation")
    assert str(error.value).startswith(f"{path}:1: expected columns 'caption', 'negation'")
    for bad in (dict(bad_rows="drop"), dict(delimiter="||")):
        with pytest.raises(ValueError, match="bad_rows must be|delimiter must be one character"):
            read_triplet_csv(str(path), columns, **bad)


def test_the_format_module_imports_without_torch():
    # The triplet tool (python -m training.triplets) reads and writes the format without paying for torch.
    probe = "import sys, semclip_kernels.triplets; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, timeout=60).returncode == 0
