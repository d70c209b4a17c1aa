"""The reference training loop: an open_clip model trained with SemCLIPLoss (or plain CLIP).

    python -m training.train --out runs/semclip                      # tiny model, synthetic data
    python -m training.train --out runs/clip --loss clip             # the baseline: captions only
    python -m training.train --data csv --csv train.csv --val-csv val.csv --model ViT-B-32 \\
        --pretrained /path/to/weights.pt --out runs/vitb32
    torchrun --nproc-per-node 2 -m training.train --out runs/ddp     # DDP (gloo on CPU, nccl on GPU)

Each step encodes the batch's images and, in one text pass, its captions, paraphrases and
negations, then calls `SemCLIPLoss(image, caption, logit_scale, paraphrase_features=...,
negation_features=...)`. With `--loss clip` only captions are encoded and the same loss
reduces exactly to open_clip's ClipLoss. Writes OUT/metrics.jsonl (appended during
training), OUT/checkpoint.pt (atomic, every --checkpoint-every steps and at the end),
OUT/metrics.json (final evaluation) and OUT/curves.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from semclip_kernels import BACKENDS, SemCLIPLoss
from semclip_kernels.triplets import BAD_ROWS, text_views

from .arguments import check_input_file, check_model_name, check_positive, fail, usable_triplet_rows
from .atomic_files import atomic_write_text, remove_orphaned_temporaries
from .checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig, build_datasets, build_model_for, run_shaping_settings
from .data import CachedTokenizer, TextBatch, batch_indices, collate
from .evaluate import evaluate, format_table
from .model import unwrap
from .paper_loss import PaperLoss
from .plots import plot_runs

CHECKPOINT_NAME = "checkpoint.pt"  # in --out


def flag(setting: str) -> str:
    """The command-line flag of a `TrainConfig` field."""
    return "--" + setting.replace("_", "-")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"data": ("synthetic", "csv"), "bad_rows": BAD_ROWS, "loss": ("semclip", "clip", "paper"),
               "precision": ("fp32", "bf16"),
               "backend": BACKENDS}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
            continue
        kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
        parser.add_argument(flag(field.name), type=kind, default=field.default, choices=choices.get(field.name),
                            help=f"default: {field.default}")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from OUT/checkpoint.pt (or the given checkpoint) exactly where it stopped")
    parser.add_argument("--resume-override", default="", metavar="SETTING[,SETTING...]",
                        help="with --resume: settings (e.g. steps,lr) that may differ from the checkpoint's; the "
                             "run continues with the new values (by default a difference is an error)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="exit after this many steps (as if pre-empted); resume later with --resume")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**values)
    check_args(parser, config, args)
    return config, args


def check_args(parser: argparse.ArgumentParser, config: TrainConfig, args: argparse.Namespace) -> None:
    """Flag mistakes end the run here, with one line naming the flag, before any model is built."""
    for name in ("steps", "batch_size", "lr", "train_size", "val_size"):
        check_positive(parser, flag(name), getattr(config, name))
    if config.data == "csv":
        if config.csv is None:
            fail(parser, "--data csv needs --csv FILE (the training triplets; docs/triplets.md makes them)")
        for name in ("csv", "val_csv"):
            if getattr(config, name) is not None:
                check_input_file(parser, flag(name), getattr(config, name))
        rows = usable_triplet_rows(config.csv)
        if rows is not None and rows < config.batch_size:
            fail(parser, f"--csv {config.csv} has {rows} usable row(s), fewer than one batch (--batch-size "
                         f"{config.batch_size}): lower --batch-size or add rows")
    else:
        for name in ("csv", "val_csv"):
            if getattr(config, name) is not None:
                fail(parser, f"{flag(name)} needs --data csv (the run trains on --data {config.data})")
        if config.train_size < config.batch_size:
            fail(parser, f"--train-size {config.train_size} is smaller than one batch (--batch-size "
                         f"{config.batch_size}): raise --train-size or lower --batch-size")
    for name in ("pretrained", "model_config"):
        if getattr(config, name) is not None:
            check_input_file(parser, flag(name), getattr(config, name))
    check_model_name(parser, config.model, config.model_config)
    if args.resume_override and args.resume is None:
        fail(parser, "--resume-override goes with --resume")
    checkpoint = os.path.join(config.out, CHECKPOINT_NAME)
    if args.resume not in (None, "auto") and os.path.abspath(args.resume) != os.path.abspath(checkpoint):
        check_input_file(parser, "--resume", args.resume, what="checkpoint")


# ----------------------------------------------------------------------------- building blocks


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: gains, biases, embeddings' norms and the logit scale are exempt (as open_clip)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(warmup: int, total: int):
    """LR multiplier: linear warmup to 1 over `warmup` steps, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# How long a rank waits in a collective before it raises (docs/distributed.md, "Failures"): a rank
