"""SemCLIP in open_clip models: the pieces a custom open_clip loop uses, and open_clip's loss factory.

Public pieces (docs/open_clip.md):

- `SemCLIPOptions`: the SemCLIP settings of an open_clip run (the flags `python -m semclip_train.open_clip` adds).
- `encode_text_groups` / `install_semclip_forward`: the model-output hook. It encodes captions,
  paraphrases and negations in ONE text-tower pass, ordered `[captions; paraphrases; negations]`
  (image-major), so the tower's `[K, d]` output already is the loss's column layout `[T; P; N]`,
  and returns `paraphrase_features` / `negation_features` as views of that one buffer.
- `create_loss`: open_clip's `create_loss(args)` returning `SemCLIPLoss` (or `SemSigLipLoss` with `--siglip`).

open_clip's own trainer with these (the CSV triplet dataset, the patches of `open_clip_train.main`, the
command line) is the application package `semclip_train.open_clip`, which depends on this module, never the
reverse.

Which hand-made monkeypatches work: `open_clip_train.main` imports `create_loss` by name, so only
`open_clip_train.main.create_loss = ...` (or `open_clip.factory.ClipLoss = SemCLIPLoss`, the global
that open_clip's `create_loss` reads) reaches the trainer; `open_clip.loss.ClipLoss = ...` does not.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any

import torch
from torch import nn

from ..backends import BACKENDS
from ..distributed import MODES as DISTRIBUTED_MODES
from ..loss import SemCLIPLoss
from ..sigmoid_loss import SemSigLipLoss
from ..triplets import text_views
from ..validation import check_weight

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SemCLIPOptions:
    """The SemCLIP settings of an open_clip run (the flags `python -m semclip_train.open_clip` adds)."""

    paraphrase_key: str | None = None  # --csv-paraphrase-key
    negation_key: str | None = None  # --csv-negation-key
    paraphrases_per_image: int = 1  # --paraphrases-per-image
    negations_per_image: int = 1  # --negations-per-image
    paraphrase_weight: float = 1.0  # --paraphrase-weight
    hard_negative_weight: float = 1.0  # --hard-negative-weight
    backend: str = "auto"  # --semclip-backend
    distributed_mode: str = "gather"  # --distributed-mode

    def __post_init__(self) -> None:
        for flag, count in (("--paraphrases-per-image", self.paraphrases_per_image),
                            ("--negations-per-image", self.negations_per_image)):
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{flag} must be an integer >= 0, got {count!r}")
        check_weight("--paraphrase-weight", self.paraphrase_weight)
        check_weight("--hard-negative-weight", self.hard_negative_weight)
        if self.backend not in BACKENDS:
            raise ValueError(f"--semclip-backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.distributed_mode not in DISTRIBUTED_MODES:
            raise ValueError(f"--distributed-mode must be one of {DISTRIBUTED_MODES}, got {self.distributed_mode!r}")

    @property
    def n_paraphrases(self) -> int:
        """`Pn` per image in a batch (0 without a paraphrase column)."""
        return self.paraphrases_per_image if self.paraphrase_key else 0

    @property
    def n_negations(self) -> int:
        """`Mn` per image in a batch (0 without a negation column)."""
        return self.negations_per_image if self.negation_key else 0

    @property
    def uses_extras(self) -> bool:
        return self.n_paraphrases + self.n_negations > 0


# ----------------------------------------------------------------------------------------------------------------
# Model-output hook: one text-tower pass, features as views of one buffer
# ----------------------------------------------------------------------------------------------------------------


def encode_text_groups(model: nn.Module, text: torch.Tensor, n_paraphrases: int,
                       normalize: bool = True) -> dict[str, torch.Tensor]:
    """Encode `text [B, 1 + Pn + Mn, L]` (per image: caption, paraphrases, negations) in one pass.

    Returns `text_features [B, d]`, and `paraphrase_features [B, Pn, d]` / `negation_features
    [B, Mn, d]` when present, all views of the tower's single output.
    """
    if text.dim() != 3:
        raise ValueError(f"text must be [B, 1 + Pn + Mn, L] token ids, got shape {tuple(text.shape)}")
    batch, groups, length = text.shape
    n_negations = groups - 1 - n_paraphrases
    if n_negations < 0:
        raise ValueError(f"text has {groups} texts per image, fewer than 1 + n_paraphrases = {1 + n_paraphrases}")
    # Reorder the (small, integer) tokens rather than the features: image-major within each kind,
    # so the output needs no permutation to be [T; P; N].
    tokens = torch.cat([text[:, 0], text[:, 1:1 + n_paraphrases].reshape(-1, length),
                        text[:, 1 + n_paraphrases:].reshape(-1, length)])
    features = model.encode_text(tokens, normalize=normalize)
    captions, paraphrases, negations = text_views(features, batch, n_paraphrases, n_negations)
    out = {"text_features": captions}  # the three are views of one buffer: the loss uses it in place
    if paraphrases is not None:
        out["paraphrase_features"] = paraphrases
    if negations is not None:
        out["negation_features"] = negations
    return out


def semclip_forward(model: nn.Module, image: torch.Tensor | None = None, text: torch.Tensor | None = None, *,
                    n_paraphrases: int) -> Any:
    """`CLIP.forward` that also accepts grouped text `[B, 1 + Pn + Mn, L]` and then returns a dict with
    `paraphrase_features` / `negation_features` (what `SemCLIPLoss` takes). `[B, L]` text goes to the
    model's own forward unchanged (validation, zero-shot)."""
    if text is None or text.dim() != 3:
        return type(model).forward(model, image, text)
    out: dict[str, Any] = {"image_features": model.encode_image(image, normalize=True) if image is not None else None}
    out.update(encode_text_groups(model, text, n_paraphrases))
    out["logit_scale"] = model.logit_scale.exp()
    if getattr(model, "logit_bias", None) is not None:
        out["logit_bias"] = model.logit_bias
    return out


