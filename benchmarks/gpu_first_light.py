"""First light on a CUDA machine in under 8 minutes: correctness of every backend, then the B = 8192 and
32768 timings that say whether the fused kernels meet their goals. Needs only torch and triton.

    python -m benchmarks.gpu_first_light [--out DIR] [--batches 8192 32768] [--dim 768] [--repeats 5]
    python -m benchmarks.gpu_first_light --device cpu --dry-run   # the same code path at tiny sizes (CPU tests)

1. Correctness: `triton`, `torch`, `reference` (and `cpp` on CPU) in the input dtype against
   `backend="reference"` evaluated in float64 on CPU from the same rounded inputs, at a small shape, float32
   and bfloat16, random and trained regimes: loss and every gradient, relative max-norm against
   docs/contract.md §4's tolerances. (`reference` in bfloat16 shows the floor of 16-bit arithmetic: in the
   trained regime its image gradient is about 3.5e-2 off on CPU, above §4's 2e-2.)
2. Timing: forward+backward (median of `--repeats` after a warm-up) and the peak memory beyond the inputs,
   bfloat16, d = `--dim`, one paraphrase and one negation per image, random (unit features, τ = 1/0.07)
   and trained (aligned pairs, τ = 100) regimes. Methods: `triton` once per candidate tile
   (config.TILE_CANDIDATES, pinned through SEMCLIP_TRITON_TILE), `torch`, `reference` (until it runs out of
   memory), and one `B×d @ d×3B` product (cuBLAS on CUDA): times are also given in GEMM-equivalents.
3. Goals at the largest batch: triton ≤ 5 GEMM-equivalents, faster than reference, peak memory
   ≤ 1/50 of reference's.

Writes `first_light.md` and `first_light.json` to `--out` (default `$OUT`, else `first_light/`; a `--dry-run`
without either writes to a new temporary folder, so a test of the code path leaves nothing in the tree); the
JSON is rewritten after every measurement, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import semclip_kernels as sk

REGIMES = {"random": 1 / 0.07, "trained": 100.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # docs/contract.md §4, relative max-norm
GOAL_GEMMS, GOAL_SPEEDUP, GOAL_MEMORY_RATIO = 5.0, 1.0, 50.0


@dataclass
class Check:
    method: str
    dtype: str
    regime: str
    loss_error: float = math.nan
    grad_error: float = math.nan  # worst over the five inputs
    tolerance: float = math.nan
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.loss_error <= self.tolerance and self.grad_error <= self.tolerance


@dataclass
class Timing:
    method: str
    regime: str
    batch: int
    dim: int
    seconds: float | None = None
    peak_bytes: int | None = None
    gemms: float | None = None  # seconds / the B×d @ d×3B product's seconds
    error: str = ""


@dataclass
class Report:
    environment: dict[str, str]
    checks: list[Check] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    gemm_seconds: dict[str, float] = field(default_factory=dict)
    goals: list[str] = field(default_factory=list)
    tuning: dict[str, dict] = field(default_factory=dict)  # the tuning cache after the checks (tiles, ms)


def regime_inputs(regime: str, batch: int, dim: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Leaves requiring grad. random: independent unit features; trained: caption, paraphrase and negation
    near their image (cos ≈ 0.94, 0.91, 0.78), the softmax peaked at τ = 100."""
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=gen), dim=-1)

    image = unit(batch, dim)
    if regime == "random":
        text, paraphrase, negation = unit(batch, dim), unit(batch, 1, dim), unit(batch, 1, dim)
    else:
        text = F.normalize(image + 0.35 * unit(batch, dim), dim=-1)
        paraphrase = F.normalize(image[:, None] + 0.45 * unit(batch, 1, dim), dim=-1)
        negation = F.normalize(image[:, None] + 0.8 * unit(batch, 1, dim), dim=-1)
    features = dict(image=image, text=text, paraphrase=paraphrase, negation=negation)
    inputs = {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in features.items()}
    inputs["logit_scale"] = torch.tensor(REGIMES[regime], device=device, requires_grad=True)
    return inputs


def loss_call(backend: str) -> Callable[..., torch.Tensor]:
    def call(image, text, paraphrase, negation, logit_scale):
        return sk.semclip_loss(image, text, logit_scale, paraphrase, negation, backend=backend)

    return call


def loss_and_grads(call: Callable[..., torch.Tensor], inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for leaf in inputs.values():
        leaf.grad = None
    loss = call(**inputs)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in inputs.values()]


