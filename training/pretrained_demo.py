"""CLIP vs the authors' objective vs SemCLIP on pretrained towers, offline: `training.demo --towers pretrained`.

    python -m training.demo --towers pretrained     # 7.5 min cold on 2 cores (load ~3); 28 min at load ~12
    python -m training.demo --towers pretrained --steps 20 --sugarcrepe-sample 300   # a quick look

Towers (training/pretrained.py): a frozen ImageNet EfficientNet-Lite0 whose feature grid is
computed once per image and cached, with a trainable MLP projection; all-MiniLM-L6-v2 with its
bottom layers frozen (their states cached per text) and its top `--text-layers` layers
fine-tuned (default 0: MiniLM frozen, its pooled embedding cached; see docs/training.md for why),
then mean pooling and a projection (linear + a residual MLP branch that starts at zero).
Three objectives train from the same initialisation on the same batches (same seed, steps, batch size):

- `clip`: captions only (SemCLIPLoss without extras = open_clip's ClipLoss);
- `paper`: the authors' released objective (training/paper_loss.py);
- `semclip`: ours, `semclip_kernels.SemCLIPLoss` with the paraphrase and one negation per image.

Evaluation: held-out synthetic scenes (negation accuracy overall and per edit type, i2t/t2i R@1,
paraphrase R@1) and, text tower only, SugarCrepe++ text accuracy (training/sugarcrepe.py), also
for the untouched MiniLM (row `pretrained`). Writes OUT/results.json, OUT/comparison.png,
OUT/<objective>/{metrics.jsonl,model.pt} and OUT/cache/ (frozen features; reused only when the
weights, inputs and recipe match).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from semclip_kernels import SemCLIPLoss
from semclip_kernels.triplets import batch_texts, text_views

from .atomic_files import atomic_write_text
from .checkpoint import atomic_save
from .data import batch_indices
from .evaluate import negation_accuracy, paraphrase_recall_at_1, recall_at_k
from .paper_loss import PaperLoss
from .pretrained import (
    FeatureCache,
    MissingPretrainedPackages,
    PretrainedDualEncoder,
    TokenStates,
    bottom_states,
    image_features,
    load_efficientnet_lite0,
    load_minilm,
    module_fingerprint,
    pretrained_sentence_embedding,
    require_pretrained_packages,
    texts_fingerprint,
)
from .sugarcrepe import DEFAULT_PATH as SUGARCREPE_PATH
from .sugarcrepe import load_triplets, sample_triplets, text_only_accuracy
from .synthetic import ABSENCE_PROB, SyntheticTriplets
from .train import warmup_cosine

OBJECTIVES = ("clip", "paper", "semclip")
HEADLINE = ["negation_accuracy", "i2t_r1", "t2i_r1", "paraphrase_r1", "sugarcrepe_pp_text_accuracy",
            "synthetic_text_accuracy"]


@dataclass
class PretrainedDemoConfig:
    out: str = "runs/demo_pretrained"
    objectives: tuple[str, ...] = OBJECTIVES
    steps: int = 200
    batch_size: int = 64
    train_size: int = 1000  # synthetic training scenes (each image's features are computed once)
    val_size: int = 300
    synthetic_negations: int = 3  # per scene; training cycles through them epoch by epoch
    absence_prob: float = ABSENCE_PROB
    image_size: int = 64  # EfficientNet sees a 2x2 feature grid: enough to tell left / middle / right
    # Top MiniLM layers fine-tuned. 0 (the default): MiniLM frozen, its pooled embedding cached, only the
    # text head trains; on the shared 2-core machine one fine-tuned layer made a CLIP step ~4x slower
    # (9 s vs 2-3 s; SemCLIP's three texts per image ~3x more again), past the 15-minute budget.
    text_layers: int = 0
    embed_dim: int = 384
    lr: float = 1e-3  # projections and logit scale
    text_lr: float = 1e-4  # fine-tuned MiniLM layers
    weight_decay: float = 0.1
    warmup: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    backend: str = "auto"
    sugarcrepe: str = SUGARCREPE_PATH
    # Triplets evaluated, a fixed random sample of the file (0: all 4,757). Their MiniLM states are cached,
    # but the first run pays a forward pass per text: the whole file costs ~2.5 min alone on 2 cores.
    sugarcrepe_sample: int = 1000
    cache_dir: str | None = None  # default OUT/cache; "" disables the disk cache
    threads: int = 2
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Towers:
    """The frozen parts: an image backbone (`extract_features` or callable -> [N, C, h, w]) and a BERT model."""

    image_backbone: nn.Module
    text_model: nn.Module
    tokenizer: Any


def load_pretrained_towers() -> Towers:
    tokenizer, text_model = load_minilm()
    return Towers(load_efficientnet_lite0(), text_model, tokenizer)


@dataclass
class Features:
    """Everything frozen, computed once and shared by the three objectives."""

    train_set: SyntheticTriplets
    val_set: SyntheticTriplets
    train_images: torch.Tensor  # [N, F] float32
    val_images: torch.Tensor
    states: TokenStates  # every synthetic text (train and val): MiniLM states after layer `cached_layer`
    cached_layer: int  # layers 1..cached_layer are frozen and cached
    model_states: TokenStates  # what the trainable model reads (`states`, or pooled vectors with --text-layers 0)


def images_fingerprint(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def synthetic_texts(dataset: SyntheticTriplets) -> list[str]:
    texts = list(dataset.captions)
    for group in (dataset.paraphrases, dataset.negations):
        texts.extend(t for item in group for t in item)
    return texts


def compute_features(config: PretrainedDemoConfig, towers: Towers, cache: FeatureCache) -> Features:
    n_layers = towers.text_model.config.num_hidden_layers
    if not 0 <= config.text_layers <= n_layers:
        raise ValueError(f"--text-layers must be in [0, {n_layers}], got {config.text_layers}")
    # Cache the states below the top layer even with --text-layers 0, so both settings share the
    # expensive part; with 0 the frozen top layer then runs once per text and only its pooled output is kept.
    cached_layer = n_layers - max(config.text_layers, 1)
    common = dict(seed=config.seed, image_size=config.image_size, n_paraphrases=1,
                  n_negations=config.synthetic_negations, val_size=config.val_size, absence_prob=config.absence_prob)
    val_set = SyntheticTriplets("val", size=config.val_size, **common)
    train_set = SyntheticTriplets("train", size=config.train_size, **common)

    image_key = {"backbone": module_fingerprint(towers.image_backbone)}
    train_images = cache.get("image_features", {**image_key, "images": images_fingerprint(train_set.images)},
                             lambda: image_features(towers.image_backbone, train_set.images,
                                                    progress=config.progress, desc="image features (train)"))
    val_images = cache.get("image_features", {**image_key, "images": images_fingerprint(val_set.images)},
                           lambda: image_features(towers.image_backbone, val_set.images,
                                                  progress=config.progress, desc="image features (val)"))
    texts = list(dict.fromkeys(synthetic_texts(train_set) + synthetic_texts(val_set)))
    states = cache.get("text_states", text_key(towers, texts, cached_layer),
                       lambda: bottom_states(towers.text_model, towers.tokenizer, texts, cached_layer,
                                             progress=config.progress, desc=f"MiniLM 1-{cached_layer} (synthetic)"))
    model_states = pooled_states(towers, states, cached_layer) if config.text_layers == 0 else states
    return Features(train_set, val_set, train_images, val_images, states, cached_layer, model_states)


def pooled_states(towers: Towers, states: TokenStates, cached_layer: int) -> TokenStates:
    """With --text-layers 0: the frozen MiniLM sentence embedding of every text, stored as a one-token state
    (mean pooling over one token is the identity: the model's text path needs no special case)."""
    texts = list(states.index)
    top = towers.text_model.encoder.layer[cached_layer:]
    pooled = pretrained_sentence_embedding(top, states, texts, normalize=False)
    return TokenStates(pooled, torch.arange(len(texts) + 1), dict(states.index))


def text_key(towers: Towers, texts: list[str], n_frozen: int) -> dict[str, Any]:
    # Hashed on every call (not memoised per object): weights changed in place must change the key.
    vocab = towers.tokenizer.get_vocab() if hasattr(towers.tokenizer, "get_vocab") else {}
    tokenizer_id = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    return {"model": module_fingerprint(towers.text_model), "tokenizer": tokenizer_id,
            "texts": texts_fingerprint(texts), "n_frozen": n_frozen}


# ----------------------------------------------------------------------------- training


def make_model(config: PretrainedDemoConfig, towers: Towers, features: Features) -> PretrainedDualEncoder:
    """The trainable model; the same seed gives every objective the same initialisation."""
    torch.manual_seed(config.seed)
    n_layers = towers.text_model.config.num_hidden_layers
    top = copy.deepcopy(towers.text_model.encoder.layer[n_layers - config.text_layers :])
    top.train().requires_grad_(True)
    return PretrainedDualEncoder(top, towers.text_model.config.hidden_size, features.train_images.shape[1],
                                 config.embed_dim)


def make_loss(objective: str, config: PretrainedDemoConfig) -> nn.Module:
    if objective == "paper":
        return PaperLoss(config.embed_dim, projection_seed=config.seed, backend=config.backend)
    if objective in ("clip", "semclip"):
        return SemCLIPLoss(backend=config.backend)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def optimizer_for(model: PretrainedDualEncoder, config: PretrainedDemoConfig) -> torch.optim.Optimizer:
    """AdamW; the fine-tuned MiniLM layers get `text_lr`, the new heads `lr`; no decay on gains, biases, scale."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        lr = config.text_lr if name.startswith("text_top.") else config.lr
        decay = 0.0 if param.ndim < 2 or name == "logit_scale" else config.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return torch.optim.AdamW([{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()],
                             betas=(0.9, 0.98), eps=1e-6)


def train_objective(
    objective: str, config: PretrainedDemoConfig, towers: Towers, features: Features
) -> tuple[PretrainedDualEncoder, list[dict]]:
    model = make_model(config, towers, features)
    loss_fn = make_loss(objective, config)
    optimizer = optimizer_for(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup, config.steps))
    extras = int(objective != "clip")  # one paraphrase and one negation per image, or none
    train_set, states = features.train_set, features.model_states
    log: list[dict] = []
    model.train()
    bar = tqdm(range(config.steps), desc=objective, unit="step", disable=not config.progress, dynamic_ncols=True,
               file=sys.stdout)
    for step in bar:
        epoch, indices = batch_indices(config.seed, step, config.batch_size, len(train_set))
        texts = batch_texts([train_set.captions[i] for i in indices], [train_set.paraphrases[i] for i in indices],
                            [train_set.negations[i] for i in indices], extras, extras, epoch)
        hidden, mask = states.batch(texts)
        caption, paraphrase, negation = text_views(model.encode_text(hidden, mask), len(indices), extras, extras)
        image = model.encode_image(features.train_images[torch.as_tensor(indices)])
        loss = loss_fn(image, caption, model.logit_scale.exp(), paraphrase_features=paraphrase,
                       negation_features=negation)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # as open_clip: τ ≤ 100
            model.logit_scale.clamp_(0, math.log(100))
        record = {"kind": "train", "step": step + 1, "epoch": epoch, "loss": loss.item(),
                  "logit_scale": model.logit_scale.exp().item(), "grad_norm": grad_norm.item()}
        log.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    model.eval()
    return model, log


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed(model: PretrainedDualEncoder, states: TokenStates, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    model.eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        hidden, mask = states.batch(texts[start : start + batch_size])
        chunks.append(model.encode_text(hidden, mask))
    return torch.cat(chunks)


def text_pair_accuracy(caption: torch.Tensor, paraphrase: torch.Tensor, negation: torch.Tensor) -> float:
    """Synthetic analogue of the SugarCrepe++ criterion: per (scene, negation), caption and paraphrase
    closer to each other than either is to the negation."""
    cp = (caption * paraphrase).sum(-1, keepdim=True)
    cn = torch.einsum("nd,nkd->nk", caption, negation)
    pn = torch.einsum("nd,nkd->nk", paraphrase, negation)
    return ((cp > cn) & (cp > pn)).double().mean().item()


@torch.no_grad()
def synthetic_metrics(model: PretrainedDualEncoder, features: Features) -> dict[str, float]:
    val = features.val_set
    image = model.encode_image(features.val_images)
    caption = embed(model, features.model_states, val.captions)
    paraphrase = embed(model, features.model_states, [p[0] for p in val.paraphrases])
    counts = {len(n) for n in val.negations}
    if len(counts) != 1:
        raise ValueError(f"every validation scene needs the same number of negations, got {sorted(counts)}")
    n_neg = counts.pop()
    negation = embed(model, features.model_states, [n for negs in val.negations for n in negs])
    owner = torch.arange(len(val)).repeat_interleave(n_neg)
    correct = negation_accuracy(image, caption, negation, owner)
    scores = image @ caption.T
    metrics = {
        "negation_accuracy": correct.double().mean().item(),
        "i2t_r1": recall_at_k(scores, 1),
        "t2i_r1": recall_at_k(scores.T, 1),
        "paraphrase_r1": paraphrase_recall_at_1(image, [paraphrase]),
        "synthetic_text_accuracy": text_pair_accuracy(caption, paraphrase, negation.view(len(val), n_neg, -1)),
    }
    kinds = [k for item in val.negation_types for k in item]
    for kind in sorted(set(kinds)):
        hits = [c for k, c in zip(kinds, correct.tolist(), strict=True) if k == kind]
        metrics[f"negation_accuracy/{kind}"] = sum(hits) / len(hits)
        metrics[f"negation_count/{kind}"] = len(hits)
    return metrics


def sugarcrepe_states(config: PretrainedDemoConfig, towers: Towers, n_frozen: int, cache: FeatureCache):
    """(triplets, states after layer `n_frozen`) of the SugarCrepe++ sample."""
    triplets = sample_triplets(load_triplets(config.sugarcrepe), config.sugarcrepe_sample, seed=0)
    texts = list(dict.fromkeys(triplets.captions + triplets.paraphrases + triplets.negations))
    states = cache.get("text_states", text_key(towers, texts, n_frozen),
                       lambda: bottom_states(towers.text_model, towers.tokenizer, texts, n_frozen,
                                             progress=config.progress, desc=f"MiniLM layers 1-{n_frozen} (SC++)"))
    return triplets, states


def sugarcrepe_accuracy(embed_fn, triplets) -> float:
    return text_only_accuracy(embed_fn(triplets.captions), embed_fn(triplets.paraphrases),
                              embed_fn(triplets.negations))


# ----------------------------------------------------------------------------- reporting


def format_rows(rows: dict[str, dict[str, float]], keys: list[str]) -> str:
    """Metrics (in %) as rows = runs, columns = metrics."""
    width = max(len(r) for r in rows)
    header = f"{'':<{width}}  " + "  ".join(f"{k:>{max(8, len(k))}}" for k in keys)
    lines = [header]
    for name, metrics in rows.items():
        cells = []
        for k in keys:
            value = metrics.get(k)
            cells.append(f"{100 * value:>{max(8, len(k))}.1f}" if value is not None else f"{'-':>{max(8, len(k))}}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_comparison(rows: dict[str, dict[str, float]], keys: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(keys)), 4.5))
    width = 0.8 / len(rows)
    for r, (name, metrics) in enumerate(rows.items()):
        xs = [k + (r - (len(rows) - 1) / 2) * width for k in range(len(keys))]
        values = [100 * metrics[k] if metrics.get(k) is not None else 0.0 for k in keys]
        bars = ax.bar(xs, values, width, label=name)
        for bar, key in zip(bars, keys, strict=True):
            if metrics.get(key) is not None:
                ax.annotate(f"{100 * metrics[key]:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.replace("negation_accuracy/", "neg/") for k in keys], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="%", ylim=(0, 105), title="pretrained towers: untouched MiniLM vs CLIP vs paper vs SemCLIP")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


# ----------------------------------------------------------------------------- the demo


def run(config: PretrainedDemoConfig, towers: Towers | None = None) -> dict[str, Any]:
    """The whole demo; `towers` defaults to the pretrained ones (tests pass tiny random towers)."""
    for objective in config.objectives:
        if objective not in OBJECTIVES:
            raise ValueError(f"objectives must be among {OBJECTIVES}, got {objective!r}")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    if towers is None:
        towers = load_pretrained_towers()
    seconds["load"] = time.perf_counter() - start
    cache_dir = os.path.join(config.out, "cache") if config.cache_dir is None else (config.cache_dir or None)
    cache = FeatureCache(cache_dir)

    mark = time.perf_counter()
    features = compute_features(config, towers, cache)
    seconds["features"] = time.perf_counter() - mark

    rows: dict[str, dict[str, float]] = {}
    models: dict[str, PretrainedDualEncoder] = {}
    for objective in config.objectives:
        print(f"== {objective}: {config.steps} steps of {config.batch_size} scenes "
              f"(MiniLM top {config.text_layers} layer(s) fine-tuned)", flush=True)
        mark = time.perf_counter()
        model, log = train_objective(objective, config, towers, features)
        seconds[f"train_{objective}"] = time.perf_counter() - mark
        mark = time.perf_counter()
        rows[objective] = synthetic_metrics(model, features)
        seconds[f"eval_{objective}"] = time.perf_counter() - mark
        models[objective] = model
        run_dir = os.path.join(config.out, objective)
        atomic_write_text("".join(json.dumps(r) + "\n" for r in log + [{"kind": "eval", "step": config.steps,
                                                                            **rows[objective]}]),
                          os.path.join(run_dir, "metrics.jsonl"))
        atomic_save({"model": model.state_dict(), "config": asdict(config), "objective": objective},
                    os.path.join(run_dir, "model.pt"))

    # The untouched MiniLM: its synthetic text-only accuracy, for reference (it has no image tower here).
    pretrained_top = towers.text_model.encoder.layer[features.cached_layer :]
    val = features.val_set

    def pretrained_embed(states: TokenStates):
        return lambda texts: pretrained_sentence_embedding(pretrained_top, states, texts)

    embed_val = pretrained_embed(features.states)
    n_neg = len(val.negations[0])
    pretrained_row = {"synthetic_text_accuracy": text_pair_accuracy(
        embed_val(val.captions), embed_val([p[0] for p in val.paraphrases]),
        embed_val([n for negs in val.negations for n in negs]).view(len(val), n_neg, -1))}

    mark = time.perf_counter()
    triplets, sc_states = sugarcrepe_states(config, towers, features.cached_layer, cache)
    pretrained_row["sugarcrepe_pp_text_accuracy"] = sugarcrepe_accuracy(pretrained_embed(sc_states), triplets)
    if config.text_layers == 0:
        sc_states = pooled_states(towers, sc_states, features.cached_layer)
    for objective, model in models.items():
        rows[objective]["sugarcrepe_pp_text_accuracy"] = sugarcrepe_accuracy(
            lambda texts, model=model: embed(model, sc_states, texts), triplets)
    seconds["sugarcrepe"] = time.perf_counter() - mark
    # No image tower was aligned to the untouched MiniLM: its image metrics are null (not applicable), not 0.
    pretrained_row = {"negation_accuracy": None, "i2t_r1": None, "t2i_r1": None, "paraphrase_r1": None,
                      **pretrained_row}
    rows = {"pretrained": pretrained_row, **rows}
    seconds["total"] = time.perf_counter() - start

    kinds = sorted({k for row in rows.values() for k in row if k.startswith("negation_accuracy/")})
    keys = HEADLINE + kinds
    table = format_rows(rows, keys)
    counts = {k.split("/")[1]: int(rows[config.objectives[0]][f"negation_count/{k.split('/')[1]}"]) for k in kinds}
    print()
    print(table)
    print(f"\nvalidation: {len(val)} scenes, negations per edit type {counts}; SugarCrepe++: {len(triplets)} triplets")
    summary = summarize(rows)
    for line in summary:
        print(line)
    print(f"wall time: {seconds['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()
                                                          if k != "total") + ")")
    plot_comparison(rows, keys, os.path.join(config.out, "comparison.png"))
    results = {"metrics": rows, "table": table, "summary": summary, "seconds": seconds,
               "negations_per_type": counts, "sugarcrepe_triplets": len(triplets),
               "cache": {"dir": cache_dir, "hits": cache.hits, "misses": cache.misses},
               "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}}
    atomic_write_text(json.dumps(results, indent=2) + "\n", os.path.join(config.out, "results.json"))
    print(f"wrote {os.path.join(config.out, 'results.json')} and {os.path.join(config.out, 'comparison.png')}")
    return results


def summarize(rows: dict[str, dict[str, float]]) -> list[str]:
    """The demo's goal checks against CLIP, in words."""
    if "semclip" not in rows or "clip" not in rows:
        return []
    s, c = rows["semclip"], rows["clip"]
    gap = 100 * (s["negation_accuracy"] - c["negation_accuracy"])
    lines = [f"negation accuracy: SemCLIP {gap:+.1f} points over CLIP (goal +20: {'met' if gap >= 20 else 'missed'})",
             f"R@1 vs CLIP: i2t {100 * (s['i2t_r1'] - c['i2t_r1']):+.1f}, t2i {100 * (s['t2i_r1'] - c['t2i_r1']):+.1f}"
             f" (goal: within 5 points)"]
    sc = 100 * (s["sugarcrepe_pp_text_accuracy"] - c["sugarcrepe_pp_text_accuracy"])
    lines.append(f"SugarCrepe++ text accuracy: SemCLIP {sc:+.1f} points vs CLIP (goal >= 0)")
    if "paper" in rows:
        p = rows["paper"]
        neg = 100 * (p["negation_accuracy"] - c["negation_accuracy"])
        lines.append(f"paper objective: negation accuracy {neg:+.1f}"
                     f", i2t R@1 {100 * (p['i2t_r1'] - c['i2t_r1']):+.1f}, SugarCrepe++ "
                     f"{100 * (p['sugarcrepe_pp_text_accuracy'] - c['sugarcrepe_pp_text_accuracy']):+.1f} vs CLIP")
    return lines


def parse_args(argv: list[str] | None = None) -> PretrainedDemoConfig:
    defaults = PretrainedDemoConfig()
    parser = argparse.ArgumentParser(prog="python -m training.demo --towers pretrained", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(PretrainedDemoConfig):
        if f.name in ("extra", "progress"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "objectives":
            parser.add_argument(flag, default=",".join(default), help=f"comma-separated subset of {OBJECTIVES}")
            continue
        kind = type(default) if default is not None else str
        parser.add_argument(flag, type=kind, default=default, help=f"default: {default}")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    values = vars(args)
    values["objectives"] = tuple(o.strip() for o in values["objectives"].split(",") if o.strip())
    return PretrainedDemoConfig(**values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_args(argv)
    try:
        require_pretrained_packages()
    except MissingPretrainedPackages as error:  # one line and exit status 2, before anything is built
        print(f"python -m training.demo --towers pretrained: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(config)


if __name__ == "__main__":
    main(sys.argv[1:])
