"""The distributed sigmoid loss on Gloo (CPU), 2 and 3 ranks, against float64 (docs/contract.md §8).

Each world size is spawned once (a module-scoped fixture): every rank runs every configuration
(backend × mode × with/without extras, every open_clip `dist_impl` name, open_clip's own distributed
SigLipLoss, the error cases) and saves what it got; the tests compare in the parent process against the
float64 oracle of §8 (tests/sigmoid_oracle.py) in open_clip's per-rank form: rank r's images against every
rank's texts, divided by the local batch; rank r's feature gradients are those of Σ_s L_s (the other ranks'
gradients of r's texts travel home), its τ and b gradients those of L_r (DDP averages them).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
from harness import capture, init_gloo, run_world
from oracle import make_case, max_norm_rel_err
from sigmoid_oracle import semsiglip_loss_float64
from test_distributed import load_open_clip_loss

import semclip_kernels as sk
from semclip_kernels.backends.sigmoid_dispatch import sigmoid_backend_status

BATCH, DIM, TAU, BIAS = 3, 8, 10.0, -4.0  # local batch per rank
CPU_BACKENDS = [b for b in ("reference", "torch", "cpp") if sigmoid_backend_status(b, torch.device("cpu"))[0]]
MODES = ("gather", "ring")
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
EXTRAS = {"plain": (None, None, 1.0, 1.0), "extras": (2, 1, 0.7, 1.5)}  # name: (Pn, Mn, w, β)
TILES = {"block_rows": 2, "block_cols": 4}
NAMES = ("image", "text", "paraphrase", "negation", "logit_scale", "logit_bias")


def global_case(world_size: int, extras: str):
    n_para, n_neg, _, _ = EXTRAS[extras]
    return make_case(world_size * BATCH, DIM, n_para, n_neg, tau=TAU, seed=world_size + 5)


def local_leaves(case, rank: int) -> list[torch.Tensor | None]:
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = [None if t is None else t.detach()[rows].clone().requires_grad_() for t in
           (case.image, case.text, case.paraphrase, case.negation)]  # fmt: skip
    out.append(case.logit_scale.detach().clone().requires_grad_())
    out.append(torch.tensor(BIAS, requires_grad=True))
    return out



def _ours(rank, world_size, leaves, backend, extras, mode=None, dist_impl=None):
    _, _, w, beta = EXTRAS[extras]
    loss_fn = sk.SemSigLipLoss(
        rank=rank, world_size=world_size, dist_impl=dist_impl, distributed_mode=mode, paraphrase_weight=w,
        hard_negative_weight=beta, backend=backend, **TILES,
    )  # fmt: skip
    image, text, para, neg, scale, bias = leaves
    loss = loss_fn(image, text, scale, bias, paraphrase_features=para, negation_features=neg)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def _open_clip(rank, world_size, open_clip_loss, leaves, dist_impl):
    loss_fn = open_clip_loss.SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)
    loss = loss_fn(leaves[0], leaves[1], leaves[4], leaves[5])
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def _uneven(rank, world_size, mode):
    feats = [torch.randn(BATCH + rank, DIM) for _ in range(2)]
    sk.SemSigLipLoss(rank=rank, world_size=world_size, distributed_mode=mode, backend="torch")(*feats, 10.0, -1.0)
    return "no error"


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world_size, port, timeout_s=60)
    results = {}
    for extras, backend, mode in itertools.product(EXTRAS, CPU_BACKENDS, MODES):
        case = global_case(world_size, extras)
        results[(backend, mode, extras)] = capture(
            _ours, rank, world_size, local_leaves(case, rank), backend, extras, mode
        )
    plain = global_case(world_size, "plain")
    open_clip_loss = load_open_clip_loss()
    for dist_impl in DIST_IMPLS:
        results[("dist_impl", dist_impl)] = capture(
            _ours, rank, world_size, local_leaves(global_case(world_size, "extras"), rank), "torch", "extras",
            None, dist_impl,
        )  # fmt: skip
        results[("open_clip", dist_impl)] = capture(
            _open_clip, rank, world_size, open_clip_loss, local_leaves(plain, rank), dist_impl
        )
        results[("ours_plain", dist_impl)] = capture(
            _ours, rank, world_size, local_leaves(plain, rank), "cpp" if "cpp" in CPU_BACKENDS else "torch", "plain",
            None, dist_impl,
        )  # fmt: skip
    for mode in MODES:
        results[("uneven", mode)] = capture(_uneven, rank, world_size, mode)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()



@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"siglip_world{world_size}")
    return world_size, run_world(_worker, world_size, out_dir, preload=[__name__])


def expected_per_rank(world_size: int, extras: str):
    """[(L_r, grads of rank r's six leaves)] in float64, open_clip's per-rank semantics."""
    _, _, w, beta = EXTRAS[extras]
    case = global_case(world_size, extras)
    glob = [None if t is None else t.detach().double().requires_grad_() for t in
            (case.image, case.text, case.paraphrase, case.negation)]  # fmt: skip
    image, text, para, neg = glob
    scales = [case.logit_scale.detach().double().clone().requires_grad_() for _ in range(world_size)]
    biases = [torch.tensor(BIAS, dtype=torch.float64, requires_grad=True) for _ in range(world_size)]
    losses = []
    for r in range(world_size):
        rows = slice(r * BATCH, (r + 1) * BATCH)
        losses.append(semsiglip_loss_float64(
            image[rows], None, scales[r], biases[r], None, None, w, beta,
            global_batch_texts=(text, para, neg), row_offset=r * BATCH,
        ))  # fmt: skip
    sum(losses).backward()
    out = []
    for r in range(world_size):
        rows = slice(r * BATCH, (r + 1) * BATCH)
        grads = [None if t is None else t.grad[rows] for t in glob] + [scales[r].grad, biases[r].grad]
        out.append((losses[r].detach(), grads))
    # The mean of the per-rank losses is the single-process loss of the global batch (equal local batches).
    single = semsiglip_loss_float64(*(t.detach() for t in glob[:2]), case.logit_scale.detach().double(), BIAS,
                                    *(None if t is None else t.detach() for t in glob[2:]), w, beta)  # fmt: skip
    assert abs(float(sum(losses).detach()) / world_size - float(single)) <= 1e-12 * abs(float(single))
    return out


def assert_rank_matches(got, expected, what, loss_tol=1e-5, grad_tol=1e-4):
    assert not isinstance(got, str), f"{what} raised:\n{got}"
    loss, grads = got
    ref_loss, ref_grads = expected
    assert abs(float(loss) - float(ref_loss)) <= loss_tol * abs(float(ref_loss)), (what, float(loss), float(ref_loss))
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        if ref is None:
            assert grad is None, f"{what}: {name}"
            continue
        err = max_norm_rel_err(grad, ref)
        assert err <= grad_tol, f"{what}: grad of {name} off by {err:.2e}"


@pytest.mark.parametrize("extras", list(EXTRAS))
def test_every_backend_and_mode_matches_float64(world, extras):
    world_size, ranks = world
    expected = expected_per_rank(world_size, extras)
    for backend, mode in itertools.product(CPU_BACKENDS, MODES):
        for r in range(world_size):
            assert_rank_matches(ranks[r][(backend, mode, extras)], expected[r], f"{backend}/{mode}/rank{r}")


def test_open_clip_dist_impl_names_map_onto_our_modes(world):
    world_size, ranks = world
    expected = expected_per_rank(world_size, "extras")
    for dist_impl in DIST_IMPLS:
        for r in range(world_size):
            assert_rank_matches(ranks[r][("dist_impl", dist_impl)], expected[r], f"dist_impl={dist_impl}/rank{r}")


def test_equals_open_clip_distributed_siglip_loss(world):
    """Drop-in: with no extras, every rank's loss and gradients equal open_clip's distributed SigLipLoss
    (each dist_impl), which itself matches the float64 per-rank form."""
    world_size, ranks = world
    expected = expected_per_rank(world_size, "plain")
    for dist_impl in DIST_IMPLS:
        for r in range(world_size):
            theirs = ranks[r][("open_clip", dist_impl)]
            assert_rank_matches(theirs, expected[r], f"open_clip {dist_impl}/rank{r}")
            assert_rank_matches(ranks[r][("ours_plain", dist_impl)], theirs, f"ours vs open_clip {dist_impl}/rank{r}")


def test_uneven_local_batches_raise_on_every_rank(world):
    world_size, ranks = world
    for mode in MODES:
        for r in range(world_size):
            assert "local batch size B" in ranks[r][("uneven", mode)], ranks[r][("uneven", mode)]
