"""Train SemCLIP and CLIP briefly on the synthetic data and print their evaluation side by side.

    python -m training.demo                 # default budget: about 3 minutes on 2 idle CPU cores
    python -m training.demo --steps 1500    # a longer budget (about 3x the time)
    python -m training.demo --steps 100     # a quicker (less trained) look
    python -m training.demo --towers pretrained   # pretrained towers, three objectives (training/pretrained_demo.py)

Both runs use the same tiny open_clip model, seed, data, batch size and number of steps;
CLIP sees only the captions, SemCLIP also each image's paraphrase (extra positive) and a
negated caption (hard negative).

The two runs train side by side, each in its own process on one thread (`--jobs`, `--threads`): the
tiny model's operations are too small to gain from splitting across threads, and an operation split
across threads waits for its slowest thread, so on a busy machine (another process holding a core)
two-threaded training ran 5-15x slower than one-threaded. One thread per run also makes the printed
table the same whatever the machine's load. Writes OUT/semclip/, OUT/clip/ (each a full training run:
metrics.jsonl, metrics.json, checkpoint.pt, curves.png), OUT/comparison.png and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

from tqdm import tqdm

from semclip_kernels import BACKENDS

from .arguments import check_positive, fail
from .atomic_files import atomic_write_text
from .config import TrainConfig
from .evaluate import format_table
from .plots import plot_runs
from .train import train

HEADLINE = ["negation_accuracy", "paraphrase_r1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"]
LOSSES = ("semclip", "clip")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def train_timed(config: TrainConfig) -> tuple[dict, float]:
    """`train(config)` and its wall time in seconds (a top-level function: worker processes import it)."""
    start = time.perf_counter()
    metrics = train(config)
    return metrics, time.perf_counter() - start


def last_logged_step(metrics_path: str) -> int:
    """The step of the last complete train record in a run's metrics.jsonl (0 before the first)."""
    try:
        with open(metrics_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if record.get("kind") == "train":
            return int(record["step"])
    return 0


def train_side_by_side(configs: dict[str, TrainConfig], progress: bool) -> dict[str, tuple[dict, float]]:
    """Train every config at once, each in its own process; one progress bar over all of them."""
    for config in configs.values():  # a fresh run deletes its old log anyway; the bar must not read it first
        stale = os.path.join(config.out, "metrics.jsonl")
        if os.path.exists(stale):
            os.unlink(stale)
    # spawn, not fork: a forked child would inherit torch's thread pools in whatever state they are in.
    with multiprocessing.get_context("spawn").Pool(len(configs)) as pool:
        pending = {loss: pool.apply_async(train_timed, (config,)) for loss, config in configs.items()}
        total = sum(config.steps for config in configs.values())
        bar = tqdm(total=total, desc=" + ".join(configs), unit="step", dynamic_ncols=True, file=sys.stdout,
                   disable=not progress)
        while not all(result.ready() for result in pending.values()):
            for result in pending.values():
                result.wait(timeout=1.0 / len(pending))
                if result.ready() and not result.successful():
                    result.get()  # raises the worker's exception; leaving `with` terminates the other run
            bar.update(sum(last_logged_step(os.path.join(c.out, "metrics.jsonl")) for c in configs.values())
                       - bar.n)
        bar.update(total - bar.n)
        bar.close()
        pool.close()
        pool.join()
        return {loss: result.get() for loss, result in pending.items()}


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
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1, which also fixes the printed numbers; 0: torch's "
                             "default)")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                        help="runs trained at once, each in its own process (default: 2 where this process may use "
                             "2 or more cores, else 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "train_size", "val_size"):
        check_positive(parser, "--" + name.replace("_", "-"), getattr(args, name))
    if args.train_size < args.batch_size:
        fail(parser, f"--train-size {args.train_size} is smaller than one batch (--batch-size {args.batch_size}): "
                     "raise --train-size or lower --batch-size")
    if args.threads < 0:
        fail(parser, f"--threads must be 0 (torch's default) or more, got {args.threads}")
    jobs = args.jobs if args.jobs is not None else min(2, available_cores())

    configs = {loss: TrainConfig(out=os.path.join(args.out, loss), loss=loss, steps=args.steps,
                                 batch_size=args.batch_size, train_size=args.train_size, val_size=args.val_size,
                                 seed=args.seed, absence_prob=args.absence_prob, partial_prob=args.partial_prob,
                                 backend=args.backend, threads=args.threads, progress=args.progress and jobs == 1,
                                 eval_every=max(1, args.steps // 5), checkpoint_every=args.steps)
               for loss in LOSSES}
    print(f"== training SemCLIP and CLIP ({args.steps} steps of {args.batch_size} on synthetic scenes; "
          f"{'side by side' if jobs > 1 else 'one after the other'}, {args.threads or 'default'} thread(s) each)",
          flush=True)
    start = time.perf_counter()
    if jobs > 1:
        timed = train_side_by_side(configs, args.progress)
    else:
        timed = {loss: train_timed(config) for loss, config in configs.items()}
    wall = time.perf_counter() - start
    results = {loss: metrics for loss, (metrics, _) in timed.items()}
    seconds = {loss: took for loss, (_, took) in timed.items()}

    columns = {"SemCLIP": results["semclip"], "CLIP": results["clip"]}
    keys = HEADLINE + sorted(k for k in results["semclip"] if k.startswith("negation_accuracy/"))
    print()
    print(format_table(columns, keys))
    gap = 100 * (results["semclip"]["negation_accuracy"] - results["clip"]["negation_accuracy"])
    print(f"\nnegation accuracy: SemCLIP {gap:+.1f} points over CLIP; "
          f"i2t R@1 {100 * (results['semclip']['i2t_r1'] - results['clip']['i2t_r1']):+.1f}, "
          f"t2i R@1 {100 * (results['semclip']['t2i_r1'] - results['clip']['t2i_r1']):+.1f}")
    print(f"time: {wall:.0f} s in all (SemCLIP {seconds['semclip']:.0f} s, CLIP {seconds['clip']:.0f} s, "
          f"{'side by side' if jobs > 1 else 'one after the other'}; load average {os.getloadavg()[0]:.1f})")

    plot_runs({loss: os.path.join(args.out, loss, "metrics.jsonl") for loss in results},
              os.path.join(args.out, "comparison.png"))
    atomic_write_text(json.dumps({"metrics": results, "train_seconds": seconds, "wall_seconds": wall, "jobs": jobs,
                                  "args": vars(args)}, indent=2) + "\n", os.path.join(args.out, "results.json"))
    print(f"curves: {os.path.join(args.out, 'comparison.png')}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
