"""Every distributed mode keeps the gradient filter (issue 20, item 2).

Trained regime (features aligned, τ = 100), 2 Gloo ranks, one paraphrase and one negation per image,
backend "cpp": each mode's backward skips at least 0.8× the fraction of tiles that the single-process
loss on the same global batch skips (`last_backward_stats`, summed over the mode's backward calls), and
its gradients stay within docs/contract.md §4 of the float64 evaluation of the global loss.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oracle import max_norm_rel_err, semclip_loss_float64
from test_cpp import peaked_case

import semclip_kernels as sk

pytestmark = pytest.mark.skipif(not sk.backend_status("cpp", "cpu")[0], reason="the cpp backend is not built")

WORLD, BATCH, DIM = 2, 96, 32  # local batch per rank
TILES = {"block_rows": 16, "block_cols": 32}
MODES = ("gather", "ring", "hierarchical")


def global_batch():
    case = peaked_case(WORLD * BATCH, DIM, tau=100.0, seed=3)
    return [t.detach() for t in (case.image, case.text, case.paraphrase, case.negation)]


def _rank(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    results = {}
    try:
        features = global_batch()
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        for mode in MODES:
            leaves = [t[rows].clone().requires_grad_() for t in features]
            loss_fn = sk.SemCLIPLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD,
                                     backend="cpp", distributed_mode=mode,
                                     group_size=WORLD if mode == "hierarchical" else None, **TILES)  # fmt: skip
            loss = loss_fn(leaves[0], leaves[1], torch.tensor(100.0),
                           paraphrase_features=leaves[2], negation_features=leaves[3])  # fmt: skip
            loss.backward()
            stats = sk.backends.last_backward_stats("cpp")
            results[mode] = (stats.tiles, stats.skipped_tiles, [leaf.grad for leaf in leaves])
    except Exception:  # reported by the parent
        results = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("filter"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank, args=(port, out_dir), nprocs=WORLD, start_method="spawn", join=True)
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for result in results:
        assert not isinstance(result, str), result
    return results


def single_process():
    leaves = [t.clone().requires_grad_() for t in global_batch()]
    sk.semclip_loss(leaves[0], leaves[1], 100.0, leaves[2], leaves[3], backend="cpp", **TILES).backward()
    return sk.backends.last_backward_stats("cpp")


def float64_gradients():
    leaves = [t.double().requires_grad_() for t in global_batch()]
    semclip_loss_float64(leaves[0], leaves[1], 100.0, leaves[2], leaves[3]).backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_keeps_the_gradient_filter(ranks, mode):
    single = single_process()
    assert single.skipped_fraction >= 0.5, single  # the trained regime: most tiles negligible
    for rank, result in enumerate(ranks):
        tiles, skipped, _ = result[mode]
        fraction = skipped / tiles
        assert fraction >= 0.8 * single.skipped_fraction, (mode, rank, fraction, single.skipped_fraction)


@pytest.mark.parametrize("mode", MODES)
def test_filtered_distributed_gradients_stay_exact(ranks, mode):
    expected = float64_gradients()
    for rank, result in enumerate(ranks):
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        for name, grad, want in zip(("image", "text", "paraphrase", "negation"), result[mode][2], expected):
            # local_loss with gather_with_grad: each rank's gradient is world_size × that of the global loss.
            err = max_norm_rel_err(grad / WORLD, want[rows])
            assert err <= 1e-4, (mode, rank, name, err)


if __name__ == "__main__":  # pragma: no cover
    multiprocessing.freeze_support()
