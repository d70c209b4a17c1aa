"""PNG of a run's training loss and evaluation curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EVAL_KEYS = ("negation_accuracy", "paraphrase_r1", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl file."""
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                (evals if record.get("kind") == "eval" else train).append(record)
    return train, evals


def plot_runs(runs: dict[str, str], path: str) -> None:
    """Plot several runs (label -> metrics.jsonl) into one PNG: loss on the left, eval metrics on the right."""
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", ":", "-."]
    for run_index, (label, metrics_path) in enumerate(runs.items()):
        train, evals = read_metrics(metrics_path)
        style = styles[run_index % len(styles)]
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], style, label=label)
        for key_index, key in enumerate(EVAL_KEYS):
            points = [(r["step"], r[key]) for r in evals if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax_eval.plot(steps, [100 * v for v in values], style, color=f"C{key_index}",
                             marker="o", markersize=3, label=f"{label} {key}")
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_eval.set(xlabel="step", ylabel="%", title="validation metrics", ylim=(0, 100))
    ax_loss.legend()
    ax_eval.legend(fontsize=7, ncol=2)
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
