"""Gradient caching (`--semclip-grad-cache`) against open_clip_train's own `--accum-freq` accumulation.

    nice python -m benchmarks.bench_grad_cache            # B = 8 × 1024, then a small sweep (~5 min on 2 cores)

Both run open_clip_train's epoch loop for one optimizer step: open_clip's `train_one_epoch` with
`accum_freq = N` (the loss N times over the global batch) and `grad_cache_train_one_epoch` (the loss once),
on the same tiny open_clip towers (one transformer layer of width 64 per tower, 32-px images, 16 tokens),
embed dim 512, one paraphrase and one negation per image, `SemCLIPLoss` (backend "auto"), fp32 on CPU.
"One big batch" is open_clip's loop with `accum_freq = 1` and the whole global batch at once.

1. time: grad-cache step / open_clip accumulation step, goal ≤ 0.6 (B = N × micro-batch, default 8 × 1024);
2. the losses the two loops log for the step are equal (and equal to the big batch's);
3. peak memory of the step (peak RSS growth over the trained model, optimizer state and data) against one big
   batch's and open_clip accumulation's;
4. a sweep at smaller sizes (time only, steps alternated in this process): how the ratio moves with the global
   batch at fixed N, and with N at a fixed global batch.

Each main measurement (a warm-up step at a tiny size, then the measured step) runs in a fresh subprocess, so
that a peak in one never hides another's; one by hand:

    python -m benchmarks.bench_grad_cache --point '{"method": "grad_cache", "micro": 256, "accum": 4}'
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from .measure import REPO_ROOT, RESULT_PREFIX, PeakMemory, format_bytes, verdict

GOAL = 0.6
METHODS = ("open_clip_accum", "grad_cache", "big_batch")
LABELS = {
    "open_clip_accum": "open_clip --accum-freq",
    "grad_cache": "--semclip-grad-cache",
    "big_batch": "one big batch",
}
SWEEP = ((256, 4), (512, 4), (1024, 4), (1024, 2), (256, 8))  # (micro-batch, N): global 1024-4096 at N=4; N at 2048


@dataclass(frozen=True)
class Point:
    method: str  # one of METHODS ("pair": a sweep point, open_clip_accum and grad_cache alternated)
    micro: int = 1024  # micro-batch size
    accum: int = 8  # N: micro-batches per optimizer step
    dim: int = 512
    width: int = 64
    repeats: int = 1  # sweep points: timed steps per method
    threads: int = 2
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum


def tiny_model(point: Point) -> torch.nn.Module:
    import open_clip

    from semclip_kernels.integrations.open_clip import install_semclip_forward

    torch.manual_seed(point.seed)
    vision = {"image_size": 32, "patch_size": 16, "layers": 1, "width": point.width, "head_width": 32}
    text = {"context_length": 16, "vocab_size": 49408, "width": point.width, "heads": 2, "layers": 1}
    model = open_clip.model.CLIP(point.dim, vision, text, output_dict=True)
    return install_semclip_forward(model, n_paraphrases=1)


class Loader:
    """open_clip_train's DataInfo/dataloader interface over in-memory batches."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.num_batches = len(batches)
        self.num_samples = sum(len(images) for images, _ in batches)
        self.dataloader = self

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


def global_batch(point: Point, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, 32, 32] and per image a caption, a paraphrase and a negation [B, 3, 16]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(point.global_batch, 3, 32, 32, generator=g), torch.randint(
        1, 49407, (point.global_batch, 3, 16), generator=g
    )


def trainer_args(batch_size: int, accum_freq: int) -> argparse.Namespace:
    from open_clip_train.params import parse_args

    args = parse_args(["--batch-size", str(batch_size), "--accum-freq", str(accum_freq), "--precision", "fp32"])
    args.device, args.distributed, args.world_size, args.rank, args.local_rank = "cpu", False, 1, 0, 0
    args.distill, args.skip_scheduler, args.log_every_n_steps, args.wandb = False, True, 1, False
    return args


