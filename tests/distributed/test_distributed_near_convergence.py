"""float32 near convergence in every distributed mode and setting (docs/contract.md §4, §5), on 2 and 3 Gloo ranks.

Captions and paraphrases very close to their images (cos 0.99..0.9999), τ 30–100: losses from 1e-3 down to 1e-6,
where `Z − s` keeps one float32 step of the largest logit. The distributed modes compute the loss as `log1p` of each
line's off-positive mass, as the single process does: the loss within 1e-6 relative up to τ = 30 (above, the
rounding of the float32 logits themselves, 2^-24·τ·√d) and every gradient within 1e-4 of float64.

The float64 truth is open_clip's semantics for each `local_loss`/`gather_with_grad` setting, materialized here from
the global batch (independent of the code under test); each rank returns what that setting promises.
"""

from __future__ import annotations

import itertools
import math
import os

import harness
import pytest
import torch
import torch.distributed as dist
from harness import init_gloo
from oracle import max_norm_rel_err, semclip_loss_float64

import semclip_kernels as sk

LOCAL_BATCH, DIM = 8, 32
MODES = ("gather", "ring", "hierarchical")
SETTINGS = list(itertools.product((False, True), (False, True)))  # (local_loss, gather_with_grad)
DIRECTIONS = ("both", "image_to_text")
BACKENDS = [name for name in ("cpp", "torch", "reference") if sk.backend_status(name, "cpu")[0]]
NAMES = ("image", "text", "paraphrase", "negation", "logit_scale")
# (τ, spread of captions and paraphrases, Pn, Mn, weights (w, β)); negations at 4× the spread.
CASES = [
    (30.0, 0.7, 0, 0, (1.0, 1.0)),  # float64 loss 4.8e-6 (2 ranks), 3.3e-6 (3 ranks)
    (100.0, 0.15, 0, 1, (1.0, 1.0)),  # 4.2e-5, 1.7e-4
    (60.0, 0.3, 0, 1, (1.0, 1.0)),  # 1.1e-6, 1.1e-5
    (30.0, 0.3, 1, 1, (1.0, 1.0)),  # 0.36: a caption and its paraphrase share the row's mass
    (60.0, 0.25, 2, 1, (0.5, 2.0)),
]


def global_batch(world: int, case: tuple, seed: int = 0) -> list[torch.Tensor | None]:
    """float64 `[image, text, paraphrase [B, Pn, d], negation [B, Mn, d]]` of the whole job (None: absent)."""
    _, spread, n_para, n_neg, _ = case
    gen = torch.Generator().manual_seed(seed)
    batch = world * LOCAL_BATCH

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    image = unit(torch.randn(batch, DIM, generator=gen, dtype=torch.float64))

    def near(s: float, n: int | None) -> torch.Tensor:
        center = image if n is None else image[:, None].expand(batch, n, DIM)
        return unit(center + s * torch.randn(center.shape, generator=gen, dtype=torch.float64) / math.sqrt(DIM))

    return [image, near(spread, None), near(spread, n_para) if n_para else None,
            near(4 * spread, n_neg) if n_neg else None]  # fmt: skip


def _run(rank: int, world: int, features: list, case: tuple, backend: str, mode: str, setting: tuple,
         directions: str):  # fmt: skip
    """This rank's `(loss, [grads of image, text, paraphrase, negation, τ])`."""
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    tau, _, _, _, (w, beta) = case
    leaves = [None if t is None else t[rows].clone().requires_grad_() for t in features]
    scale = torch.tensor(tau, requires_grad=True)
    loss_fn = sk.SemCLIPLoss(local_loss=setting[0], gather_with_grad=setting[1], rank=rank, world_size=world,
                             backend=backend, distributed_mode=mode, paraphrase_weight=w, hard_negative_weight=beta,
                             directions=directions, group_size=world if mode == "hierarchical" else None)  # fmt: skip
    loss = loss_fn(leaves[0], leaves[1], scale, paraphrase_features=leaves[2], negation_features=leaves[3])
    loss.backward()
    return loss.detach(), [None if t is None else t.grad for t in (*leaves, scale)]


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    results = {}
    for index, case in enumerate(CASES):
        features = [None if t is None else t.float() for t in global_batch(world, case)]
        for backend, mode, setting, directions in itertools.product(BACKENDS, MODES, SETTINGS, DIRECTIONS):
            key = (index, backend, mode, *setting, directions)
            results[key] = harness.capture(_run, rank, world, features, case, backend, mode, setting, directions)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# --------------------------------------------------------------------------- float64 truth (open_clip's semantics)


