"""The patches that make `open_clip_train.main.main(argv)` train with SemCLIPLoss for one run.

- `CpuFriendlyDDP`: `DistributedDataParallel` that drops `device_ids` for CPU modules (open_clip_train
  passes `device_ids=[cpu]`, which DDP rejects, so Gloo on CPU fails before the loss exists).
- `register_model_config`: a model config JSON registered with open_clip (`--model-config`).
- `patch_open_clip_train`: installs the loss, the SemCLIP CSV and the grouped-text forward into
  `open_clip_train.main` for one run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from semclip_kernels.integrations.open_clip import SemCLIPOptions, create_loss, install_semclip_forward

from .data import get_data


class CpuFriendlyDDP(DistributedDataParallel):
    """DistributedDataParallel that accepts `device_ids=[cpu]` (as open_clip_train passes it) by
    dropping it: DDP wants `device_ids=None` for CPU modules and raises otherwise."""

    def __init__(self, module: nn.Module, device_ids: Sequence[Any] | None = None, *args: Any, **kwargs: Any) -> None:
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def register_model_config(path: str) -> str:
    """Register a model config JSON with open_clip; returns its model name (the file's stem)."""
    import open_clip

    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"--model-config {path}: not an open_clip model config (lacks {', '.join(missing)})")
    open_clip.add_model_config(path)
    return os.path.splitext(os.path.basename(path))[0]


@contextlib.contextmanager
def patch_open_clip_train(options: SemCLIPOptions) -> Iterator[None]:
    """Within the block, `open_clip_train.main.main(argv)` trains with SemCLIPLoss (always), the
    SemCLIP CSV and grouped-text forward (when `options.uses_extras`), and DDP works on CPU."""
    import open_clip_train.main as trainer

    saved = {name: getattr(trainer, name) for name in ("create_loss", "get_data", "create_model_and_transforms")}
    saved_ddp = torch.nn.parallel.DistributedDataParallel

    def create_model_and_transforms(*args: Any, **kwargs: Any) -> Any:
        model, *transforms = saved["create_model_and_transforms"](*args, **kwargs)
        if options.uses_extras:
            install_semclip_forward(model, options.n_paraphrases)
        return (model, *transforms)

    trainer.create_loss = functools.partial(create_loss, options=options)
    trainer.get_data = functools.partial(get_data, options=options, fallback=saved["get_data"])
    trainer.create_model_and_transforms = create_model_and_transforms
    # open_clip_train/main.py reads torch.nn.parallel.DistributedDataParallel at call time.
    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)
        torch.nn.parallel.DistributedDataParallel = saved_ddp
