"""`python -m semclip_train.open_clip`: open_clip's own trainer with SemCLIPLoss.

Every open_clip_train flag passes through unchanged (`python -m open_clip_train.main --help`);
the flags below are added. Without `--csv-paraphrase-key` / `--csv-negation-key` the run trains
open_clip's ClipLoss objective (SemCLIPLoss reduces to it exactly). See docs/open_clip.md.

    python -m semclip_train.open_clip --train-data triplets.csv --csv-separator , \\
        --csv-img-key filepath --csv-caption-key caption \\
        --csv-paraphrase-key paraphrase --csv-negation-key negation --paraphrases-per-image 2 \\
        --model ViT-B-32 --batch-size 256 --precision amp_bf16 --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from semclip_kernels.backends import BACKENDS
from semclip_kernels.distributed import MODES as DISTRIBUTED_MODES
from semclip_kernels.integrations.open_clip import SemCLIPOptions

from .data import is_csv_data
from .grad_cache import check_grad_cache_args, patch_grad_cache
from .patches import patch_open_clip_train, register_model_config

PROG = "python -m semclip_train.open_clip"


def build_parser() -> argparse.ArgumentParser:
    """The SemCLIP flags only; everything else is left for open_clip_train's own parser."""
    # allow_abbrev=False: an abbreviation must never swallow one of open_clip_train's flags.
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, add_help=False,
                                     description="open_clip_train with SemCLIPLoss. Every open_clip_train flag "
                                                 "is accepted and passed through; these are added:")
    parser.add_argument("--csv-paraphrase-key", default=None,
                        help="CSV column of paraphrases (several per row separated by ' || ').")
    parser.add_argument("--csv-negation-key", default=None,
                        help="CSV column of negated captions (several per row separated by ' || ').")
    parser.add_argument("--paraphrases-per-image", type=int, default=1,
                        help="Paraphrases per image in a batch (Pn); a row's paraphrases are cycled per epoch.")
    parser.add_argument("--negations-per-image", type=int, default=1,
                        help="Negations per image in a batch (Mn); a row's negations are cycled per epoch.")
    parser.add_argument("--paraphrase-weight", type=float, default=1.0, help="w >= 0 (docs/contract.md §1).")
    parser.add_argument("--hard-negative-weight", type=float, default=1.0, help="beta >= 0 (docs/contract.md §1).")
    parser.add_argument("--semclip-backend", default="auto", choices=BACKENDS, help="Loss backend.")
    parser.add_argument("--distributed-mode", default="gather", choices=DISTRIBUTED_MODES,
                        help="How the loss combines ranks: all-gather the columns or pass them in a ring.")
    parser.add_argument("--model-config", default=None, metavar="FILE",
                        help="Register a model config JSON with open_clip under its file name (without .json); "
                             "--model defaults to that name.")
    parser.add_argument("--semclip-grad-cache", action="store_true",
                        help="With --accum-freq N: the loss once per step, gradients equal to one big batch's "
                             "(gradient caching, docs/grad_cache.md).")
    return parser


def fail(message: str) -> NoReturn:
    """One line naming the flag and what to do, exit status 2 (argparse's), before any model or data is built."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_input_file(flag: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file (check the path; relative paths start from {os.getcwd()})")


def csv_records(path: str, separator: str) -> int:
    """Data rows of a CSV (records after the header line; quoted fields may span lines)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        return max(0, sum(1 for _ in csv.reader(handle, delimiter=separator)) - 1)


def check_trainer_args(args: argparse.Namespace) -> None:
    """open_clip_train's flags that would otherwise fail late (a missing CSV, an unknown --model) or not at all
    (a training CSV smaller than one batch trains 0 steps per epoch and still writes every epoch's checkpoint)."""
    import open_clip

    for flag, value in (("--batch-size", args.batch_size), ("--accum-freq", args.accum_freq)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if ":" not in args.model and args.model not in open_clip.list_models():
        raise ValueError(f"--model {args.model}: not an open_clip model (`python -c \"import open_clip; "
                         "print(open_clip.list_models())\"` lists them; --model-config FILE registers your own)")
    for flag, path in (("--train-data", args.train_data), ("--val-data", args.val_data)):
        if path and is_csv_data(path, args.dataset_type):
            check_input_file(flag, path)
    if not (args.train_data and is_csv_data(args.train_data, args.dataset_type)):
        return  # webdataset shards: open_clip_train counts samples through --train-num-samples
    rows = csv_records(args.train_data, args.csv_separator)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = math.ceil(rows / world_size)  # what DistributedSampler gives each rank
    steps = per_rank // args.batch_size // args.accum_freq  # training loaders drop the last partial batch
    if steps == 0:
        step = f"--batch-size {args.batch_size}" + (f" x --accum-freq {args.accum_freq}" if args.accum_freq > 1 else "")
        ranks = f" on each of {world_size} processes" if world_size > 1 else ""
        raise ValueError(f"--train-data {args.train_data} has {rows} row(s), fewer than one optimizer step "
                         f"({step}{ranks}): it would train 0 steps per epoch; lower --batch-size or add rows")


def has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def main(argv: Sequence[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if has_flag(argv, "-h") or has_flag(argv, "--help"):
        parser.print_help()
        print("\nopen_clip_train's flags:\n")
        from open_clip_train.params import parse_args

        parse_args(["--help"])  # prints and exits
    ours, rest = parser.parse_known_args(argv)
    try:
        options = SemCLIPOptions(
            paraphrase_key=ours.csv_paraphrase_key,
            negation_key=ours.csv_negation_key,
            paraphrases_per_image=ours.paraphrases_per_image,
            negations_per_image=ours.negations_per_image,
            paraphrase_weight=ours.paraphrase_weight,
            hard_negative_weight=ours.hard_negative_weight,
            backend=ours.semclip_backend,
            distributed_mode=ours.distributed_mode,
        )
        if ours.model_config is not None:
            check_input_file("--model-config", ours.model_config)
            name = register_model_config(ours.model_config)
            if not has_flag(rest, "--model"):
                rest += ["--model", name]
        from open_clip_train.params import parse_args

        trainer_args = parse_args(list(rest))
        if ours.semclip_grad_cache:
            check_grad_cache_args(trainer_args)
        check_trainer_args(trainer_args)
    except ValueError as error:  # every message names its flag
        fail(str(error))
    import open_clip_train.main as trainer

    with patch_open_clip_train(options), patch_grad_cache(ours.semclip_grad_cache):
        return trainer.main(rest)


if __name__ == "__main__":
    sys.exit(main())
