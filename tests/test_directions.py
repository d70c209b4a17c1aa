"""`directions="image_to_text"`: the image → text half of docs/contract.md §1 alone, `L = L_i2t`.

Every backend (Triton through its interpreter), the gradient filter and the distributed modes (4 Gloo
ranks: gather, ring, hierarchical in two groups of two; open_clip's four local_loss/gather_with_grad
combinations) against the float64 oracle's `directions="image_to_text"`; no column partition is computed;
the sigmoid loss rejects the argument.
"""

from __future__ import annotations

import datetime
import itertools
import math
import multiprocessing
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oracle import make_case, max_norm_rel_err, semclip_loss_float64
from test_cpp import peaked_case

import semclip_kernels as sk
from semclip_kernels import loss_node
from semclip_kernels.backends import last_backward_stats

BACKENDS = [name for name in ("reference", "torch", "cpp", "triton") if sk.backend_status(name, "cpu")[0]]
TILES = {"block_rows": 8, "block_cols": 16}
NAMES = ("image", "text", "paraphrase", "negation", "logit_scale")


def run_loss(case, backend, w=1.0, beta=1.0, **options):
    for leaf in case.leaves():
        leaf.grad = None
    loss = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
                           paraphrase_weight=w, hard_negative_weight=beta, backend=backend,
                           directions="image_to_text", **options)  # fmt: skip
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in case.leaves()]


def run_oracle(case, w=1.0, beta=1.0, directions="image_to_text"):
    leaves = [leaf.detach().double().requires_grad_() for leaf in case.leaves()]
    it = iter(leaves)
    image, text = next(it), next(it)
    para = next(it) if case.paraphrase is not None else None
    neg = next(it) if case.negation is not None else None
    loss = semclip_loss_float64(image, text, next(it), para, neg, w, beta, directions)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_matches(case, backend, w=1.0, beta=1.0, loss_tol=1e-5, grad_tol=1e-4, **options):
    loss, grads = run_loss(case, backend, w, beta, **options)
    ref_loss, ref_grads = run_oracle(case, w, beta)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - ref_loss) <= loss_tol * abs(ref_loss), (backend, float(loss), float(ref_loss))
    for leaf, grad, ref in zip(case.leaves(), grads, ref_grads):
        assert grad is None or grad.dtype == leaf.dtype
        err = max_norm_rel_err(grad, ref)
        assert err <= grad_tol, f"{backend}: gradient off by {err:.2e} (rel. max-norm)"


def test_oracle_one_direction_is_the_image_to_text_half():
    """The oracle's L_i2t, pinned independently: without extras it is the image → text cross-entropy, the
    first half of ClipLoss (τ = 14.25 is exact in float32, as the oracle reads a float τ)."""
    case = make_case(9, 16, None, None, tau=14.25, seed=5)
    image, text = case.image.detach().double(), case.text.detach().double()
    logits = 14.25 * image @ text.T
    labels = torch.arange(9)
    i2t = torch.nn.functional.cross_entropy(logits, labels)
    t2i = torch.nn.functional.cross_entropy(logits.T, labels)
    one = semclip_loss_float64(image, text, 14.25, directions="image_to_text")
    both = semclip_loss_float64(image, text, 14.25)
    assert abs(float(one - i2t)) <= 1e-14 and abs(float(both - (i2t + t2i) / 2)) <= 1e-14


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,dim", [(1, 1), (7, 129), (31, 17)])
@pytest.mark.parametrize("n_para,n_neg", [(None, None), (1, None), (None, 1), (3, 2)])
def test_matches_float64_oracle(backend, batch, dim, n_para, n_neg):
    case = make_case(batch, dim, n_para, n_neg, tau=14.3, seed=batch * 100 + dim, extra_as_2d=True)
    assert_matches(case, backend, **TILES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau,w,beta", [(1.0, 0.5, 2.5), (50.0, 0.0, 1.0), (100.0, 2.0, 0.0), (14.3, 1.0, 0.3)])
def test_scales_and_weights(backend, tau, w, beta):
    case = make_case(23, 33, 2, 2, tau=tau, seed=int(tau) + int(10 * w))
    assert_matches(case, backend, w=w, beta=beta, **TILES)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_half_precision(backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} backend not available")
    case = make_case(40, 64, 2, 1, tau=30.0, seed=11, dtype=torch.bfloat16, normalize=True)
    assert_matches(case, backend, loss_tol=2e-2, grad_tol=2e-2, **TILES)


@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton") if b in BACKENDS])
def test_gradient_filter_skips_tiles_and_stays_exact(backend):
    """The trained regime (features aligned, τ = 100): the default filter skips most tiles, the gradients
    stay within docs/contract.md §4; with eps = 0 nothing is skipped."""
    case = peaked_case(128 if backend == "triton" else 384, 32)
    tiles = {"block_rows": 32, "block_cols": 32}
    assert_matches(case, backend, **tiles)
    stats = last_backward_stats(backend)
    assert stats.skipped_fraction >= 0.5, stats
    assert_matches(case, backend, grad_filter_eps=0.0, **tiles)
    assert last_backward_stats(backend).skipped_tiles == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_column_partition_is_computed(backend, monkeypatch):
    """One direction asks the kernels for no column partition: n_query_cols = 0 in forward and backward."""
    seen = []
    forward = loss_node.backend_forward

    def spy(problem, name):
        seen.append(problem.n_query_cols)
        return forward(problem, name)

    monkeypatch.setattr(loss_node, "backend_forward", spy)
    case = make_case(6, 8, 1, 1, tau=10.0)
    loss, _ = run_loss(case, backend)
    if backend != "reference":  # the reference backend runs as plain autograd, not through the node
        assert seen == [0]
    both = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation, backend=backend)
    if backend != "reference":
        assert seen == [0, 12]
    assert float(loss) != float(both.detach())


