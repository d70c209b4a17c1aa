"""`--semclip-grad-cache`: open_clip_train's `--accum-freq N` with the loss evaluated once per step.

open_clip_train's own accumulation (`train_one_epoch` with `accum_freq > 1`) evaluates the loss N times per
optimizer step over the whole accumulated batch, each time with one micro-batch's features requiring grad.
`grad_cache_train_one_epoch` is the same epoch loop (scheduler, scaler, gradient clipping, logit-scale clamp,
logging: as in open_clip_train 3.x's `train_one_epoch`) whose step is `semclip_kernels.grad_cache`'s: every
micro-batch encoded without grad, the loss once on the global batch, every micro-batch re-encoded with grad
under its first pass's random state. Under DDP the re-encodes of all micro-batches but the last run under
`no_sync()` (one gradient all-reduce per step), and `logit_scale`/`logit_bias` (0-dim model outputs) get
their gradient once, through the last micro-batch's synchronised backward. See docs/grad_cache.md.

`patch_grad_cache()` installs it into `open_clip_train.main` for one run (what
`python -m semclip_train.open_clip --semclip-grad-cache --accum-freq N` does).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from semclip_kernels.grad_cache import grad_cache_backward

FLAG = "--semclip-grad-cache"


def check_grad_cache_args(args: Any) -> None:
    """Raise a ValueError naming the flag when open_clip_train's parsed `args` cannot use gradient caching."""
    accum_freq = getattr(args, "accum_freq", 1)
    if not isinstance(accum_freq, int) or accum_freq < 2:
        raise ValueError(
            f"{FLAG} needs --accum-freq N with N >= 2 (the micro-batches of --batch-size each that "
            f"make one optimizer step), got --accum-freq {accum_freq}"
        )
    for flag, active in (
        ("--horovod", getattr(args, "horovod", False)),
        ("--distill-model", getattr(args, "distill", False)),
    ):
        if active:
            raise ValueError(f"{FLAG} does not support {flag}")


