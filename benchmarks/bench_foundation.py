"""The foundation's performance expectation, as three ratios from one run.

    python -m benchmarks.bench_foundation            # CPU, fp32, B=8192, Pn=Mn=1, d=512 (a few minutes)

1. time:   "torch" forward+backward / "reference" forward+backward     goal ≤ 1
2. memory: "reference" peak extra memory / "torch" peak extra memory    goal ≥ 8
3. growth: "torch" peak extra memory at B / at B/2                      goal ≤ 2.4

`--competing-processes N` times the two backends again with N CPU-bound processes
running beside them (the "loaded" row; the time goal holds in both rows):

    python -m benchmarks.bench_foundation --competing-processes 1 --time-only   # quiet vs loaded

Peak memory: one fresh subprocess per point (peak RSS growth over the inputs, see
`benchmarks.measure`). Time: both backends in this process on the same inputs,
calls alternated (reference, torch, reference, torch, …) so that the noise of a
shared machine hits both alike; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
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

GOALS = {"time": ("≤", 1.0), "time loaded": ("≤", 1.0), "memory": ("≥", 8.0), "growth": ("≤", 2.4)}


def alternated_median_seconds(point: Point, methods: tuple[str, ...], repeats: int) -> dict[str, float]:
    """Median forward+backward time of each method on the same inputs, calls interleaved."""
    inputs = make_inputs(point)
    calls = {}
    for method in methods:
        loss_fn = loss_function(method)
        calls[method] = lambda loss_fn=loss_fn: forward_backward(loss_fn, inputs)
    return interleaved_medians(calls, repeats)


@contextlib.contextmanager
def competing_processes(n: int):
    """`n` CPU-bound processes (busy loops) running while the block runs: a machine loaded by other jobs."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend")
    parser.add_argument(
        "--competing-processes",
        type=int,
        default=0,
        metavar="N",
        help="also time with N CPU-bound processes running beside the backends (default 0: quiet only)",
    )
    parser.add_argument("--time-only", action="store_true", help="skip the memory points (time ratios only)")
    args = parser.parse_args(argv)
    if args.competing_processes < 0:
        parser.error(f"--competing-processes must be >= 0 (got {args.competing_processes})")

    point = Point(method="", batch=args.batch, dim=args.dim, n_paraphrases=1, n_negations=1, timed=False)
    half = dataclasses.replace(point, batch=args.batch // 2)
    print(
        f"CPU ({torch.get_num_threads()} threads), fp32, B={args.batch}, d={args.dim}, one paraphrase and one "
        f"negation per image (K={point.n_cols})",
        flush=True,
    )
    peaks = {}
    for label, p in (("reference", point), ("torch", point), ("torch B/2", half)) if not args.time_only else ():
        result = run_point_in_subprocess(dataclasses.replace(p, method=label.split()[0]))
        if "error" in result:
            sys.exit(f"{label}: {result['error']}")
        peaks[label] = result["peak_extra_bytes"]
        print(f"  peak extra memory {label:<10} B={p.batch:<6} {format_bytes(peaks[label])}", flush=True)
    settings = {"time": 0}
    if args.competing_processes:
        settings["time loaded"] = args.competing_processes
    ratios = {}
    for name, n_busy in settings.items():
        with competing_processes(n_busy):
            seconds = alternated_median_seconds(point, ("reference", "torch"), args.repeats)
            load = os.getloadavg()[0]
        for method, s in seconds.items():
            print(
                f"  forward+backward  {method:<10} B={args.batch:<6} {s:.2f} s (median of {args.repeats}; "
                f"{n_busy} competing processes, load average {load:.1f} on {os.cpu_count()} CPUs)",
                flush=True,
            )
        ratios[name] = seconds["torch"] / seconds["reference"]
    if peaks:
        ratios["memory"] = peaks["reference"] / peaks["torch"]
        ratios["growth"] = peaks["torch"] / peaks["torch B/2"]
    labels = {
        "time": "torch time / reference time",
        "time loaded": f"the same, {args.competing_processes} competing processes",
        "memory": "reference peak extra / torch peak extra",
        "growth": f"torch peak extra at B={args.batch} / B={args.batch // 2}",
    }
    for name, label in labels.items():
        if name not in ratios:
            continue
        print(f"{label:<44} {ratios[name]:6.2f}   ({verdict(ratios[name], *GOALS[name])})")
    return ratios


if __name__ == "__main__":
    main()