def test_module_and_function_agree():
    case = make_case(12, 16, 2, 1, tau=20.0, seed=2)
    loss_fn = sk.SemCLIPLoss(backend="torch", directions="image_to_text")
    got = loss_fn(case.image, case.text, case.logit_scale, paraphrase_features=case.paraphrase,
                  negation_features=case.negation)  # fmt: skip
    want = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
                           backend="torch", directions="image_to_text")  # fmt: skip
    assert float(got) == float(want)


@pytest.mark.parametrize("bad", ["text_to_image", "Both", "", None, 1])
def test_bad_directions_name_the_argument(bad):
    case = make_case(4, 8, None, None, tau=10.0)
    with pytest.raises(ValueError, match="directions"):
        sk.semclip_loss(case.image, case.text, 10.0, directions=bad)
    with pytest.raises(ValueError, match="directions"):
        sk.SemCLIPLoss(directions=bad)


@pytest.mark.parametrize("value", ["both", "image_to_text"])
def test_sigmoid_loss_rejects_directions(value):
    case = make_case(4, 8, None, None, tau=10.0)
    with pytest.raises(TypeError, match="directions.*sigmoid"):
        sk.semsiglip_loss(case.image, case.text, 10.0, -10.0, directions=value)
    with pytest.raises(TypeError, match="directions.*sigmoid"):
        sk.SemSigLipLoss(directions=value)


# --------------------------------------------------------------------------- distributed

WORLD, BATCH, DIM, TAU = 4, 3, 8, 14.3
W, BETA = 0.7, 1.5
MODES = ("gather", "ring", "hierarchical")
COMBOS = list(itertools.product((False, True), (False, True)))  # (local_loss, gather_with_grad)
DIST_BACKENDS = [b for b in ("torch", "cpp") if b in BACKENDS]


def global_case():
    return make_case(WORLD * BATCH, DIM, 2, 1, tau=TAU, seed=17)


def _one_rank(rank, backend, mode, local_loss, gather_with_grad):
    case = global_case()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    leaves = [t.detach()[rows].clone().requires_grad_() for t in (case.image, case.text, case.paraphrase,
                                                                   case.negation)]  # fmt: skip
    scale = case.logit_scale.detach().clone().requires_grad_()
    loss_fn = sk.SemCLIPLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=WORLD,
                             paraphrase_weight=W, hard_negative_weight=BETA, backend=backend, distributed_mode=mode,
                             group_size=2 if mode == "hierarchical" else None, block_rows=2, block_cols=4,
                             directions="image_to_text")  # fmt: skip
    loss = loss_fn(leaves[0], leaves[1], scale, paraphrase_features=leaves[2], negation_features=leaves[3])
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves] + [scale.grad]


