"""SemCLIP inside open_clip's own trainer (`open_clip_train`), and the pieces for custom open_clip loops.

Public pieces (docs/open_clip.md):

- `SemCLIPOptions`: the SemCLIP flags of `python -m semclip_kernels.open_clip_train`.
- `read_csv_triplets` / `CsvTripletTokens` / `get_csv_triplet_data`: a CSV dataset whose items are
  `(image, tokens [1 + Pn + Mn, L])`: the caption, `Pn` paraphrases and `Mn` negations of one image
  (several per cell separated by ` || `, docs/contract.md §6; cycled per epoch when a row has more).
- `encode_text_groups` / `install_semclip_forward`: the model-output hook. It encodes captions,
  paraphrases and negations in ONE text-tower pass, ordered `[captions; paraphrases; negations]`
  (image-major), so the tower's `[K, d]` output already is the loss's column layout `[T; P; N]`,
  and returns `paraphrase_features` / `negation_features` as views of that one buffer.
- `create_loss`: open_clip's `create_loss(args)` returning `SemCLIPLoss`.
- `CpuFriendlyDDP`: `DistributedDataParallel` that drops `device_ids` for CPU modules (open_clip_train
  passes `device_ids=[cpu]`, which DDP rejects, so Gloo on CPU fails before the loss exists).
- `patch_open_clip_train`: installs all of the above into `open_clip_train.main` for one run.

Which hand-made monkeypatches work: `open_clip_train.main` imports `create_loss` by name, so only
`open_clip_train.main.create_loss = ...` (or `open_clip.factory.ClipLoss = SemCLIPLoss`, the global
that open_clip's `create_loss` reads) reaches the trainer; `open_clip.loss.ClipLoss = ...` does not.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ..backends import BACKENDS
from ..distributed import MODES as DISTRIBUTED_MODES
from ..loss import SemCLIPLoss
from ..triplets import MissingColumnsError, TripletColumns, TripletRow, batch_texts, read_triplet_csv, text_views
from ..validation import check_weight

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SemCLIPOptions:
    """What `python -m semclip_kernels.open_clip_train` adds to open_clip_train's flags."""

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
# Data: CSV rows -> (image, tokens [1 + Pn + Mn, L])
# ----------------------------------------------------------------------------------------------------------------


def read_csv_triplets(
    path: str,
    img_key: str,
    caption_key: str,
    paraphrase_key: str | None,
    negation_key: str | None,
    sep: str = "\t",
) -> list[TripletRow]:
    """Read an open_clip-style CSV with extra paraphrase/negation columns (`semclip_kernels.triplets`).

    Columns are chosen by the open_clip flags (`--csv-img-key`, `--csv-caption-key`, `--csv-separator`) plus
    ours; a key of None leaves that column unread. Every row that cannot be used is reported with the file and
    line, all at once, before training starts (`BadRowsError`); a missing column names its flag.
    """
    if len(sep) != 1:
        raise ValueError(f"--csv-separator must be one character for a SemCLIP CSV, got {sep!r}")
    columns = TripletColumns(img_key, caption_key, paraphrase_key, negation_key)
    try:
        return read_triplet_csv(path, columns, delimiter=sep, bad_rows="error")
    except MissingColumnsError as error:
        flags = {"filepath": "--csv-img-key", "caption": "--csv-caption-key", "paraphrase": "--csv-paraphrase-key",
                 "negation": "--csv-negation-key"}
        raise ValueError(f"{error} (see {', '.join(flags[role] for role in error.missing)})") from error


class CsvTripletTokens(Dataset):
    """Items `(image [3, H, W], tokens [1 + Pn + Mn, L])`: caption, paraphrases, negations of one image.

    Args:
        rows: from `read_csv_triplets` (or `semclip_kernels.triplets.read_triplet_csv`).
        transform: open_clip's image transform (applied to the PIL image as open_clip's CsvDataset does).
        tokenizer: open_clip's tokenizer (`open_clip.get_tokenizer(model)`).
        n_paraphrases, n_negations: texts per image of each kind in a batch (`Pn`, `Mn`).
        epoch: anything with `get_value() -> int` (open_clip_train's `SharedEpoch`, which reaches
            DataLoader workers) or None for epoch 0; it picks which texts a row shows (`pick`).
    """

    def __init__(
        self,
        rows: Sequence[TripletRow],
        transform: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        n_paraphrases: int,
        n_negations: int,
        epoch: Any = None,
    ) -> None:
        self.rows = list(rows)
        self.transform = transform
        self.tokenizer = tokenizer
        self.n_paraphrases = n_paraphrases
        self.n_negations = n_negations
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, index: int, epoch: int) -> list[str]:
        """`[caption, paraphrases…, negations…]` of row `index` in epoch `epoch`."""
        row = self.rows[index]
        return batch_texts([row.caption], [row.paraphrases], [row.negations], self.n_paraphrases, self.n_negations,
                           epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        epoch = 0 if self.epoch is None else int(self.epoch.get_value())
        with Image.open(self.rows[index].image_path) as image:
            pixels = self.transform(image)
        return pixels, self.tokenizer(self.texts(index, epoch))


def get_csv_triplet_data(args: Any, preprocess_fn: Callable, is_train: bool, epoch: int = 0,
                         tokenizer: Callable | None = None, *, options: SemCLIPOptions) -> Any:
    """open_clip_train's `get_csv_dataset` for a SemCLIP CSV: the same sampler, loader and DataInfo."""
    from open_clip_train.data import DataInfo, SharedEpoch
    from torch.utils.data.distributed import DistributedSampler

    path = args.train_data if is_train else args.val_data
    # A column whose count per image is 0 is not read at all (its cells may then be empty).
    rows = read_csv_triplets(path, args.csv_img_key, args.csv_caption_key,
                             options.paraphrase_key if options.n_paraphrases else None,
                             options.negation_key if options.n_negations else None, args.csv_separator)
    shared_epoch = SharedEpoch(epoch=epoch)
    dataset = CsvTripletTokens(rows, preprocess_fn, tokenizer, options.n_paraphrases, options.n_negations,
                               shared_epoch)
    sampler = DistributedSampler(dataset) if args.distributed and is_train else None
    dataloader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=is_train and sampler is None,
        num_workers=args.workers,
        pin_memory=torch.cuda.is_available(),
        sampler=sampler,
        drop_last=is_train,
    )
    dataloader.num_samples = len(dataset)
    dataloader.num_batches = len(dataloader)
    return DataInfo(dataloader, sampler, shared_epoch)