# that raised, died or stopped makes the others fail after at most this long instead of hanging.
# It must exceed the longest time one rank spends outside collectives while the others wait in
# the next loss: rank 0's evaluation (--eval-every) and checkpoint writes. Explicit because the
# backends' defaults differ (NCCL 10 min, Gloo 30 min). Override: SEMCLIP_PG_TIMEOUT_MINUTES.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("SEMCLIP_PG_TIMEOUT_MINUTES", "30")))


def init_distributed() -> Distributed:
    """torchrun sets WORLD_SIZE/RANK; one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    return Distributed(dist.get_rank(), dist.get_world_size())


def features_of(model: nn.Module, batch: TextBatch, autocast) -> tuple[torch.Tensor, ...]:
    """(image [B,d], caption [B,d], paraphrase [B,Pn,d] | None, negation [B,Mn,d] | None, logit_scale)."""
    with autocast():
        out = model(batch.images, batch.tokens)  # through the (DDP) wrapper's forward: one text pass
    if isinstance(out, dict):
        image, text, logit_scale = out["image_features"], out["text_features"], out["logit_scale"]
    else:
        image, text, logit_scale = out[0], out[1], out[2]
    # The loss wants one dtype; autocast may leave the towers' outputs in different ones.
    text = text.to(image.dtype)
    caption, paraphrase, negation = text_views(text, image.shape[0], batch.n_paraphrases, batch.n_negations)
    return image, caption, paraphrase, negation, logit_scale


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics.jsonl file; a torn last line (a write cut short by a kill) is dropped with a warning.

    Raises ValueError naming the file and line for an unreadable line anywhere else: that is not an interrupted
    append, and silently dropping records would hide it.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if position < len(numbered) - 1:
                raise ValueError(f"{path}:{number}: not a JSON record ({error.msg}): {line[:80]!r}") from error
            warnings.warn(f"{path}:{number}: dropped a torn last line (a write interrupted by a kill): "
                          f"{line[:80]!r}", stacklevel=2)
    return records


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be produced again), and a torn last line."""
    if not os.path.exists(path):
        return
    kept = [record for record in read_jsonl(path) if record["step"] <= last_step]
    atomic_write_text("".join(json.dumps(record) + "\n" for record in kept), path)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainingRun:
    """Everything a run holds between its steps; built once by `setup_run`."""

    config: TrainConfig
    world: Distributed
    model: nn.Module  # wrapped in DistributedDataParallel under torchrun; `unwrap(model)` is the open_clip model
    train_set: Dataset
    val_set: Dataset
    tokenizer: CachedTokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module  # SemCLIPLoss, or PaperLoss with the same call signature
    start_step: int = 0  # the step the loop starts from (the checkpoint's step on --resume)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.config.out, "metrics.jsonl")

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.config.out, CHECKPOINT_NAME)

    @property
    def summary_path(self) -> str:
        return os.path.join(self.config.out, "metrics.json")

    def autocast(self) -> AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.config.precision == "bf16" else nullcontext()


