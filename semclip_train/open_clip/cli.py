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
import sys
from collections.abc import Sequence

from semclip_kernels.backends import BACKENDS
from semclip_kernels.distributed import MODES as DISTRIBUTED_MODES
from semclip_kernels.integrations.open_clip import SemCLIPOptions

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
        name = register_model_config(ours.model_config)
        if not has_flag(rest, "--model"):
            rest += ["--model", name]
    if ours.semclip_grad_cache:
        from open_clip_train.params import parse_args

        check_grad_cache_args(parse_args(list(rest)))  # before any model or data is built
    import open_clip_train.main as trainer

    with patch_open_clip_train(options), patch_grad_cache(ours.semclip_grad_cache):
        return trainer.main(rest)


if __name__ == "__main__":
    sys.exit(main())