def get_data(args: Any, preprocess_fns: tuple, epoch: int = 0, tokenizer: Callable | None = None, *,
             options: SemCLIPOptions, fallback: Callable) -> dict[str, Any]:
    """open_clip_train's `get_data` with the training set read as a SemCLIP CSV.

    Validation and ImageNet sets stay open_clip's own (captions only): the hook leaves `[B, L]`
    tokens to the model's own forward, so open_clip's evaluation runs unchanged.
    """
    if not options.uses_extras:
        return fallback(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    if not args.train_data:
        raise ValueError("--csv-paraphrase-key / --csv-negation-key need --train-data (a CSV file)")
    is_csv = args.dataset_type == "csv" or (
        args.dataset_type == "auto" and args.train_data.rsplit(".", 1)[-1] in ("csv", "tsv"))
    if not is_csv:
        raise ValueError(f"--csv-paraphrase-key / --csv-negation-key need a CSV --train-data "
                         f"(--dataset-type csv), got {args.train_data!r} with --dataset-type {args.dataset_type}")
    others = copy.copy(args)
    others.train_data = None  # open_clip builds everything but the training set
    data = fallback(others, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    data["train"] = get_csv_triplet_data(args, preprocess_fns[0], True, epoch, tokenizer, options=options)
    return data


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
# Loss factory, DDP on CPU, and the patch of open_clip_train
# ----------------------------------------------------------------------------------------------------------------


def create_loss(args: Any, options: SemCLIPOptions | None = None) -> SemCLIPLoss:
    """open_clip's `create_loss(args)` for the CLIP objective, returning `SemCLIPLoss`.

    Raises for the objectives SemCLIP does not replace (SigLIP, CoCa, distillation) instead of
    silently training something else.
    """
    options = options or SemCLIPOptions()
    for flag, active in (("--siglip", getattr(args, "siglip", False)),
                         ("--distill-model", getattr(args, "distill", False)),
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


class CpuFriendlyDDP(DistributedDataParallel):
    """DistributedDataParallel that accepts `device_ids=[cpu]` (as open_clip_train passes it) by
    dropping it: DDP wants `device_ids=None` for CPU modules and raises otherwise."""

    def __init__(self, module: nn.Module, device_ids: Sequence[Any] | None = None, *args: Any, **kwargs: Any) -> None:
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def register_model_config(path: str) -> str:
    """Register a model config JSON with open_clip; returns its model name (the file's stem)."""
    import open_clip

    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"--model-config {path}: not an open_clip model config (lacks {', '.join(missing)})")
    open_clip.add_model_config(path)
    return os.path.splitext(os.path.basename(path))[0]


@contextlib.contextmanager
def patch_open_clip_train(options: SemCLIPOptions) -> Iterator[None]:
    """Within the block, `open_clip_train.main.main(argv)` trains with SemCLIPLoss (always), the
    SemCLIP CSV and grouped-text forward (when `options.uses_extras`), and DDP works on CPU."""
    import open_clip_train.main as trainer

    saved = {name: getattr(trainer, name) for name in ("create_loss", "get_data", "create_model_and_transforms")}
    saved_ddp = torch.nn.parallel.DistributedDataParallel

    def create_model_and_transforms(*args: Any, **kwargs: Any) -> Any:
        model, *transforms = saved["create_model_and_transforms"](*args, **kwargs)
        if options.uses_extras:
            install_semclip_forward(model, options.n_paraphrases)
        return (model, *transforms)

    trainer.create_loss = functools.partial(create_loss, options=options)
    trainer.get_data = functools.partial(get_data, options=options, fallback=saved["get_data"])
    trainer.create_model_and_transforms = create_model_and_transforms
    # open_clip_train/main.py reads torch.nn.parallel.DistributedDataParallel at call time.
    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)
        torch.nn.parallel.DistributedDataParallel = saved_ddp