class LoggedLosses(logging.Handler):
    """The `Contrastive_loss: X` values the epoch loop logs (5 significant digits, as a user reads them)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.values: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.values += re.findall(r"Contrastive_loss: ([0-9.eE+-]+)", record.getMessage())


def one_step(
    method: str, point: Point, model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, memory: bool = False
) -> dict:
    """One optimizer step of `method` on the global batch: seconds, loss values, peak memory."""
    from open_clip_train.train import train_one_epoch

    from semclip_kernels import SemCLIPLoss
    from semclip_train.open_clip.grad_cache import grad_cache_train_one_epoch

    big = method == "big_batch"
    micro, accum = (point.global_batch, 1) if big else (point.micro, point.accum)
    loader = Loader([(images[i : i + micro], texts[i : i + micro]) for i in range(0, point.global_batch, micro)])
    args = trainer_args(micro, accum)
    loss = SemCLIPLoss()
    values: list[float] = []
    loss.forward = _recording(loss.forward, values)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    epoch_loop = grad_cache_train_one_epoch if method == "grad_cache" else train_one_epoch
    handler = LoggedLosses()
    logging.root.addHandler(handler)
    logging.root.setLevel(logging.INFO)
    peak = PeakMemory(torch.device("cpu")) if memory else contextlib.nullcontext()
    try:
        with peak:
            start = time.perf_counter()
            epoch_loop(model, {"train": loader}, loss, 0, optimizer, None, None, None, args)
            seconds = time.perf_counter() - start
    finally:
        logging.root.removeHandler(handler)
    out = {"seconds": seconds, "loss_calls": len(values), "loss": values[-1], "logged": handler.values}
    if memory:
        out["peak_extra_bytes"] = peak.extra_bytes
    return out


def _recording(forward, values: list[float]):
    def recorded(*args, **kwargs):
        out = forward(*args, **kwargs)
        values.append(float(out["contrastive_loss"].detach()))
        return out

    return recorded


def measure(point: Point) -> dict:
    """One method in this process: a warm-up step at a tiny size, then the measured step with its peak memory."""
    torch.set_num_threads(point.threads)
    model = tiny_model(point)
    warm = dataclasses.replace(point, micro=8, accum=2)
    one_step(point.method, warm, model, *global_batch(warm, seed=1))
    images, texts = global_batch(point, seed=point.seed + 2)
    return {**dataclasses.asdict(point), point.method: one_step(point.method, point, model, images, texts, True)}


def alternated(points: list[Point]) -> list[dict]:
    """Step time of open_clip's accumulation and of the grad cache at each point, steps alternated in this
    process from the same weights (the median of `repeats` each); no memory measurement."""
    model = tiny_model(points[0])
    initial = copy.deepcopy(model.state_dict())
    warm = dataclasses.replace(points[0], micro=8, accum=2)
    for method in METHODS[:2]:
        one_step(method, warm, model, *global_batch(warm, seed=1))
    results = []
    for point in points:
        torch.set_num_threads(point.threads)
        images, texts = global_batch(point, seed=point.seed + 2)
        seconds: dict[str, list[float]] = {method: [] for method in METHODS[:2]}
        for _ in range(point.repeats):
            for method in METHODS[:2]:
                model.load_state_dict(initial)
                seconds[method].append(one_step(method, point, model, images, texts)["seconds"])
        results.append({method: statistics.median(values) for method, values in seconds.items()})
    return results


def run_in_subprocess(point: Point, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "benchmarks.bench_grad_cache", "--point", json.dumps(dataclasses.asdict(point))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return {"error": f"exit code {done.returncode}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", type=int, default=1024, help="micro-batch size")
    parser.add_argument("--accum", type=int, default=8, help="N, micro-batches per step")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sweep",
        nargs="*",
        default=None,
        metavar="MICRO:N",
        help=f"sweep points (time only); default {' '.join(f'{m}:{n}' for m, n in SWEEP)}; none to skip",
    )
    parser.add_argument("--sweep-repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point is not None:
        result = measure(Point(**json.loads(args.point)))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return result

    main_point = Point("", micro=args.micro, accum=args.accum, dim=args.dim, threads=args.threads)
    print(
        f"CPU ({args.threads} threads), fp32, tiny open_clip towers (1 layer, width 64), embed {args.dim}, "
        f"one paraphrase and one negation per image; global batch {main_point.global_batch} = "
        f"{args.accum} × {args.micro}",
        flush=True,
    )
    report: dict = {"main": {}, "sweep": []}
    for method in METHODS:
        result = run_in_subprocess(dataclasses.replace(main_point, method=method), args.timeout)
        if "error" in result:
            print(f"  {LABELS[method]}: {result['error']}", flush=True)
            report["main"][method] = result
            continue
        step = report["main"][method] = result[method]
        print(
            f"  {LABELS[method]:>24}: {step['seconds']:7.2f} s/step, loss evaluated {step['loss_calls']}×, "
            f"logged loss {', '.join(step['logged'])}, peak memory +{format_bytes(step['peak_extra_bytes'])}",
            flush=True,
        )
    steps = report["main"]
    if all("error" not in steps.get(m, {"error": 1}) for m in METHODS):
        accum, cache, big = (steps[m] for m in METHODS)
        ratio = cache["seconds"] / accum["seconds"]
        report["ratio"] = ratio
        print(f"\n1. time, grad cache / open_clip accumulation: {ratio:.3f}  ({verdict(ratio, '≤', GOAL)})")
        print(f"   (one big batch / open_clip accumulation: {big['seconds'] / accum['seconds']:.3f})")
        print(
            f"2. logged losses: grad cache {cache['logged']}, open_clip {accum['logged']}, big batch {big['logged']}"
            f" ({'equal' if cache['logged'] == accum['logged'] == big['logged'] else 'DIFFERENT'}); exact values "
            f"differ by {relative(cache['loss'], accum['loss']):.1e} (vs open_clip) and "
            f"{relative(cache['loss'], big['loss']):.1e} (vs big batch), relative"
        )
        # A peak below the resident-memory sampling's resolution reads 0: no ratio then, rather than a division by it.
        times = (
            f"{big['peak_extra_bytes'] / cache['peak_extra_bytes']:.2f}× the grad cache's"
            if cache["peak_extra_bytes"] > 0
            else "the grad cache's peak is below the measurement's resolution"
        )
        print(
            f"3. peak memory of the step: grad cache +{format_bytes(cache['peak_extra_bytes'])}, one big batch "
            f"+{format_bytes(big['peak_extra_bytes'])} ({times}), open_clip accumulation "
            f"+{format_bytes(accum['peak_extra_bytes'])}"
        )

    sweep = SWEEP if args.sweep is None else [tuple(int(x) for x in s.split(":")) for s in args.sweep]
    if sweep:
        print(
            "\n4. sweep (time only, the two steps alternated in this process, median of "
            f"{args.sweep_repeats}):\n   global batch   N   open_clip accum   grad cache   ratio",
            flush=True,
        )
        points = [
            Point("pair", micro=micro, accum=accum, dim=args.dim, threads=args.threads, repeats=args.sweep_repeats)
            for micro, accum in sweep
        ]
        for point, result in zip(points, alternated(points)):
            a, c = result["open_clip_accum"], result["grad_cache"]
            report["sweep"].append(
                {
                    "global_batch": point.global_batch,
                    "accum": point.accum,
                    "open_clip_accum": a,
                    "grad_cache": c,
                    "ratio": c / a,
                }
            )
            print(f"   {point.global_batch:>12} {point.accum:>3}   {a:13.2f} s   {c:8.2f} s   {c / a:.3f}", flush=True)
    if "ratio" in report:
        print(
            f"\nverdict: grad cache / open_clip accumulation = {report['ratio']:.3f} at "
            f"{main_point.accum} × {main_point.micro}: {verdict(report['ratio'], '≤', GOAL)}"
        )
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
