"""SemCLIP on real language: fine-tune all-MiniLM-L6-v2 on rules-made triplets of real captions.

`python -m training.real_language` splits the shipped SugarCrepe++ file by image into a training
part and an evaluation part (`split_by_image`), makes paraphrases and negations of the training
captions with the offline rules generator (`training.triplets.RulesGenerator`: the file's own
paraphrases and negations are never trained on), fine-tunes the top layers of MiniLM with each
objective, and measures SugarCrepe++ text accuracy on the evaluation part with the file's own
paraphrases and negations. Objectives, all at the same step count and batch of captions:

- `untouched`: the pretrained MiniLM, no training;
- `mnrl`: sentence-transformers' `MultipleNegativesRankingLoss` on (caption, paraphrase);
- `mnrl_hard`: the same with the negations as hard negatives (caption, paraphrase, negation 1..n);
- `semclip`: `semclip_kernels.semclip_loss` with the caption as the row ("image"), the first
  paraphrase as its text, the other paraphrases as extra positives and the negations as hard negatives.

The frozen bottom layers' token states of every text are computed once and cached on disk (a
cache that grows by the texts it lacks); the runs then go side by side, each in a single-thread
worker process (`--jobs`, `--threads`); each finished (objective, seed) run is stored as its own
JSON file, so a rerun with the same settings skips it (resumable). See docs/real_language.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .atomic_files import atomic_write_text
from .checkpoint import atomic_save
from .demo import available_cores
from .pretrained import (
    RECIPE_VERSION,
    TokenStates,
    bottom_states,
    load_minilm,
    mean_pool,
    module_fingerprint,
    run_layers,
    texts_fingerprint,
)
from .sugarcrepe import DEFAULT_PATH, TextTriplets, load_triplets_with_images, text_only_correct
from .triplets import RulesGenerator

METHODS = ("untouched", "mnrl", "mnrl_hard", "semclip")
DIRECTIONS = ("both", "image_to_text")
# Negation families of the rules generator (training/triplets/rules.py), for the variety ablation.
NEGATION_FAMILIES = ("swap", "attribute", "relation", "object", "negate")


# ----------------------------------------------------------------------------- the split


@dataclass
class Split:
    """Which rows evaluate and which captions train.

    Rule: an image evaluates when the first 8 hex digits of sha256(file name), read as an integer,
    are below `eval_fraction · 16⁸`; every row of that image is an evaluation row. The training
    captions are the distinct captions of the other images, minus any text (caption, paraphrase or
    negation) that occurs in an evaluation row.
    """

    eval_fraction: float
    eval_rows: list[int]
    train_captions: list[str]
    eval_images: list[str]
    train_images: list[str]
    dropped_captions: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "eval_rows": len(self.eval_rows),
            "eval_images": len(self.eval_images),
            "train_images": len(self.train_images),
            "train_captions": len(self.train_captions),
            "train_captions_dropped_as_in_eval": len(self.dropped_captions),
        }


def image_evaluates(image: str, eval_fraction: float) -> bool:
    return int(hashlib.sha256(image.encode("utf-8")).hexdigest()[:8], 16) < eval_fraction * 16**8


def split_by_image(images: Sequence[str], triplets: TextTriplets, eval_fraction: float = 0.5) -> Split:
    """Split the rows by image (see `Split`); deterministic, independent of row order."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(images) != len(triplets):
        raise ValueError(f"images has {len(images)} rows, triplets {len(triplets)}")
    evaluates = {image: image_evaluates(image, eval_fraction) for image in images}
    eval_rows = [i for i, image in enumerate(images) if evaluates[image]]
    eval_texts = {
        text for i in eval_rows for text in (triplets.captions[i], triplets.paraphrases[i], triplets.negations[i])
    }
    candidates = list(dict.fromkeys(triplets.captions[i] for i, image in enumerate(images) if not evaluates[image]))
    return Split(
        eval_fraction=eval_fraction,
        eval_rows=eval_rows,
        train_captions=[c for c in candidates if c not in eval_texts],
        eval_images=sorted(image for image, e in evaluates.items() if e),
        train_images=sorted(image for image, e in evaluates.items() if not e),
        dropped_captions=[c for c in candidates if c in eval_texts],
    )


