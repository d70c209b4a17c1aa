"""Property-based tests of the distributed modes (docs/testing.md), on 2 and 3 Gloo ranks on CPU.

Spawning a world is the slow part: each world size is spawned once per module (`worlds`) and its ranks
serve every drawn example (a task queue per rank). Hypothesis draws the example (tests/property_regimes.py),
the mode, the settings and the backend; each rank builds the same global batch from the example's seed.

- distributed = single process: with `gather_with_grad=True` (either `local_loss`), the ranks' losses and
  gradients give the single-process loss and gradients of the global batch (docs/contract.md §5), and both
  stay within §4 of the float64 evaluation; the same for the sigmoid family (§8);
- bitwise repeatable: each rank runs every example twice and gets identical bits;
- the cross-rank gradient filter: every rank skips at least 0.8× the fraction of tiles that the
  single-process loss on the same global batch skips (`cpp`).
"""

from __future__ import annotations

import datetime
import queue
import traceback
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import free_port
from hypothesis import assume, given
from hypothesis import strategies as st
from property_regimes import (
    DTYPES,
    LOSS_FLOOR,
    REGIMES,
    example_bounds,
    examples,
    filter_draw,
)
from test_properties import assert_gradients_within_contract, float64_run

import semclip_kernels as sk

WORLD_SIZES = (2, 3)
# Triton runs through its interpreter on CPU: far too slow for worlds of ranks (its own properties cover it).
BACKENDS = [name for name in ("reference", "torch", "cpp") if sk.backend_status(name, "cpu")[0]]
SIGMOID_MODES = ("gather", "ring")
SOFTMAX_MODES = ("gather", "ring", "hierarchical")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Task:
    family: str  # "softmax" or "sigmoid"
    example: object  # property_regimes.Example; batch is the global batch (a multiple of the world size)
    backend: str
    mode: str
    local_loss: bool = True
    group_size: int | None = None


def _rank_rows(task: Task, rank: int, world: int) -> slice:
    local = task.example.batch // world
    return slice(rank * local, (rank + 1) * local)


def _run_rank(task: Task, rank: int, world: int):
    """`(loss, grads [image, text, paraphrase, negation, τ(, b)], (tiles, skipped))` of this rank."""
    ex = task.example
    rows = _rank_rows(task, rank, world)
    leaves = [None if t is None else t[rows].clone().requires_grad_() for t in ex.features()]
    scale = torch.tensor(ex.tau, requires_grad=True)
    common = {"rank": rank, "world_size": world, "backend": task.backend, "paraphrase_weight": ex.paraphrase_weight,
              "hard_negative_weight": ex.hard_negative_weight, **ex.options()}  # fmt: skip
    image, text, para, neg = leaves
    if task.family == "sigmoid":
        bias = torch.tensor(ex.bias, requires_grad=True)
        loss_fn = sk.SemSigLipLoss(distributed_mode=task.mode, **common)
        loss = loss_fn(image, text, scale, bias, paraphrase_features=para, negation_features=neg)
        inputs = leaves + [scale, bias]
    else:
        loss_fn = sk.SemCLIPLoss(local_loss=task.local_loss, gather_with_grad=True, distributed_mode=task.mode,
                                 group_size=task.group_size, **common)  # fmt: skip
        loss = loss_fn(image, text, scale, paraphrase_features=para, negation_features=neg)
        inputs = leaves + [scale]
    loss.backward()
    stats = None
    if task.backend == "cpp" and task.family == "softmax":
        last = sk.backends.last_backward_stats("cpp")
        stats = (last.tiles, last.skipped_tiles)
    return loss.detach(), [None if t is None else t.grad for t in inputs], stats


def _serve(rank: int, world: int, port: int, tasks, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))  # fmt: skip
    try:
        while (task := tasks.get()) is not None:
            try:
                results.put((rank, [_run_rank(task, rank, world) for _ in range(2)]))
            except Exception:  # reported by the parent; the world stays up for the next example
                results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class World:
    """`size` Gloo ranks serving tasks until closed."""

    def __init__(self, size: int) -> None:
        context = mp.get_context("spawn")
        port = free_port()
        self.size = size
        self.tasks = [context.Queue() for _ in range(size)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, args=(r, size, port, self.tasks[r], self.results))
                          for r in range(size)]  # fmt: skip
        for process in self.processes:
            process.start()

    def run(self, task: Task) -> list:
        """Per rank, the two runs of `_run_rank` (rank order)."""
        for q in self.tasks:
            q.put(task)
        out = {}
        for _ in range(self.size):
            try:
                rank, result = self.results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"a rank gave no result within {TIMEOUT_S} s for {task}") from None
            out[rank] = result
        for rank, result in out.items():
            assert not isinstance(result, str), f"rank {rank} raised on {task}:\n{result}"
        return [out[r] for r in range(self.size)]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for process in self.processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def worlds():
    started = {size: World(size) for size in WORLD_SIZES}
    yield started
    for world in started.values():
        world.close()