def grad_cache_train_one_epoch(
    model: Any,
    data: dict,
    loss: Any,
    epoch: int,
    optimizer: Any,
    scaler: Any,
    scheduler: Any,
    dist_model: Any,
    args: Any,
    tb_writer: Any = None,
) -> None:
    """open_clip_train's `train_one_epoch(...)` (same signature) with a gradient-cached step."""
    from open_clip import get_input_dtype
    from open_clip_train.distributed import is_master
    from open_clip_train.precision import get_autocast
    from open_clip_train.train import AverageMeter, unwrap_model

    check_grad_cache_args(args)
    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)

    model.train()
    data["train"].set_epoch(epoch)  # set epoch in process safe manner via sampler or shared_epoch
    dataloader = data["train"].dataloader
    num_batches_per_epoch = dataloader.num_batches // args.accum_freq
    sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))

    def encode(micro_batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, texts = micro_batch
        with autocast():
            model_out = model(images, texts)
        return {key: value for key, value in model_out.items() if value is not None}

    last_step: dict[str, Any] = {}  # what loss_fn saw: the losses dict and the logit scale, for the log

    def loss_fn(features: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast():
            losses = loss(**features, output_dict=True)
            total_loss = sum(losses.values())
            losses["loss"] = total_loss
        last_step["losses"] = {key: value.detach() for key, value in losses.items()}
        last_step["logit_scale"] = features["logit_scale"].detach()
        return total_loss

    # A DDP model (possibly inside torch.compile) re-encodes all micro-batches but the last under no_sync().
    ddp = model if args.distributed and hasattr(model, "no_sync") else None
    scale_loss = scaler.scale if scaler is not None else None

    micro_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    losses_m: dict[str, AverageMeter] = {}
    batch_time_m = AverageMeter()
    data_time_m = AverageMeter()
    end = time.time()
    for i, batch in enumerate(dataloader):
        i_accum = i // args.accum_freq
        step = num_batches_per_epoch * epoch + i_accum

        if not args.skip_scheduler:
            scheduler(step)

        images, texts = batch
        images = images.to(device=device, dtype=input_dtype, non_blocking=True)
        texts = texts.to(device=device, non_blocking=True)
        micro_batches.append((images, texts))

        data_time_m.update(time.time() - end)
        if (i + 1) % args.accum_freq > 0:
            continue  # as in open_clip_train, a last incomplete group of micro-batches is not trained on

        optimizer.zero_grad()
        grad_cache_backward(micro_batches, encode, loss_fn, model=ddp, scale_loss=scale_loss)
        losses, logit_scale = last_step["losses"], last_step["logit_scale"]
        micro_batches = []

        if scaler is not None:
            if args.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            if args.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
            optimizer.step()

        # Note: we clamp to 4.6052 = ln(100), as in the original paper.
        with torch.no_grad():
            unwrap_model(model).logit_scale.clamp_(0, math.log(100))

        batch_time_m.update(time.time() - end)
        end = time.time()
        batch_count = i_accum + 1
        if is_master(args) and (i_accum % args.log_every_n_steps == 0 or batch_count == num_batches_per_epoch):
            batch_size = len(images)
            num_samples = batch_count * batch_size * args.accum_freq * args.world_size
            samples_per_epoch = dataloader.num_samples
            percent_complete = 100.0 * batch_count / num_batches_per_epoch

            # The loss of the whole global batch (every micro-batch of every rank's local loss, as logged by rank 0).
            for key, val in losses.items():
                if key not in losses_m:
                    losses_m[key] = AverageMeter()
                losses_m[key].update(val.item(), batch_size)

            logit_scale_scalar = logit_scale.item()
            loss_log = " ".join(
                f"{loss_name.capitalize()}: {loss_m.val:#.5g} ({loss_m.avg:#.5g})"
                for loss_name, loss_m in losses_m.items()
            )
            samples_per_second = args.accum_freq * args.batch_size * args.world_size / batch_time_m.val
            samples_per_second_per_gpu = args.accum_freq * args.batch_size / batch_time_m.val
            logging.info(
                f"Train Epoch: {epoch} [{num_samples:>{sample_digits}}/{samples_per_epoch} ({percent_complete:.0f}%)] "
                f"Data (t): {data_time_m.avg:.3f} "
                f"Batch (t): {batch_time_m.avg:.3f}, {samples_per_second:#g}/s, {samples_per_second_per_gpu:#g}/s/gpu "
                f"LR: {optimizer.param_groups[0]['lr']:5f} "
                f"Logit Scale: {logit_scale_scalar:.3f} " + loss_log
            )

            log_data = {
                "data_time": data_time_m.val,
                "batch_time": batch_time_m.val,
                "samples_per_second": samples_per_second,
                "samples_per_second_per_gpu": samples_per_second_per_gpu,
                "scale": logit_scale_scalar,
                "lr": optimizer.param_groups[0]["lr"],
            }
            log_data.update({name: val.val for name, val in losses_m.items()})
            log_data = {"train/" + name: val for name, val in log_data.items()}
            if tb_writer is not None:
                for name, val in log_data.items():
                    tb_writer.add_scalar(name, val, step)
            if args.wandb:
                import wandb

                log_data["step"] = step  # for backwards compatibility
                wandb.log(log_data, step=step)

            # resetting batch / data time meters per log window
            batch_time_m.reset()
            data_time_m.reset()


@contextlib.contextmanager
def patch_grad_cache(enabled: bool = True) -> Iterator[None]:
    """Within the block, `open_clip_train.main.main(argv)` trains with `grad_cache_train_one_epoch`
    (a no-op when `enabled` is false: open_clip_train's own loop runs unchanged)."""
    if not enabled:
        yield
        return
    import open_clip_train.main as trainer

    saved = trainer.train_one_epoch
    trainer.train_one_epoch = grad_cache_train_one_epoch
    try:
        yield
    finally:
        trainer.train_one_epoch = saved
