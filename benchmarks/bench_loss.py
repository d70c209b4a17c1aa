"""Time and memory of every SemCLIP backend and of the losses a user would pick instead.

    python -m benchmarks.bench_loss                  # this device's default sweep
    python -m benchmarks.bench_loss --quick          # a few minutes on a laptop CPU
    python -m benchmarks.bench_loss --device cuda    # GPU: batch sweep up to the largest batch that fits

Methods: the semclip backends available on the device (`reference` materializes the
`B × K` logits, `torch`, `cpp`, `triton` are tiled) and two peers: `open_clip`
(`ClipLoss` logits over captions, paraphrases and negations concatenated on the text
side, NegCLIP-style, materialized) and, on CUDA when installed, `inf_cl`.

Sweeps: batch size at the main configuration (d=512, one paraphrase and one negation
per image, float32), then feature dim, paraphrases/negations per image and dtype at
`--side-batch`. A method's batch sweep stops when its next point is predicted (from
the last one, assuming quadratic growth) to exceed `--max-call-seconds` per call or
`--max-gb` of memory, or when it fails (CUDA out of memory).

Writes `results.json`, `results.md` and `time_vs_batch.png`, `memory_vs_batch.png` to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys

import torch
from tqdm import tqdm

from .measure import REPO_ROOT, Point, available_methods, format_bytes, run_point

CPU_BATCHES = [1024, 2048, 4096, 8192, 16384]
CUDA_BATCHES = [2**k for k in range(10, 21)]  # 1024 … 1M, stopped by the first out-of-memory
QUICK_BATCHES = [512, 1024, 2048, 4096]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="output folder (default: bench_results/<device>)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every available backend and peer")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes of the main sweep")
    parser.add_argument("--dim", type=int, default=512, help="feature dim of the main sweep")
    parser.add_argument("--paraphrases", type=int, default=1, help="paraphrases per image, main sweep")
    parser.add_argument("--negations", type=int, default=1, help="negations per image, main sweep")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--side-batch", type=int, default=None, help="batch of the dim/extras/dtype sweeps")
    parser.add_argument("--dims", type=int, nargs="*", default=None, help="feature dims of the side sweep")
    parser.add_argument(
        "--extras", nargs="*", default=None, help='"Pn,Mn" pairs (paraphrases,negations per image) of the side sweep'
    )
    parser.add_argument("--dtypes", nargs="*", default=None, help="dtypes of the side sweep")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per point (median)")
    parser.add_argument("--budget-gb", type=float, default=8.0, help="report the largest batch whose peak fits")
    parser.add_argument("--max-gb", type=float, default=None, help="skip points predicted to need more memory")
    parser.add_argument("--max-call-seconds", type=float, default=None, help="skip points predicted to be slower")
    parser.add_argument("--quick", action="store_true", help="small sweep: batches 512…4096, side batch 1024")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    cuda = torch.device(args.device).type == "cuda"
    if args.quick:
        args.batches = args.batches or QUICK_BATCHES
        args.side_batch = args.side_batch or 1024
        args.dims = [256] if args.dims is None else args.dims
        args.extras = ["0,0", "2,2"] if args.extras is None else args.extras
    args.batches = sorted(args.batches or (CUDA_BATCHES if cuda else CPU_BATCHES))
    args.side_batch = args.side_batch or (16384 if cuda else 2048)
    args.dims = [256, 1024] if args.dims is None else args.dims
    args.extras = ["0,0", "0,1", "2,2"] if args.extras is None else args.extras
    if args.dtypes is None:
        args.dtypes = ["float16", "bfloat16"] if cuda else ["bfloat16"]
    args.methods = args.methods or available_methods(args.device)
    if args.max_call_seconds is None:
        args.max_call_seconds = 10.0 if cuda else 30.0
    if args.max_gb is None:  # CUDA: run until out of memory; CPU: stay clear of the machine's free memory
        args.max_gb = math.inf if cuda else min(8.0, 0.6 * available_ram_bytes() / 2**30)
    args.out = args.out or os.path.join("bench_results", torch.device(args.device).type)
    return args


def available_ram_bytes() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan(args: argparse.Namespace) -> tuple[list[Point], list[Point]]:
    """(main batch sweep, side sweeps) as points, method innermost: the methods of one
    shape run back to back, so machine noise hits them alike."""
    main = Point(
        method="",
        batch=args.side_batch,
        dim=args.dim,
        n_paraphrases=args.paraphrases,
        n_negations=args.negations,
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
    )
    batch_sweep = [dataclasses.replace(main, batch=b, method=m) for b in args.batches for m in args.methods]
    side_shapes = [dataclasses.replace(main, dim=d) for d in args.dims]
    for pair in args.extras:
        n_para, n_neg = (int(x) for x in pair.split(","))
        side_shapes.append(dataclasses.replace(main, n_paraphrases=n_para, n_negations=n_neg))
    side_shapes += [dataclasses.replace(main, dtype=dtype) for dtype in args.dtypes]
    unique_shapes = [s for i, s in enumerate(side_shapes) if s != main and s not in side_shapes[:i]]
    side_sweep = [dataclasses.replace(s, method=m) for s in unique_shapes for m in args.methods]
    return batch_sweep, side_sweep


def predicted_cost(last: dict | None, point: Point) -> tuple[float, float]:
    """(seconds per call, peak bytes) of `point` from the method's last measured point,
    assuming both grow with B·K (quadratically in B): an upper bound for the tiled ones."""
    if last is None:
        return 0.0, 0.0
    growth = point.batch * point.n_cols / (last["batch"] * last["n_cols"])
    return last["seconds"] * growth, last["peak_extra_bytes"] * growth


def point_timeout(args: argparse.Namespace) -> float:
    # Tiny warm-up, measured call, timed calls and the GEMM reference, with slack for imports.
    return args.max_call_seconds * (args.repeats + 3) * 2 + 120


def run_sweeps(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    batch_sweep, side_sweep = plan(args)
    results, skipped = [], []
    last_by_method: dict[str, dict] = {}
    stopped: dict[str, str] = {}  # method -> why its batch sweep stopped
    with tqdm(total=len(batch_sweep) + len(side_sweep), desc="bench_loss", unit="pt", file=sys.stderr) as bar:
        for point in batch_sweep + side_sweep:
            bar.set_postfix_str(f"{point.method} B={point.batch} d={point.dim} {point.dtype}")
            in_batch_sweep = point in batch_sweep
            reason = stopped.get(point.method) if in_batch_sweep else None
            if reason is None and in_batch_sweep:
                seconds, peak = predicted_cost(last_by_method.get(point.method), point)
                if seconds > args.max_call_seconds:
                    reason = f"predicted {seconds:.0f} s per call > --max-call-seconds {args.max_call_seconds:g}"
                elif peak > args.max_gb * 2**30:
                    reason = f"predicted {format_bytes(peak)} > --max-gb {args.max_gb:.1f}"
                if reason:
                    stopped[point.method] = reason
            if reason:
                skipped.append({**dataclasses.asdict(point), "skipped": reason})
                bar.update(1)
                continue
            result = run_point(point, timeout=point_timeout(args))
            results.append(result)
            if in_batch_sweep:
                if "error" in result:
                    stopped[point.method] = f"B={point.batch}: {result['error']}"
                else:
                    last_by_method[point.method] = result
            bar.update(1)
    return results, skipped


def budget_fit(results: list[dict], method: str, budget_bytes: float) -> dict:
    """Largest batch of the main sweep whose peak extra memory fits the budget: measured,
    and extrapolated from the last two points as `peak ∝ B^e` (e clamped to [1, 2])."""
    points = sorted((r for r in results if r["method"] == method and "error" not in r), key=lambda r: r["batch"])
    fitting = [r["batch"] for r in points if r["peak_extra_bytes"] <= budget_bytes]
    fit = {"method": method, "largest_measured": max(fitting) if fitting else None, "estimated": None}
    if len(points) >= 2:
        (b1, m1), (b2, m2) = [(r["batch"], max(r["peak_extra_bytes"], 1)) for r in points[-2:]]
        exponent = min(2.0, max(1.0, math.log(m2 / m1) / math.log(b2 / b1)))
        fit["exponent"] = exponent
        fit["estimated"] = int(b2 * (budget_bytes / m2) ** (1 / exponent))
    return fit


def environment(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                device_name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": args.device,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "command": "python -m benchmarks.bench_loss " + " ".join(sys.argv[1:]),
    }


def markdown(report: dict) -> str:
    env, args = report["environment"], report["args"]
    lines = [
        f"Device: {env['device']} ({env['device_name']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch "
        f"threads), torch {env['torch']}, commit {env['commit']}, {env['date_utc']} UTC.",
        "",
        "fwd+bwd: median wall time of loss + backward. GEMM-eq: that time divided by one `B×d @ d×K` "
        "product timed in the same process. Peak extra: peak memory of the call beyond the inputs "
        "(includes their gradients).",
        "",
    ]
    header = "| method | B | K | d | Pn | Mn | dtype | fwd+bwd (ms) | GEMM-eq | peak extra | loss |"
    rule = "|" + "---|" * (header.count("|") - 1)

    def row(r: dict) -> str:
        shape = f"{r['batch']} | {r['batch'] * (1 + r['n_paraphrases'] + r['n_negations'])} | {r['dim']} | "
        shape += f"{r['n_paraphrases']} | {r['n_negations']} | {r['dtype']}"
        if "error" in r or "skipped" in r:
            return f"| {r['method']} | {shape} | – | – | – | {r.get('error') or r.get('skipped')} |"
        return (
            f"| {r['method']} | {shape} | {r['seconds'] * 1e3:.0f} | {r['gemm_equivalents']:.1f} | "
            f"{format_bytes(r['peak_extra_bytes'])} | {r['loss']:.4f} |"
        )

    main = report["main_config"]
    in_main = [r for r in report["points"] + report["skipped"] if is_main(r, main)]
    lines += [
        f"### Batch sweep (d={main['dim']}, Pn={main['n_paraphrases']}, Mn={main['n_negations']}, {main['dtype']})",
        "",
        header,
        rule,
    ]
    lines += [row(r) for r in sorted(in_main, key=lambda r: (r["batch"], report["methods"].index(r["method"])))]
    side = [r for r in report["points"] if not is_main(r, main)]
    if side:
        lines += ["", f"### Feature dim, extras and dtype at B={args['side_batch']}", "", header, rule]
        lines += [row(r) for r in side]
    lines += [
        "",
        f"### Largest batch within a {args['budget_gb']:g} GB budget (main configuration)",
        "",
        "| method | largest measured | estimated (peak ∝ B^e from the last two points) |",
        "|---|---|---|",
    ]
    for fit in report["budget"]:
        estimate = "–" if fit["estimated"] is None else f"{fit['estimated']} (e={fit['exponent']:.2f})"
        lines.append(f"| {fit['method']} | {fit['largest_measured'] or 'none'} | {estimate} |")
    return "\n".join(lines) + "\n"


def is_main(r: dict, main: dict) -> bool:
    return all(r[key] == main[key] for key in ("dim", "n_paraphrases", "n_negations", "dtype"))


def plot(report: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = report["main_config"]
    measured = [r for r in report["points"] if "error" not in r and is_main(r, main)]
    title = f"{report['environment']['device_name']}: d={main['dim']}, Pn={main['n_paraphrases']}, "
    title += f"Mn={main['n_negations']}, {main['dtype']}"
    paths = []
    for key, ylabel, name in (
        ("seconds", "forward+backward time (s)", "time_vs_batch.png"),
        ("peak_extra_bytes", "peak extra memory (MiB)", "memory_vs_batch.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for method in report["methods"]:
            series = sorted((r["batch"], r[key]) for r in measured if r["method"] == method)
            if series:
                batches, values = zip(*series, strict=True)
                if key == "peak_extra_bytes":
                    values = [max(v, 1) / 2**20 for v in values]
                ax.plot(batches, values, marker="o", label=method)
        if key == "seconds":  # the GEMM reference: the floor a loss of this shape cannot beat by much
            gemm = {}
            for r in measured:
                gemm.setdefault(r["batch"], []).append(r["gemm_seconds"])
            if gemm:
                batches = sorted(gemm)
                ax.plot(batches, [sorted(gemm[b])[len(gemm[b]) // 2] for b in batches], "k--", label="one B×d·d×K GEMM")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results, skipped = run_sweeps(args)
    main_config = {"dim": args.dim, "n_paraphrases": args.paraphrases, "n_negations": args.negations}
    main_config["dtype"] = args.dtype
    main_results = [r for r in results if is_main(r, main_config)]
    report = {
        "environment": environment(args),
        "args": {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in vars(args).items()},
        "methods": args.methods,
        "main_config": main_config,
        "points": results,
        "skipped": skipped,
        "budget": [budget_fit(main_results, m, args.budget_gb * 2**30) for m in args.methods],
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    if not args.no_plots:
        plot(report, args.out)
    print(table)
    plots = "" if args.no_plots else ", time_vs_batch.png, memory_vs_batch.png"
    print(f"wrote {args.out}/results.json, results.md{plots}")
    return report


if __name__ == "__main__":
    main()