def _global_example(draw, family: str, regime: str, dtype: str, backend: str, world: int):
    ex = draw(examples(regime, dtype, backend, max_batch=24, max_dim=32, sigmoid=family == "sigmoid"))
    # Every rank holds the same local batch: round the global batch up to a multiple of the world size.
    return replace(ex, batch=world * -(-ex.batch // world))


@st.composite
def tasks(draw, family: str):
    world = draw(st.sampled_from(WORLD_SIZES))
    dtype = draw(st.sampled_from(tuple(DTYPES)))
    regime = draw(st.sampled_from(REGIMES))
    backend = draw(st.sampled_from(BACKENDS))
    ex = _global_example(draw, family, regime, dtype, backend, world)
    if family == "sigmoid":
        return world, Task(family, ex, backend, draw(st.sampled_from(SIGMOID_MODES)))
    mode = draw(st.sampled_from(SOFTMAX_MODES))
    divisors = [g for g in range(1, world + 1) if world % g == 0]
    group = draw(st.sampled_from(divisors)) if mode == "hierarchical" else None
    return world, Task(family, ex, backend, mode, local_loss=draw(st.booleans()), group_size=group)


def _combined(task: Task, per_rank: list, world: int):
    """The single-process loss and gradients that the ranks' results stand for (docs/contract.md §5, §8)."""
    losses = torch.stack([loss for loss, _, _ in per_rank])
    # Each rank's feature gradient is world × the global one on its rows (local_loss with gather_with_grad,
    # the sigmoid family; or every rank's loss is the global one and the gathered copies send theirs home).
    features = [None if per_rank[0][1][k] is None else torch.cat([g[k] for _, g, _ in per_rank]) / world
                for k in range(4)]  # fmt: skip
    per_loss_scalars = [torch.stack([g[k] for _, g, _ in per_rank]) for k in range(4, len(per_rank[0][1]))]
    if task.family == "softmax" and not task.local_loss:  # every rank's loss (and τ gradient) is the global one
        return losses[0], features + [s[0] for s in per_loss_scalars]
    return losses.mean(), features + [s.mean() for s in per_loss_scalars]


def _single_process(task: Task):
    ex = task.example
    leaves = [None if t is None else t.clone().requires_grad_() for t in ex.features()]
    scale = torch.tensor(ex.tau, requires_grad=True)
    weights = {"paraphrase_weight": ex.paraphrase_weight, "hard_negative_weight": ex.hard_negative_weight}
    image, text, para, neg = leaves
    if task.family == "sigmoid":
        bias = torch.tensor(ex.bias, requires_grad=True)
        loss = sk.semsiglip_loss(image, text, scale, bias, para, neg, backend=task.backend, **weights, **ex.options())
        inputs = leaves + [scale, bias]
    else:
        loss = sk.semclip_loss(image, text, scale, para, neg, backend=task.backend, **weights, **ex.options())
        inputs = leaves + [scale]
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in inputs]


def _assert_distributed_equals_single_process(worlds, world: int, task: Task) -> None:
    sigmoid = task.family == "sigmoid"
    expected_loss, expected = float64_run(task.example, sigmoid)
    assume(expected_loss >= LOSS_FLOOR)
    per_rank = worlds[world].run(task)
    first_runs = [runs[0] for runs in per_rank]
    for rank, (first, second) in enumerate(per_rank):  # bitwise repeatable
        assert torch.equal(first[0], second[0]), f"rank {rank} {task}: loss {first[0]!r} then {second[0]!r}"
        for a, b in zip(first[1], second[1]):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"rank {rank} {task}: gradient"
    loss, grads = _combined(task, first_runs, world)
    single_loss, single_grads = _single_process(task)
    loss_tol, _ = example_bounds(task.example)
    for what, want_loss, want_grads in (("float64", expected_loss, expected),
                                        ("single process", float(single_loss), single_grads)):  # fmt: skip
        err = abs(float(loss) - want_loss) / max(abs(want_loss), 1e-30)
        assert err <= loss_tol, f"world {world} {task}: loss {float(loss)!r} vs {what} {want_loss!r} ({err:.3g})"
        assert_gradients_within_contract(task.example, grads, want_grads, task.family,
                                         f"world {world} {task} vs {what}")  # fmt: skip


@given(drawn=tasks("softmax"))
def test_softmax_distributed_equals_single_process_and_float64(worlds, drawn):
    _assert_distributed_equals_single_process(worlds, *drawn)


@given(drawn=tasks("sigmoid"))
def test_sigmoid_distributed_equals_single_process_and_float64(worlds, drawn):
    _assert_distributed_equals_single_process(worlds, *drawn)


@st.composite
def filter_tasks(draw):
    world = draw(st.sampled_from(WORLD_SIZES))
    what = filter_draw()
    ex = _global_example(draw, "softmax", "trained_like", "float32", "cpp", world)
    # τ of a trained model; one paraphrase and one negation per image.
    ex = replace(ex, regime=draw(st.sampled_from(what.regimes)), batch=world * draw(st.integers(*what.local_batch)),
                 dim=draw(st.integers(*what.dim)), n_para=1, n_neg=1, paraphrase_weight=1.0, hard_negative_weight=1.0,
                 tau=100.0, block_rows=what.tiles[0], block_cols=what.tiles[1])  # fmt: skip
    mode = draw(st.sampled_from(SOFTMAX_MODES))
    group = world if mode == "hierarchical" else None
    return world, Task("softmax", ex, "cpp", mode, local_loss=draw(st.booleans()), group_size=group)


@given(drawn=filter_tasks())
def test_every_rank_filters_at_least_08_of_single_process(worlds, drawn):
    world, task = drawn
    leaves = [t.clone().requires_grad_() for t in task.example.features()]
    sk.semclip_loss(leaves[0], leaves[1], task.example.tau, leaves[2], leaves[3], backend="cpp",
                    **task.example.options()).backward()  # fmt: skip
    single = sk.backends.last_backward_stats("cpp")
    assume(single.skipped_fraction >= 0.2)  # a batch where the filter has something to skip
    for rank, runs in enumerate(worlds[world].run(task)):
        tiles, skipped = runs[0][2]
        assert skipped / tiles >= 0.8 * single.skipped_fraction, (
            f"world {world} rank {rank} {task}: skipped {skipped}/{tiles} = {skipped / tiles:.3f} of its tiles, "
            f"single process {single.skipped_fraction:.3f}"
        )