def _mixed_directions(rank):
    case = make_case(BATCH, DIM, None, None, tau=TAU, seed=rank)
    loss_fn = sk.SemCLIPLoss(rank=rank, world_size=WORLD, backend="torch",
                             directions="image_to_text" if rank == 0 else "both")  # fmt: skip
    loss_fn(case.image, case.text, TAU)
    return "no error"


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    results = {}
    for key in itertools.product(DIST_BACKENDS, MODES, COMBOS):
        backend, mode, (local_loss, gwg) = key
        try:
            results[key] = _one_rank(rank, backend, mode, local_loss, gwg)
        except Exception:  # noqa: BLE001 - reported by the parent's assertion
            results[key] = traceback.format_exc()
    try:
        results["mixed"] = _mixed_directions(rank)
    except Exception as error:  # noqa: BLE001
        results["mixed"] = repr(error)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("directions")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "semclip_kernels.loss", __name__])
    mp.start_processes(_worker, args=(port, str(out_dir)), nprocs=WORLD, join=True, start_method="forkserver")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def rank_loss_float64(rank, image_r, all_text, all_para, all_neg, tau):
    """Rank r's image → text share, open_clip's local_loss form, materialized: its images against every
    column of the global batch, the positives read off the global columns."""
    own = torch.arange(BATCH) + rank * BATCH
    cols = torch.cat([all_text, all_para.reshape(-1, DIM), all_neg.reshape(-1, DIM)])
    n_pos = all_text.shape[0] + all_para.shape[0] * all_para.shape[1]
    bias = torch.cat([torch.zeros(n_pos, dtype=torch.float64),
                      torch.full((cols.shape[0] - n_pos,), math.log(BETA), dtype=torch.float64)])  # fmt: skip
    logits = tau * image_r @ cols.T + bias
    z = torch.logsumexp(logits, dim=1)
    i2t = z - logits[torch.arange(BATCH), own]
    para_pos = tau * torch.einsum("bd,bpd->bp", image_r, all_para[own])
    i2t = i2t + W * (z[:, None] - para_pos).sum(1)
    return i2t.mean() / (1 + W * all_para.shape[1])


def expected(local_loss, gather_with_grad):
    """Per rank: (loss, grads of image, text, paraphrase, negation, τ) in float64."""
    case = global_case()
    base = [t.detach().double() for t in (case.image, case.text, case.paraphrase, case.negation)]
    if not local_loss:
        leaves = [t.clone().requires_grad_() for t in base]
        tau = case.logit_scale.detach().double().requires_grad_()
        loss = semclip_loss_float64(*leaves[:2], tau, *leaves[2:], W, BETA, "image_to_text")
        loss.backward()
        factor = WORLD if gather_with_grad else 1
        rows = [slice(r * BATCH, (r + 1) * BATCH) for r in range(WORLD)]
        return [(loss.detach(), [factor * t.grad[rows[r]] for t in leaves] + [tau.grad]) for r in range(WORLD)]
    out = []
    taus = [case.logit_scale.detach().double().requires_grad_() for _ in range(WORLD)]
    if gather_with_grad:  # shared leaves: each rank's features get Σ_s d loss_s / d(its rows)
        shared = [t.clone().requires_grad_() for t in base]
        losses = [rank_loss_float64(r, shared[0][r * BATCH : (r + 1) * BATCH], *shared[1:], taus[r])
                  for r in range(WORLD)]  # fmt: skip
        torch.stack(losses).sum().backward()
        for r in range(WORLD):
            rows = slice(r * BATCH, (r + 1) * BATCH)
            out.append((losses[r].detach(), [t.grad[rows] for t in shared] + [taus[r].grad]))
        return out
    for r in range(WORLD):  # gathered copies are constants: only the own images are differentiated
        rows = slice(r * BATCH, (r + 1) * BATCH)
        image_r = base[0][rows].clone().requires_grad_()
        loss = rank_loss_float64(r, image_r, *base[1:], taus[r])
        loss.backward()
        zeros = [torch.zeros_like(t[rows]) for t in base[1:]]
        out.append((loss.detach(), [image_r.grad, *zeros, taus[r].grad]))
    return out


def test_per_rank_form_matches_oracle():
    """The per-rank float64 form is pinned to the oracle: its mean over ranks is the global L_i2t."""
    losses = expected(True, True)
    global_loss = expected(False, False)[0][0]
    assert abs(float(torch.stack([loss for loss, _ in losses]).mean() - global_loss)) <= 1e-12


@pytest.mark.parametrize("local_loss,gather_with_grad", COMBOS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_distributed_matches_float64(world, backend, mode, local_loss, gather_with_grad):
    want = expected(local_loss, gather_with_grad)
    for rank in range(WORLD):
        got = world[rank][(backend, mode, (local_loss, gather_with_grad))]
        assert not isinstance(got, str), got
        loss, grads = got
        ref_loss, ref_grads = want[rank]
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (rank, float(loss), float(ref_loss))
        for name, grad, ref in zip(NAMES, grads, ref_grads):
            err = max_norm_rel_err(grad, ref)
            assert err <= 1e-4, f"rank {rank}: grad of {name} off by {err:.2e}"


def test_directions_must_agree_across_ranks(world):
    for rank in range(WORLD):
        assert "directions differs across ranks" in world[rank]["mixed"], world[rank]["mixed"]