def max_norm_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    return (actual.double() - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def check_backends(methods: list[str], device: str, batch: int, dim: int) -> list[Check]:
    checks = []
    for regime in REGIMES:
        for dtype_name, dtype in DTYPES.items():
            inputs = regime_inputs(regime, batch, dim, dtype, device)
            exact = {k: v.detach().cpu().double().requires_grad_() for k, v in inputs.items()}
            ref_loss, ref_grads = loss_and_grads(loss_call("reference"), exact)
            for method in methods:
                check = Check(method, dtype_name, regime, tolerance=TOLERANCE[dtype_name])
                try:
                    loss, grads = loss_and_grads(loss_call(method), inputs)
                    check.loss_error = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
                    check.grad_error = max(max_norm_rel_err(g.cpu(), r) for g, r in zip(grads, ref_grads))
                except Exception as error:  # noqa: BLE001  (reported, not raised: the report goes on)
                    check.error = f"{type(error).__name__}: {error}"
                checks.append(check)
    return checks


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(run: Callable[[], object], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_extra_bytes(run: Callable[[], object], device: str) -> int | None:
    """Peak memory the call allocates beyond what was allocated before it (CUDA only)."""
    if not device.startswith("cuda"):
        run()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated() - before


def gemm_seconds(batch: int, dim: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """One `B×d @ d×3B` product (the forward's logits, materialized): the unit of GEMM-equivalents."""
    rows = torch.randn(batch, dim, device=device, dtype=dtype)
    cols = torch.randn(3 * batch, dim, device=device, dtype=dtype)
    out = torch.empty(batch, 3 * batch, device=device, dtype=dtype)
    torch.mm(rows, cols.T, out=out)  # warm-up (cuBLAS heuristics)
    return median_seconds(lambda: torch.mm(rows, cols.T, out=out), repeats, device)


def time_method(
    label: str, call: Callable, tile: str | None, regime: str, batch: int, dim: int, device: str, repeats: int
) -> Timing:
    timing = Timing(label, regime, batch, dim)
    try:
        inputs = regime_inputs(regime, batch, dim, torch.bfloat16, device)
        with pinned_tile(tile):
            timing.peak_bytes = peak_extra_bytes(lambda: loss_and_grads(call, inputs), device)  # also the warm-up
            timing.seconds = median_seconds(lambda: loss_and_grads(call, inputs), repeats, device)
    except torch.cuda.OutOfMemoryError:
        timing.error = "out of memory"
    except Exception as error:  # noqa: BLE001
        timing.error = f"{type(error).__name__}: {error}"[:300]
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return timing


def triton_tiles(dim: int) -> list[str]:
    from semclip_kernels.triton_kernels import config, tuning

    return [tuning.tile_name(tile) for tile in config.tile_candidates(dim, torch.bfloat16)]


@contextlib.contextmanager
def pinned_tile(tile: str | None) -> Iterator[None]:
    """backend="triton" runs `tile` (SEMCLIP_TRITON_TILE) inside: the forward and its backward alike."""
    if tile is None:
        yield
        return
    from semclip_kernels.triton_kernels import tuning

    saved = os.environ.get(tuning.TILE_ENV)
    os.environ[tuning.TILE_ENV] = tile
    tuning.forget_choices()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(tuning.TILE_ENV, None)
        else:
            os.environ[tuning.TILE_ENV] = saved
        tuning.forget_choices()


def environment(device: str) -> dict[str, str]:
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", sms=str(props.multi_processor_count),
                   memory_gib=f"{props.total_memory / 2**30:.0f}", cuda=str(torch.version.cuda))  # fmt: skip
    return env


def goals(report: Report) -> list[str]:
    """The goals at the largest batch, per regime, for the fastest triton tile."""
    lines = []
    batch = max((t.batch for t in report.timings), default=0)
    for regime in REGIMES:
        at = {t.method: t for t in report.timings if t.batch == batch and t.regime == regime and t.seconds}
        tritons = [t for m, t in at.items() if m.startswith("triton")]
        if not tritons:
            lines.append(f"{regime}: no triton timing at B = {batch}")
            continue
        best = min(tritons, key=lambda t: t.seconds)
        line = f"{regime}, B = {batch}: {best.method}"
        if best.gemms is not None:
            line += (
                f" {best.gemms:.2f} GEMM-equivalents ({'ok' if best.gemms <= GOAL_GEMMS else 'MISS'} ≤ {GOAL_GEMMS})"
            )
        reference = at.get("reference")
        if reference is None:
            line += "; reference did not run at this batch"
        else:
            line += f"; {reference.seconds / best.seconds:.2f}× reference's speed"
            line += f" ({'ok' if reference.seconds > best.seconds else 'MISS'})"
            if best.peak_bytes and reference.peak_bytes:
                ratio = reference.peak_bytes / best.peak_bytes
                verdict = "ok" if ratio >= GOAL_MEMORY_RATIO else "MISS"
                line += f"; reference peak / triton peak = {ratio:.0f} ({verdict} ≥ {GOAL_MEMORY_RATIO:.0f})"
        lines.append(line)
    return lines


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def to_markdown(report: Report) -> str:
    env = ", ".join(f"{k} {v}" for k, v in report.environment.items())
    lines = [f"# First light: {env}", "", "## Correctness against float64", ""]
    lines += ["| method | dtype | regime | loss rel. err | grad rel. err | tolerance | ok |", "|---|" * 1 + "---|" * 6]
    for c in report.checks:
        verdict = "ok" if c.ok else f"FAIL {c.error}".strip()
        lines.append(f"| {c.method} | {c.dtype} | {c.regime} | {c.loss_error:.1e} | {c.grad_error:.1e} | "
                     f"{c.tolerance:.0e} | {verdict} |")  # fmt: skip
    lines += ["", "## Forward+backward, bfloat16, Pn = Mn = 1", "",
              "| regime | B | d | method | ms | GEMM-equiv. | peak MiB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in report.timings:
        ms = "—" if t.seconds is None else f"{t.seconds * 1e3:.2f}"
        gemms = "—" if t.gemms is None else f"{t.gemms:.2f}"
        lines.append(f"| {t.regime} | {t.batch} | {t.dim} | {t.method} | {ms if not t.error else t.error} | {gemms} | "
                     f"{_mib(t.peak_bytes)} |")  # fmt: skip
    lines += ["", "One GEMM: " + ", ".join(f"B = {b}: {s * 1e3:.3f} ms" for b, s in report.gemm_seconds.items()), ""]
    lines += ["## Goals", ""] + [f"- {line}" for line in report.goals] + [""]
    return "\n".join(lines)


def write(report: Report, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    data = asdict(report) | {"checks_ok": all(c.ok for c in report.checks)}
    with open(os.path.join(out, "first_light.json"), "w") as handle:
        json.dump(data, handle, indent=1)
    with open(os.path.join(out, "first_light.md"), "w") as handle:
        handle.write(to_markdown(report))


def output_folder(out: str | None, dry_run: bool, environ: Mapping[str, str] = os.environ) -> str:
    """`--out`, else `$OUT`, else `first_light` (a real run) or a new temporary folder (a dry run)."""
    if out:
        return out
    if environ.get("OUT"):
        return environ["OUT"]
    return tempfile.mkdtemp(prefix="first_light_dry_run_") if dry_run else "first_light"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_first_light", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="default: $OUT, else first_light/ (--dry-run: a temporary folder)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (B 48, d 32): the code path, not figures")
    parser.add_argument("--batches", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-batch", type=int, default=256)
    parser.add_argument("--check-dim", type=int, default=96)
    args = parser.parse_args(argv)
    args.out = output_folder(args.out, args.dry_run)
    print(f"writing {os.path.join(args.out, 'first_light.md')} and first_light.json", file=sys.stderr)
    if args.dry_run:
        args.batches, args.dim, args.repeats, args.check_batch, args.check_dim = [48], 32, 1, 24, 16
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (use --device cpu --dry-run to test the code path)", file=sys.stderr)
        return 2
    report = Report(environment(device))
    methods = [m for m in ("triton", "torch", "cpp", "reference") if sk.backend_status(m, device)[0]]
    # reference in the input dtype too: its own error is the floor that dtype's arithmetic sets.
    report.checks = check_backends(methods, device, args.check_batch, args.check_dim)
    if "triton" in methods and device == "cuda":  # first use at the timed shape's d: what does the tuner choose?
        from semclip_kernels.triton_kernels import tuning

        start = time.perf_counter()
        chosen = tuning.select_tile(args.dim, torch.bfloat16, torch.device(device))
        report.environment["tuned_tile"] = f"{tuning.tile_name(chosen)} ({time.perf_counter() - start:.1f} s to choose)"
        report.tuning = tuning.read_cache(tuning.cache_path())
    write(report, args.out)
    print(to_markdown(report), flush=True)
    tiles = triton_tiles(args.dim) if "triton" in methods else []
    reference_fits = "reference" in methods
    for batch in args.batches:
        report.gemm_seconds[str(batch)] = unit = gemm_seconds(batch, args.dim, torch.bfloat16, device, args.repeats)
        calls = {f"triton {tile}": ("triton", tile) for tile in tiles}
        calls.update({m: (m, None) for m in methods if m not in ("triton", "cpp", "reference")})
        if reference_fits:
            calls["reference"] = ("reference", None)
        for regime in REGIMES:
            for label, (backend, tile) in calls.items():
                timing = time_method(label, loss_call(backend), tile, regime, batch, args.dim, device, args.repeats)
                timing.gemms = None if timing.seconds is None else timing.seconds / unit
                report.timings.append(timing)
                print(f"{regime} B={batch} {label}: {timing.seconds} s, peak {_mib(timing.peak_bytes)} MiB "
                      f"{timing.error}", file=sys.stderr, flush=True)  # fmt: skip
                if label == "reference" and timing.error == "out of memory":
                    reference_fits = False
                write(report, args.out)
    report.goals = goals(report)
    write(report, args.out)
    print(to_markdown(report))
    return 0 if all(c.ok for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
