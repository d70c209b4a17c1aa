"""Failure behaviour of the distributed loss (docs/contract.md §5): no rank waits forever.

Each scenario is a 2-rank Gloo world on loopback with a short process-group timeout. Rank 1
misbehaves; rank 0 runs the loss and records how long it took to fail and what it said. The
scenarios' worlds run side by side (they mostly wait), every process is ended at the end of the
module, even when a test fails, and the whole module is bounded by `_DEADLINE`.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from harness import free_port

import semclip_kernels as sk

TIMEOUT = 4.0  # seconds: the process group's timeout in every scenario
_DEADLINE = 120.0  # seconds for all worlds to report (spawning is slow on a loaded 2-core machine)
BATCH, DIM = 3, 8

# scenario: (mode, what rank 1 does)
SCENARIOS = {
    # An exception on rank 1 before it reaches the loss: its process exits.
    "raises": ("gather", "raise before the loss"),
    # Rank 1's process dies (os._exit) between the forward and the backward of the ring.
    "dies": ("ring", "die after the forward"),
    # Rank 1 stays alive but never calls the loss.
    "absent": ("hierarchical", "never call the loss"),
    # Rank 1 runs the forward, then never calls the backward (the ring's gradient blocks never come).
    "no_backward": ("ring", "never call the backward"),
}


def _loss(rank: int, mode: str):
    torch.manual_seed(rank)
    image, text = (torch.randn(BATCH, DIM, requires_grad=True) for _ in range(2))
    loss_fn = sk.SemCLIPLoss(
        local_loss=True,
        gather_with_grad=True,
        rank=rank,
        world_size=2,
        backend="torch",
        distributed_mode=mode,
        group_size=2 if mode == "hierarchical" else None,
    )
    return loss_fn(image, text, 10.0)


def _worker(scenario: str, rank: int, port: int, out_path: str) -> None:
    mode, _ = SCENARIOS[scenario]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    if rank == 1:
        if scenario == "raises":
            raise RuntimeError("rank 1 fails in its data loader")  # uncaught: the process exits
        if scenario == "absent":
            time.sleep(4 * TIMEOUT)  # alive, elsewhere; ended by the parent
            return
        _loss(rank, mode)  # the forward, with rank 0
        if scenario == "dies":
            os._exit(17)
        time.sleep(4 * TIMEOUT)  # "no_backward"
        return
    start = time.monotonic()
    try:
        _loss(rank, mode).backward()
        outcome = {"error": None}
    except Exception as error:  # noqa: BLE001 - what rank 0 saw is the result
        outcome = {"error": type(error).__name__, "message": str(error)}
    outcome["elapsed"] = time.monotonic() - start
    with open(out_path, "w") as file:
        json.dump(outcome, file)
    os._exit(0)  # skip destroy_process_group: its peer is gone or stuck



@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("failures")
    context = multiprocessing.get_context("forkserver")
    # semclip_kernels.loss: `import semclip_kernels` alone loads the loss stack lazily, on first use
    context.set_forkserver_preload(["torch", "semclip_kernels.loss", __name__])
    processes = []
    try:
        for scenario in SCENARIOS:
            port = free_port()
            for rank in (0, 1):
                out_path = str(out_dir / f"{scenario}.json")
                process = context.Process(target=_worker, args=(scenario, rank, port, out_path), daemon=True)
                process.start()
                processes.append((scenario, rank, process))
        deadline = time.monotonic() + _DEADLINE
        for _, rank, process in processes:
            if rank == 0:
                process.join(max(0.0, deadline - time.monotonic()))
        results = {}
        for scenario in SCENARIOS:
            path = out_dir / f"{scenario}.json"
            results[scenario] = json.loads(path.read_text()) if path.exists() else None
        return results
    finally:  # every process this fixture started is ended, whatever happened
        for _, _, process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(10)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_other_rank_fails_in_bounded_time_with_a_message(outcomes, scenario):
    mode, misbehaviour = SCENARIOS[scenario]
    got = outcomes[scenario]
    assert got is not None, f"{scenario}: rank 0 did not report within {_DEADLINE} s (hung?)"
    assert got["error"] == "PeerFailure", f"{scenario} ({mode}): rank 0 got {got}"
    # Bounded by the process group's timeout (plus scheduling slack on a loaded machine).
    assert got["elapsed"] <= TIMEOUT + 10.0, f"{scenario}: rank 0 failed after {got['elapsed']:.1f} s"
    message = got["message"]
    assert message.startswith("distributed SemCLIP loss, rank 0 of 2: "), message
    assert "torch.distributed reported:" in message, message
    if scenario in ("raises", "dies"):  # the peer's process is gone: said as such, and quickly
        assert "another rank exited (it raised an exception or its process died)" in message, message
        assert got["elapsed"] < TIMEOUT, f"{scenario}: a closed connection should not wait for the timeout"
    else:  # the peer is alive but elsewhere: the timeout, named
        assert "no answer within the process group's timeout (0:00:04)" in message, message
        assert "did not call the loss (or its backward)" in message, message
        assert got["elapsed"] >= TIMEOUT * 0.9, f"{scenario}: failed before the timeout ({got['elapsed']:.1f} s)"
    which = {
        "raises": "the exchange of every rank's batch layout",
        "dies": "the ring's exchange",
        "absent": "the exchange of every rank's batch layout",
        "no_backward": "the ring's exchange of feature blocks (backward",
    }[scenario]
    assert which in message, message
    print(f"{scenario}: rank 0 failed after {got['elapsed']:.2f} s: {message}")


def test_training_sets_an_explicit_process_group_timeout(monkeypatch):
    """training/train.py passes its documented timeout to init_process_group (no world needed)."""
    from training import train

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    world = train.init_distributed()
    assert (world.rank, world.world_size) == (1, 2)
    assert calls == [{"backend": "gloo" if not torch.cuda.is_available() else "nccl",
                      "timeout": train.PROCESS_GROUP_TIMEOUT}]
    assert train.PROCESS_GROUP_TIMEOUT == datetime.timedelta(minutes=30)