@dataclass
class StepResult:
    epoch: int
    loss: torch.Tensor  # this rank's loss (detached)
    logit_scale: torch.Tensor  # τ as the step's forward used it
    grad_norm: torch.Tensor  # before clipping


def setup_run(config: TrainConfig, resume: str | None, resume_override: Sequence[str] = ()) -> TrainingRun:
    """Build the model, data, optimizer and loss; restore the checkpoint on `resume` (`resume_override`: settings
    that may differ from the checkpoint's); wrap DDP under torchrun."""
    world = init_distributed()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    os.makedirs(config.out, exist_ok=True)
    if config.batch_size % world.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the world size {world.world_size}")

    bundle = build_model_for(config)
    train_set, val_set = build_datasets(config, bundle)
    optimizer = torch.optim.AdamW(parameter_groups(bundle.model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup, config.steps))
    if config.loss == "paper":  # the SemCLIP authors' released objective, a baseline (training/paper_loss.py)
        if world.world_size > 1:
            raise ValueError("--loss paper runs in one process only (its text terms are per-rank means)")
        loss_fn = PaperLoss(paraphrase_weight=config.paraphrase_weight, negation_weight=config.hard_negative_weight,
                            projection_seed=config.seed, backend=config.backend)
    else:
        loss_fn = SemCLIPLoss(
            local_loss=world.world_size > 1, gather_with_grad=world.world_size > 1, rank=world.rank,
            world_size=world.world_size, paraphrase_weight=config.paraphrase_weight,
            hard_negative_weight=config.hard_negative_weight, backend=config.backend,
        )
    run = TrainingRun(config, world, bundle.model, train_set, val_set, CachedTokenizer(bundle.tokenizer), optimizer,
                      scheduler, loss_fn)
    if world.is_main:
        remove_interrupted_writes(run)
    restore(run, resume, resume_override)
    if world.world_size > 1:  # after restoring: every rank loads the same checkpoint before DDP's broadcast
        run.model = nn.parallel.DistributedDataParallel(run.model)
    return run


def check_resume_override(override: Sequence[str]) -> None:
    shaping = run_shaping_settings()
    unknown = [name for name in override if name not in shaping]
    if unknown:
        raise ValueError(f"--resume-override: {', '.join(unknown)} not among the run-shaping settings "
                         f"{', '.join(shaping)}")


def check_resume_settings(saved: dict | None, config: TrainConfig, path: str, override: Sequence[str] = ()) -> None:
    """Refuse to resume from a checkpoint trained with other run-shaping settings (config.run_shaping_settings).

    `override`: settings allowed to differ (the run continues with `config`'s values). Raises ValueError naming
    every differing setting with both values.
    """
    shaping = run_shaping_settings()
    if saved is None:
        raise ValueError(f"--resume {path}: the checkpoint records no settings (not written by training.train)")
    # A setting the checkpoint lacks was added after it was written: it ran with that setting's default.
    saved = {**asdict(TrainConfig()), **saved}
    differing = [(name, saved[name], getattr(config, name)) for name in shaping
                 if name not in override and saved[name] != getattr(config, name)]
    if differing:
        listing = ", ".join(f"{flag(name)} {old!r} (now {new!r})" for name, old, new in differing)
        names = ",".join(name for name, _, _ in differing)
        raise ValueError(f"--resume {path}: the checkpoint was trained with other settings: {listing}. Resume "
                         f"with the checkpoint's settings, write to another --out, or pass --resume-override {names} "
                         "to continue with the new values")


def remove_interrupted_writes(run: TrainingRun) -> None:
    """Delete the temporary files of atomic writes killed mid-write (call before the run writes anything)."""
    for written in (run.checkpoint_path, run.metrics_path, run.summary_path):
        for orphan in remove_orphaned_temporaries(written):
            print(f"removed {orphan}: the temporary file of a write that was killed", file=sys.stderr)


