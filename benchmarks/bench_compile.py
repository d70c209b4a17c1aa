"""torch.compile against eager: forward+backward of the loss, compiled with fullgraph=True.

    python -m benchmarks.bench_compile            # CPU, fp32, B=8192, Pn=Mn=1, d=512, backends torch and cpp

For each backend: the eager loss and `torch.compile(fullgraph=True)` of the same function, timed
on the same inputs with calls interleaved (eager, compiled, eager, ...), after one compiling call
(reported separately). Goal: compiled time / eager time ≤ 1.1 (compiling the loss must not cost
speed; the loss is a custom operator, so the gain is in the surrounding graph, not here). Also
prints the loss difference between the two, which must stay within 1e-6 relative.
"""

from __future__ import annotations

import argparse
import time

import torch

import semclip_kernels

from .measure import Point, forward_backward, interleaved_medians, make_inputs, verdict

GOAL = ("≤", 1.1)


def loss_of(backend: str):
    def loss(image, text, logit_scale, paraphrase, negation):
        return semclip_kernels.semclip_loss(image, text, logit_scale, paraphrase, negation, backend=backend)

    return loss


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["torch", "cpp"])
    args = parser.parse_args(argv)
    point = Point(method="", batch=args.batch, dim=args.dim)
    inputs = make_inputs(point)
    print(f"CPU ({torch.get_num_threads()} threads), fp32, B={args.batch}, d={args.dim}, K={point.n_cols}")
    ratios = {}
    for backend in args.backends:
        ok, reason = semclip_kernels.backend_status(backend, "cpu")
        if not ok:
            print(f"  {backend}: unavailable ({reason})")
            continue
        eager = loss_of(backend)
        compiled = torch.compile(eager, fullgraph=True, dynamic=True)
        start = time.perf_counter()
        compiled_loss = compiled(**inputs)
        compiled_loss.backward()
        compile_seconds = time.perf_counter() - start
        eager_loss = eager(**inputs)
        difference = abs(float(compiled_loss.detach()) - float(eager_loss.detach())) / abs(float(eager_loss.detach()))
        seconds = interleaved_medians(
            {
                "eager": lambda eager=eager: forward_backward(eager, inputs),
                "compiled": lambda compiled=compiled: forward_backward(compiled, inputs),
            },
            args.repeats,
        )
        ratios[backend] = seconds["compiled"] / seconds["eager"]
        print(
            f"  {backend:<6} eager {seconds['eager']:.2f} s, compiled {seconds['compiled']:.2f} s "
            f"(first call with compilation {compile_seconds:.0f} s), loss rel. difference {difference:.1e}"
        )
        print(f"  {backend:<6} compiled / eager {ratios[backend]:.3f}   ({verdict(ratios[backend], *GOAL)})")
    return ratios


if __name__ == "__main__":
    main()
