"""Train SemCLIP and CLIP briefly on the synthetic data and print their evaluation side by side.

    python -m training.demo                 # default budget: a few minutes on 2 CPU cores
    python -m training.demo --steps 100     # a quicker (less trained) look
    python -m training.demo --towers pretrained   # pretrained towers, three objectives (training/pretrained_demo.py)

Both runs use the same tiny open_clip model, seed, data, batch size and number of steps;
CLIP sees only the captions, SemCLIP also each image's paraphrase (extra positive) and a
negated caption (hard negative). Writes OUT/semclip/, OUT/clip/ (each a full training run:
metrics.jsonl, metrics.json, checkpoint.pt, curves.png), OUT/comparison.png and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from semclip_kernels import BACKENDS

from .arguments import check_positive, fail
from .atomic_files import atomic_write_text
from .config import TrainConfig
from .evaluate import format_table
from .plots import plot_runs
from .train import train

HEADLINE = ["negation_accuracy", "paraphrase_r1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    towers = argparse.ArgumentParser(add_help=False)
    towers.add_argument("--towers", choices=("tiny", "pretrained"), default="tiny")
    known, rest = towers.parse_known_args(argv)
    if known.towers == "pretrained":  # pretrained EfficientNet-Lite0 + MiniLM: training/pretrained_demo.py
        from .pretrained_demo import main as pretrained_main

        return pretrained_main(rest)
    argv = rest
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", choices=("tiny", "pretrained"), default="tiny",
                        help="tiny: the open_clip model below; pretrained: see training/pretrained_demo.py")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    parser.add_argument("--val-size", type=int, default=defaults.val_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--absence-prob", type=float, default=defaults.absence_prob,
                        help="share of captions with a true 'and no <object>' clause")
    parser.add_argument("--partial-prob", type=float, default=defaults.partial_prob,
                        help="share of training captions that leave one object out")
    parser.add_argument("--backend", default=defaults.backend, choices=BACKENDS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "train_size", "val_size"):
        check_positive(parser, "--" + name.replace("_", "-"), getattr(args, name))
    if args.train_size < args.batch_size:
        fail(parser, f"--train-size {args.train_size} is smaller than one batch (--batch-size {args.batch_size}): "
                     "raise --train-size or lower --batch-size")
    if args.threads < 0:
        fail(parser, f"--threads must be >= 0 (0: torch's default), got {args.threads}")

    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for loss in ("semclip", "clip"):
        config = TrainConfig(out=os.path.join(args.out, loss), loss=loss, steps=args.steps,
                             batch_size=args.batch_size, train_size=args.train_size, val_size=args.val_size,
                             seed=args.seed, absence_prob=args.absence_prob, partial_prob=args.partial_prob,
                             backend=args.backend, threads=args.threads, progress=args.progress,
                             eval_every=max(1, args.steps // 5), checkpoint_every=args.steps)
        print(f"== training {loss.upper()} ({args.steps} steps of {args.batch_size} on synthetic scenes)",
              flush=True)
        start = time.perf_counter()
        results[loss] = train(config)
        seconds[loss] = time.perf_counter() - start

    columns = {"SemCLIP": results["semclip"], "CLIP": results["clip"]}
    keys = HEADLINE + sorted(k for k in results["semclip"] if k.startswith("negation_accuracy/"))
    print()
    print(format_table(columns, keys))
    gap = 100 * (results["semclip"]["negation_accuracy"] - results["clip"]["negation_accuracy"])
    print(f"\nnegation accuracy: SemCLIP {gap:+.1f} points over CLIP; "
          f"i2t R@1 {100 * (results['semclip']['i2t_r1'] - results['clip']['i2t_r1']):+.1f}, "
          f"t2i R@1 {100 * (results['semclip']['t2i_r1'] - results['clip']['t2i_r1']):+.1f} "
          f"(training time: SemCLIP {seconds['semclip']:.0f} s, CLIP {seconds['clip']:.0f} s)")

    plot_runs({loss: os.path.join(args.out, loss, "metrics.jsonl") for loss in results},
              os.path.join(args.out, "comparison.png"))
    atomic_write_text(json.dumps({"metrics": results, "train_seconds": seconds, "args": vars(args)}, indent=2)
                      + "\n", os.path.join(args.out, "results.json"))
    print(f"curves: {os.path.join(args.out, 'comparison.png')}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
