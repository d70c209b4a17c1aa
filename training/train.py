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
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from semclip_kernels import SemCLIPLoss

from .checkpoint import atomic_save, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig, build_datasets, build_model_for
from .data import CachedTokenizer, TextBatch, batch_indices, collate
from .evaluate import evaluate, format_table
from .model import unwrap
from .plots import plot_runs


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"data": ("synthetic", "csv"), "bad_rows": ("skip", "error"), "loss": ("semclip", "clip"),
               "precision": ("fp32", "bf16"),
               "backend": ("auto", "triton", "cpp", "torch", "reference")}
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
            continue
        kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
        parser.add_argument(flag, type=kind, default=field.default, choices=choices.get(field.name),
                            help=f"default: {field.default}")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from OUT/checkpoint.pt (or the given checkpoint) exactly where it stopped")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="exit after this many steps (as if pre-empted); resume later with --resume")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values), args


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


def init_distributed() -> Distributed:
    """torchrun sets WORLD_SIZE/RANK; one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
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
    size = image.shape[0]
    caption = text[:size]
    n_para, n_neg = batch.n_paraphrases, batch.n_negations
    paraphrase = text[size : size * (1 + n_para)].view(size, n_para, -1) if n_para else None
    negation = text[size * (1 + n_para) :].view(size, n_neg, -1) if n_neg else None
    return image, caption, paraphrase, negation, logit_scale


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be produced again)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text("".join(kept), path)


# ----------------------------------------------------------------------------- the loop


def train(config: TrainConfig, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Train per `config`; returns the final metrics (or {} when stopped early by `stop_after`)."""
    world = init_distributed()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    os.makedirs(config.out, exist_ok=True)
    metrics_path = os.path.join(config.out, "metrics.jsonl")
    checkpoint_path = os.path.join(config.out, "checkpoint.pt")
    if config.batch_size % world.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the world size {world.world_size}")

    bundle = build_model_for(config)
    model = bundle.model
    train_set, val_set = build_datasets(config, bundle)
    tokenizer = CachedTokenizer(bundle.tokenizer)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup, config.steps))
    semclip = config.loss == "semclip"
    loss_fn = SemCLIPLoss(
        local_loss=world.world_size > 1, gather_with_grad=world.world_size > 1, rank=world.rank,
        world_size=world.world_size, paraphrase_weight=config.paraphrase_weight,
        hard_negative_weight=config.hard_negative_weight, backend=config.backend,
    )

    start_step = 0
    if resume is not None:
        path = checkpoint_path if resume == "auto" else resume
        state = load_checkpoint(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        if world.is_main:
            truncate_jsonl(metrics_path, start_step)
    elif world.is_main and os.path.exists(metrics_path):
        os.unlink(metrics_path)  # a fresh run owns its log

    if world.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if config.precision == "bf16" else nullcontext()

    def save(step: int) -> None:
        if world.is_main:
            atomic_save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step,
                         "config": asdict(config)}, checkpoint_path)

    def run_eval(step: int) -> dict:
        metrics = evaluate(unwrap(model), tokenizer, val_set, precision=config.precision)
        append_jsonl(metrics_path, {"kind": "eval", "step": step, **metrics})
        return metrics

    n_paraphrases = config.paraphrases_per_image if semclip and config.paraphrase_weight > 0 else 0
    n_negations = config.negations_per_image if semclip and config.hard_negative_weight > 0 else 0
    local_batch = config.batch_size // world.world_size
    end_step = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(total=config.steps, initial=start_step, disable=not (config.progress and world.is_main),
               desc=f"{config.loss}", unit="step", dynamic_ncols=True, file=sys.stdout)
    model.train()
    window_start, window_images = time.perf_counter(), 0
    for step in range(start_step, end_step):
        epoch, indices = batch_indices(config.seed, step, config.batch_size, len(train_set))
        indices = indices[world.rank * local_batch : (world.rank + 1) * local_batch]
        batch = collate(train_set, indices, tokenizer, n_paraphrases, n_negations, rotation=epoch)

        image, caption, paraphrase, negation, logit_scale = features_of(model, batch, autocast)
        loss = loss_fn(image, caption, logit_scale, paraphrase_features=paraphrase, negation_features=negation)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # as open_clip: keep τ = exp(logit_scale) ≤ 100
            unwrap(model).logit_scale.clamp_(0, math.log(100))

        done = step + 1
        window_images += config.batch_size
        if done % config.log_every == 0 or done == config.steps:
            logged_loss = loss.detach().clone()
            if world.world_size > 1:  # each rank holds its local loss; their mean is the global batch's loss
                dist.all_reduce(logged_loss)
                logged_loss /= world.world_size
        if world.is_main and (done % config.log_every == 0 or done == config.steps):
            elapsed = time.perf_counter() - window_start
            record = {"kind": "train", "step": done, "epoch": epoch, "loss": logged_loss.item(),
                      "lr": scheduler.get_last_lr()[0], "logit_scale": logit_scale.item(),
                      "grad_norm": grad_norm.item(), "images_per_s": window_images / elapsed}
            append_jsonl(metrics_path, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
            window_start, window_images = time.perf_counter(), 0
        bar.update(1)
        if world.is_main and config.eval_every and done % config.eval_every == 0 and done < config.steps:
            run_eval(done)
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            save(done)
    bar.close()

    if end_step < config.steps:  # stopped early: leave a checkpoint to resume from
        save(end_step)
        return {}
    save(config.steps)
    final: dict = {}
    if world.is_main:
        final = run_eval(config.steps)
        summary = {"loss": config.loss, "steps": config.steps, "config": asdict(config), **final}
        atomic_write_text(json.dumps(summary, indent=2) + "\n", os.path.join(config.out, "metrics.json"))
        plot_runs({config.loss: metrics_path}, os.path.join(config.out, "curves.png"))
    if world.world_size > 1:
        dist.barrier()
    return final


def main(argv: list[str] | None = None) -> dict:
    config, args = parse_args(argv)
    final = train(config, resume=args.resume, stop_after=args.stop_after)
    if final:
        print(format_table({config.loss: final}))
    return final


if __name__ == "__main__":
    main(sys.argv[1:])
