"""Deterministic batching shared by the synthetic and CSV datasets.

The batch at global step `s` is a pure function of (seed, s): epoch `e` visits the
dataset in the order `permutation(seed, e)`, in consecutive full batches. That is
what lets `--resume` continue with exactly the batches an uninterrupted run sees,
with no sampler state to save.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from semclip_kernels.triplets import batch_texts


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, 1_000_003, epoch]).permutation(size)


def batch_indices(seed: int, step: int, batch_size: int, size: int) -> tuple[int, np.ndarray]:
    """(epoch, dataset indices) of the global batch at `step` (0-based); the last partial batch is dropped."""
    batches_per_epoch = size // batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"dataset of {size} items is smaller than one batch of {batch_size}")
    epoch, position = divmod(step, batches_per_epoch)
    order = epoch_order(seed, epoch, size)
    return epoch, order[position * batch_size : (position + 1) * batch_size]


class CachedTokenizer:
    """Tokenize through a per-string cache: the same captions recur every epoch, and
    open_clip's tokenizer (text cleaning + BPE) costs more per string than the tiny model."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            for text, tokens in zip(missing, self.tokenizer(missing), strict=True):
                self.cache[text] = tokens
        return torch.stack([self.cache[t] for t in texts])


@dataclass
class TextBatch:
    images: torch.Tensor  # [B, 3, H, W]
    tokens: torch.Tensor  # [B·(1 + Pn + Mn), context], in `semclip_kernels.triplets.batch_texts` order
    n_paraphrases: int
    n_negations: int


def collate(
    dataset: Dataset, indices: np.ndarray, tokenizer, n_paraphrases: int, n_negations: int, rotation: int = 0
) -> TextBatch:
    """Load `indices` and tokenize their texts in one call (captions, paraphrases, negations)."""
    items = [dataset[int(i)] for i in indices]
    images, captions, paraphrases, negations = zip(*items, strict=True)
    texts = batch_texts(captions, paraphrases, negations, n_paraphrases, n_negations, rotation)
    return TextBatch(torch.stack(images), tokenizer(texts), n_paraphrases, n_negations)