def restore(run: TrainingRun, resume: str | None, override: Sequence[str] = ()) -> None:
    """Load model, optimizer, scheduler, RNG states and step from the checkpoint (`resume`), else start a fresh log.

    `--resume` (`"auto"`) before the run's first checkpoint exists starts fresh, so a scheduler may pass it on
    every launch; an explicit checkpoint path that does not exist is an error (a typo must not restart a run),
    and so is a checkpoint trained with other run-shaping settings (`check_resume_settings`), finished or not.
    """
    check_resume_override(override)
    path = run.checkpoint_path if resume == "auto" else resume
    if path is not None and not os.path.exists(path):
        if os.path.abspath(path) != os.path.abspath(run.checkpoint_path):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        if run.world.is_main:
            print(f"--resume: no checkpoint at {path} yet: starting a fresh run", file=sys.stderr)
        path = None
    if path is None:
        if run.world.is_main and os.path.exists(run.metrics_path):
            os.unlink(run.metrics_path)  # a fresh run owns its log
        return
    state = load_checkpoint(path)
    check_resume_settings(state.get("config"), run.config, path, override)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    run.start_step = state["step"]
    if run.world.is_main:
        truncate_jsonl(run.metrics_path, run.start_step)


def train_step(run: TrainingRun, step: int) -> StepResult:
    """One optimizer step on this rank's slice of the global batch at `step` (0-based)."""
    config, world = run.config, run.world
    semclip = config.loss in ("semclip", "paper")  # both use each image's paraphrases and negations
    n_paraphrases = config.paraphrases_per_image if semclip and config.paraphrase_weight > 0 else 0
    n_negations = config.negations_per_image if semclip and config.hard_negative_weight > 0 else 0
    local_batch = config.batch_size // world.world_size
    epoch, indices = batch_indices(config.seed, step, config.batch_size, len(run.train_set))
    indices = indices[world.rank * local_batch : (world.rank + 1) * local_batch]
    batch = collate(run.train_set, indices, run.tokenizer, n_paraphrases, n_negations, rotation=epoch)

    image, caption, paraphrase, negation, logit_scale = features_of(run.model, batch, run.autocast)
    loss = run.loss_fn(image, caption, logit_scale, paraphrase_features=paraphrase, negation_features=negation)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    with torch.no_grad():  # as open_clip: keep τ = exp(logit_scale) ≤ 100
        unwrap(run.model).logit_scale.clamp_(0, math.log(100))
    return StepResult(epoch, loss.detach(), logit_scale, grad_norm)


class Throughput:
    """Images per second since the last logged step."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def images_per_s(self) -> float:
        return self.images / (time.perf_counter() - self.start)


def log_step(run: TrainingRun, done: int, result: StepResult, throughput: Throughput) -> dict | None:
    """Append the train record of step `done` (1-based) to metrics.jsonl; returns it (None where not logged)."""
    config, world = run.config, run.world
    if not (done % config.log_every == 0 or done == config.steps):
        return None
    logged_loss = result.loss.clone()
    if world.world_size > 1:  # each rank holds its local loss; their mean is the global batch's loss
        dist.all_reduce(logged_loss)
        logged_loss /= world.world_size
    if not world.is_main:
        return None
    record = {"kind": "train", "step": done, "epoch": result.epoch, "loss": logged_loss.item(),
              "lr": run.scheduler.get_last_lr()[0], "logit_scale": result.logit_scale.item(),
              "grad_norm": result.grad_norm.item(), "images_per_s": throughput.images_per_s()}
    append_jsonl(run.metrics_path, record)
    throughput.restart()
    return record


def save_checkpoint(run: TrainingRun, step: int) -> None:
    if run.world.is_main:
        atomic_save({"model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
                     "scheduler": run.scheduler.state_dict(), "rng": rng_state(), "step": step,
                     "config": asdict(run.config)}, run.checkpoint_path)


def evaluate_and_log(run: TrainingRun, step: int) -> dict:
    """Validation metrics after `step` steps, appended to metrics.jsonl (call on the main rank only)."""
    metrics = evaluate(unwrap(run.model), run.tokenizer, run.val_set, precision=run.config.precision)
    append_jsonl(run.metrics_path, {"kind": "eval", "step": step, **metrics})
    return metrics


def run_steps(run: TrainingRun, end_step: int) -> None:
    """Train from `run.start_step` to `end_step`, logging, evaluating and checkpointing on the config's schedule."""
    config, world = run.config, run.world
    bar = tqdm(total=config.steps, initial=run.start_step, disable=not (config.progress and world.is_main),
               desc=f"{config.loss}", unit="step", dynamic_ncols=True, file=sys.stdout)
    run.model.train()
    throughput = Throughput()
    for step in range(run.start_step, end_step):
        result = train_step(run, step)
        done = step + 1
        throughput.images += config.batch_size
        record = log_step(run, done, result, throughput)
        if record is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
        bar.update(1)
        if world.is_main and config.eval_every and done % config.eval_every == 0 and done < config.steps:
            evaluate_and_log(run, done)
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            save_checkpoint(run, done)
    bar.close()


