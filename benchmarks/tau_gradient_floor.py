"""τ's float32 gradient against docs/contract.md §4's floor, over drawn peaked batches, every backend.

    PYTHONPATH=$PWD python -m benchmarks.tau_gradient_floor [--seed 0] [--examples 300]

Draws float32 batches of the peaked regimes (tests/property_regimes.py: trained-like, near-duplicate paraphrases,
near convergence; B 4..20, d 16..32, any weights, τ 10..100, default or 16-wide tiles), keeps those with a
float64 loss of at least 1e-6, and prints per backend the worst `error / bound` of `∂L/∂τ` against

- `R`: the float32 products' rounding alone (`2^-24·√d·Σ|G|·|a||c|`), and
- §4's floor `max(1e-4·|∂L/∂τ|, R + R_H + R_K)`: the first-order effect of float32 logits (`R_H`, through the
  weights) and float32 log-partitions (`R_K`) too (tests/oracle.py, `scale_gradient_rounding_terms`),

with the verdict: every backend within §4's floor. Triton runs through its interpreter on a machine without a
GPU (set before import).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import semclip_kernels as sk  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from oracle import scale_gradient_rounding_terms, semclip_loss_float64  # noqa: E402
from property_regimes import LOSS_FLOOR, Example  # noqa: E402

BACKENDS = ("reference", "torch", "cpp", "triton")


def draw(rng: random.Random) -> Example:
    """A peaked float32 example: the property tests' regimes, drawn with `random` (many, fast)."""
    regime = rng.choice(["trained_like", "near_duplicate", "near_convergence"])
    near_duplicate = regime == "near_duplicate"
    return Example(regime, rng.randint(4, 20), rng.randint(16, 32),
                   rng.choice([1, 2]) if near_duplicate else rng.choice([None, 1, 2]), rng.choice([None, 1, 2]),
                   rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(10 if near_duplicate else 30, 100), "float32",
                   rng.choice([None, 16]), rng.choice([None, 16]), rng.randrange(10**6),
                   closeness=rng.uniform(0.015, 0.15) if regime == "near_convergence" else 0.0)  # fmt: skip


def float64_scale_gradient(ex: Example) -> tuple[float, float]:
    """(loss, ∂L/∂τ) in float64 on the example's float32 inputs, at τ as a float32 tensor holds it."""
    image, text, para, neg = (None if t is None else t.double() for t in ex.features())
    scale = torch.tensor(ex.tau).double().requires_grad_()
    loss = semclip_loss_float64(image, text, scale, para, neg, ex.paraphrase_weight, ex.hard_negative_weight)
    loss.backward()
    return float(loss.detach()), float(scale.grad)


def backend_scale_gradient(ex: Example, backend: str) -> float:
    image, text, para, neg = ex.features()
    scale = torch.tensor(ex.tau, requires_grad=True)
    sk.semclip_loss(image, text, scale, para, neg, backend=backend, paraphrase_weight=ex.paraphrase_weight,
                    hard_negative_weight=ex.hard_negative_weight, **ex.options()).backward()  # fmt: skip
    return float(scale.grad)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=300, help="batches drawn (those below the loss floor skipped)")
    parser.add_argument("--backends", nargs="+", default=[b for b in BACKENDS if sk.backend_status(b, "cpu")[0]])
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    worst = {(b, f): (0.0, "") for b in args.backends for f in ("R", "§4")}
    over = dict.fromkeys(worst, 0)
    looser = []  # (R + R_H + R_K) / R where the floor is above 1e-4 relative
    counted = 0
    for _ in tqdm(range(args.examples), desc="batches", leave=False):
        ex = draw(rng)
        loss, want = float64_scale_gradient(ex)
        if loss < LOSS_FLOOR or want == 0:
            continue
        counted += 1
        image, text, para, neg = (None if t is None else t.double() for t in ex.features())
        terms = scale_gradient_rounding_terms(image, text, ex.tau, para, neg, ex.paraphrase_weight,
                                              ex.hard_negative_weight)  # fmt: skip
        floor = sum(terms.values())
        if floor > 1e-4 * abs(want):
            looser.append(floor / terms["R"])
        bounds = {"R": max(1e-4 * abs(want), terms["R"]), "§4": max(1e-4 * abs(want), floor)}
        for backend in args.backends:
            err = abs(backend_scale_gradient(ex, backend) - want)
            for name, bound in bounds.items():
                ratio = err / bound
                over[backend, name] += ratio > 1
                if ratio > worst[backend, name][0]:
                    worst[backend, name] = (ratio, f"relative error {err / abs(want):.3g}, ∂L/∂τ {want:.4g}, {ex}")
    print(f"seed {args.seed}: {counted} of {args.examples} drawn batches have a float64 loss >= {LOSS_FLOOR}")
    if looser:
        print(f"where §4's floor is above 1e-4 relative ({len(looser)} batches): floor / R median "
              f"{statistics.median(looser):.3g}, max {max(looser):.3g}")  # fmt: skip
    for backend in args.backends:
        for name in ("R", "§4"):
            ratio, where = worst[backend, name]
            count = over[backend, name]
            print(f"  {backend:9s} worst error / {name:2s} bound {ratio:6.3f}  over 1: {count:3d}  {where}")
    ok = all(over[b, "§4"] == 0 for b in args.backends)
    print("verdict:", "every backend within §4's floor" if ok else "MISSED: a backend exceeds §4's floor (above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
