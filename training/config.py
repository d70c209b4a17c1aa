"""What a training run is made of: its configuration and the model and datasets built from it.

`training.train` (which trains) and `training.evaluate` (which re-evaluates a checkpoint) both
build a model and datasets from a `TrainConfig`; both import them from here, so neither imports
the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch.utils.data import Dataset

from .model import TINY_MODEL_NAME, ModelBundle, build_model


@dataclass
class TrainConfig:
    out: str = "runs/semclip"
    # data
    data: str = "synthetic"  # synthetic | csv
    csv: str | None = None  # training triplets (--data csv)
    val_csv: str | None = None  # validation triplets (--data csv); default: evaluate on --csv
    bad_rows: str = "skip"  # skip | error
    train_size: int = 12000  # synthetic scenes in the training split
    val_size: int = 1000  # synthetic scenes in the validation split
    paraphrases_per_image: int = 1  # Pn used by the loss per step
    negations_per_image: int = 1  # Mn used by the loss per step (cycled through each item's negations)
    synthetic_negations: int = 3  # negations generated per synthetic scene (all are evaluated)
    absence_prob: float = 0.6  # share of synthetic captions with a true "and no <object>" clause (see synthetic.py)
    partial_prob: float = 0.0  # share of synthetic training captions that leave one object out
    # model
    model: str = TINY_MODEL_NAME
    pretrained: str | None = None
    model_config: str | None = None  # JSON model config registered under --model
    # loss
    loss: str = "semclip"  # semclip | clip | paper (the authors' released objective, training/paper_loss.py)
    paraphrase_weight: float = 1.0
    hard_negative_weight: float = 1.0
    backend: str = "auto"
    # optimisation
    steps: int = 500
    batch_size: int = 128  # global batch (split across ranks)
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 50
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    seed: int = 0
    threads: int = 0  # torch threads; 0 keeps torch's default
    # bookkeeping
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    progress: bool = True


# Settings that may change between the launches of one run (`--resume`): where it writes, which backend
# computes the same loss, threads, and how often it logs, evaluates and checkpoints. Every other setting
# shapes the run (data, model, objective, optimisation, schedule, seed): `--resume` refuses a checkpoint
# trained with other values (training/train.py, `check_resume_settings`); a new field is checked by default.
RESUMABLE_CHANGES = ("out", "backend", "threads", "log_every", "eval_every", "checkpoint_every", "progress")


def run_shaping_settings() -> tuple[str, ...]:
    """The `TrainConfig` fields that a resumed run must share with its checkpoint."""
    return tuple(f.name for f in fields(TrainConfig) if f.name not in RESUMABLE_CHANGES)


def build_model_for(config: TrainConfig) -> ModelBundle:
    return build_model(config.model, config.pretrained, config.model_config)


def build_datasets(
    config: TrainConfig, bundle: ModelBundle, need_train: bool = True, bad_rows: str | None = None
) -> tuple[Dataset | None, Dataset]:
    """(train dataset or None, validation dataset) for the config's data source."""
    bad_rows = bad_rows or config.bad_rows
    if config.data == "synthetic":
        from .synthetic import SyntheticTriplets

        common = dict(seed=config.seed, image_size=bundle.image_size, n_paraphrases=config.paraphrases_per_image,
                      n_negations=config.synthetic_negations, val_size=config.val_size,
                      absence_prob=config.absence_prob, partial_prob=config.partial_prob)
        val_set = SyntheticTriplets("val", size=config.val_size, **common)
        train_set = SyntheticTriplets("train", size=config.train_size, **common) if need_train else None
        return train_set, val_set
    if config.data == "csv":
        from .csv_data import CsvTriplets

        if config.csv is None and config.val_csv is None:
            raise ValueError("--data csv needs --csv (and optionally --val-csv)")
        train_set = CsvTriplets(config.csv, bundle.preprocess_train, bad_rows) if need_train and config.csv else None
        if need_train and train_set is None:
            raise ValueError("--data csv needs --csv for training")
        val_set = CsvTriplets(config.val_csv or config.csv, bundle.preprocess_val, bad_rows)
        return train_set, val_set
    raise ValueError(f"unknown --data {config.data!r}")
