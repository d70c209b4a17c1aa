"""The gradient filter across ranks against the single process, in every mode and setting (Gloo ranks, CPU).

    python -m benchmarks.bench_distributed_filter                    # both regimes, both alignments, cpp
    python -m benchmarks.bench_distributed_filter --regime wide --repeats 3   # and time the modes
    python -m benchmarks.bench_distributed_filter --batch 64 --dim 32         # CI smoke size

Trained-like features: unit random images; caption and paraphrase `normalize(image + a_i·g/√d)`,
negation `normalize(image + 0.8·g/√d)` (g standard normal), one of each per image, τ = 100, with the
alignment `a_i` = 0.5 for every image ("uniform") or drawn uniformly in [0.3, 0.8] per image ("varied": some
pairs tighter than others, so the images' partitions spread over several nats). Regimes:

    wide:        2 ranks, local B = 2048, d = 128, the backend's default tiles
    small-tiles: 3 ranks, local B = 128,  d = 32,  block_rows = block_cols = 16

Each rank runs forward + backward of `SemCLIPLoss(local_loss, gather_with_grad, distributed_mode)` for every
mode and each of the four settings, and reports the fraction of tiles its backward skipped
(`last_backward_stats`, summed over the backward's calls). The goal: on every rank at least 0.8× the fraction
the single-process loss skips on the same global batch with the same tiles. With `--repeats N` the modes are
also timed (local_loss = gather_with_grad = True, modes alternating; goal ≤ 1.15× "gather").
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import semclip_kernels as sk

MODES = ("gather", "ring", "hierarchical")
SETTINGS = tuple(itertools.product((False, True), (False, True)))  # (local_loss, gather_with_grad)
TAU = 100.0
TIME_GOAL, SKIP_GOAL = 1.15, 0.8
# name: (ranks, local batch, d, tile or None for the backend's default)
REGIMES = {"wide": (2, 2048, 128, None), "small-tiles": (3, 128, 32, 16)}


# name: the range of the caption/paraphrase noise a_i
ALIGNMENTS = {"uniform": (0.5, 0.5), "varied": (0.3, 0.8)}


def trained_like_batch(global_batch: int, dim: int, alignment: str = "uniform", seed: int = 0) -> list[torch.Tensor]:
    """`[image, text, paraphrase [B, 1, d], negation [B, 1, d]]` of the module docstring's recipe."""
    generator = torch.Generator().manual_seed(seed)

    def near(center: torch.Tensor, spread: float) -> torch.Tensor:
        noise = torch.randn(center.shape, generator=generator) / math.sqrt(dim)
        return F.normalize(center + spread * noise, dim=-1)

    image = F.normalize(torch.randn(global_batch, dim, generator=generator), dim=-1)
    low, high = ALIGNMENTS[alignment]
    noise = low + (high - low) * torch.rand(global_batch, 1, generator=generator)
    return [image, near(image, noise), near(image, noise)[:, None], near(image, 0.8)[:, None]]


def _setting_name(local_loss: bool, gather_with_grad: bool) -> str:
    return f"local_loss={int(local_loss)} gather_with_grad={int(gather_with_grad)}"


def _run_loss(loss_fn, leaves) -> None:
    for leaf in leaves:
        leaf.grad = None
    loss = loss_fn(leaves[0], leaves[1], torch.tensor(TAU), paraphrase_features=leaves[2], negation_features=leaves[3])
    loss.backward()


