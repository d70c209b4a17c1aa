"""open_clip models for the training loop: any registered model name, local weights, and a tiny default.

The tiny default (`semclip-tiny`) is registered through open_clip's own config
registry (`open_clip.add_model_config`), so `open_clip.create_model_and_transforms`
and `open_clip.get_tokenizer` treat it like any built-in architecture. Nothing
here downloads: pretrained weights must be a local file (or a `local-dir:` model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from torch import nn

TINY_MODEL_NAME = "semclip-tiny"

# Small enough to train in a couple of minutes on 2 CPU cores, large enough to
# learn colour/shape/position binding on the 32-pixel synthetic scenes.
TINY_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

_REGISTERED: dict[str, str] = {}


def register_model_config(name: str, config: dict[str, Any]) -> None:
    """Register `config` under `name` in open_clip's model registry.

    open_clip reads configs from JSON files, so the dict is written to a private
    temporary folder which is then added to the registry's search paths.
    """
    if _REGISTERED.get(name) == json.dumps(config, sort_keys=True):
        return
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"model config {name!r} lacks {missing}")
    folder = tempfile.mkdtemp(prefix="semclip_model_cfg_")
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    open_clip.add_model_config(path)
    _REGISTERED[name] = json.dumps(config, sort_keys=True)


@dataclass
class ModelBundle:
    model: nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    image_size: int
    context_length: int


def build_model(
    model_name: str = TINY_MODEL_NAME,
    pretrained: str | None = None,
    model_config_json: str | None = None,
    device: str | torch.device = "cpu",
) -> ModelBundle:
    """Create an open_clip model, its transforms and tokenizer.

    Args:
        model_name: any open_clip model name (`ViT-B-32`, `local-dir:/path`, ...) or `semclip-tiny`.
        pretrained: path to a local checkpoint file (open_clip tags would need a download).
        model_config_json: optional path to a JSON model config, registered under `model_name`.
    """
    if model_name == TINY_MODEL_NAME and model_config_json is None:
        register_model_config(TINY_MODEL_NAME, TINY_MODEL_CONFIG)
    if model_config_json is not None:
        with open(model_config_json, encoding="utf-8") as f:
            register_model_config(model_name, json.load(f))
    if pretrained is not None and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"--pretrained must be a local checkpoint file (no downloads here): {pretrained}")
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device
    )
    tokenizer = open_clip.get_tokenizer(model_name)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    context_length = int(getattr(tokenizer, "context_length", getattr(model, "context_length", 77)))
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer, image_size, context_length)


@contextlib.contextmanager
def checkpoint_loaded_next() -> Iterator[None]:
    """Within the block, open_clip's "No pretrained weights loaded ... Model initialized randomly" warning is
    dropped: the caller loads a checkpoint into the model it builds here, so the warning would be untrue."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()  # open_clip warns through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model
