"""The sigmoid loss's performance expectation, from one run.

    nice python -m benchmarks.bench_siglip          # CPU, fp32, B=8192, d=512, Pn=Mn=1 (K=24576), weights 1

Methods, each forward+backward of the same loss on the same inputs:
- "reference", "torch", "cpp": `semsiglip_loss(backend=...)` (the fused ones compute the feature gradients
  during the forward, the default);
- "torch:recompute", "cpp:recompute": the same backends with the forward computing the sum alone and the
  backward recomputing the tiles (what `GRADIENTS_IN_FORWARD` switches);
- "open_clip": the installed open_clip's `SigLipLoss` computing the same loss the way an open_clip user
  would: its pair loss on (images, captions) + on (images, paraphrases) + its negatives-only pair loss on
  (images, negations), the form its distributed code uses for other ranks' texts (three `B × B` logits).

Goals: peak extra memory of "torch" and "cpp" at least 8× below "reference"; "cpp" faster than "open_clip".
Peak memory: one fresh subprocess per method (peak RSS growth over the inputs, `benchmarks.measure`).
Time: the methods alternate in this process on the same inputs; medians of `--repeats` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import semclip_kernels
from semclip_kernels.backends import sigmoid_dispatch

from .measure import REPO_ROOT, PeakMemory, format_bytes, interleaved_medians, verdict

METHODS = ("reference", "torch", "torch:recompute", "cpp", "cpp:recompute", "open_clip")
LOGIT_SCALE, LOGIT_BIAS = 10.0, -10.0  # SigLIP's initialisation (log t = log 10, b = −10)
RESULT_PREFIX = "RESULT "
PAGE_BYTES = 4096


def make_inputs(batch: int, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def features(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, dim, generator=generator), dim=-1).requires_grad_()

    return {
        "image": features(batch),
        "text": features(batch),
        "paraphrase": features(batch, 1),
        "negation": features(batch, 1),
        "logit_scale": torch.tensor(LOGIT_SCALE, requires_grad=True),
        "logit_bias": torch.tensor(LOGIT_BIAS, requires_grad=True),
    }


def open_clip_siglip(image, text, paraphrase, negation, logit_scale, logit_bias) -> torch.Tensor:
    """The same loss (weights 1) with open_clip's SigLipLoss (see the module docstring)."""
    from open_clip.loss import SigLipLoss

    siglip = SigLipLoss()
    loss = siglip._loss(image, text, logit_scale, logit_bias)
    for p in range(paraphrase.shape[1]):
        loss = loss + siglip._loss(image, paraphrase[:, p], logit_scale, logit_bias)
    for m in range(negation.shape[1]):
        loss = loss + siglip._loss(image, negation[:, m], logit_scale, logit_bias, negative_only=True)
    return loss


def run_method(method: str, inputs: dict[str, torch.Tensor]) -> float:
    """One training-style call: fresh gradients, loss, backward. Returns the loss value."""
    for tensor in inputs.values():
        tensor.grad = None
    if method == "open_clip":
        loss = open_clip_siglip(**inputs)
    else:
        backend, _, variant = method.partition(":")
        saved = dict(sigmoid_dispatch.GRADIENTS_IN_FORWARD)
        if variant == "recompute":
            sigmoid_dispatch.GRADIENTS_IN_FORWARD[backend] = False
        try:
            loss = semclip_kernels.semsiglip_loss(
                inputs["image"], inputs["text"], inputs["logit_scale"], inputs["logit_bias"],
                inputs["paraphrase"], inputs["negation"], backend=backend,
            )  # fmt: skip
            loss.backward()
        finally:
            sigmoid_dispatch.GRADIENTS_IN_FORWARD.clear()  # back to what the kernels say, or the saved overrides
            sigmoid_dispatch.GRADIENTS_IN_FORWARD.update(saved)
        return float(loss.detach())
    loss.backward()
    return float(loss.detach())


def peak_in_subprocess(method: str, batch: int, dim: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    point = json.dumps({"method": method, "batch": batch, "dim": dim})
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_siglip", "--point", point],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}


def measure_peak(method: str, batch: int, dim: int) -> dict:
    run_method(method, make_inputs(64, dim))  # warm-up: kernels, thread pools
    inputs = make_inputs(batch, dim)
    with PeakMemory(torch.device("cpu")) as memory:
        value = run_method(method, inputs)
    return {"method": method, "peak_extra_bytes": memory.extra_bytes, "loss": value}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: one peak-memory measurement
    args = parser.parse_args(argv)
    if args.point:
        point = json.loads(args.point)
        print(RESULT_PREFIX + json.dumps(measure_peak(point["method"], point["batch"], point["dim"])), flush=True)
        return {}

    methods = tuple(args.methods.split(","))
    print(
        f"CPU ({torch.get_num_threads()} threads), fp32, B={args.batch}, d={args.dim}, one paraphrase and one "
        f"negation per image (K={3 * args.batch}), τ={LOGIT_SCALE}, b={LOGIT_BIAS}, weights 1",
        flush=True,
    )
    peaks, losses = {}, {}
    for method in methods:
        result = peak_in_subprocess(method, args.batch, args.dim)
        if "error" in result:
            sys.exit(f"{method}: {result['error']}")
        peaks[method], losses[method] = result["peak_extra_bytes"], result["loss"]
        print(f"  peak extra memory {method:<16} {format_bytes(peaks[method]):>10}   loss {losses[method]:.6f}")
    inputs = make_inputs(args.batch, args.dim)
    seconds = interleaved_medians({m: (lambda m=m: run_method(m, inputs)) for m in methods}, args.repeats)
    for method, s in seconds.items():
        print(f"  forward+backward  {method:<16} {s:8.2f} s (median of {args.repeats})")

    ratios = {}
    for fused in ("torch", "cpp"):
        # One page is the resolution of RSS: at a tiny batch the peaks may not grow at all (no ratio then).
        if fused in methods and "reference" in methods and peaks["reference"] >= PAGE_BYTES:
            ratios[f"memory {fused}"] = peaks["reference"] / max(peaks[fused], PAGE_BYTES)
    if "cpp" in methods and "open_clip" in methods:
        ratios["time cpp vs open_clip"] = seconds["open_clip"] / seconds["cpp"]
    for fused in ("torch", "cpp"):
        if fused in methods and f"{fused}:recompute" in methods:
            ratios[f"{fused} recompute / gradients-in-forward time"] = seconds[f"{fused}:recompute"] / seconds[fused]
    if "torch" in methods and "reference" in methods:
        ratios["time reference / torch"] = seconds["reference"] / seconds["torch"]
    goals = {"memory torch": ("≥", 8.0), "memory cpp": ("≥", 8.0), "time cpp vs open_clip": ("≥", 1.0)}
    for name, value in ratios.items():
        label = {
            "memory torch": "reference peak extra / torch peak extra",
            "memory cpp": "reference peak extra / cpp peak extra",
            "time cpp vs open_clip": "open_clip SigLipLoss time / cpp time",
        }.get(name, name)
        status = f"   ({verdict(value, *goals[name])})" if name in goals else ""
        print(f"{label:<48} {value:6.2f}{status}")
    return ratios


if __name__ == "__main__":
    main()
