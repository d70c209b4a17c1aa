"""Triplet CSVs (docs/contract.md §6) as a dataset of images and texts.

The format, its validation and its error messages belong to `semclip_kernels.triplets`; this adds the
image check (each image's header is opened before training starts, so a corrupt file is reported with its
line instead of failing an epoch later) and the loading of images with an open_clip transform.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from semclip_kernels.triplets import TripletRow, read_triplet_csv


def unreadable_image(path: str) -> str | None:
    """Why PIL cannot read the image at `path`, or None."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for corrupt files
        return f"{type(error).__name__}: {error}"
    return None


def read_rows(path: str, bad_rows: str = "skip") -> list[TripletRow]:
    """The usable rows of the triplet CSV at `path`, images checked (`bad_rows`: see `read_triplet_csv`)."""
    return read_triplet_csv(path, bad_rows=bad_rows, image_problem=unreadable_image)


class CsvTriplets(Dataset):
    """Items `(image tensor, caption, [paraphrases], [negations])` with an open_clip image transform."""

    def __init__(self, path: str, transform: Callable[[Image.Image], torch.Tensor], bad_rows: str = "skip") -> None:
        self.rows = read_rows(path, bad_rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, list[str], list[str]]:
        row = self.rows[index]
        with Image.open(row.image_path) as image:
            pixels = self.transform(image.convert("RGB"))
        return pixels, row.caption, list(row.paraphrases), list(row.negations)
