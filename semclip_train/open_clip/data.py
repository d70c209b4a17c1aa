"""The SemCLIP CSV in open_clip's trainer: CSV rows -> `(image, tokens [1 + Pn + Mn, L])`.

- `read_csv_triplets` / `CsvTripletTokens` / `get_csv_triplet_data`: a CSV dataset whose items are
  `(image, tokens [1 + Pn + Mn, L])`: the caption, `Pn` paraphrases and `Mn` negations of one image
  (several per cell separated by ` || `, docs/contract.md §6; cycled per epoch when a row has more).
- `get_data`: open_clip_train's `get_data` with the training set read as a SemCLIP CSV.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from semclip_kernels.integrations.open_clip import SemCLIPOptions
from semclip_kernels.triplets import MissingColumnsError, TripletColumns, TripletRow, batch_texts, read_triplet_csv


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


def is_csv_data(path: str, dataset_type: str) -> bool:
    """Whether open_clip_train reads `path` as a CSV (`--dataset-type csv`, or `auto` and a .csv/.tsv name)."""
    return dataset_type == "csv" or (dataset_type == "auto" and path.rsplit(".", 1)[-1] in ("csv", "tsv"))


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
    if not is_csv_data(args.train_data, args.dataset_type):
        raise ValueError(f"--csv-paraphrase-key / --csv-negation-key need a CSV --train-data "
                         f"(--dataset-type csv), got {args.train_data!r} with --dataset-type {args.dataset_type}")
    others = copy.copy(args)
    others.train_data = None  # open_clip builds everything but the training set
    data = fallback(others, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    data["train"] = get_csv_triplet_data(args, preprocess_fns[0], True, epoch, tokenizer, options=options)
    return data
