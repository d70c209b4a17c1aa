"""SemCLIP as a sentence-transformers loss (docs/sentence_transformers.md).

`SemCLIPRankingLoss` is a drop-in for sentence-transformers 6.x's `MultipleNegativesRankingLoss`,
`MultipleNegativesSymmetricRankingLoss` and `CachedMultipleNegativesRankingLoss`: the same arguments and the
same `forward(sentence_features, labels)`, computed by this package's fused loss (docs/contract.md §1) with
the anchors as its rows ("images") and the documents as its columns:

    columns of the batch    anchor, positive, then n_paraphrase_columns extra positives, then hard negatives
    SemCLIP inputs          image_features = anchors, text_features = positives,
                            paraphrase_features [B, Pn, d], negation_features [B, Mn, d]
    directions              ("query_to_doc",)                   -> directions="image_to_text" (MNRL)
                            ("query_to_doc", "doc_to_query")
                            with partition_mode="per_direction" -> directions="both" (MNSRL)
    similarity_fct          cos_sim (embeddings normalized first) or dot_score; scale = τ
    gather_across_devices   SemCLIPLoss(local_loss=True, gather_with_grad=True) over the default process group
    mini_batch_size         gradient caching (semclip_kernels.grad_cache): the model runs on mini-batches, the
                            fused loss once per step on the whole batch's embeddings

With no paraphrase column the loss and its gradients are theirs (tests/integrations/test_sentence_transformers.py).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.util import cos_sim, dot_score, similarity_fct_name
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "semclip_kernels.integrations.sentence_transformers needs sentence-transformers 6.x: "
        "pip install 'semclip-kernels[sentence-transformers]'"
    ) from error

from ..distributed import MODES as DISTRIBUTED_MODES
from ..grad_cache import grad_cache_forward
from ..loss import SemCLIPLoss

# sentence-transformers' direction names; the ones this package computes.
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SUPPORTED_DIRECTIONS = ({"query_to_doc"}, {"query_to_doc", "doc_to_query"})

__all__ = ["SemCLIPRankingLoss"]


class SemCLIPRankingLoss(nn.Module):
    """MultipleNegativesRankingLoss (and its symmetric and cached variants) as the fused SemCLIP loss, with
    extra positives (paraphrases) and weighted hard negatives.

    Args (sentence-transformers' own, same meaning):
        model: the `SentenceTransformer`.
        scale: the logits' scale (`1 / temperature`), > 0.
        similarity_fct: `sentence_transformers.util.cos_sim` or `dot_score`.
        gather_across_devices: the loss of every rank's batch together (all-gather with gradients).
        directions: `("query_to_doc",)` (MNRL, the default) or `("query_to_doc", "doc_to_query")` with
            `partition_mode="per_direction"` (MNSRL).
        partition_mode: `"joint"` or `"per_direction"` (the same with one direction).
        hardness_mode, hardness_strength: only `None` (no hardness weighting) is computed here.
        mini_batch_num_tokens: only `None`; show_progress_bar: a progress bar over the mini-batches.
    Args (this package's):
        mini_batch_size: None: one forward of the model per column and batch (MNRL). An int: gradient caching
            with mini-batches of that many rows (CachedMNRL), the fused loss once per step.
        n_paraphrase_columns: how many columns after (anchor, positive) are extra positives (`Pn`); the
            columns after them are hard negatives.
        paraphrase_weight: `w ≥ 0` of the extra positives; hard_negative_weight: `β ≥ 0` of the hard negatives
            (docs/contract.md §1).
        backend, distributed_mode: as `SemCLIPLoss`'s.
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: Sequence[str] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        *,
        mini_batch_size: int | None = None,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        n_paraphrase_columns: int = 0,
        paraphrase_weight: float = 1.0,
        hard_negative_weight: float = 1.0,
        backend: str = "auto",
        distributed_mode: str = "gather",
    ) -> None:
        super().__init__()
        self.model = model
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < float("inf"):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)
        if similarity_fct is cos_sim:
            self.normalize = True
        elif similarity_fct is dot_score:
            self.normalize = False
        else:
            raise ValueError(
                "similarity_fct must be sentence_transformers.util.cos_sim or sentence_transformers.util.dot_score "
                f"(the fused loss computes scale · <a, b> of the (normalized) embeddings), got {similarity_fct!r}"
            )
        self.similarity_fct = similarity_fct
        self.gather_across_devices = bool(gather_across_devices)
        self.directions = tuple(directions) if not isinstance(directions, str) else (directions,)
        unknown = set(self.directions) - set(ALL_DIRECTIONS)
        if not self.directions or unknown:
            raise ValueError(f"directions must be a tuple of {ALL_DIRECTIONS}, got {directions!r}")
        if set(self.directions) not in SUPPORTED_DIRECTIONS:
            raise ValueError(
                f"directions={directions!r} is not computed by this loss: use ('query_to_doc',) (anchor against every "
                "document) or ('query_to_doc', 'doc_to_query') (and each positive against every anchor)"
            )
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
        if len(set(self.directions)) == 2 and partition_mode != "per_direction":
            raise ValueError(
                "partition_mode='joint' with directions ('query_to_doc', 'doc_to_query') (one softmax over both "
                "directions) is not computed by this loss: use partition_mode='per_direction' (the mean of the two "
                "directions' losses, as MultipleNegativesSymmetricRankingLoss)"
            )
        self.partition_mode = partition_mode
        if hardness_mode is not None:
            raise ValueError(f"hardness_mode={hardness_mode!r} is not computed by this loss: only None")
        if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, numbers.Real):
            raise TypeError(f"hardness_strength must be a number, got {type(hardness_strength).__name__}")
        if hardness_strength < 0:
            raise ValueError(f"hardness_strength must be non-negative, got {hardness_strength!r}")
        self.hardness_mode, self.hardness_strength = hardness_mode, float(hardness_strength)
        if mini_batch_size is not None and not _is_int_at_least(mini_batch_size, 1):
            raise ValueError(f"mini_batch_size must be a positive int or None, got {mini_batch_size!r}")
        self.mini_batch_size = None if mini_batch_size is None else int(mini_batch_size)
        if mini_batch_num_tokens is not None:
            raise ValueError(
                f"mini_batch_num_tokens={mini_batch_num_tokens!r} is not supported: mini-batches are given by "
                "mini_batch_size (rows)"
            )
        self.mini_batch_num_tokens = None
        self.show_progress_bar = bool(show_progress_bar)
        if not _is_int_at_least(n_paraphrase_columns, 0):
            raise ValueError(f"n_paraphrase_columns must be an int >= 0, got {n_paraphrase_columns!r}")
        self.n_paraphrase_columns = int(n_paraphrase_columns)
        self._loss_options = {
            "paraphrase_weight": paraphrase_weight,
            "hard_negative_weight": hard_negative_weight,
            "backend": backend,
            "directions": "both" if "doc_to_query" in self.directions else "image_to_text",
        }
        if distributed_mode not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed_mode must be one of {DISTRIBUTED_MODES}, got {distributed_mode!r}")
        self.distributed_mode = distributed_mode
        # Made now so that a bad weight or backend is an error here, not at the first step.
        self._losses: dict[tuple[int, int], SemCLIPLoss] = {(0, 1): SemCLIPLoss(**self._loss_options)}
        self.paraphrase_weight = self._losses[0, 1].config.paraphrase_weight
        self.hard_negative_weight = self._losses[0, 1].config.hard_negative_weight

    # ------------------------------------------------------------------ forward

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """The loss of one batch; `labels` is unused (as in sentence-transformers' ranking losses)."""
        features = list(sentence_features)
        self._check_columns(len(features))
        if self.mini_batch_size is None:
            return self.loss_from_embeddings(embed_columns(self.model, features))
        micro_batches = _micro_batches(features, self.mini_batch_size)
        if not torch.is_grad_enabled():  # evaluation: the embeddings, then the loss; nothing to cache
            parts = [self._encode_compared(micro_batch) for micro_batch in micro_batches]
            return self._loss_of_compared([torch.cat(column) for column in zip(*parts)])
        ddp = self.model if hasattr(self.model, "no_sync") else None
        encode = self._encode_compared
        if self.show_progress_bar:
            import tqdm

            bar = tqdm.tqdm(total=len(micro_batches), desc="Embed mini-batches")

            def encode(micro_batch: list[dict[str, Any]]) -> tuple[Tensor, ...]:
                bar.update(1)
                return self._encode_compared(micro_batch)

        # The cache holds what the loss compares (unit rows for cos_sim, normalized per mini-batch, where the
        # normalization's backward is one mini-batch's): the loss itself keeps no copy of the batch's embeddings.
        step = grad_cache_forward(micro_batches, encode, self._loss_of_compared, model=ddp)
        # What the trainer differentiates: the loss as a leaf whose gradient replays the mini-batches.
        loss = step.loss.clone().requires_grad_()
        loss.register_hook(step.replay)
        return loss

    def loss_from_embeddings(self, embeddings: Sequence[Tensor]) -> Tensor:
        """The loss of the columns' embeddings `[anchor, positive, *paraphrases, *hard negatives]`, each `[B, d]`."""
        self._check_columns(len(embeddings))
        return self._loss_of_compared([self._compared(e) for e in embeddings])

    def _compared(self, embeddings: Tensor) -> Tensor:
        """What the similarity compares by a dot product: unit rows for cos_sim, the embeddings for dot_score."""
        return F.normalize(embeddings, p=2, dim=-1) if self.normalize else embeddings

    def _loss_of_compared(self, embeddings: Sequence[Tensor]) -> Tensor:
        """The fused loss of the columns as the similarity compares them (`_compared`)."""
        anchor, positive, rest = embeddings[0], embeddings[1], list(embeddings[2:])
        n_para = self.n_paraphrase_columns
        paraphrases, negatives = _per_anchor(rest[:n_para]), _per_anchor(rest[n_para:])
        return self._loss()(anchor, positive, self.scale, paraphrase_features=paraphrases, negation_features=negatives)

    def _check_columns(self, n_columns: int) -> None:
        if n_columns < 2 + self.n_paraphrase_columns:
            raise ValueError(
                f"the batch has {n_columns} columns, but SemCLIPRankingLoss needs (anchor, positive) and "
                f"n_paraphrase_columns={self.n_paraphrase_columns} extra positives before any hard negative"
            )

    def _loss(self) -> SemCLIPLoss:
        """The fused loss for this process: over every rank's batch with `gather_across_devices`."""
        rank, world_size = 0, 1
        if self.gather_across_devices and dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        if (rank, world_size) not in self._losses:
            self._losses[rank, world_size] = SemCLIPLoss(
                local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size,
                distributed_mode=self.distributed_mode, **self._loss_options,
            )  # fmt: skip
        return self._losses[rank, world_size]

    def _encode_compared(self, micro_batch: list[dict[str, Any]]) -> tuple[Tensor, ...]:
        return tuple(self._compared(self.model(column)["sentence_embedding"]) for column in micro_batch)

    # ------------------------------------------------------------------ sentence-transformers conventions

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": similarity_fct_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "mini_batch_size": self.mini_batch_size,
            "n_paraphrase_columns": self.n_paraphrase_columns,
            "paraphrase_weight": self.paraphrase_weight,
            "hard_negative_weight": self.hard_negative_weight,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale


