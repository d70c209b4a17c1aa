"""Ring against gather, side by side in one run on 2 Gloo ranks (goal: ring within 1.15× of gather).

    python -m benchmarks.bench_distributed                      # local B = 2048, d = 128, one thread per rank
    python -m benchmarks.bench_distributed --batch 512 --repeats 3

Both ranks run forward + backward of `SemCLIPLoss(local_loss=True, gather_with_grad=True)` in
each mode, alternating the modes call by call (`measure.interleaved_medians`) so the noise of a
shared machine hits them alike; rank 0 reports the medians, their ratio and the verdict. Cases:
captions only (CLIP) and one paraphrase plus one negation per image.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semclip_kernels import SemCLIPLoss

from .measure import forward_backward, interleaved_medians, verdict

GOAL = 1.15  # ring time / gather time
WORLD_SIZE = 2
MODES = ("gather", "ring")
CASES = {"captions only": (0, 0), "1 paraphrase + 1 negation": (1, 1)}  # (Pn, Mn)


def _inputs(rank: int, batch: int, dim: int, n_para: int, n_neg: int) -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(rank)

    def features(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, dim, generator=generator)
        return (x / x.norm(dim=-1, keepdim=True)).requires_grad_()

    return {
        "image_features": features(batch),
        "text_features": features(batch),
        "logit_scale": torch.tensor(1 / 0.07, requires_grad=True),
        "paraphrase_features": features(batch, n_para) if n_para else None,
        "negation_features": features(batch, n_neg) if n_neg else None,
    }


def _rank(rank: int, port: int, options: dict, out_path: str) -> None:
    torch.set_num_threads(options["threads"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=options["timeout"]),
    )
    results = {}
    for case, (n_para, n_neg) in CASES.items():
        inputs = _inputs(rank, options["batch"], options["dim"], n_para, n_neg)
        calls = {}
        for mode in MODES:
            loss_fn = SemCLIPLoss(
                local_loss=True,
                gather_with_grad=True,
                rank=rank,
                world_size=WORLD_SIZE,
                backend=options["backend"],
                distributed_mode=mode,
            )

            def call(loss_fn=loss_fn, inputs=inputs) -> float:
                return forward_backward(
                    lambda **kw: loss_fn(
                        kw["image_features"],
                        kw["text_features"],
                        kw["logit_scale"],
                        paraphrase_features=kw["paraphrase_features"],
                        negation_features=kw["negation_features"],
                    ),
                    inputs,
                )

            calls[mode] = call
        # Both ranks make the same calls in the same order: the collectives pair them up.
        results[case] = interleaved_medians(calls, options["repeats"])
    if rank == 0:
        with open(out_path, "w") as file:
            json.dump(results, file)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(options: dict) -> dict[str, dict[str, float]]:
    """Spawn the 2-rank world, wait at most `options['deadline']` seconds, end every process."""
    # semclip_kernels.loss: `import semclip_kernels` alone loads the loss stack lazily, on first use
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "semclip_kernels.loss"])
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        context = mp.start_processes(
            _rank, args=(_free_port(), options, out_path), nprocs=WORLD_SIZE, join=False, start_method="forkserver"
        )
        deadline = time.monotonic() + options["deadline"]
        try:
            while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the 2-rank benchmark did not finish within {options['deadline']} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(10)
        with open(out_path) as file:
            return json.load(file)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2048, help="local batch per rank")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--timeout", type=float, default=300.0, help="process group timeout, seconds")
    parser.add_argument("--deadline", type=float, default=1800.0, help="give up after this many seconds")
    options = vars(parser.parse_args(argv))
    print(
        f"{WORLD_SIZE} Gloo ranks on loopback, local batch {options['batch']}, d {options['dim']}, "
        f"{options['threads']} thread(s) per rank, backend {options['backend']!r}, "
        f"forward+backward, median of {options['repeats']} interleaved calls"
    )
    results = run(options)
    print("| case | gather s | ring s | ring / gather | verdict |")
    print("| --- | --- | --- | --- | --- |")
    for case, times in results.items():
        ratio = times["ring"] / times["gather"]
        print(
            f"| {case} | {times['gather']:.3f} | {times['ring']:.3f} | {ratio:.3f} | {verdict(ratio, '≤', GOAL)} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
