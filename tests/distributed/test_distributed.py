"""The distributed SemCLIP loss on Gloo (CPU), 2 and 4 ranks, against float64 evaluations.

Spawning a world is the slow part, so each world size is spawned once (a
module-scoped fixture): every rank runs every configuration (backend × mode ×
local_loss/gather_with_grad × with/without extras, plus open_clip's ClipLoss
and the error cases), saves what it got, and the tests below compare in the
parent process against
- the float64 oracle of docs/contract.md §1 on the concatenated batch (global loss
  and gradients, docs/contract.md §5), and
- an explicit float64 per-rank form written here in open_clip's style (this
  rank's rows against materialized global logits), which pins the per-rank
  values and open_clip's gradient semantics of all four combinations;
  its mean over ranks is itself checked against the oracle.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
from harness import capture, init_gloo, run_world
from oracle import make_case, max_norm_rel_err, semclip_loss_float64

import semclip_kernels as sk

BATCH, DIM, TAU = 3, 8, 14.3  # local batch per rank
# The compiled and the portable backends (and the ground truth). Triton runs on CPU only through its
# interpreter, far too slow to spawn worlds around; its own tests cover its primitive.
CPU_BACKENDS = [name for name in sk.available_backends("cpu") if name in ("cpp", "torch", "reference")]
MODES = ("gather", "ring", "hierarchical")
# "hierarchical" in groups of 2: one group (no ring step) in the 2-rank world, two groups of 2 in the 4-rank world.
GROUP_SIZE = 2
COMBOS = list(itertools.product((False, True), (False, True)))  # (local_loss, gather_with_grad)
# name: (Pn, Mn, paraphrase_weight, hard_negative_weight)
EXTRAS = {"plain": (None, None, 1.0, 1.0), "extras": (2, 1, 0.7, 1.5)}
TILES = {"block_rows": 2, "block_cols": 4}  # several ragged tiles even at this size
FROZEN_COMBOS = [(False, True), (True, True), (False, False)]
NAMES = ("image", "text", "paraphrase", "negation", "logit_scale")


def global_case(world_size: int, extras: str, seed: int = 0):
    n_para, n_neg, _, _ = EXTRAS[extras]
    return make_case(world_size * BATCH, DIM, n_para, n_neg, tau=TAU, seed=seed + world_size)


def rank_slice(rank: int) -> slice:
    return slice(rank * BATCH, (rank + 1) * BATCH)


def local_leaves(case, rank: int) -> list[torch.Tensor | None]:
    """This rank's rows of the global case as fresh leaves (None for absent extras)."""
    rows = rank_slice(rank)
    out = []
    for tensor in (case.image, case.text, case.paraphrase, case.negation):
        out.append(None if tensor is None else tensor.detach()[rows].clone().requires_grad_())
    out.append(case.logit_scale.detach().clone().requires_grad_())
    return out


