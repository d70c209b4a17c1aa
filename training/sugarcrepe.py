"""SugarCrepe++ text-only accuracy: real captions, their paraphrases and minimal meaning-changing edits.

Evaluation only (never training data). The file ships with the repository:
`training/evaluation_data/sugarcrepe_pp_triplets.csv`, columns `filename, caption, paraphrased, negation`
(its README there states its origin and licences).

A triplet counts as correct when, on L2-normalised text embeddings, the caption is closer to
its paraphrase than to its negation AND the paraphrase is closer to the caption than to the
negation (SugarCrepe++'s text-only "TOT" criterion). Ties count as wrong.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import torch

from .paths import SUGARCREPE_PP_CSV

DEFAULT_PATH = SUGARCREPE_PP_CSV
COLUMNS = ("caption", "paraphrased", "negation")
IMAGE_COLUMN = "filename"


@dataclass(frozen=True)
class TextTriplets:
    captions: list[str]
    paraphrases: list[str]
    negations: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _read_rows(path: str, columns: tuple[str, ...], limit: int) -> list[list[str]]:
    """The CSV's `columns` per row (the first `limit` rows when `limit > 0`); errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SugarCrepe++ triplets not found: {path} (pass --sugarcrepe PATH)")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header lacks columns {missing} (has {reader.fieldnames})")
        for row in reader:
            texts = [(row.get(c) or "").strip() for c in columns]
            if not all(texts):
                empty = " or ".join(c for c, t in zip(columns, texts, strict=True) if not t)
                raise ValueError(f"{path}:{reader.line_num}: empty {empty}")
            rows.append(texts)
            if limit and len(rows) >= limit:
                break
    return rows


def load_triplets(path: str = DEFAULT_PATH, limit: int = 0) -> TextTriplets:
    """The CSV's triplets (the first `limit` rows when `limit > 0`); errors name the file and line."""
    rows = _read_rows(path, COLUMNS, limit)
    return TextTriplets([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def load_triplets_with_images(path: str = DEFAULT_PATH, limit: int = 0) -> tuple[list[str], TextTriplets]:
    """(image file name per row, the triplets): what a split by image needs."""
    rows = _read_rows(path, (IMAGE_COLUMN, *COLUMNS), limit)
    return [r[0] for r in rows], TextTriplets([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def sample_triplets(triplets: TextTriplets, count: int, seed: int = 0) -> TextTriplets:
    """`count` triplets drawn without replacement by a fixed seed (file order kept); all when `count` is 0 or more."""
    if count <= 0 or count >= len(triplets):
        return triplets
    rows = sorted(torch.randperm(len(triplets), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    return TextTriplets([triplets.captions[i] for i in rows], [triplets.paraphrases[i] for i in rows],
                        [triplets.negations[i] for i in rows])


def text_only_correct(caption: torch.Tensor, paraphrase: torch.Tensor, negation: torch.Tensor) -> torch.Tensor:
    """Per-triplet correctness `[n]` bool for L2-normalised embeddings `[n, d]` each."""
    if not caption.shape == paraphrase.shape == negation.shape or caption.dim() != 2:
        raise ValueError(f"caption, paraphrase, negation must be [n, d] alike, got {tuple(caption.shape)}, "
                         f"{tuple(paraphrase.shape)}, {tuple(negation.shape)}")
    cp = (caption * paraphrase).sum(-1)
    cn = (caption * negation).sum(-1)
    pn = (paraphrase * negation).sum(-1)
    return (cp > cn) & (cp > pn)


def text_only_accuracy(caption: torch.Tensor, paraphrase: torch.Tensor, negation: torch.Tensor) -> float:
    return text_only_correct(caption, paraphrase, negation).double().mean().item()