def _per_anchor(columns: list[Tensor]) -> Tensor | None:
    """Columns `[B, d]` as the loss's `[B, n, d]` (one column as itself, `[B, d]`: no copy)."""
    if not columns:
        return None
    return columns[0] if len(columns) == 1 else torch.stack(columns, dim=1)


def _is_int_at_least(value: object, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def _batch_size(features: dict[str, Any]) -> int:
    for key in ("input_ids", "attention_mask"):
        value = features.get(key)
        if isinstance(value, Tensor):
            return value.shape[0]
    return next(v.shape[0] for v in features.values() if isinstance(v, Tensor) and v.dim() > 0)


def _rows(features: dict[str, Any], begin: int, end: int, batch: int) -> dict[str, Any]:
    """Rows `begin:end` of one column's model inputs, the padding that no row of them uses cut off."""
    mask = features.get("attention_mask")
    width = None
    if isinstance(mask, Tensor) and mask.dim() == 2:
        used = mask[begin:end].bool().any(dim=0).nonzero()
        if used.numel():
            width = int(used.max()) + 1
    out = {}
    for key, value in features.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            value = value[begin:end]
            if width is not None and value.dim() >= 2 and value.shape[1] == mask.shape[1]:
                value = value[:, :width]
        out[key] = value
    return out


def _micro_batches(features: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Every column's rows split into micro-batches of `size` (the last one may be smaller)."""
    batch = _batch_size(features[0])
    for index, column in enumerate(features):
        if _batch_size(column) != batch:
            raise ValueError(f"column {index} has {_batch_size(column)} rows, column 0 has {batch}")
    return [[_rows(column, begin, min(begin + size, batch), batch) for column in features]
            for begin in range(0, batch, size)]  # fmt: skip
