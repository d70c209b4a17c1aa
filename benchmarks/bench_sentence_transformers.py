"""SemCLIPRankingLoss against sentence-transformers' CachedMultipleNegativesRankingLoss, side by side in one run.

    nice python -m benchmarks.bench_sentence_transformers          # global batch 4096 and 16384 (~10 min, 2 cores)

A small BERT-like `SentenceTransformer` from a `transformers` config (random weights, mean pooling, float32 on
CPU), batches of (anchor, positive, one hard negative) of random 4 to 12-word sentences, cosine similarity,
scale 20, mini-batches of 64 rows for both losses (gradient caching: the model runs per mini-batch).

1. the loss's own memory, the same definition for both: the peak resident-set growth (VmHWM after
   clear_refs) of one whole training step `loss(features).backward()`, each loss in a fresh subprocess after
   a warm-up step, with a model that costs nothing (`CachedEmbeddings`: each row's embedding looked up in a
   fixed table, times one learnable scalar), so that every byte of growth is the loss's: its first passes'
   embeddings, the scores, normalization and scratch of the loss and its backward, the cached gradients and
   the replay; minus the cache any gradient-cached loss must hold at once, the columns' embeddings and their
   gradients (2 × 3 × B × d float32; printed). Goal: ours ≤ 1/8 of theirs. The growth with the cache is
   printed too.
2. the step: `loss(features).backward()` of the BERT-like model (both passes of the model over every
   mini-batch and the loss), the two losses alternated in this process, median of `--repeats`. Goal: ours ≤
   theirs. Their loss and ours on the same step are printed (equal up to float32 rounding).

One memory point by hand:

    python -m benchmarks.bench_sentence_transformers --point '{"method": "ours", "batch": 4096}'
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

from .measure import REPO_ROOT, RESULT_PREFIX, PeakMemory, format_bytes, verdict

MEMORY_GOAL, TIME_GOAL = 1 / 8, 1.0
METHODS = ("theirs", "ours")
LABELS = {"theirs": "CachedMultipleNegativesRankingLoss", "ours": "SemCLIPRankingLoss"}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)]


def build_model(path: str, hidden: int, layers: int, seed: int = 0):
    """A random BERT-like `SentenceTransformer` (mean pooling) saved in and loaded from `path`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as file:
        file.write("\n".join(VOCAB))
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden,
                        max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    BertTokenizerFast(vocab_file=vocab_file).save_pretrained(path)
    transformer = Transformer(path)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def batch_features(model, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Model inputs of the columns anchor, positive, hard negative: `batch` random sentences each."""
    rng = random.Random(seed)
    return [
        model.preprocess([" ".join(rng.choice(VOCAB[5:]) for _ in range(rng.randint(4, 12))) for _ in range(batch)])
        for _ in range(3)
    ]


def make_loss(method: str, model, mini_batch: int):
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from semclip_kernels.integrations.sentence_transformers import SemCLIPRankingLoss

    if method == "theirs":
        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch)
    return SemCLIPRankingLoss(model, mini_batch_size=mini_batch)


# --- the loss's own memory (one subprocess per point) ------------------------------------------


class CachedEmbeddings(nn.Module):
    """A model that costs nothing: row `features["row"]`'s embedding is row `row` of a fixed table, times one
    learnable scalar (so that the replay's backward runs). Its activations are one mini-batch's embeddings."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": self.table[features["row"]] * self.weight}


def memory_point(method: str, batch: int, dim: int, mini_batch: int, seed: int = 0) -> dict:
    """Peak RSS growth of one step of the loss, in this process, with `CachedEmbeddings` of `[batch, dim]` × 3
    columns as the model (sentence-transformers' cached loss indexes the model as a `Sequential`)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(CachedEmbeddings(torch.randn(3 * batch, dim, generator=gen)))
    loss = make_loss(method, model, mini_batch)

    def features(rows: int) -> list[dict[str, torch.Tensor]]:
        return [{"row": torch.arange(column * batch, column * batch + rows)} for column in range(3)]

    loss(features(2 * mini_batch), None).backward()  # first calls allocate pools and load code
    step = features(batch)
    cache_bytes = 2 * 3 * batch * dim * 4  # the embeddings and their gradients
    with PeakMemory(torch.device("cpu")) as peak:
        value = loss(step, None)
        value.backward()
    return {"method": method, "batch": batch, "loss": float(value), "peak_extra_bytes": peak.extra_bytes,
            "cache_bytes": cache_bytes, "own_bytes": peak.extra_bytes - cache_bytes, "how": peak.method}  # fmt: skip


def run_memory_point(point: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_sentence_transformers", "--point", json.dumps(point)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return {"error": (done.stderr.strip().splitlines() or ["no result"])[-1]}


# --- the step ----------------------------------------------------------------------------------


def step_times(model, batch: int, mini_batch: int, repeats: int) -> dict[str, dict]:
    """Median seconds of `loss(features).backward()` per method, the two alternated; and each one's loss."""
    features = batch_features(model, batch, seed=batch)
    losses = {method: make_loss(method, model, mini_batch) for method in METHODS}
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    values: dict[str, float] = {}
    warm = batch_features(model, 2 * mini_batch, seed=1)
    for method in METHODS:  # warm-up at a small size
        losses[method](warm, None).backward()
    for _ in range(repeats):
        for method in METHODS:
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            value = losses[method](features, None)
            value.backward()
            times[method].append(time.perf_counter() - start)
            values[method] = float(value)
    return {method: {"seconds": statistics.median(times[method]), "loss": values[method]} for method in METHODS}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384], help="Global batch sizes.")
    parser.add_argument("--mini-batch", type=int, default=64, help="Rows per mini-batch (both losses).")
    parser.add_argument("--hidden", type=int, default=128, help="BERT hidden size (= the embedding dim).")
    parser.add_argument("--layers", type=int, default=2, help="BERT layers.")
    parser.add_argument("--repeats", type=int, default=1, help="Timed steps per method and batch (median).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds per memory subprocess.")
    parser.add_argument("--point", default=None, help="Measure one memory point (JSON) and print it.")
    parser.add_argument("--step-batches", type=int, nargs="*", default=None,
                        help="Time the whole step at these batches only (default: every --batches).")  # fmt: skip
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        point = json.loads(args.point)
        result = memory_point(point["method"], point["batch"], point.get("dim", args.hidden),
                              point.get("mini_batch", args.mini_batch))  # fmt: skip
        print(RESULT_PREFIX + json.dumps(result))
        return result

    print(f"model: BERT, hidden {args.hidden}, {args.layers} layers, random weights, float32, CPU, "
          f"{torch.get_num_threads()} threads; columns: anchor, positive, 1 hard negative; mini-batches of "
          f"{args.mini_batch}; cos_sim, scale 20; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    report: dict = {"rows": []}
    with tempfile.TemporaryDirectory() as path:
        model = build_model(path, args.hidden, args.layers)
        for batch in args.batches:
            memory = {m: run_memory_point({"method": m, "batch": batch, "dim": args.hidden,
                                           "mini_batch": args.mini_batch}, args.timeout) for m in METHODS}  # fmt: skip
            timed = args.step_batches is None or batch in args.step_batches
            steps = step_times(model, batch, args.mini_batch, args.repeats) if timed else None
            row = {"batch": batch, "memory": memory, "steps": steps}
            if all("error" not in memory[m] for m in METHODS):
                row["memory_ratio"] = memory["ours"]["own_bytes"] / max(memory["theirs"]["own_bytes"], 1)
            if timed:
                row["time_ratio"] = steps["ours"]["seconds"] / steps["theirs"]["seconds"]
            report["rows"].append(row)
    report["load_after"] = os.getloadavg()[0]

    print("\n| global batch | loss memory theirs | loss memory ours | ours/theirs | with the cache theirs / ours "
          "(ratio) | step theirs | step ours | ours/theirs | loss theirs | loss ours |")  # fmt: skip
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in report["rows"]:
        memory, steps = row["memory"], row["steps"]
        own = [format_bytes(memory[m]["own_bytes"]) if "error" not in memory[m] else memory[m]["error"]
               for m in METHODS]  # fmt: skip
        ratio = f"{row['memory_ratio']:.3f}" if "memory_ratio" in row else "-"
        total = "-"
        if "memory_ratio" in row:
            peaks = [memory[m]["peak_extra_bytes"] for m in METHODS]
            total = f"{format_bytes(peaks[0])} / {format_bytes(peaks[1])} ({peaks[1] / max(peaks[0], 1):.3f})"
        step = "| - | - | - | - | - |" if steps is None else (
            f"| {steps['theirs']['seconds']:.2f} s | {steps['ours']['seconds']:.2f} s | {row['time_ratio']:.2f} | "
            f"{steps['theirs']['loss']:.6f} | {steps['ours']['loss']:.6f} |")  # fmt: skip
        print(f"| {row['batch']} | {own[0]} | {own[1]} | {ratio} | {total} {step}")
    how = next((row["memory"]["ours"].get("how") for row in report["rows"] if "how" in row["memory"]["ours"]), "")
    print(f"\nloss memory: {how} of one step with a lookup model (CachedEmbeddings), minus the cache "
          f"(the embeddings and their gradients, 2·3·B·d float32); load after {report['load_after']:.1f}")  # fmt: skip
    memory_ratios = [row["memory_ratio"] for row in report["rows"] if "memory_ratio" in row]
    worst_memory = max(memory_ratios) if len(memory_ratios) == len(report["rows"]) else float("inf")
    worst_time = max((row["time_ratio"] for row in report["rows"] if "time_ratio" in row), default=float("inf"))
    report["memory_verdict"] = verdict(worst_memory, "≤", MEMORY_GOAL)
    report["time_verdict"] = verdict(worst_time, "≤", TIME_GOAL)
    print(f"verdict: loss memory ours/theirs (worst) {worst_memory:.3f}: {report['memory_verdict']}")
    if any("time_ratio" in row for row in report["rows"]):
        print(f"verdict: step time ours/theirs (worst) {worst_time:.2f}: {report['time_verdict']}")
    else:
        print("verdict: step time ours/theirs: not measured (no step timed)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