def load_open_clip_loss():
    """open_clip's loss.py on its own: `import open_clip` takes seconds per process."""
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(os.path.dirname(spec.origin), "loss.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_loss_only", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the worker (one per rank)



def _semclip(rank, world_size, leaves, backend, mode, local_loss, gather_with_grad, extras,
             group_size=GROUP_SIZE):
    _, _, w, beta = EXTRAS[extras]
    group_size = group_size if mode == "hierarchical" else None
    loss_fn = sk.SemCLIPLoss(
        local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size,
        paraphrase_weight=w, hard_negative_weight=beta, backend=backend, distributed_mode=mode,
        group_size=group_size, **TILES,
    )
    image, text, para, neg, scale = leaves
    loss = loss_fn(image, text, scale, paraphrase_features=para, negation_features=neg)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def _open_clip(rank, world_size, open_clip_loss, leaves, local_loss, gather_with_grad):
    clip = open_clip_loss.ClipLoss(
        local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size
    )
    loss = clip(leaves[0], leaves[1], leaves[4])
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def _bad_layout(rank, world_size, mode, batch, n_para, scale=10.0, beta=1.0):
    feats = [torch.randn(batch, DIM) for _ in range(2)]
    para = torch.randn(batch, n_para, DIM)
    loss_fn = sk.SemCLIPLoss(
        rank=rank, world_size=world_size, backend="torch", distributed_mode=mode,
        group_size=GROUP_SIZE if mode == "hierarchical" else None, hard_negative_weight=beta,
    )
    loss_fn(feats[0], feats[1], scale, paraphrase_features=para)
    return "no error"


def _primitive_calls(rank, world_size, leaves, mode):
    """How often the ring calls the primitive's forward and its backward-only entry, in the forward
    and in the backward of one loss (local_loss=True, gather_with_grad=True, with extras)."""
    from semclip_kernels.distributed import ring

    calls = {"partitions": 0, "partitions_backward": 0}

    def counted(name):
        original = getattr(ring, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return original, call

    originals = {}
    for name in calls:
        originals[name], counting = counted(name)
        setattr(ring, name, counting)
    try:
        image, text, para, neg, scale = leaves
        loss_fn = sk.SemCLIPLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size, backend="torch",
            distributed_mode=mode, group_size=GROUP_SIZE if mode == "hierarchical" else None,
        )
        loss = loss_fn(image, text, scale, paraphrase_features=para, negation_features=neg)
        forward = dict(calls)
        calls.update(partitions=0, partitions_backward=0)
        loss.backward()
        return {"forward": forward, "backward": dict(calls)}
    finally:
        for name, original in originals.items():
            setattr(ring, name, original)


def _traffic(rank, world_size, leaves, mode):
    """Bytes of feature data this rank sends in one forward + backward (local_loss=True,
    gather_with_grad=True, float32), counted at the calls: a ring all-gather or reduce-scatter over
    n members sends n − 1 slices, an isend its tensor. The integer layout table is not counted."""
    from semclip_kernels.distributed import collectives

    sent = [0]
    all_gather, reduce_scatter, batch_isend_irecv = (
        collectives._all_gather_single, collectives._reduce_scatter_single, dist.batch_isend_irecv
    )

    def counted_all_gather(out, tensor, group=None):
        if tensor.is_floating_point():
            sent[0] += (dist.get_world_size(group) - 1) * tensor.numel() * tensor.element_size()
        return all_gather(out, tensor, group=group)

    def counted_reduce_scatter(out, tensor, group=None):
        sent[0] += (dist.get_world_size(group) - 1) * out.numel() * out.element_size()
        return reduce_scatter(out, tensor, group=group)

    def counted_batch_isend_irecv(ops):
        sent[0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return batch_isend_irecv(ops)

    collectives._all_gather_single, collectives._reduce_scatter_single = counted_all_gather, counted_reduce_scatter
    dist.batch_isend_irecv = counted_batch_isend_irecv
    try:
        _semclip(rank, world_size, leaves, "torch", mode, True, True, "extras")
    finally:
        collectives._all_gather_single, collectives._reduce_scatter_single = all_gather, reduce_scatter
        dist.batch_isend_irecv = batch_isend_irecv
    return sent[0]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world_size, port, timeout_s=60)
    results = {}
    for extras in EXTRAS:
        case = global_case(world_size, extras)
        for backend, mode, (local_loss, gwg) in itertools.product(CPU_BACKENDS, MODES, COMBOS):
            results[(backend, mode, local_loss, gwg, extras)] = capture(
                _semclip, rank, world_size, local_leaves(case, rank), backend, mode, local_loss, gwg, extras
            )

    open_clip_loss = load_open_clip_loss()
    plain = global_case(world_size, "plain")
    for local_loss, gwg in COMBOS:
        results[("open_clip", local_loss, gwg)] = capture(
            _open_clip, rank, world_size, open_clip_loss, local_leaves(plain, rank), local_loss, gwg
        )

    # A frozen image tower: no gradient for it, the text side still exact.
    extra = global_case(world_size, "extras")
    for mode, (local_loss, gwg) in itertools.product(MODES, FROZEN_COMBOS):
        leaves = local_leaves(extra, rank)
        leaves[0].requires_grad_(False)
        results[("frozen_image", mode, local_loss, gwg)] = capture(
            _semclip, rank, world_size, leaves, "torch", mode, local_loss, gwg, "extras"
        )

    # Half precision: the blocks travel and are gathered in bfloat16, statistics stay float32.
    for mode, (local_loss, gwg) in itertools.product(MODES, [(False, False), (True, True)]):
        leaves = [None if t is None else t.detach().bfloat16().requires_grad_() for t in local_leaves(extra, rank)[:4]]
        leaves.append(extra.logit_scale.detach().clone().requires_grad_())
        results[("bfloat16", mode, local_loss, gwg)] = capture(
            _semclip, rank, world_size, leaves, "torch", mode, local_loss, gwg, "extras"
        )

    # The ring's backward uses the primitive's backward-only entry: no forward recomputed.
    for mode in ("ring", "hierarchical"):
        results[("primitive_calls", mode)] = capture(
            _primitive_calls, rank, world_size, local_leaves(extra, rank), mode
        )

    # What each mode sends, for the scale model (benchmarks/distributed_model.py).
    for mode in MODES:
        results[("traffic", mode)] = capture(_traffic, rank, world_size, local_leaves(extra, rank), mode)

    # "hierarchical" without group_size: the local world size that torchrun sets.
    os.environ["LOCAL_WORLD_SIZE"] = str(GROUP_SIZE)
    results[("hierarchical_default_group_size",)] = capture(
        _semclip, rank, world_size, local_leaves(extra, rank), "torch", "hierarchical", True, True, "extras", None
    )
    del os.environ["LOCAL_WORLD_SIZE"]

    # A non-finite feature on rank 0 makes every rank's loss NaN; nobody crashes or hangs.
    for mode, (local_loss, gwg) in itertools.product(MODES, [(False, False), (True, True)]):
        leaves = local_leaves(extra, rank)
        if rank == 0:
            with torch.no_grad():
                leaves[0][0, 0] = float("nan")
        results[("nan", mode, local_loss, gwg)] = capture(
            _semclip, rank, world_size, leaves, "torch", mode, local_loss, gwg, "extras"
        )

    # Bad layouts are rejected on every rank with a clear error (and nobody hangs).
    for mode in MODES:
        results[("uneven", mode)] = capture(_bad_layout, rank, world_size, mode, BATCH + rank, 1)
        results[("paraphrase_count", mode)] = capture(_bad_layout, rank, world_size, mode, BATCH, 1 + rank)
    # τ and β must agree across ranks (docs/contract.md §5): checked in the layout all-gather.
    results["scale_differs"] = capture(_bad_layout, rank, world_size, "gather", BATCH, 1, 10.0 + rank)
    results["beta_differs"] = capture(_bad_layout, rank, world_size, "gather", BATCH, 1, 10.0, 1.0 + rank)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()



@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    return world_size, run_world(_worker, world_size, out_dir, preload=[__name__])


# --------------------------------------------------------------------------- float64 expectations


def oracle_global(case, w, beta):
    """docs/contract.md §1 on the concatenated batch: (L, grads of the five leaves)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in
              (case.image, case.text, case.paraphrase, case.negation, case.logit_scale)]
    image, text, para, neg, scale = leaves
    loss = semclip_loss_float64(image, text, scale, para, neg, paraphrase_weight=w, hard_negative_weight=beta)
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def rank_loss_float64(rank, image_r, text_r, para_r, all_image, all_text, all_para, all_neg, tau, w, beta):
    """Rank r's share in open_clip's local_loss form, materialized in float64.

    Its images against every column of the global batch; its captions and
    paraphrases against every image. The positive of image→text is read off the
    global columns (`all_*`), that of text→image off the global images, as
    open_clip reads `logits[i, labels[i]]`.
    """
    offset = rank * BATCH
    own = torch.arange(BATCH)
    col_blocks = [all_text]
    bias = [torch.zeros(all_text.shape[0], dtype=torch.float64)]
    if all_para is not None:
        col_blocks.append(all_para.reshape(-1, DIM))
        bias.append(torch.zeros(all_para.shape[0] * all_para.shape[1], dtype=torch.float64))
    if all_neg is not None:
        col_blocks.append(all_neg.reshape(-1, DIM))
        bias.append(torch.full((all_neg.shape[0] * all_neg.shape[1],), math.log(beta), dtype=torch.float64))
    logits_per_image = tau * image_r @ torch.cat(col_blocks).T + torch.cat(bias)
    z = torch.logsumexp(logits_per_image, dim=1)
    i2t = z - logits_per_image[own, offset + own]
    logits_per_text = tau * text_r @ all_image.T
    t2i = torch.logsumexp(logits_per_text, dim=1) - logits_per_text[own, offset + own]
    n_para = 0
    if para_r is not None:
        n_para = para_r.shape[1]
        own_para = all_para[offset : offset + BATCH]  # [B, Pn, d], columns of image→text
        i2t = i2t + w * (z[:, None] - tau * torch.einsum("bd,bpd->bp", image_r, own_para)).sum(1)
        logits_per_para = tau * torch.einsum("bpd,kd->bpk", para_r, all_image)
        para_pos = logits_per_para[own, :, offset + own]  # [B, Pn]
        t2i = t2i + w * (torch.logsumexp(logits_per_para, dim=2) - para_pos).sum(1)
    return (i2t.mean() + t2i.mean()) / (2 * (1 + w * n_para))


def per_rank_expectation(case, world_size, gather_with_grad, w, beta):
    """local_loss=True: per-rank float64 losses and each rank's gradients (list over ranks).

    gather_with_grad: the global features are shared leaves, so each rank's feature gradient is
    Σ_s d loss_s / d(its rows); without, the gathered copies are constants and each rank
    differentiates its own rows only. τ: d loss_r / dτ on rank r.
    """
    base = [None if t is None else t.detach().double() for t in (case.image, case.text, case.paraphrase, case.negation)]
    taus = [case.logit_scale.detach().double().requires_grad_() for _ in range(world_size)]
    losses, grads = [], []
    if gather_with_grad:
        shared = [None if t is None else t.clone().requires_grad_() for t in base]
        image, text, para, neg = shared
        for r in range(world_size):
            rows = rank_slice(r)
            losses.append(rank_loss_float64(r, image[rows], text[rows], None if para is None else para[rows],
                                            image, text, para, neg, taus[r], w, beta))
        torch.stack(losses).sum().backward()
        for r in range(world_size):
            rows = rank_slice(r)
            grads.append([None if t is None else t.grad[rows] for t in shared] + [taus[r].grad])
        # The negations of this rank enter others' image→text partitions: their gradient is shared too.
        return [loss.detach() for loss in losses], grads
    image, text, para, neg = base
    for r in range(world_size):
        rows = rank_slice(r)
        own = [None if t is None else t[rows].clone().requires_grad_() for t in (image, text, para)]
        loss = rank_loss_float64(r, own[0], own[1], own[2], image, text, para, neg, taus[r], w, beta)
        loss.backward()
        losses.append(loss.detach())
        # Negations are columns only: constants here, so no gradient (open_clip's semantics).
        grads.append([own[0].grad, own[1].grad, None if own[2] is None else own[2].grad,
                      None if neg is None else torch.zeros_like(neg[rows]), taus[r].grad])
    return losses, grads


def expected(case, world_size, local_loss, gather_with_grad, w, beta):
    """Per rank: (loss, [grads of image, text, paraphrase, negation, τ]) in float64."""
    if local_loss:
        return list(zip(*per_rank_expectation(case, world_size, gather_with_grad, w, beta)))
    loss, grads = oracle_global(case, w, beta)
    feature_factor = world_size if gather_with_grad else 1
    out = []
    for r in range(world_size):
        rows = rank_slice(r)
        out.append((loss, [None if g is None else feature_factor * g[rows] for g in grads[:4]] + [grads[4]]))
    return out


def assert_close(got, want, what, loss_tol=1e-5, grad_tol=1e-4):
    assert not isinstance(got, str), f"{what} raised:\n{got}"
    loss, grads = got
    ref_loss, ref_grads = want
    assert abs(float(loss) - float(ref_loss)) <= loss_tol * abs(float(ref_loss)), (
        f"{what}: loss {float(loss)!r} vs {float(ref_loss)!r}"
    )
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        err = max_norm_rel_err(grad, ref)
        assert err <= grad_tol, f"{what}: grad of {name} off by {err:.2e} (rel. max-norm)"


# --------------------------------------------------------------------------- tests


def test_per_rank_float64_form_matches_oracle():
    """The test's per-rank float64 form is itself pinned to docs/contract.md §1 (mean over ranks, Σ gradients)."""
    for world_size, extras in itertools.product((2, 4), EXTRAS):
        _, _, w, beta = EXTRAS[extras]
        case = global_case(world_size, extras)
        losses, grads = per_rank_expectation(case, world_size, True, w, beta)
        ref_loss, ref_grads = oracle_global(case, w, beta)
        assert abs(float(torch.stack(losses).mean() - ref_loss)) <= 1e-12 * abs(float(ref_loss))
        for k, name in enumerate(NAMES[:4]):
            if ref_grads[k] is None:
                continue
            got = torch.cat([grads[r][k] for r in range(world_size)]) / world_size
            assert max_norm_rel_err(got, ref_grads[k]) <= 1e-12, name
        tau_grad = sum(grads[r][4] for r in range(world_size)) / world_size
        assert max_norm_rel_err(tau_grad, ref_grads[4]) <= 1e-12


@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("local_loss,gather_with_grad", COMBOS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_float64(world, backend, mode, local_loss, gather_with_grad, extras):
    world_size, ranks = world
    _, _, w, beta = EXTRAS[extras]
    case = global_case(world_size, extras)
    key = (backend, mode, local_loss, gather_with_grad, extras)
    want = expected(case, world_size, local_loss, gather_with_grad, w, beta)
    for r in range(world_size):
        assert_close(ranks[r][key], want[r], f"{key} rank {r}/{world_size}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_local_loss_with_grad_gives_global_loss_and_gradients(world, backend, mode):
    """docs/contract.md §5: mean of per-rank losses = L, rank gradients / world_size = global gradient rows."""
    world_size, ranks = world
    for extras in EXTRAS:
        _, _, w, beta = EXTRAS[extras]
        case = global_case(world_size, extras)
        ref_loss, ref_grads = oracle_global(case, w, beta)
        got = [ranks[r][(backend, mode, True, True, extras)] for r in range(world_size)]
        for r, item in enumerate(got):
            assert not isinstance(item, str), f"rank {r} raised:\n{item}"
        mean_loss = sum(float(loss) for loss, _ in got) / world_size
        assert abs(mean_loss - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        for k, name in enumerate(NAMES[:4]):
            if ref_grads[k] is None:
                assert all(grads[k] is None for _, grads in got)
                continue
            global_grad = torch.cat([grads[k] for _, grads in got]) / world_size
            err = max_norm_rel_err(global_grad, ref_grads[k])
            assert err <= 1e-4, f"{extras}: grad of {name} off by {err:.2e}"
        tau_grad = sum(grads[4] for _, grads in got) / world_size
        assert max_norm_rel_err(tau_grad, ref_grads[4]) <= 1e-4


@pytest.mark.parametrize("local_loss,gather_with_grad", COMBOS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_equals_open_clip_without_extras(world, backend, mode, local_loss, gather_with_grad):
    world_size, ranks = world
    for r in range(world_size):
        reference = ranks[r][("open_clip", local_loss, gather_with_grad)]
        assert not isinstance(reference, str), reference
        ref_loss, ref_grads = reference
        assert_close(ranks[r][(backend, mode, local_loss, gather_with_grad, "plain")], (ref_loss, ref_grads),
                     f"rank {r} vs open_clip ClipLoss({local_loss=}, {gather_with_grad=})")


@pytest.mark.parametrize("local_loss,gather_with_grad", FROZEN_COMBOS)
@pytest.mark.parametrize("mode", MODES)
def test_frozen_image_tower(world, mode, local_loss, gather_with_grad):
    world_size, ranks = world
    _, _, w, beta = EXTRAS["extras"]
    want = expected(global_case(world_size, "extras"), world_size, local_loss, gather_with_grad, w, beta)
    for r in range(world_size):
        got = ranks[r][("frozen_image", mode, local_loss, gather_with_grad)]
        assert not isinstance(got, str), got
        loss, grads = got
        assert grads[0] is None
        assert_close((loss, [None] + grads[1:]), (want[r][0], [None] + list(want[r][1][1:])), f"frozen image, rank {r}")


@pytest.mark.parametrize("local_loss,gather_with_grad", [(False, False), (True, True)])
@pytest.mark.parametrize("mode", MODES)
def test_bfloat16(world, mode, local_loss, gather_with_grad):
    world_size, ranks = world
    _, _, w, beta = EXTRAS["extras"]
    want = expected(global_case(world_size, "extras"), world_size, local_loss, gather_with_grad, w, beta)
    for r in range(world_size):
        got = ranks[r][("bfloat16", mode, local_loss, gather_with_grad)]
        assert not isinstance(got, str), got
        assert got[0].dtype == torch.float32
        assert all(g.dtype == torch.bfloat16 for g in got[1][:4]), [g.dtype for g in got[1][:4]]
        # The features are the float32 case rounded to bfloat16: compare with the float32 expectation at 2e-2.
        assert_close(got, want[r], f"bfloat16 rank {r}", loss_tol=2e-2, grad_tol=2e-2)


@pytest.mark.parametrize("mode", MODES)
def test_nan_feature_propagates_to_every_rank(world, mode):
    world_size, ranks = world
    for local_loss, gather_with_grad in [(False, False), (True, True)]:
        for r in range(world_size):
            got = ranks[r][("nan", mode, local_loss, gather_with_grad)]
            assert not isinstance(got, str), got
            assert torch.isnan(got[0]), f"rank {r}: loss {float(got[0])} with a NaN feature on rank 0"


@pytest.mark.parametrize("mode", MODES)
def test_bad_layouts_rejected_on_every_rank(world, mode):
    world_size, ranks = world
    for r in range(world_size):
        uneven = ranks[r][("uneven", mode)]
        assert "ValueError" in uneven and "same local batch size on every rank" in uneven, uneven
        assert str([BATCH + k for k in range(world_size)]) in uneven, uneven
        para = ranks[r][("paraphrase_count", mode)]
        assert "ValueError" in para and "paraphrases per image Pn differs across ranks" in para, para


def test_scale_and_weights_must_agree_across_ranks(world):
    world_size, ranks = world
    for r in range(world_size):
        scale = ranks[r]["scale_differs"]
        assert "ValueError" in scale and "logit_scale differs across ranks" in scale, scale
        assert str([10.0 + k for k in range(world_size)]) in scale, scale
        beta = ranks[r]["beta_differs"]
        assert "ValueError" in beta and "hard_negative_weight differs across ranks" in beta, beta


@pytest.mark.parametrize("mode", ["ring", "hierarchical"])
def test_ring_backward_recomputes_no_forward(world, mode):
    """Issue 15, item 1: per block, the forward calls the primitive twice (rows × columns, queries ×
    images) and the backward calls only its backward-only entry, as often, with the global statistics.
    The own group's step has one call less in "ring" mode: its row problem holds the own block in both
    directions (the diagonal block), and no other member's images are left for a query problem."""
    world_size, ranks = world
    n_steps = world_size if mode == "ring" else world_size // GROUP_SIZE
    n_calls = 2 * n_steps - (1 if mode == "ring" else 0)
    for r in range(world_size):
        got = ranks[r][("primitive_calls", mode)]
        assert not isinstance(got, str), got
        assert got["forward"] == {"partitions": n_calls, "partitions_backward": 0}, (r, got)
        assert got["backward"] == {"partitions": 0, "partitions_backward": n_calls}, (r, got)


def test_hierarchical_group_size_defaults_to_local_world_size(world):
    """With LOCAL_WORLD_SIZE=2 set (as torchrun does) and no group_size: groups of 2, still exact."""
    world_size, ranks = world
    _, _, w, beta = EXTRAS["extras"]
    want = expected(global_case(world_size, "extras"), world_size, True, True, w, beta)
    for r in range(world_size):
        assert_close(ranks[r][("hierarchical_default_group_size",)], want[r], f"default group size, rank {r}")


def test_hierarchical_group_size_resolution(monkeypatch):
    """The default and the checks of group_size, without a process group."""
    from semclip_kernels.distributed import RankGroup

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert RankGroup(0, 8, mode="hierarchical").group_size == 4
    assert RankGroup(0, 8, mode="hierarchical", group_size=2).group_size == 2
    assert RankGroup(0, 8, mode="hierarchical").ring_group_size == 4
    assert RankGroup(3, 8, mode="ring").ring_group_size == 1
    assert RankGroup(3, 8, mode="gather").ring_group_size == 8
    with pytest.raises(ValueError, match=r"positive divisor of world_size=8, got 3"):
        RankGroup(0, 8, mode="hierarchical", group_size=3)
    with pytest.raises(ValueError, match=r"got 4 \(from LOCAL_WORLD_SIZE\)"):
        RankGroup(0, 6, mode="hierarchical")
    with pytest.raises(ValueError, match="group_size applies to distributed_mode='hierarchical' only"):
        RankGroup(0, 8, mode="ring", group_size=2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ValueError, match="needs group_size .* LOCAL_WORLD_SIZE, which is not set"):
        RankGroup(0, 8, mode="hierarchical")
    assert RankGroup(0, 1, mode="hierarchical").group_size == 1  # one process: nothing to group


@pytest.mark.parametrize("mode", MODES)
def test_scale_model_counts_the_bytes_this_implementation_sends(world, mode):
    """benchmarks/distributed_model.py's bytes per rank equal what the code sends (float32, with extras)."""
    from benchmarks.distributed_model import Config, Links, estimate

    world_size, ranks = world
    n_para, n_neg, _, _ = EXTRAS["extras"]
    config = Config(world_size, BATCH, DIM, n_para, n_neg, feature_bytes=4, group_size=GROUP_SIZE)
    want = estimate(config, mode, Links()).sent_bytes
    for r in range(world_size):
        got = ranks[r][("traffic", mode)]
        assert not isinstance(got, str), got
        assert got == want, f"{mode}, rank {r}: sent {got} bytes, the model says {want}"