def logged_final_evaluation(run: TrainingRun) -> dict | None:
    """The final evaluation already in metrics.jsonl when `--resume` found the run finished, else None."""
    if run.start_step < run.config.steps or not os.path.exists(run.metrics_path):
        return None
    for record in reversed(read_jsonl(run.metrics_path)):
        if record["kind"] == "eval" and record["step"] == run.config.steps:
            return {key: value for key, value in record.items() if key not in ("kind", "step")}
    return None


def finish(run: TrainingRun) -> dict:
    """Final checkpoint, evaluation, metrics.json and curves.png; the final metrics on the main rank, {} elsewhere.

    On `--resume` of a finished run the checkpoint stands and its logged final evaluation is reported again,
    not appended a second time.
    """
    config = run.config
    if run.start_step < config.steps:
        save_checkpoint(run, config.steps)
    final: dict = {}
    if run.world.is_main:
        final = logged_final_evaluation(run)
        if final is None:
            final = evaluate_and_log(run, config.steps)
        else:
            print(f"{config.out}: already finished at step {config.steps}; its final evaluation:", file=sys.stderr)
        summary = {"loss": config.loss, "steps": config.steps, "config": asdict(config), **final}
        atomic_write_text(json.dumps(summary, indent=2) + "\n", run.summary_path)
        plot_runs({config.loss: run.metrics_path}, os.path.join(config.out, "curves.png"))
    if run.world.world_size > 1:
        dist.barrier()
    return final


def train(config: TrainConfig, resume: str | None = None, stop_after: int | None = None,
          resume_override: Sequence[str] = ()) -> dict:
    """Train per `config`; returns the final metrics (or {} when stopped early by `stop_after`).

    `resume`: a checkpoint path, or `"auto"` for OUT/checkpoint.pt; `resume_override`: run-shaping settings that
    may differ from the checkpoint's (see `check_resume_settings`).
    """
    run = setup_run(config, resume, resume_override)
    end_step = config.steps if stop_after is None else min(config.steps, stop_after)
    run_steps(run, end_step)
    if end_step < config.steps:  # stopped early: leave a checkpoint to resume from
        save_checkpoint(run, end_step)
        return {}
    return finish(run)


def main(argv: list[str] | None = None) -> dict:
    config, args = parse_args(argv)
    override = [name.strip().replace("-", "_") for name in args.resume_override.split(",") if name.strip()]
    final = train(config, resume=args.resume, stop_after=args.stop_after, resume_override=override)
    if final:
        print(format_table({config.loss: final}))
    return final


if __name__ == "__main__":
    main(sys.argv[1:])
