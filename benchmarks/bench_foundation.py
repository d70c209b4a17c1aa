"""The foundation's performance expectation, as three ratios from one run.

    python -m benchmarks.bench_foundation            # CPU, fp32, B=8192, Pn=Mn=1, d=512 (a few minutes)

1. time:   "torch" forward+backward / "reference" forward+backward     goal ≤ 1
2. memory: "reference" peak extra memory / "torch" peak extra memory    goal ≥ 8
3. growth: "torch" peak extra memory at B / at B/2                      goal ≤ 2.4

Peak memory: one fresh subprocess per point (peak RSS growth over the inputs, see
`benchmarks.measure`). Time: both backends in this process on the same inputs,
calls alternated (reference, torch, reference, torch, …) so that the noise of a
shared machine hits both alike; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from .measure import (
    Point,
    format_bytes,
    forward_backward,
    interleaved_medians,
    loss_function,
    make_inputs,
    run_point_in_subprocess,
    verdict,
)

GOALS = {"time": ("≤", 1.0), "memory": ("≥", 8.0), "growth": ("≤", 2.4)}


def alternated_median_seconds(point: Point, methods: tuple[str, ...], repeats: int) -> dict[str, float]:
    """Median forward+backward time of each method on the same inputs, calls interleaved."""
    inputs = make_inputs(point)
    calls = {}
    for method in methods:
        loss_fn = loss_function(method)
        calls[method] = lambda loss_fn=loss_fn: forward_backward(loss_fn, inputs)
    return interleaved_medians(calls, repeats)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend")
    args = parser.parse_args(argv)

    point = Point(method="", batch=args.batch, dim=args.dim, n_paraphrases=1, n_negations=1, timed=False)
    half = dataclasses.replace(point, batch=args.batch // 2)
    print(
        f"CPU ({torch.get_num_threads()} threads), fp32, B={args.batch}, d={args.dim}, one paraphrase and one "
        f"negation per image (K={point.n_cols})",
        flush=True,
    )
    peaks = {}
    for label, p in (("reference", point), ("torch", point), ("torch B/2", half)):
        result = run_point_in_subprocess(dataclasses.replace(p, method=label.split()[0]))
        if "error" in result:
            sys.exit(f"{label}: {result['error']}")
        peaks[label] = result["peak_extra_bytes"]
        print(f"  peak extra memory {label:<10} B={p.batch:<6} {format_bytes(peaks[label])}", flush=True)
    seconds = alternated_median_seconds(point, ("reference", "torch"), args.repeats)
    for method, s in seconds.items():
        print(f"  forward+backward  {method:<10} B={args.batch:<6} {s:.2f} s (median of {args.repeats})")

    ratios = {
        "time": seconds["torch"] / seconds["reference"],
        "memory": peaks["reference"] / peaks["torch"],
        "growth": peaks["torch"] / peaks["torch B/2"],
    }
    labels = {
        "time": "torch time / reference time",
        "memory": "reference peak extra / torch peak extra",
        "growth": f"torch peak extra at B={args.batch} / B={args.batch // 2}",
    }
    for name, label in labels.items():
        print(f"{label:<44} {ratios[name]:6.2f}   ({verdict(ratios[name], *GOALS[name])})")
    return ratios


if __name__ == "__main__":
    main()