def _rank(rank: int, port: int, options: dict, out_path: str) -> None:
    torch.set_num_threads(options["threads"])
    world = options["world"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=options["timeout"]))  # fmt: skip
    batch, backend, tile = options["batch"], options["backend"], options["tile"]
    features = trained_like_batch(world * batch, options["dim"], options["alignment"])
    rows = slice(rank * batch, (rank + 1) * batch)
    leaves = [t[rows].clone().requires_grad_() for t in features]

    def loss_fn(mode: str, local_loss: bool, gather_with_grad: bool) -> sk.SemCLIPLoss:
        return sk.SemCLIPLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world,
                              backend=backend, distributed_mode=mode, block_rows=tile, block_cols=tile,
                              group_size=world if mode == "hierarchical" else None)  # fmt: skip

    skipped = {}
    for (local_loss, gather_with_grad), mode in itertools.product(SETTINGS, MODES):
        _run_loss(loss_fn(mode, local_loss, gather_with_grad), leaves)
        stats = sk.backends.last_backward_stats(backend)
        skipped[f"{_setting_name(local_loss, gather_with_grad)} {mode}"] = (stats.skipped_tiles, stats.tiles)
    times = {mode: [] for mode in MODES}
    timed = {mode: loss_fn(mode, True, True) for mode in MODES}
    for repeat in range(options["repeats"] + 1 if options["repeats"] else 0):  # the first round warms up
        for mode in MODES:
            dist.barrier()
            start = time.perf_counter()
            _run_loss(timed[mode], leaves)
            dist.barrier()
            if repeat:
                times[mode].append(time.perf_counter() - start)
    gathered = [None] * world
    dist.all_gather_object(gathered, skipped)
    if rank == 0:
        with open(out_path, "w") as out:
            json.dump({"times": times, "skipped": gathered}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_fraction(world: int, batch: int, dim: int, tile: int | None, backend: str, alignment: str) -> float:
    """The skipped fraction of the single-process loss on the same global batch, same tiles."""
    leaves = [t.clone().requires_grad_() for t in trained_like_batch(world * batch, dim, alignment)]
    sk.semclip_loss(leaves[0], leaves[1], TAU, leaves[2], leaves[3], backend=backend, block_rows=tile,
                    block_cols=tile).backward()  # fmt: skip
    return sk.backends.last_backward_stats(backend).skipped_fraction


def run_regime(name: str, world: int, batch: int, dim: int, tile: int | None, alignment: str, args) -> dict:
    """Measure one regime; print and return `{"single": f, "<setting> <mode>": min over ranks, ...}`."""
    single = single_process_fraction(world, batch, dim, tile, args.backend, alignment)
    options = {"world": world, "batch": batch, "dim": dim, "tile": tile, "backend": args.backend,
               "threads": args.threads, "timeout": args.timeout, "repeats": args.repeats,
               "alignment": alignment}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        mp.start_processes(_rank, args=(_free_port(), options, out_path), nprocs=world, start_method="spawn")
        with open(out_path) as result:
            result = json.load(result)

    tiles_text = "default tiles" if tile is None else f"block_rows = block_cols = {tile}"
    print(f"\n{name}, {alignment} alignment: {world} Gloo ranks, local B = {batch}, d = {dim}, Pn = Mn = 1, "
          f"τ = {TAU:g}, {tiles_text}, backend {args.backend}")  # fmt: skip
    print(f"  single process (global batch): skipped {single:.3f} of the backward's tiles")
    report = {"single": single}
    for key in result["skipped"][0]:
        fractions = [skipped / tiles if tiles else 0.0 for skipped, tiles in (r[key] for r in result["skipped"])]
        worst = min(fractions)
        ratio = worst / single if single else float("nan")
        per_rank = " ".join(f"{f:.3f}" for f in fractions)
        verdict = "ok" if worst >= SKIP_GOAL * single else "MISSED"
        print(f"  {key:<50} per rank {per_rank}  worst {ratio:5.2f}× single  {verdict}")
        report[key] = worst
    if args.repeats:
        gather_time = _median(result["times"]["gather"])
        for mode in MODES:
            seconds = _median(result["times"][mode])
            print(f"  time (local_loss = gather_with_grad = 1) {mode:<13} {seconds:8.3f} s  "
                  f"{seconds / gather_time:5.2f}× gather")  # fmt: skip
            report[f"{mode} time ratio"] = seconds / gather_time
    return report


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", choices=(*REGIMES, "both"), default="both")
    parser.add_argument("--alignment", choices=(*ALIGNMENTS, "both"), default="both")
    parser.add_argument("--batch", type=int, default=None, help="local batch per rank (default: the regime's)")
    parser.add_argument("--dim", type=int, default=None, help="feature dim (default: the regime's)")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds of the modes (0: no timing)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--timeout", type=float, default=600.0, help="process group timeout, seconds")
    args = parser.parse_args(argv)
    for flag in ("batch", "dim", "repeats", "threads"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "repeats" else 1):
            parser.error(f"--{flag} must be positive, got {value}")

    reports, ok = {}, True
    regimes = REGIMES if args.regime == "both" else (args.regime,)
    alignments = ALIGNMENTS if args.alignment == "both" else (args.alignment,)
    for name, alignment in itertools.product(regimes, alignments):
        world, batch, dim, tile = REGIMES[name]
        report = run_regime(name, world, args.batch or batch, args.dim or dim, tile, alignment, args)
        reports[f"{name} {alignment}"] = report
        keys = [key for key in report if key != "single" and not key.endswith("time ratio")]
        ok &= all(report[key] >= SKIP_GOAL * report["single"] for key in keys)
        ok &= all(report[key] <= TIME_GOAL for key in report if key.endswith("time ratio"))
    goal = f"every rank skipped ≥ {SKIP_GOAL}× single process" + (
        f", time ≤ {TIME_GOAL}× gather" if args.repeats else ""
    )
    print(f"\ngoal ({goal}): {'met' if ok else 'MISSED'}")
    reports["ok"] = ok
    return reports


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
