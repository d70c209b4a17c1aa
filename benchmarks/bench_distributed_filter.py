"""The gradient filter in every distributed mode, trained regime, 2 Gloo ranks.

    python -m benchmarks.bench_distributed_filter                  # local B = 2048, d = 128, Pn = Mn = 1, cpp
    python -m benchmarks.bench_distributed_filter --batch 512 --repeats 3

Features as a trained model produces them (measure.trained_inputs: caption and paraphrase near
their image, negation a little farther, τ = 100). Each rank runs forward + backward of
`SemCLIPLoss(local_loss=True, gather_with_grad=True)` in each mode, the modes alternating call by call;
rank 0 reports per mode the median time, its ratio to "gather" (goal ≤ 1.15) and the fraction of tiles
the backward skipped (`last_backward_stats`, summed over the mode's calls), next to the single-process
loss's fraction on the same global batch (goal: each mode ≥ 0.8× it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import semclip_kernels as sk

from .measure import TRAINED_SCALE, trained_inputs

WORLD_SIZE = 2
MODES = ("gather", "ring", "hierarchical")
TIME_GOAL, SKIP_GOAL = 1.15, 0.8


def _global_batch(batch: int, dim: int) -> list[torch.Tensor]:
    inputs = trained_inputs(WORLD_SIZE * batch, dim)
    return [inputs[name].detach() for name in ("image", "text", "paraphrase", "negation")]


def _rank(rank: int, port: int, options: dict, out_path: str) -> None:
    torch.set_num_threads(options["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=options["timeout"]))  # fmt: skip
    batch, backend = options["batch"], options["backend"]
    features = _global_batch(batch, options["dim"])
    rows = slice(rank * batch, (rank + 1) * batch)
    leaves = [t[rows].clone().requires_grad_() for t in features]
    losses = {
        mode: sk.SemCLIPLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD_SIZE,
                             backend=backend, distributed_mode=mode,
                             group_size=WORLD_SIZE if mode == "hierarchical" else None)
        for mode in MODES
    }  # fmt: skip
    times = {mode: [] for mode in MODES}
    skipped = {}
    for repeat in range(options["repeats"] + 1):  # the first round warms up
        for mode in MODES:
            for leaf in leaves:
                leaf.grad = None
            dist.barrier()
            start = time.perf_counter()
            loss = losses[mode](leaves[0], leaves[1], torch.tensor(TRAINED_SCALE),
                                paraphrase_features=leaves[2], negation_features=leaves[3])  # fmt: skip
            loss.backward()
            dist.barrier()
            if repeat:
                times[mode].append(time.perf_counter() - start)
            stats = sk.backends.last_backward_stats(backend)
            skipped[mode] = (stats.skipped_tiles, stats.tiles)
    if rank == 0:
        with open(out_path, "w") as out:
            json.dump({"times": times, "skipped": skipped}, out)
    dist.destroy_process_group()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2048, help="local batch per rank")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--timeout", type=float, default=600.0, help="process group timeout, seconds")
    args = parser.parse_args(argv)
    options = vars(args)

    leaves = [t.clone().requires_grad_() for t in _global_batch(args.batch, args.dim)]
    sk.semclip_loss(leaves[0], leaves[1], TRAINED_SCALE, leaves[2], leaves[3], backend=args.backend).backward()
    single = sk.backends.last_backward_stats(args.backend)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        mp.start_processes(_rank, args=(port, options, out_path), nprocs=WORLD_SIZE, start_method="spawn")
        with open(out_path) as result:
            result = json.load(result)

    print(f"2 Gloo ranks, local B = {args.batch}, d = {args.dim}, Pn = Mn = 1, τ = {TRAINED_SCALE}, "
          f"backend {args.backend}, {args.threads} thread(s) per rank, {args.repeats} repeats")  # fmt: skip
    print(f"single process (global batch): skipped {single.skipped_tiles}/{single.tiles} "
          f"= {single.skipped_fraction:.3f} of the backward's tiles")  # fmt: skip
    gather_time = _median(result["times"]["gather"])
    report = {"single skipped fraction": single.skipped_fraction}
    for mode in MODES:
        seconds = _median(result["times"][mode])
        skipped, tiles = result["skipped"][mode]
        fraction = skipped / tiles if tiles else 0.0
        ratio = fraction / single.skipped_fraction if single.skipped_fraction else float("nan")
        print(f"{mode:<13} {seconds:8.3f} s  {seconds / gather_time:5.2f}× gather   skipped {skipped}/{tiles} "
              f"= {fraction:.3f} ({ratio:.2f}× single process)")  # fmt: skip
        report[f"{mode} time ratio"] = seconds / gather_time
        report[f"{mode} skipped fraction"] = fraction
    ok = all(report[f"{mode} time ratio"] <= TIME_GOAL for mode in MODES) and all(
        report[f"{mode} skipped fraction"] >= SKIP_GOAL * single.skipped_fraction for mode in MODES
    )
    print(f"goals (time ≤ {TIME_GOAL}× gather, skipped ≥ {SKIP_GOAL}× single process): {'met' if ok else 'MISSED'}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