def _term(logits: torch.Tensor, pos_col: torch.Tensor, pos_logit: torch.Tensor) -> torch.Tensor:
    """`log Σ_c e^{logits_c} − pos_logit` per line, written `log(1 + Σ_{c ≠ pos_col} e^{logits_c − pos_logit})`: the
    same number, without float64's own cancellation (a text→image gradient of e^-59 is exactly 0 as `Z − s`)."""
    others = logits - pos_logit[:, None]
    own = torch.zeros_like(others, dtype=torch.bool)
    own[torch.arange(logits.shape[0]), pos_col] = True
    return torch.log1p(torch.exp(others.masked_fill(own, -math.inf)).sum(1))


def _rank_share(rank, own, every, tau, w, beta, directions):
    """Rank r's share `loss_r` (docs/contract.md §5): its images against every column, its captions and
    paraphrases against every image; `own` its rows of `[image, text, paraphrase]`, `every` the global batch."""
    image_r, text_r, para_r = own
    all_image, all_text, all_para, all_neg = every
    batch, n = image_r.shape[0], all_text.shape[0]
    mine = torch.arange(rank * batch, (rank + 1) * batch)
    blocks = [tau * image_r @ all_text.T]
    n_para = 0 if all_para is None else all_para.shape[1]
    if n_para:
        blocks.append(tau * torch.einsum("id,jpd->ijp", image_r, all_para).reshape(batch, -1))
    if all_neg is not None:
        blocks.append(tau * torch.einsum("id,jmd->ijm", image_r, all_neg).reshape(batch, -1) + math.log(beta))
    row_logits = torch.cat(blocks, dim=1)  # columns [T; P; N] of the global batch
    # Each direction's positive logit through its own side's rows (with open_clip's one-sided gradients the
    # image→text terms differentiate the images only, the text→image terms the captions and paraphrases).
    i2t = _term(row_logits, mine, tau * (image_r * all_text[mine]).sum(1))
    t2i = _term(tau * text_r @ all_image.T, mine, tau * (all_image[mine] * text_r).sum(1))
    for p in range(n_para):
        i2t = i2t + w * _term(row_logits, n + mine * n_para + p, tau * (image_r * all_para[mine, p]).sum(1))
        t2i_pos = tau * (all_image[mine] * para_r[:, p]).sum(1)
        t2i = t2i + w * _term(tau * para_r[:, p] @ all_image.T, mine, t2i_pos)
    norm = 1.0 + w * n_para
    if directions == "image_to_text":
        return (i2t / norm).mean()
    return ((i2t / norm).mean() + (t2i / norm).mean()) / 2