def split_problems(images: Sequence[str], triplets: TextTriplets, split: Split) -> list[str]:
    """What makes `split` leak: an image on both sides, an evaluation text among the training captions."""
    problems = []
    eval_rows = set(split.eval_rows)
    eval_images = {images[i] for i in eval_rows}
    train_images = {images[i] for i in range(len(images)) if i not in eval_rows}
    if both := eval_images & train_images:
        problems.append(f"{len(both)} image(s) on both sides, e.g. {sorted(both)[0]}")
    eval_texts = {
        text for i in eval_rows for text in (triplets.captions[i], triplets.paraphrases[i], triplets.negations[i])
    }
    if leaked := eval_texts & set(split.train_captions):
        problems.append(f"{len(leaked)} training caption(s) occur in the evaluation part, e.g. {sorted(leaked)[0]!r}")
    train_image_captions = {triplets.captions[i] for i in range(len(images)) if images[i] in train_images}
    if strays := set(split.train_captions) - train_image_captions:
        problems.append(f"{len(strays)} training caption(s) of no training image, e.g. {sorted(strays)[0]!r}")
    return problems


# ----------------------------------------------------------------------------- training triplets


@dataclass
class TrainingTriplets:
    """Rules-made texts of each training caption: exactly `n_paraphrases` and `n_negations` each
    (a caption the rules give fewer has its own cycled to fill the slots)."""

    captions: list[str]
    paraphrases: list[list[str]]
    negations: list[list[str]]
    skipped: int  # captions with no paraphrase or no negation at all

    def __len__(self) -> int:
        return len(self.captions)


def rules_triplets(
    captions: Sequence[str], n_paraphrases: int, n_negations: int, negation_families: Sequence[str] = NEGATION_FAMILIES
) -> TrainingTriplets:
    """Paraphrases and negations of `captions` by the rules generator (negations of the chosen families only)."""
    from .triplets import rules, select_texts

    unknown = sorted(set(negation_families) - set(NEGATION_FAMILIES))
    if unknown or not negation_families:
        raise ValueError(
            f"negation_families must be a non-empty subset of {NEGATION_FAMILIES}, got {negation_families}"
        )
    generator = RulesGenerator()
    all_families = set(negation_families) == set(NEGATION_FAMILIES)
    kept, paraphrases, negations, skipped = [], [], [], 0
    for caption in captions:
        para, neg, _ = generator.generate(caption, n_paraphrases, n_negations if all_families else 0)
        if not all_families:
            candidates = [text for name, text in rules.negation_candidates(caption) if name in negation_families]
            neg, _ = select_texts(caption, candidates, n_negations, avoid=tuple(para))
        if not para or not neg:
            skipped += 1
            continue
        kept.append(caption)
        paraphrases.append([para[i % len(para)] for i in range(n_paraphrases)])
        negations.append([neg[i % len(neg)] for i in range(n_negations)])
    return TrainingTriplets(kept, paraphrases, negations, skipped)


# ----------------------------------------------------------------------------- the model


def encode(layers: nn.Module, states: TokenStates, texts: Sequence[str], chunk: int = 64) -> torch.Tensor:
    """L2-normalised MiniLM sentence embeddings `[len(texts), h]` of the cached `states` through `layers`.

    Distinct texts only, sorted by length and run in chunks of `chunk`: each chunk is padded to its own
    longest text, so padding costs little; the result is gathered back into `texts`' order (with grad).
    """
    unique = list(dict.fromkeys(texts))
    lengths = [int(states.offsets[states.index[t] + 1] - states.offsets[states.index[t]]) for t in unique]
    order = sorted(range(len(unique)), key=lambda i: lengths[i])
    pieces, positions = [], []
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        hidden, mask = states.batch([unique[i] for i in rows])
        pieces.append(mean_pool(run_layers(layers, hidden, mask), mask))
        positions += rows
    pooled = torch.cat(pieces)
    where = torch.empty(len(unique), dtype=torch.long)
    where[torch.tensor(positions)] = torch.arange(len(unique))
    at = {text: i for i, text in enumerate(unique)}
    return F.normalize(pooled[where[torch.tensor([at[t] for t in texts])]], dim=-1)