def install_semclip_forward(model: nn.Module, n_paraphrases: int) -> nn.Module:
    """Make `model(image, text)` accept grouped text (see `semclip_forward`); returns the model.

    The forward is replaced on this instance only (parameters and state_dict keys are untouched,
    so checkpoints stay plain open_clip checkpoints); DDP and torch.compile call it as usual.
    """
    for name in ("encode_image", "encode_text", "logit_scale"):
        if not hasattr(model, name):
            raise TypeError(f"model must be an open_clip CLIP-like model with {name}; got {type(model).__name__}")
    model.forward = functools.partial(semclip_forward, model, n_paraphrases=n_paraphrases)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Loss factory
# ----------------------------------------------------------------------------------------------------------------


def create_loss(args: Any, options: SemCLIPOptions | None = None) -> SemCLIPLoss | SemSigLipLoss:
    """open_clip's `create_loss(args)` for the CLIP objective (`SemCLIPLoss`) and, with `--siglip`, the
    SigLIP objective (`SemSigLipLoss`, docs/siglip.md).

    Raises for the objectives SemCLIP does not replace (CoCa, distillation) instead of silently training
    something else.
    """
    options = options or SemCLIPOptions()
    if getattr(args, "siglip", False) and not getattr(args, "distill", False):
        logger.info("SemCLIP sigmoid loss (--siglip): %s", json.dumps(dataclasses.asdict(options)))
        return SemSigLipLoss(
            cache_labels=True,
            rank=args.rank,
            world_size=args.world_size,
            paraphrase_weight=options.paraphrase_weight,
            hard_negative_weight=options.hard_negative_weight,
            backend=options.backend,
            distributed_mode=options.distributed_mode,
        )
    for flag, active in (("--distill-model", getattr(args, "distill", False)),
                         ("--model (CoCa)", "coca" in str(getattr(args, "model", "")).lower())):
        if active:
            raise ValueError(f"{flag}: SemCLIPLoss replaces open_clip's ClipLoss only; "
                             "use python -m open_clip_train.main for this objective")
    logger.info("SemCLIP loss: %s", json.dumps(dataclasses.asdict(options)))
    return SemCLIPLoss(
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=getattr(args, "horovod", False),
        paraphrase_weight=options.paraphrase_weight,
        hard_negative_weight=options.hard_negative_weight,
        backend=options.backend,
        distributed_mode=options.distributed_mode,
    )


# Names that moved to the application package (the library never imports it). ImportError, not AttributeError:
# `from ... import name` replaces an AttributeError by a generic message, and the point is to name the new home.
MOVED_TO_APPLICATION = {
    "read_csv_triplets": "semclip_train.open_clip.data",
    "CsvTripletTokens": "semclip_train.open_clip.data",
    "get_csv_triplet_data": "semclip_train.open_clip.data",
    "get_data": "semclip_train.open_clip.data",
    "CpuFriendlyDDP": "semclip_train.open_clip.patches",
    "register_model_config": "semclip_train.open_clip.patches",
    "patch_open_clip_train": "semclip_train.open_clip.patches",
}


def __getattr__(name: str) -> Any:
    if name in MOVED_TO_APPLICATION:
        raise ImportError(f"{__name__}.{name} moved to {MOVED_TO_APPLICATION[name]}.{name} "
                             "(the open_clip trainer application, docs/open_clip.md)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
