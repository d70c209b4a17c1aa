"""The one command to run on a CUDA machine and send back: correctness, then time and memory of every loss.

    python -m benchmarks.gpu_report [--out gpu_report] [--quick] [--dims 512 768] [--max-batch 65536]

1. Correctness: every backend (and each Triton variant) against a float64 evaluation
   (`backend="reference"` in float64 on CPU) at small shapes, float32 and bfloat16,
   random and trained regimes: loss and every gradient, relative max-norm.
2. Timing: forward+backward, median of `--repeats` calls after a warm-up, with the peak
   memory beyond the inputs (`torch.cuda.max_memory_allocated`), for the random regime
   (unit features, τ = 1/0.07) and the trained regime (aligned pairs, τ = 100, where the
   gradient filter skips most tiles); bfloat16 and float32; d in `--dims`; B = 4096, 8192, …
   until a method runs out of memory or exceeds `--max-call-seconds`.
   Methods: the Triton variants (`triton`: default, filter on; `triton-nofilter`:
   `grad_filter_eps=0`; `triton-tf32`: float32 inputs with TF32 dots), `torch`, `reference`,
   open_clip's `ClipLoss` (NegCLIP-style, materialized) and Inf-CL when installed.

Writes `report.md`, `report.json` and `time_vs_batch.png` (matplotlib) to `--out`.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

import semclip_kernels

from .measure import (
    PeakMemory,
    Point,
    available_methods,
    format_bytes,
    loss_function,
    make_inputs,
    max_norm_rel_err,
    median_seconds,
    trained_inputs,
)

TRITON_VARIANTS = ("triton", "triton-nofilter", "triton-tf32")
REGIMES = ("random", "trained")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Correctness tolerances of docs/contract.md §4 (relative max-norm).
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@dataclass
class Check:
    method: str
    dtype: str
    regime: str
    loss_error: float
    grad_error: float  # worst over the five inputs
    tolerance: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.loss_error <= self.tolerance and self.grad_error <= self.tolerance


@dataclass
class Timing:
    method: str
    regime: str
    dtype: str
    dim: int
    batch: int
    seconds: float | None = None
    peak_bytes: int | None = None
    error: str = ""


@contextlib.contextmanager
def _allow_tf32(value: bool) -> Iterator[None]:
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = value
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


def method_call(method: str, dtype: str) -> Callable[..., torch.Tensor] | None:
    """`f(image, text, logit_scale, paraphrase, negation) -> loss`, or None if the method does not apply."""
    if method == "triton-tf32" and dtype != "float32":
        return None
    if method in TRITON_VARIANTS:
        options = {"grad_filter_eps": 0.0} if method == "triton-nofilter" else {}

        def triton_loss(image, text, logit_scale, paraphrase, negation):
            with _allow_tf32(method == "triton-tf32"):
                return semclip_kernels.semclip_loss(
                    image, text, logit_scale, paraphrase, negation, backend="triton", **options
                )

        return triton_loss
    return loss_function(method)


def regime_inputs(regime: str, batch: int, dim: int, dtype: str, device: str, seed: int = 0) -> dict:
    """Leaves requiring grad: `random` (unit features, τ = 1/0.07) or `trained` (aligned, τ = 100)."""
    if regime == "random":
        return make_inputs(Point(method="", batch=batch, dim=dim, dtype=dtype, device=device, seed=seed))
    inputs = trained_inputs(batch, dim, seed)
    return {name: x.detach().to(device=device, dtype=DTYPES[dtype] if x.dim() else torch.float32).requires_grad_()
            for name, x in inputs.items()}  # fmt: skip


def _loss_and_grads(call, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x for x in inputs.values() if x is not None]
    for leaf in leaves:
        leaf.grad = None
    loss = call(**inputs)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def check_backends(methods: list[str], device: str, batch: int = 300, dim: int = 96) -> list[Check]:
    """Each method against `backend="reference"` in float64 on CPU, on the same (rounded) inputs."""
    checks = []
    for regime in REGIMES:
        for dtype in DTYPES:
            inputs = regime_inputs(regime, batch, dim, dtype, device)
            exact = {k: None if v is None else v.detach().cpu().double().requires_grad_() for k, v in inputs.items()}
            ref_loss, ref_grads = _loss_and_grads(loss_function("reference"), exact)
            for method in methods:
                call = method_call(method, dtype)
                if call is None or method == "inf_cl":  # Inf-CL computes NegCLIP, not SemCLIP, with paraphrases
                    continue
                check = Check(method, dtype, regime, float("nan"), float("nan"), TOLERANCE[dtype])
                try:
                    loss, grads = _loss_and_grads(call, inputs)
                    check.loss_error = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
                    check.grad_error = max(max_norm_rel_err(g.cpu(), r) for g, r in zip(grads, ref_grads))
                except Exception as error:  # noqa: BLE001  (reported, not raised: the report goes on)
                    check.error = f"{type(error).__name__}: {error}"
                checks.append(check)
    return checks


def time_point(method: str, regime: str, dtype: str, dim: int, batch: int, device: str, repeats: int) -> Timing:
    timing = Timing(method, regime, dtype, dim, batch)
    call = method_call(method, dtype)
    try:
        inputs = regime_inputs(regime, batch, dim, dtype, device)
        with PeakMemory(torch.device(device)) as memory:
            _loss_and_grads(call, inputs)  # the measured call, and the warm-up
        timing.peak_bytes = memory.extra_bytes
        timing.seconds = median_seconds(lambda: _loss_and_grads(call, inputs), repeats, torch.device(device))
    except torch.cuda.OutOfMemoryError:
        timing.error = "out of memory"
    except Exception as error:  # noqa: BLE001
        timing.error = f"{type(error).__name__}: {error}"
    finally:
        torch.cuda.empty_cache()
    return timing


def time_methods(
    methods: list[str], dims: list[int], batches: list[int], device: str, repeats: int, max_call_seconds: float,
    log: Callable[[Timing], None] = lambda t: None,
) -> list[Timing]:  # fmt: skip
    timings = []
    for regime in REGIMES:
        for dtype in DTYPES:
            for dim in dims:
                for method in methods:
                    if method_call(method, dtype) is None:
                        continue
                    for batch in batches:
                        timing = time_point(method, regime, dtype, dim, batch, device, repeats)
                        timings.append(timing)
                        log(timing)
                        # Quadratic growth: the next batch (twice as large) takes about 4x as long.
                        if timing.error or 4 * timing.seconds > max_call_seconds:
                            break
    return timings


def environment() -> dict[str, str]:
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", sms=str(props.multi_processor_count),
                   memory=format_bytes(props.total_memory), cuda=str(torch.version.cuda))  # fmt: skip
    return env


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def to_markdown(env: dict[str, str], checks: list[Check], timings: list[Timing]) -> str:
    lines = ["# GPU report", "", ", ".join(f"{k}: {v}" for k, v in env.items()), "", "## Correctness", ""]
    lines += ["Against `backend=\"reference\"` in float64 (relative max-norm; gradients: worst of five inputs).", ""]
    lines += ["| method | dtype | regime | loss error | gradient error | tolerance | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for c in checks:
        verdict = "ok" if c.ok else (f"ERROR {c.error}" if c.error else "FAIL")
        lines.append(f"| {c.method} | {c.dtype} | {c.regime} | {c.loss_error:.1e} | {c.grad_error:.1e} | "
                     f"{c.tolerance:.0e} | {verdict} |")  # fmt: skip
    lines += ["", "## Forward + backward", "", "Milliseconds (median) / peak memory beyond the inputs.", ""]
    groups: dict[tuple[str, str, int], list[Timing]] = {}
    for t in timings:
        groups.setdefault((t.regime, t.dtype, t.dim), []).append(t)
    for (regime, dtype, dim), group in groups.items():
        methods = list(dict.fromkeys(t.method for t in group))
        batches = sorted({t.batch for t in group})
        cell = {(t.method, t.batch): t for t in group}
        lines += [f"### {regime}, {dtype}, d = {dim}", ""]
        lines += ["| B | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
        for batch in batches:
            row = []
            for method in methods:
                t = cell.get((method, batch))
                if t is None:
                    row.append("")
                elif t.error:
                    row.append(t.error)
                else:
                    row.append(f"{_ms(t.seconds)} / {format_bytes(t.peak_bytes)}")
            lines.append(f"| {batch} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_plot(timings: list[Timing], path: str) -> bool:
    """Time against batch, one panel per (regime, dtype, d), log-log. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = list(dict.fromkeys((t.regime, t.dtype, t.dim) for t in timings))
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        group = [t for t in timings if (t.regime, t.dtype, t.dim) == key and t.seconds is not None]
        for method in dict.fromkeys(t.method for t in group):
            points = sorted((t.batch, t.seconds * 1e3) for t in group if t.method == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="batch B", ylabel="forward+backward (ms)",
               title="{}, {}, d = {}".format(*key))  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_report")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--min-batch", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=1 << 17)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-call-seconds", type=float, default=20.0)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="d = 512, B up to 16384, 3 repeats")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_report: no CUDA device here (or TRITON_INTERPRET=1 is set): nothing to measure.")
        return 0
    if args.quick:
        args.dims, args.max_batch, args.repeats = [512], 16384, 3
    methods = args.methods or available_methods("cuda", backends=(*TRITON_VARIANTS, "torch", "reference"))
    batches = [b for b in (args.min_batch << k for k in range(20)) if b <= args.max_batch]
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print(env, flush=True)
    checks = check_backends(methods, "cuda")
    for c in checks:
        print(f"check {c.method:<16} {c.dtype:<9} {c.regime:<8} loss {c.loss_error:.1e} grad {c.grad_error:.1e} "
              f"{'ok' if c.ok else 'FAIL ' + c.error}", flush=True)  # fmt: skip
    timings = time_methods(
        methods, args.dims, batches, "cuda", args.repeats, args.max_call_seconds,
        log=lambda t: print(f"time {t.method:<16} {t.regime:<8} {t.dtype:<9} d={t.dim} B={t.batch}: "
                            f"{t.error or _ms(t.seconds) + ' ms, ' + format_bytes(t.peak_bytes)}", flush=True),
    )  # fmt: skip
    with open(os.path.join(args.out, "report.json"), "w") as out:
        json.dump({"environment": env, "checks": [asdict(c) | {"ok": c.ok} for c in checks],
                   "timings": [asdict(t) for t in timings]}, out, indent=1)  # fmt: skip
    with open(os.path.join(args.out, "report.md"), "w") as out:
        out.write(to_markdown(env, checks, timings))
    write_plot(timings, os.path.join(args.out, "time_vs_batch.png"))
    print(f"wrote {args.out}/report.md, report.json, time_vs_batch.png")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