# ----------------------------------------------------------------------------- config


@dataclass
class RealLanguageConfig:
    out: str = "runs/real_language"
    sugarcrepe: str = DEFAULT_PATH
    eval_fraction: float = 0.5
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 100
    batch_size: int = 32  # captions per step
    layers: int = 1  # top MiniLM layers fine-tuned; the others are frozen and cached
    lr: float = 1e-4
    warmup: float = 0.1  # fraction of the steps with a linear warm-up; then linear decay to 0
    scale: float = 20.0  # logit scale (1 / temperature) of every objective
    paraphrases: int = 2  # rules paraphrases per caption (MNRL uses the first; SemCLIP all)
    negations: int = 4  # rules negations per caption (both hard-negative objectives use all)
    paraphrase_weight: float = 1.0
    hard_negative_weight: float = 4.0
    directions: str = "both"  # SemCLIP: "both" or "image_to_text" (caption -> texts only, as MNRL)
    # SugarCrepe++ has no "is not" negations: the `negate` family is left out of training by default
    negation_families: tuple[str, ...] = ("swap", "attribute", "relation", "object")
    limit_rows: int = 0  # first rows of the file only (tests)
    threads: int = 1  # torch threads per process (0: torch's default)
    jobs: int = 0  # processes working side by side (0: one per available core, at most 2)
    progress: bool = True
    cache_dir: str | None = None  # None: <out>/cache; "": no disk cache

    def run_settings(self) -> dict[str, Any]:
        """What a run's result depends on (its resume key): everything but where and how it reports."""
        settings = asdict(self)
        for name in ("out", "methods", "seeds", "threads", "jobs", "progress", "cache_dir"):
            settings.pop(name)
        settings["sugarcrepe"] = texts_fingerprint([open(self.sugarcrepe, "rb").read().decode("utf-8")])
        return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def check_config(config: RealLanguageConfig, n_layers: int) -> None:
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"--methods: {method!r} is not one of {METHODS}")
    if config.directions not in DIRECTIONS:
        raise ValueError(f"--directions must be one of {DIRECTIONS}, got {config.directions!r}")
    if not 1 <= config.layers <= n_layers:
        raise ValueError(f"--layers must be in [1, {n_layers}], got {config.layers}")
    for name in ("steps", "batch_size", "paraphrases", "negations"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if not config.seeds:
        raise ValueError("--seeds: give at least one seed")
    if config.threads < 0 or config.jobs < 0:
        raise ValueError(f"--threads and --jobs must be 0 (automatic) or more, got {config.threads}, {config.jobs}")


# ----------------------------------------------------------------------------- objectives


def objective_loss(
    method: str, config: RealLanguageConfig, caption: torch.Tensor, paraphrases: torch.Tensor, negations: torch.Tensor
) -> torch.Tensor:
    """The loss of one batch: `caption [B, h]`, `paraphrases [B, P, h]`, `negations [B, N, h]`, all normalised."""
    if method in ("mnrl", "mnrl_hard"):
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        columns = [caption, paraphrases[:, 0]]
        if method == "mnrl_hard":
            columns += list(negations.unbind(1))
        return MultipleNegativesRankingLoss(None, scale=config.scale).compute_loss_from_embeddings(columns, None)
    if method == "semclip":
        from semclip_kernels import semclip_loss

        extra = paraphrases[:, 1:] if paraphrases.shape[1] > 1 else None
        return semclip_loss(
            caption,
            paraphrases[:, 0],
            config.scale,
            extra,
            negations,
            paraphrase_weight=config.paraphrase_weight,
            hard_negative_weight=config.hard_negative_weight,
            directions=config.directions,
        )
    raise ValueError(f"no loss for method {method!r}")


def learning_rate(config: RealLanguageConfig, step: int) -> float:
    warmup = max(1, round(config.warmup * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * max(0.0, (config.steps - step) / max(1, config.steps - warmup))


def train(
    method: str,
    seed: int,
    config: RealLanguageConfig,
    base_top: nn.Module,
    states: TokenStates,
    data: TrainingTriplets,
    bar: tqdm,
) -> tuple[nn.Module, list[float]]:
    """Fine-tune a copy of `base_top` with `method` for `config.steps` steps; (layers, losses)."""
    torch.manual_seed(seed)
    top = copy.deepcopy(base_top).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(top.parameters(), lr=config.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    n_para = config.paraphrases if method == "semclip" else 1
    n_neg = 0 if method == "mnrl" else config.negations
    for step in range(config.steps):
        if len(order) < config.batch_size:  # a new epoch: reshuffle, never a caption twice in a batch
            order += torch.randperm(len(data), generator=generator).tolist()
        rows, order = order[: config.batch_size], order[config.batch_size :]
        captions = [data.captions[i] for i in rows]
        paraphrases = [p for i in rows for p in data.paraphrases[i][:n_para]]
        negations = [n for i in rows for n in data.negations[i][:n_neg]]
        embedded = encode(top, states, captions + paraphrases + negations)
        b = len(rows)
        caption = embedded[:b]
        paraphrase = embedded[b : b + len(paraphrases)].view(b, n_para, embedded.shape[1])
        negation = embedded[b + len(paraphrases) :].view(b, n_neg, embedded.shape[1])
        loss = objective_loss(method, config, caption, paraphrase, negation)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix_str(f"{method} seed {seed} loss {loss.item():.3f}", refresh=False)
    return top.eval(), losses


def evaluate(top: nn.Module, states: TokenStates, triplets: TextTriplets) -> dict[str, float]:
    """SugarCrepe++ text accuracy (TOT: caption-paraphrase closer than caption-negation and paraphrase-negation),
    and the caption-side half alone (caption closer to its paraphrase than to its negation)."""
    with torch.inference_mode():
        c, p, n = (
            encode(top, states, texts, chunk=256)
            for texts in (triplets.captions, triplets.paraphrases, triplets.negations)
        )
    caption_side = ((c * p).sum(-1) > (c * n).sum(-1)).double().mean().item()
    return {"text_accuracy": text_only_correct(c, p, n).double().mean().item(), "caption_accuracy": caption_side}


# ----------------------------------------------------------------------------- the comparison


def merge_states(parts: Sequence[TokenStates]) -> TokenStates:
    """One `TokenStates` holding the texts of all `parts` (disjoint sets), copied once."""
    index: dict[str, int] = {}
    offsets = [torch.zeros(1, dtype=torch.long)]
    for part in parts:
        index.update({text: row + len(index) for text, row in part.index.items()})
        offsets.append(part.offsets[1:] + offsets[-1][-1])
    return TokenStates(torch.cat([part.flat for part in parts]), torch.cat(offsets), index)


def frozen_bottom(model: nn.Module, n_frozen: int) -> nn.Module:
    """A BERT of `model`'s class, config and weights cut after its first `n_frozen` layers: the same states
    after them, without running the layers above (which `bottom_states`' full forward would compute and drop).
    Built afresh rather than copied: a transformers model's output-capturing hooks do not survive pickling."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n_frozen
    bottom = type(model)(config)
    wanted = bottom.state_dict()
    bottom.load_state_dict({name: value for name, value in model.state_dict().items() if name in wanted})
    return bottom.eval().requires_grad_(False)


def compute_states(
    model: nn.Module, tokenizer, texts: list[str], n_frozen: int, pool, progress: bool, desc: str
) -> TokenStates:
    """Frozen states of `texts`, in this process or split into chunks of similar length across `pool`."""
    if pool is None:
        return bottom_states(frozen_bottom(model, n_frozen), tokenizer, texts, n_frozen, progress=progress, desc=desc)
    by_length = sorted(texts, key=len)  # a chunk of similar lengths pads little
    size = 512
    chunks = [by_length[start : start + size] for start in range(0, len(by_length), size)]
    weights = {name: value.share_memory_() for name, value in model.state_dict().items()}
    source = (module_fingerprint(model), type(model), model.config, weights)
    parts = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress, dynamic_ncols=True) as bar:
        tasks = [(source, tokenizer, chunk, n_frozen) for chunk in chunks]
        for part in pool.imap_unordered(_states_task, tasks):
            parts.append(part)
            bar.update(len(part.index))
    return merge_states(parts)


def text_states(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    n_frozen: int,
    folder: str | None,
    progress: bool,
    pool=None,
) -> TokenStates:
    """Token states after the frozen `n_frozen` layers for `texts`, from a per-(model, depth) cache that grows:
    only texts it lacks are computed (an ablation that adds paraphrases computes just those), by `pool`'s
    workers where one is given. The cache file is keyed by the model's weights, the depth and the tokenizer,
    and written atomically."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    key = {
        "model": module_fingerprint(model),
        "n_frozen": n_frozen,
        "recipe": RECIPE_VERSION,
        "tokenizer": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
    }
    path = os.path.join(
        folder or "", "states-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".pt"
    )
    cached = None
    if folder and os.path.exists(path):
        stored = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(stored, dict) and stored.get("key") == key:  # else stale or foreign: recompute
            cached = stored["value"]
    missing = [t for t in dict.fromkeys(texts) if cached is None or t not in cached.index]
    if missing:
        computed = compute_states(
            model,
            tokenizer,
            missing,
            n_frozen,
            pool,
            progress,
            f"MiniLM layers 1-{n_frozen} ({len(missing)} new texts{', cached' if folder else ''})",
        )
        cached = computed if cached is None else merge_states([cached, computed])
        if folder:
            atomic_save({"key": key, "value": cached}, path)
    return cached


# ----------------------------------------------------------------------------- side-by-side processes
#
# Every op here is small (a batch of ~200 short texts through one layer), and an op split across threads
# waits for its slowest thread: on the shared 2-core machine a SemCLIP step on two threads cost 4x the CPU
# time of one thread and 3-6x its wall time. So the work goes side by side, one single-thread process per
# chunk of texts or run, which also makes every number independent of the machine's load and core count.

_progress_queue = None  # a worker's channel to the parent's progress bar


def _worker_start(threads: int, queue) -> None:
    global _progress_queue
    if threads > 0:
        torch.set_num_threads(threads)
    _progress_queue = queue


class _QueueBar:
    """The part of tqdm's interface `train` uses, forwarded to the parent's bar."""

    def update(self, n: int = 1) -> None:
        _progress_queue.put(("update", n))

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        _progress_queue.put(("postfix", text))


_bottoms: dict[tuple[str, int], nn.Module] = {}  # a worker's frozen bottoms, built once per (weights, depth)


def _states_task(task: tuple) -> TokenStates:
    (fingerprint, model_class, model_config, weights), tokenizer, texts, n_frozen = task
    if (fingerprint, n_frozen) not in _bottoms:
        model = model_class(model_config)
        model.load_state_dict(weights)
        _bottoms[(fingerprint, n_frozen)] = frozen_bottom(model, n_frozen)
    return bottom_states(_bottoms[(fingerprint, n_frozen)], tokenizer, texts, n_frozen, progress=False)


def _run_task(task: tuple) -> dict[str, Any]:
    return run_one(*task, bar=_QueueBar())


def start_pool(config: RealLanguageConfig):
    """(pool, progress queue) of `config.jobs` spawned single-purpose workers, or (None, None) for one job."""
    jobs = config.jobs or min(2, available_cores())
    if jobs == 1:
        return None, None
    # spawn, not fork: a forked child would inherit torch's thread pools in whatever state they are in
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    return context.Pool(jobs, initializer=_worker_start, initargs=(config.threads, queue)), queue


def run_one(
    method: str,
    seed: int,
    config: RealLanguageConfig,
    base_top: nn.Module,
    states: TokenStates,
    data: TrainingTriplets,
    eval_set: TextTriplets,
    bar,
) -> dict[str, Any]:
    """Train (unless `untouched`) and evaluate one (method, seed)."""
    mark = time.perf_counter()
    if method == "untouched":
        top, losses = base_top, []
    else:
        top, losses = train(method, seed, config, base_top, states, data, bar)
    train_seconds = time.perf_counter() - mark
    return {
        "method": method,
        "seed": seed,
        **evaluate(top, states, eval_set),
        "train_seconds": train_seconds,
        "losses": losses,
        "settings": config.run_settings(),
    }


def run_all(todo: list[tuple[str, int, str]], arguments: tuple, pool, queue, bar: tqdm):
    """Yield (method, seed, path, result) of every run in `todo`, in this process or across `pool`.

    `arguments` are `run_one`'s after (method, seed). Across the pool, the costliest runs start first (the
    runs with more texts per step), so the last to finish is a short one.
    """
    if pool is None:
        for method, seed, path in todo:
            yield method, seed, path, run_one(method, seed, *arguments, bar=bar)
        return
    cost = {"semclip": 3, "mnrl_hard": 2, "mnrl": 1, "untouched": 0}
    ordered = sorted(todo, key=lambda item: -cost[item[0]])
    pending = [(item, pool.apply_async(_run_task, ((item[0], item[1], *arguments),))) for item in ordered]
    while pending:
        while not queue.empty():
            kind, value = queue.get()
            if kind == "update":
                bar.update(value)
            else:
                bar.set_postfix_str(value, refresh=False)
        still = []
        for item, result in pending:
            if result.ready():
                yield (*item, result.get())  # a worker's exception is raised here
            else:
                still.append((item, result))
        pending = still
        if pending:
            pending[0][1].wait(timeout=0.5)
    while not queue.empty():  # the last runs' final steps
        kind, value = queue.get()
        if kind == "update":
            bar.update(value)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per method: mean, population standard deviation, min and max of the text accuracy over seeds."""
    table = {}
    for method, results in runs.items():
        values = [r["text_accuracy"] for r in results]
        caption_side = [r["caption_accuracy"] for r in results]
        table[method] = {
            "mean": statistics.fmean(values),
            "std": statistics.pstdev(values),
            "min": min(values),
            "max": max(values),
            "seeds": len(values),
            "caption_accuracy_mean": statistics.fmean(caption_side),
            "train_seconds_mean": statistics.fmean(r.get("train_seconds", 0.0) for r in results),
        }
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'method':<10}  {'text acc %':>10}  {'± std':>6}  {'min':>5}  {'max':>5}  {'caption-side %':>14}  "
        f"{'train s':>7}"
    ]
    for method, row in table.items():
        lines.append(
            f"{method:<10}  {100 * row['mean']:>10.1f}  {100 * row['std']:>6.1f}  {100 * row['min']:>5.1f}  "
            f"{100 * row['max']:>5.1f}  {100 * row['caption_accuracy_mean']:>14.1f}  "
            f"{row['train_seconds_mean']:>7.0f}"
        )
    return "\n".join(lines)


def verdict(table: dict[str, dict[str, float]]) -> list[str]:
    """The goal, in words: SemCLIP ≥ 5 points above untouched and ahead of MNRL with hard negatives by more
    than the seeds' spread (the larger of the two methods' max − min)."""
    if not {"untouched", "semclip", "mnrl_hard"} <= set(table):
        return []
    untouched, semclip, hard = table["untouched"], table["semclip"], table["mnrl_hard"]
    gain = 100 * (semclip["mean"] - untouched["mean"])
    lead = 100 * (semclip["mean"] - hard["mean"])
    spread = 100 * max(semclip["max"] - semclip["min"], hard["max"] - hard["min"])
    return [
        f"SemCLIP vs untouched: {gain:+.1f} points (goal ≥ +5.0): "
        + ("met" if gain >= 5 else f"missed by {5 - gain:.1f}"),
        f"SemCLIP vs MNRL+hard negatives: {lead:+.1f} points, seeds' spread {spread:.1f}: "
        + ("met" if lead > spread else f"missed by {spread - lead:.1f}"),
        f"moonshot 83 %: SemCLIP {100 * semclip['mean']:.1f} %",
    ]


def plot(table: dict[str, dict[str, float]], runs: dict[str, list[dict[str, Any]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(table)
    means = [100 * table[m]["mean"] for m in names]
    spans = [
        [100 * (table[m]["mean"] - table[m]["min"]) for m in names],
        [100 * (table[m]["max"] - table[m]["mean"]) for m in names],
    ]
    bars.bar(names, means, yerr=spans, capsize=4, color=["0.6", "tab:blue", "tab:orange", "tab:green"][: len(names)])
    for x, value in enumerate(means):
        bars.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", xytext=(0, 6), textcoords="offset points")
    low = min(means) - 8
    bars.set(
        ylabel="SugarCrepe++ text accuracy (%), held-out images",
        ylim=(max(0, low), min(100, max(means) + 6)),
        title="mean over seeds, bars: min-max",
    )
    bars.grid(axis="y", alpha=0.3)
    for method, results in runs.items():
        for r, result in enumerate(results):
            if result.get("losses"):
                curves.plot(
                    result["losses"],
                    alpha=0.7,
                    lw=1,
                    label=method if r == 0 else None,
                    color={"mnrl": "tab:blue", "mnrl_hard": "tab:orange", "semclip": "tab:green"}.get(method),
                )
    curves.set(xlabel="step", ylabel="training loss", title="training loss per seed")
    curves.legend(fontsize=8)
    curves.grid(alpha=0.3)
    fig.suptitle("MiniLM fine-tuned on rules triplets of SugarCrepe++ training images", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


def run_key(method: str, seed: int, config: RealLanguageConfig) -> str:
    settings = {
        "untouched": {"layers": config.layers, "eval_fraction": config.eval_fraction, "limit_rows": config.limit_rows}
    }.get(method, config.run_settings())
    blob = json.dumps({"method": method, "seed": seed if method != "untouched" else 0, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(config: RealLanguageConfig, model_and_tokenizer: tuple[nn.Module, Any] | None = None) -> dict[str, Any]:
    """The whole comparison; `model_and_tokenizer` defaults to the installed MiniLM (tests pass a tiny BERT)."""
    start = time.perf_counter()
    load_at_start = os.getloadavg()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    if model_and_tokenizer is None:
        tokenizer, model = load_minilm()
    else:
        model, tokenizer = model_and_tokenizer
    n_layers = model.config.num_hidden_layers
    check_config(config, n_layers)
    seconds = {"load": time.perf_counter() - start}

    images, triplets = load_triplets_with_images(config.sugarcrepe, config.limit_rows)
    split = split_by_image(images, triplets, config.eval_fraction)
    if problems := split_problems(images, triplets, split):
        raise RuntimeError("the split leaks: " + "; ".join(problems))
    eval_set = TextTriplets(
        *([getattr(triplets, name)[i] for i in split.eval_rows] for name in ("captions", "paraphrases", "negations"))
    )
    data = rules_triplets(split.train_captions, config.paraphrases, config.negations, config.negation_families)
    record = {
        "rule": " ".join(Split.__doc__.split("Rule: ")[1].split()),
        **split.counts(),
        "train_captions_with_rules_triplets": len(data),
        "train_captions_skipped_no_rules_output": data.skipped,
        "eval_image_files": split.eval_images,
        "train_image_files": split.train_images,
        "dropped_captions": split.dropped_captions,
    }
    atomic_write_text(json.dumps(record, indent=1) + "\n", os.path.join(config.out, "split.json"))

    mark = time.perf_counter()
    n_frozen = n_layers - config.layers
    texts = list(
        dict.fromkeys(
            data.captions
            + [t for ts in data.paraphrases for t in ts]
            + [t for ts in data.negations for t in ts]
            + eval_set.captions
            + eval_set.paraphrases
            + eval_set.negations
        )
    )
    cache_dir = os.path.join(config.out, "cache") if config.cache_dir is None else (config.cache_dir or None)
    pool, queue = start_pool(config)
    try:
        states = text_states(model, tokenizer, texts, n_frozen, cache_dir, config.progress, pool)
        base_top = model.encoder.layer[n_frozen:]
        seconds["frozen_states"] = time.perf_counter() - mark
        if pool is not None:  # the workers map these instead of receiving a copy per run
            states.flat.share_memory_()
            states.offsets.share_memory_()

        mark = time.perf_counter()
        results_dir = os.path.join(config.out, "runs")
        runs: dict[str, list[dict[str, Any]]] = {}
        todo = []
        for method in config.methods:
            for seed in config.seeds[:1] if method == "untouched" else config.seeds:
                path = os.path.join(results_dir, f"{method}-seed{seed}-{run_key(method, seed, config)}.json")
                if os.path.exists(path):
                    with open(path, encoding="utf-8") as f:
                        runs.setdefault(method, []).append(json.load(f))
                else:
                    todo.append((method, seed, path))
        total_steps = sum(0 if method == "untouched" else config.steps for method, _, _ in todo)
        arguments = (config, base_top, states, data, eval_set)
        with tqdm(
            total=total_steps, desc="training", unit="step", disable=not config.progress, dynamic_ncols=True
        ) as bar:
            for method, seed, path, result in run_all(todo, arguments, pool, queue, bar):
                atomic_write_text(json.dumps(result) + "\n", path)
                runs.setdefault(method, []).append(result)
                if config.progress:
                    bar.write(
                        f"{method} seed {seed}: text accuracy {100 * result['text_accuracy']:.1f} % "
                        f"({result['train_seconds']:.0f} s)"
                    )
        seconds["runs"] = time.perf_counter() - mark
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds["cpu"] = sum(
        getattr(resource.getrusage(who), field)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for field in ("ru_utime", "ru_stime")
    )
    seconds["total"] = time.perf_counter() - start

    runs = {m: sorted(runs[m], key=lambda r: r["seed"]) for m in METHODS if m in runs}
    table = summarize(runs)
    lines = verdict(table)
    text = format_table(table)
    print(
        f"\nsplit by image: {len(split.eval_rows)} evaluation rows of {len(split.eval_images)} images; "
        f"{len(data)} training captions of {len(split.train_images)} images "
        f"({len(split.dropped_captions)} dropped as evaluation texts, {data.skipped} without rules output)"
    )
    print(text)
    for line in lines:
        print(line)
    print(
        f"wall time {seconds['total']:.0f} s (load {seconds['load']:.0f} s, frozen states "
        f"{seconds['frozen_states']:.0f} s, runs {seconds['runs']:.0f} s); CPU time {seconds['cpu']:.0f} s "
        f"(this process and its workers, user + system); load average {load_at_start[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs"
    )
    plot(table, runs, os.path.join(config.out, "real_language.png"))
    results = {
        "table": table,
        "text": text,
        "verdict": lines,
        "split": split.counts(),
        "train_captions": len(data),
        "seconds": seconds,
        "load_average": os.getloadavg(),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "runs": {m: [{k: v for k, v in r.items() if k != "losses"} for r in rs] for m, rs in runs.items()},
    }
    atomic_write_text(json.dumps(results, indent=2) + "\n", os.path.join(config.out, "results.json"))
    print(f"wrote {os.path.join(config.out, 'results.json')} and {os.path.join(config.out, 'real_language.png')}")
    return results


def parse_args(argv: list[str] | None = None) -> RealLanguageConfig:
    defaults = RealLanguageConfig()
    parser = argparse.ArgumentParser(prog="python -m training.real_language", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=defaults.out, help="output folder: results.json, real_language.png, split.json"
    )
    parser.add_argument("--sugarcrepe", default=defaults.sugarcrepe, help="SugarCrepe++ triplets CSV")
    parser.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction)
    parser.add_argument("--methods", nargs="+", default=list(defaults.methods), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(defaults.seeds))
    for name in ("steps", "batch_size", "layers", "paraphrases", "negations", "limit_rows"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch threads per process (default 1; 0: torch's)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=defaults.jobs,
        help="processes side by side, one run each (default 0: one per available core, at most 2)",
    )
    for name in ("lr", "warmup", "scale", "paraphrase_weight", "hard_negative_weight"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument(
        "--directions",
        default=defaults.directions,
        choices=DIRECTIONS,
        help="SemCLIP's directions (image_to_text: caption -> texts only, as MNRL)",
    )
    parser.add_argument(
        "--negation-families",
        nargs="+",
        default=list(defaults.negation_families),
        choices=NEGATION_FAMILIES,
        help="rules negation families to train on",
    )
    parser.add_argument("--cache-dir", default=None, help="frozen-state cache folder (default <out>/cache; '' none)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = vars(parser.parse_args(argv))
    for name in ("methods", "seeds", "negation_families"):
        args[name] = tuple(args[name])
    return RealLanguageConfig(**args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
