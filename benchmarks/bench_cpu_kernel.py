"""The compiled CPU kernel (backend="cpp") against its goals, side by side in one run.

    python -m benchmarks.bench_cpu_kernel                 # B=8192, d=512, Pn=Mn=1, fp32 (a few minutes)
    python -m benchmarks.bench_cpu_kernel --batch 2048    # quicker look

Two regimes, forward+backward:

1. random: unit-norm random features at τ = 1/0.07 ≈ 14.3 (CLIP at initialization).
   cpp time / reference time (goal ≤ 0.7), cpp GEMM-equivalents (≤ 4.3), cpp peak extra memory /
   reference peak extra memory (≤ 1/40; each in a fresh subprocess, see `benchmarks.measure`).
2. trained: τ = 100, each image's caption and paraphrase near it, its negation a little farther, all
   else far (a peaked softmax), default gradient filtering: GEMM-equivalents (goal ≤ 2.5), the fraction
   of tiles the backward skipped, and every gradient's error against a float64 evaluation (the tiled
   "torch" backend in float64, an independent implementation), goal ≤ 1e-4 (docs/contract.md §4).

"GEMM-equivalents" = time ÷ the time of one [B, d] @ [d, K] product measured in the same run. Calls
are interleaved (GEMM, cpp, reference, GEMM, cpp, …) and medians taken, so the noise of a shared
machine hits all alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

import torch

import semclip_kernels
from semclip_kernels.backends import cpp, last_backward_stats

from .measure import (
    Point,
    format_bytes,
    forward_backward,
    interleaved_medians,
    loss_function,
    make_inputs,
    max_norm_rel_err,
    run_point_in_subprocess,
    trained_inputs,
    verdict,
)

GOALS = {
    "random time ratio": ("≤", 0.7),
    "random GEMM-eq": ("≤", 4.3),
    "random memory ratio": ("≤", 1 / 40),
    "trained GEMM-eq": ("≤", 2.5),
    "trained max grad error": ("≤", 1e-4),
}


def gemm_call(batch: int, dim: int, n_cols: int) -> Callable[[], None]:
    """One [B, d] @ [d, K] float32 product, in row blocks into one reused ≤ 512 MiB output."""
    rows = torch.randn(batch, dim)
    cols_t = torch.randn(dim, n_cols)
    block = max(1, min(batch, (512 * 2**20) // (4 * n_cols)))
    out = torch.empty(block, n_cols)

    def run() -> None:
        for start in range(0, batch, block):
            stop = min(start + block, batch)
            torch.mm(rows[start:stop], cols_t, out=out[: stop - start])

    return run


def gradients(loss_fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    forward_backward(loss_fn, inputs)
    return {name: x.grad.clone() for name, x in inputs.items()}


def cpp_loss(grad_filter_eps: float | None) -> Callable[..., torch.Tensor]:
    def loss(image, text, logit_scale, paraphrase, negation) -> torch.Tensor:
        return semclip_kernels.semclip_loss(
            image, text, logit_scale, paraphrase, negation, backend="cpp", grad_filter_eps=grad_filter_eps
        )

    return loss


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (median)")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory subprocesses")
    args = parser.parse_args(argv)
    ok, reason = cpp.is_available(torch.device("cpu"))
    if not ok:
        sys.exit(reason)

    point = Point(method="cpp", batch=args.batch, dim=args.dim, n_paraphrases=1, n_negations=1, timed=False)
    batch, dim, n_cols = point.batch, point.dim, point.n_cols
    print(f"CPU ({torch.get_num_threads()} threads), fp32, B={batch}, d={dim}, Pn=Mn=1 (K={n_cols}), "
          f"tiles {cpp.DEFAULT_BLOCK_ROWS}x{cpp.DEFAULT_BLOCK_COLS}", flush=True)
    results: dict[str, float] = {}

    # --- random features, τ ≈ 14.3 ---------------------------------------------------------------
    if not args.skip_memory:
        peaks = {}
        for method in ("reference", "cpp"):
            result = run_point_in_subprocess(dataclasses.replace(point, method=method))
            if "error" in result:
                sys.exit(f"{method}: {result['error']}")
            peaks[method] = result["peak_extra_bytes"]
            print(f"  random  peak extra memory {method:<9} {format_bytes(peaks[method])}", flush=True)
        results["random memory ratio"] = peaks["cpp"] / peaks["reference"]
    inputs = make_inputs(point)
    seconds = interleaved_medians(
        {
            "gemm": gemm_call(batch, dim, n_cols),
            "cpp": lambda: forward_backward(loss_function("cpp"), inputs),
            "reference": lambda: forward_backward(loss_function("reference"), inputs),
        },
        args.repeats,
    )
    for name, s in seconds.items():
        print(f"  random  {name:<9} {s:7.3f} s (median of {args.repeats})", flush=True)
    results["random time ratio"] = seconds["cpp"] / seconds["reference"]
    results["random GEMM-eq"] = seconds["cpp"] / seconds["gemm"]
    results["random reference GEMM-eq"] = seconds["reference"] / seconds["gemm"]
    del inputs

    # --- trained regime, τ = 100, default filtering ---------------------------------------------
    inputs = trained_inputs(batch, dim)
    seconds = interleaved_medians(
        {
            "gemm": gemm_call(batch, dim, n_cols),
            "cpp": lambda: forward_backward(cpp_loss(None), inputs),
            "cpp eps=0": lambda: forward_backward(cpp_loss(0.0), inputs),
        },
        args.repeats,
    )
    stats = last_backward_stats("cpp")  # of the last call: eps = 0
    forward_backward(cpp_loss(None), inputs)
    stats_filtered = last_backward_stats("cpp")
    for name, s in seconds.items():
        print(f"  trained {name:<9} {s:7.3f} s (median of {args.repeats})", flush=True)
    results["trained GEMM-eq"] = seconds["cpp"] / seconds["gemm"]
    results["trained GEMM-eq without filtering"] = seconds["cpp eps=0"] / seconds["gemm"]
    results["trained skipped tile fraction"] = stats_filtered.skipped_fraction
    print(f"  trained tiles skipped by the default filter: {stats_filtered.skipped_tiles} of {stats_filtered.tiles}"
          f" (eps=0: {stats.skipped_tiles})", flush=True)

    filtered = gradients(cpp_loss(None), inputs)
    unfiltered = gradients(cpp_loss(0.0), inputs)
    inputs64 = {name: x.detach().double().requires_grad_() for name, x in inputs.items()}
    expected = gradients(loss_function("torch"), inputs64)  # tiled torch backend in float64
    errors = {name: max_norm_rel_err(filtered[name], expected[name]) for name in expected}
    errors_unfiltered = {name: max_norm_rel_err(unfiltered[name], expected[name]) for name in expected}
    for name in expected:
        print(f"  trained grad {name:<11} error vs float64: filtered {errors[name]:.2e}, "
              f"unfiltered {errors_unfiltered[name]:.2e}")
    results["trained max grad error"] = max(errors.values())

    print()
    labels = {
        "random time ratio": "random:  cpp time / reference time",
        "random GEMM-eq": "random:  cpp GEMM-equivalents",
        "random memory ratio": "random:  cpp peak extra / reference peak extra",
        "trained GEMM-eq": "trained: cpp GEMM-equivalents (default filter)",
        "trained max grad error": "trained: max gradient error vs float64",
    }
    for name, label in labels.items():
        if name in results:
            print(f"{label:<48} {results[name]:9.4g}   ({verdict(results[name], *GOALS[name])})")
    print(f"{'random:  reference GEMM-equivalents':<48} {results['random reference GEMM-eq']:9.4g}")
    print(f"{'trained: cpp GEMM-equivalents, filter off':<48} {results['trained GEMM-eq without filtering']:9.4g}")
    print(f"{'trained: fraction of tiles skipped':<48} {results['trained skipped tile fraction']:9.4g}")
    return results


if __name__ == "__main__":
    main()
