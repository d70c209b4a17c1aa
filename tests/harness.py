"""What several test modules share: the repository's root and the multi-process (Gloo) harness.

A world is `world_size` processes of `worker(rank, world_size, port, out_dir, *args)`; each rank saves what it
computed to `out_dir/rank{r}.pt` (errors as their traceback text, via `capture`, so that one bad configuration
fails one test) and the parent compares in its own process.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float = 120.0) -> None:
    """This rank's Gloo process group on the loopback (a rank that waits longer than `timeout_s` fails)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip


def capture(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, or the error's traceback text (reported by the parent's assertion)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        return traceback.format_exc()


def run_world(
    worker: Callable[..., None], world_size: int, out_dir: str | os.PathLike, *args: Any, preload: Sequence[str] = ()
) -> list[Any]:
    """Run a world of `worker` and return each rank's saved results, rank order.

    With `preload` (module names, e.g. the test module's `__name__`) the ranks are forked from a server that
    has imported torch once: importing torch in each fresh process is what makes spawning slow on a small
    machine. Without it, each rank is a fresh spawned interpreter.
    """
    if preload:
        multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "semclip_kernels.loss", *preload])
    mp.start_processes(worker, args=(world_size, free_port(), str(out_dir), *args), nprocs=world_size, join=True,
                       start_method="forkserver" if preload else "spawn")  # fmt: skip
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