def expected(world: int, case: tuple, setting: tuple, directions: str) -> list[tuple]:
    """Per rank `(loss, [grads of image, text, paraphrase, negation, τ])` in float64, from the float32-rounded
    global batch."""
    base = [None if t is None else t.float().double() for t in global_batch(world, case)]
    tau0, _, _, _, (w, beta) = case
    local_loss, gather_with_grad = setting
    out = []
    for rank in range(world):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        tau = torch.tensor(tau0, dtype=torch.float64, requires_grad=True)
        if local_loss and not gather_with_grad:
            # The gathered features are constants: own rows differentiate their own direction only.
            own = [None if t is None else t[rows].clone().requires_grad_() for t in base[:3]]
            loss = _rank_share(rank, own, base, tau, w, beta, directions)
            grads = torch.autograd.grad(loss, [t for t in own if t is not None] + [tau], allow_unused=True)
            grads = list(grads)
            own_grads = [None if t is None else grads.pop(0) for t in own]
            out.append((loss.detach(), [*own_grads, None, grads[-1]]))
            continue
        shared = [None if t is None else t.clone().requires_grad_() for t in base]

        def rows_of(t, r):
            return None if t is None else t[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH]

        shares = [_rank_share(r, [rows_of(t, r) for t in shared[:3]], shared, tau, w, beta, directions)
                  for r in range(world)]  # fmt: skip
        total = torch.stack(shares).mean()
        loss = shares[rank] if local_loss else total
        tau_grad = torch.autograd.grad(loss, tau, retain_graph=True)[0]
        present = [t for t in shared if t is not None]
        grads = list(torch.autograd.grad(total, present, allow_unused=True))
        factor = world if gather_with_grad else 1
        feature_grads = [None if t is None else grads.pop(0) for t in shared]
        out.append((loss.detach(), [None if g is None else factor * g[rows] for g in feature_grads] + [tau_grad]))
    return out


def loss_bound(tau: float) -> float:
    """docs/contract.md §4, float32 near convergence: 1e-6 up to τ = 30, above it the float32 logits' rounding."""
    return 1e-6 if tau <= 30 else 2.0**-24 * tau * math.sqrt(DIM)


def single_process_loss_error(world: int, case: tuple, backend: str, directions: str) -> float:
    """The single-process loss's relative error on the same global batch (the reference backend's float32
    statistics reach 1.2e-6 on the τ = 30 case with one direction, 3 ranks' batch: the distributed modes are
    held to §4 or to what one process gives, whichever is larger)."""
    features = [None if t is None else t.float() for t in global_batch(world, case)]
    tau, _, _, _, (w, beta) = case
    loss = sk.semclip_loss(features[0], features[1], torch.tensor(tau), features[2], features[3], backend=backend,
                           paraphrase_weight=w, hard_negative_weight=beta, directions=directions)  # fmt: skip
    exact = [None if t is None else t.double() for t in features]
    want = semclip_loss_float64(exact[0], exact[1], tau, exact[2], exact[3], w, beta, directions)
    return abs(float(loss) - float(want)) / float(want)


def errors(ranks: list[dict], world: int, index: int, backend: str, mode: str, setting: tuple, directions: str):
    """`{"loss": worst relative error, input name: worst max-norm relative error}` over ranks."""
    want = expected(world, CASES[index], setting, directions)
    worst = dict.fromkeys(("loss", *NAMES), 0.0)
    for rank, result in enumerate(ranks):
        got = result[(index, backend, mode, *setting, directions)]
        assert not isinstance(got, str), got
        worst["loss"] = max(worst["loss"], abs(float(got[0]) - float(want[rank][0])) / float(want[rank][0]))
        for name, grad, ref in zip(NAMES, got[1], want[rank][1]):
            worst[name] = max(worst[name], max_norm_rel_err(grad, ref))
    return worst


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    return world, harness.run_world(_rank, world, str(tmp_path_factory.mktemp(f"near_convergence{world}")))


@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("local_loss,gather_with_grad", SETTINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_near_convergence_distributed(world_results, backend, mode, local_loss, gather_with_grad, directions):
    world, ranks = world_results
    for index, case in enumerate(CASES):
        worst = errors(ranks, world, index, backend, mode, (local_loss, gather_with_grad), directions)
        where = f"world {world}, case {case}: {worst}"
        bound = max(loss_bound(case[0]), 1.5 * single_process_loss_error(world, case, backend, directions))
        assert worst["loss"] <= bound, where
        for name in NAMES:
            assert worst[name] <= 1e-4, (name, where)


def test_regime_is_near_convergence():
    """The cases reach the losses where `Z − s` fails: the global float64 losses of the cases without
    paraphrases lie between 1e-6 (the contract's range) and 1e-3."""
    for world in (2, 3):
        losses = [float(expected(world, case, (False, False), "both")[0][0]) for case in CASES if case[2] == 0]
        assert 1e-6 <= min(losses) < 1e-5 and max(losses) < 1e-3, losses
