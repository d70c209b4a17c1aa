"""Evaluation: negation accuracy, paraphrase R@1 and image<->text retrieval.

    python -m training.evaluate --checkpoint OUT/checkpoint.pt            # the run's own validation data
    python -m training.evaluate --checkpoint OUT/checkpoint.pt --data csv --csv val.csv

Metrics (all in [0, 1], higher is better), on L2-normalised features:
- negation_accuracy: fraction of (image, negation) pairs where the image is closer to its
  caption than to that negation (the CC-Neg "original over negation" metric).
- paraphrase_r1: image->text R@1 when every image's paraphrase stands in for its caption
  (averaged over paraphrase rounds when images have several).
- i2t_r1/i2t_r5, t2i_r1/t2i_r5: retrieval among the split's captions / images.
A candidate ranks ahead of the right answer only with a strictly higher score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import Dataset

from .arguments import check_input_file, check_positive, fail
from .checkpoint import load_checkpoint
from .config import TrainConfig, build_datasets, build_model_for
from .model import checkpoint_loaded_next


def recall_at_k(scores: torch.Tensor, k: int) -> float:
    """R@k for a square score matrix whose right answers are on the diagonal (row = query)."""
    correct = scores.diagonal()[:, None]
    rank = (scores > correct).sum(dim=1)  # candidates strictly better than the right one
    return (rank < k).double().mean().item()


def negation_accuracy(
    image: torch.Tensor, caption: torch.Tensor, negation: torch.Tensor, owner: torch.Tensor
) -> torch.Tensor:
    """Per-negation correctness: `<I_o, T_o> > <I_o, N>` for each negation `N` of image `o = owner[n]`."""
    positive = (image[owner] * caption[owner]).sum(-1)
    negative = (image[owner] * negation).sum(-1)
    return positive > negative


def paraphrase_recall_at_1(image: torch.Tensor, paraphrases: list[torch.Tensor]) -> float:
    """Mean over rounds r of image->text R@1 against every image's paraphrase r ([N, d] each)."""
    return sum(recall_at_k(image @ round_.T, 1) for round_ in paraphrases) / len(paraphrases)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, texts: list[str], batch_size: int, autocast) -> torch.Tensor:
    chunks = []
    for start in range(0, len(texts), batch_size):
        with autocast():
            chunks.append(model.encode_text(tokenizer(texts[start : start + batch_size]), normalize=True).float())
    return torch.cat(chunks)


@torch.no_grad()
def evaluate(
    model: nn.Module, tokenizer, dataset: Dataset, batch_size: int = 256, precision: str = "fp32"
) -> dict[str, float]:
    """All metrics of the module docstring on `dataset` (items `(image, caption, [paraphrases], [negations])`)."""
    was_training = model.training
    model.eval()

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    captions, paraphrases, negations = [], [], []
    image_features = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        with autocast():
            batch = torch.stack([item[0] for item in items])
            image_features.append(model.encode_image(batch, normalize=True).float())
        for _, caption, paraphrase_list, negation_list in items:
            captions.append(caption)
            paraphrases.append(paraphrase_list)
            negations.append(negation_list)
    image = torch.cat(image_features)
    caption = encode_texts(model, tokenizer, captions, batch_size, autocast)

    n_rounds = max(len(p) for p in paraphrases)
    para_texts = [p[r % len(p)] for r in range(n_rounds) for p in paraphrases]
    para_flat = encode_texts(model, tokenizer, para_texts, batch_size, autocast)
    para_rounds = list(para_flat.view(n_rounds, len(dataset), -1))

    owner = torch.tensor([i for i, negs in enumerate(negations) for _ in negs], dtype=torch.long)
    negation = encode_texts(model, tokenizer, [n for negs in negations for n in negs], batch_size, autocast)
    neg_correct = negation_accuracy(image, caption, negation, owner)

    scores = image @ caption.T
    metrics = {
        "negation_accuracy": neg_correct.double().mean().item(),
        "paraphrase_r1": paraphrase_recall_at_1(image, para_rounds),
        "i2t_r1": recall_at_k(scores, 1),
        "i2t_r5": recall_at_k(scores, 5),
        "t2i_r1": recall_at_k(scores.T, 1),
        "t2i_r5": recall_at_k(scores.T, 5),
    }
    negation_types = getattr(dataset, "negation_types", None)
    if negation_types is not None:
        by_type: dict[str, list[bool]] = defaultdict(list)
        flat_types = [kind for kinds in negation_types for kind in kinds]
        for kind, correct in zip(flat_types, neg_correct.tolist(), strict=True):
            by_type[kind].append(correct)
        for kind in sorted(by_type):
            metrics[f"negation_accuracy/{kind}"] = sum(by_type[kind]) / len(by_type[kind])
    model.train(was_training)
    return metrics


def format_table(columns: dict[str, dict[str, float]], keys: list[str] | None = None) -> str:
    """A plain-text table: one row per metric (in %), one column per run."""
    names = list(columns)
    keys = keys or list(next(iter(columns.values())))
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>10}" for n in names)]
    for key in keys:
        cells = [columns[n].get(key) for n in names]
        lines.append(f"{key:<{width}}  " + "  ".join(f"{100 * c:>10.1f}" if c is not None else f"{'-':>10}"
                                                     for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by training.train")
    parser.add_argument("--data", choices=("synthetic", "csv"), default=None, help="default: the run's own")
    parser.add_argument("--csv", default=None, help="triplet CSV to evaluate on (with --data csv)")
    parser.add_argument("--bad-rows", choices=("skip", "error"), default="skip")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output", default=None, help="write the metrics to this JSON file")
    args = parser.parse_args(argv)
    check_positive(parser, "--batch-size", args.batch_size)
    check_input_file(parser, "--checkpoint", args.checkpoint, what="checkpoint")
    if args.csv is not None:
        check_input_file(parser, "--csv", args.csv)
    try:
        state = load_checkpoint(args.checkpoint)
        config = TrainConfig(**state["config"])
        weights = state["model"]
    except Exception as error:  # torch.load raises many types for a file that is not a checkpoint
        fail(parser, f"--checkpoint {args.checkpoint}: not a checkpoint written by training.train "
                     f"({type(error).__name__}: {str(error)[:120]})")
    if args.data is not None:
        config.data = args.data
    if args.csv is not None:
        config.val_csv = args.csv
    if config.data == "csv":
        if config.val_csv is None and config.csv is None:
            fail(parser, "--data csv needs --csv FILE (the triplets to evaluate on)")
        recorded = config.val_csv or config.csv
        if args.csv is None and not os.path.isfile(recorded):
            fail(parser, f"the run's validation CSV {recorded} is gone: pass --csv FILE")
    with checkpoint_loaded_next():
        bundle = build_model_for(config)
    bundle.model.load_state_dict(weights)
    print(f"{args.checkpoint}: step {state.get('step', '?')} of a --loss {config.loss} run, model {config.model}",
          file=sys.stderr)
    _, val_set = build_datasets(config, bundle, need_train=False, bad_rows=args.bad_rows)
    metrics = evaluate(bundle.model, bundle.tokenizer, val_set, args.batch_size, config.precision)
    print(format_table({config.loss: metrics}))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
