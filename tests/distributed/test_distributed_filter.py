"""The gradient filter across ranks is as tight as in one process, and stays exact.

Trained-like features (unit images; caption and paraphrase `normalize(image + a_i·g/√d)`, negation
`normalize(image + 0.8·g/√d)`, τ = 100), with `a_i` = 0.5 for every image ("uniform") or drawn in
[0.3, 0.8] per image ("varied": the images' partitions spread over several nats, which is where bounds
taken against the largest partition lose). Two regimes: 3 ranks with 16 × 16 tiles (local B = 128, d = 32)
and 2 ranks with 32 × 32 tiles (local B = 256, d = 64). Backend "cpp". In every mode and setting, each rank's
backward skips at least 0.8× the fraction of tiles that the single-process loss skips on the same global
batch with the same tiles (`last_backward_stats`, summed over the rank's backward calls), and its gradients
stay within docs/contract.md §4 of the float64 evaluation of the global loss (with open_clip's one-sided
gradients, `local_loss` without `gather_with_grad`: of each rank's share, the other ranks' features constant).
One case misses 0.8× today and is left out while its switch is off (tests/property_regimes.py:
`DISTRIBUTED_FILTER_ONE_SIDED_RING`).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import init_gloo, run_world
from oracle import max_norm_rel_err, semclip_loss_float64
from property_regimes import DISTRIBUTED_FILTER_ONE_SIDED_RING

import semclip_kernels as sk

pytestmark = pytest.mark.needs_cpp

TAU = 100.0
# name: (ranks, local batch, d, tile)
REGIMES = {"3 ranks, 16-tiles": (3, 128, 32, 16), "2 ranks, 32-tiles": (2, 256, 64, 32)}
ALIGNMENTS = {"uniform": (0.5, 0.5), "varied": (0.3, 0.8)}
MODES = ("gather", "ring", "hierarchical")
SETTINGS = list(itertools.product((False, True), (False, True)))  # (local_loss, gather_with_grad)
ONE_SIDED = (True, False)  # open_clip's local_loss without gather_with_grad
# (regime, alignment, mode, setting) that misses 0.8× today (tests/property_regimes.py)
KNOWN_GAP = ("2 ranks, 32-tiles", "uniform", "ring", ONE_SIDED)
NAMES = ("image", "text", "paraphrase", "negation")


def global_batch(batch: int, dim: int, alignment: str, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    low, high = ALIGNMENTS[alignment]
    spread = low + (high - low) * torch.rand(batch, 1, generator=generator)

    def near(noise: torch.Tensor | float) -> torch.Tensor:
        return F.normalize(image + noise * torch.randn(batch, dim, generator=generator) / math.sqrt(dim), dim=-1)

    return [image, near(spread), near(spread)[:, None], near(0.8)[:, None]]


def _rank(rank: int, world_size: int, port: int, out_dir: str, regime: str) -> None:
    world, batch, dim, tile = REGIMES[regime]
    torch.set_num_threads(1)
    init_gloo(rank, world_size, port)
    results = {}
    rows = slice(rank * batch, (rank + 1) * batch)
    for alignment, mode, (local_loss, gwg) in itertools.product(ALIGNMENTS, MODES, SETTINGS):
        try:
            leaves = [t[rows].clone().requires_grad_() for t in global_batch(world * batch, dim, alignment)]
            loss_fn = sk.SemCLIPLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world,
                                     backend="cpp", distributed_mode=mode, block_rows=tile, block_cols=tile,
                                     group_size=world if mode == "hierarchical" else None)  # fmt: skip
            loss = loss_fn(leaves[0], leaves[1], torch.tensor(TAU),
                           paraphrase_features=leaves[2], negation_features=leaves[3])  # fmt: skip
            loss.backward()
            stats = sk.backends.last_backward_stats("cpp")
            results[(alignment, mode, local_loss, gwg)] = (stats.tiles, stats.skipped_tiles, [x.grad for x in leaves])
        except Exception:  # noqa: BLE001 - reported by the parent's assertion
            results[(alignment, mode, local_loss, gwg)] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=list(REGIMES))
def regime(request, tmp_path_factory):
    name = request.param
    world = REGIMES[name][0]
    out_dir = str(tmp_path_factory.mktemp("filter"))
    return name, run_world(_rank, world, out_dir, name)


def single_process_fraction(regime: str, alignment: str) -> float:
    world, batch, dim, tile = REGIMES[regime]
    leaves = [t.clone().requires_grad_() for t in global_batch(world * batch, dim, alignment)]
    sk.semclip_loss(leaves[0], leaves[1], TAU, leaves[2], leaves[3], backend="cpp", block_rows=tile,
                    block_cols=tile).backward()  # fmt: skip
    return sk.backends.last_backward_stats("cpp").skipped_fraction


def _log1p_term(logits: torch.Tensor, pos_col: torch.Tensor, pos_logit: torch.Tensor) -> torch.Tensor:
    """`log Σ_c e^{logits_c} − pos_logit` per line as `log(1 + Σ_{c ≠ pos_col} e^{logits_c − pos_logit})`: in these
    batches a text→image term's gradient is ~1e-18, which float64's `lse − s` rounds to 0."""
    others = logits - pos_logit[:, None]
    others[torch.arange(logits.shape[0]), pos_col] = -math.inf
    return torch.log1p(others.exp().sum(1))


def one_sided_float64_gradients(regime: str, alignment: str) -> list[list[torch.Tensor | None]]:
    """Per rank, the float64 gradients of its share `loss_r` (docs/contract.md §5) with the other ranks' features
    constant (open_clip's one-sided setting): an image's from its image→text terms, a caption's and a
    paraphrase's from their text→image terms, a negation's none."""
    world, batch, dim, _ = REGIMES[regime]
    image, text, para, neg = (t.double() for t in global_batch(world * batch, dim, alignment))
    para, neg, n = para[:, 0], neg[:, 0], world * batch
    out = []
    for rank in range(world):
        mine = torch.arange(rank * batch, (rank + 1) * batch)
        own = [t[mine].clone().requires_grad_() for t in (image, text, para)]
        row_logits = TAU * own[0] @ torch.cat([text, para, neg]).T  # columns [T; P; N] of the global batch
        i2t = (_log1p_term(row_logits, mine, TAU * (own[0] * text[mine]).sum(1))
               + _log1p_term(row_logits, n + mine, TAU * (own[0] * para[mine]).sum(1)))  # fmt: skip
        t2i = sum(_log1p_term(TAU * q @ image.T, mine, TAU * (image[mine] * q).sum(1)) for q in own[1:])
        loss = ((i2t / 2).mean() + (t2i / 2).mean()) / 2  # Pn = 1, w = 1: each line's terms over 1 + w·Pn
        grad_image, grad_text, grad_para = torch.autograd.grad(loss, own)
        out.append([grad_image, grad_text, grad_para[:, None], None])  # paraphrases [B, Pn, d]
    return out


def float64_gradients(regime: str, alignment: str) -> list[torch.Tensor]:
    world, batch, dim, _ = REGIMES[regime]
    leaves = [t.double().requires_grad_() for t in global_batch(world * batch, dim, alignment)]
    semclip_loss_float64(leaves[0], leaves[1], TAU, leaves[2], leaves[3]).backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("alignment", list(ALIGNMENTS))
def test_every_mode_and_setting_skips_as_much_as_one_process(regime, alignment):
    name, ranks = regime
    single = single_process_fraction(name, alignment)
    assert single >= 0.4, single  # the trained regime: most tiles negligible
    for mode, (local_loss, gwg) in itertools.product(MODES, SETTINGS):
        if (name, alignment, mode, (local_loss, gwg)) == KNOWN_GAP and not DISTRIBUTED_FILTER_ONE_SIDED_RING:
            continue
        for rank, result in enumerate(ranks):
            got = result[(alignment, mode, local_loss, gwg)]
            assert not isinstance(got, str), got
            tiles, skipped, _ = got
            fraction = skipped / tiles
            assert fraction >= 0.8 * single, (mode, local_loss, gwg, rank, fraction, single)


@pytest.mark.parametrize("alignment", list(ALIGNMENTS))
def test_filtered_distributed_gradients_stay_exact(regime, alignment):
    name, ranks = regime
    world, batch, _, _ = REGIMES[name]
    expected = float64_gradients(name, alignment)
    # Settings whose gradient is a multiple of the global loss's: world·dL (gather_with_grad), dL (neither).
    for mode, (local_loss, gwg) in itertools.product(MODES, [(True, True), (False, True), (False, False)]):
        factor = world if gwg else 1
        for rank, result in enumerate(ranks):
            rows = slice(rank * batch, (rank + 1) * batch)
            for grad_name, grad, want in zip(NAMES, result[(alignment, mode, local_loss, gwg)][2], expected):
                err = max_norm_rel_err(grad / factor, want[rows])
                assert err <= 1e-4, (mode, local_loss, gwg, rank, grad_name, err)


@pytest.mark.parametrize("alignment", list(ALIGNMENTS))
def test_filtered_one_sided_gradients_stay_exact(regime, alignment):
    name, ranks = regime
    expected = one_sided_float64_gradients(name, alignment)
    for mode in MODES:
        for rank, result in enumerate(ranks):
            for grad_name, grad, want in zip(NAMES, result[(alignment, mode, *ONE_SIDED)][2], expected[rank]):
                err = max_norm_rel_err(grad, want)
                assert err <= 1e-4, (mode, rank, grad_name, err)


if __name__ == "__main__":  # pragma: no cover
    multiprocessing.freeze_support()
