"""One table from backend names to kernels, for every primitive (docs/backends.md, "Adding a backend"), and one
owner of the losses' arguments: the same bad input gets the same error in both loss families.

A tiny backend is registered from outside the package (this file): materialized kernels, written without
autograd, so that the layer registers custom operators for it exactly as for the built-in backends. Both
losses run through it and match the independent float64 oracles.
"""

from __future__ import annotations

import types

import pytest
import torch
from oracle import make_case, max_norm_rel_err, semclip_loss_float64
from sigmoid_oracle import semsiglip_loss_float64

import semclip_kernels as sk
from semclip_kernels import backends
from semclip_kernels.backends.sigmoid_values import PairSums
from semclip_kernels.backends.values import Grads, Stats, column_mass_bounds, counts, positive_entries, split_cols

# ----------------------------------------------------------------------------- a tiny backend, from outside


def _logits(problem):
    """`τ·A·Cᵀ` with the entries `problem.positives` leaves out of both partitions at -inf."""
    dtype = problem.stat_dtype
    logits = problem.scale.to(dtype) * (problem.rows.to(dtype) @ problem.joined_cols().to(dtype).T)
    left_out = positive_entries(problem.positives, slice(0, problem.n_rows), slice(0, problem.n_cols), logits.device)
    return logits if left_out is None else logits.masked_fill(left_out, -torch.inf)


def _partitions_module() -> types.ModuleType:
    module = types.ModuleType("tiny_partitions")
    module.differentiable = False
    module.DEFAULT_BLOCK_ROWS = module.DEFAULT_BLOCK_COLS = None
    module.is_available = lambda device: (True, "")

    def forward(problem):
        logits = _logits(problem)
        row_lse = torch.logsumexp(logits + problem.col_bias, dim=1)
        query_lse = torch.logsumexp(logits[:, : problem.n_query_cols], dim=0)
        return Stats(row_lse, query_lse, column_mass_bounds(problem.col_bias, torch.logsumexp(logits, 0), row_lse))

    def stats_like(problem):
        new, stat = problem.rows.new_empty, problem.stat_dtype
        return Stats(new(problem.n_rows, dtype=stat), new(problem.n_query_cols, dtype=stat),
                     new(problem.n_cols, dtype=stat))  # fmt: skip

    def backward(problem, stats, grads, needs):
        dtype, logits = problem.stat_dtype, _logits(problem)
        d_logits = torch.zeros_like(logits)
        if grads.row is not None:
            d_logits += grads.row[:, None] * torch.exp(logits + problem.col_bias - stats.row_lse[:, None].to(dtype))
        if grads.query is not None:
            q = problem.n_query_cols
            d_logits[:, :q] += grads.query * torch.exp(logits[:, :q] - stats.query_lse.to(dtype))
        rows = torch.arange(problem.n_rows)[:, None]
        for band in grads.positives:
            d_logits[rows, band.columns(problem.n_rows, logits.device)] += band.grad.to(dtype)
        tau, a, c = problem.scale.to(dtype), problem.rows.to(dtype), problem.joined_cols().to(dtype)
        return Grads(
            tau * d_logits @ c if needs.rows else None,
            split_cols(tau * d_logits.T @ a, problem) if needs.cols else None,
            (d_logits * (a @ c.T)).sum() if needs.scale else None,  # d_logits is 0 where logits are -inf
            counts(1),
        )

    module.forward, module.stats_like, module.backward = forward, stats_like, backward
    return module


def _sigmoid_module() -> types.ModuleType:
    module = types.ModuleType("tiny_sigmoid_pairs")
    module.DEFAULT_BLOCK_ROWS = module.DEFAULT_BLOCK_COLS = None
    module.gradients_in_forward = False
    module.is_available = lambda device: (True, "")

    def pair_sum(problem, needs):
        dtype = problem.stat_dtype
        a, c = problem.rows.to(dtype), problem.joined_cols().to(dtype)
        products = a @ c.T
        logits = problem.scale.to(dtype) * products + problem.bias.to(dtype)
        positive = problem.col_owner[None, :] == torch.arange(a.shape[0])[:, None]
        signs = 1.0 - 2.0 * positive.to(dtype)
        weight = problem.col_weight.to(dtype)
        total = (torch.nn.functional.softplus(signs * logits) * weight).sum()
        d_logits = weight * signs * torch.sigmoid(signs * logits)  # d softplus(s·l)/dl, weighted
        tau = problem.scale.to(dtype)
        return PairSums(
            total, tau * d_logits @ c if needs.rows else None, tau * d_logits.T @ a if needs.cols else None,
            (d_logits * products).sum() if needs.scale else None, d_logits.sum() if needs.scale else None, (1, 0),
        )  # fmt: skip

    module.pair_sum = pair_sum
    return module


@pytest.fixture
def tiny_backends(monkeypatch):
    """ "tiny": both primitives; "halfway": the partitions only, first in "auto"'s order on CPU."""
    table = {"halfway": backends.Backend({"partitions": _partitions_module()}, auto_on=("cpu",))}
    table.update(backends.BACKEND_TABLE)
    monkeypatch.setattr(backends, "BACKEND_TABLE", table)
    monkeypatch.setattr(backends, "_resolved", {})
    backends.register_backend("tiny", {"partitions": _partitions_module(), "sigmoid_pairs": _sigmoid_module()})
    yield


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("extras", [(None, None), (2, 1)])
def test_registered_backend_runs_both_losses(tiny_backends, extras):
    case = make_case(6, 5, *extras, tau=7.0, seed=3)
    leaves = case.leaves()
    softmax = sk.semclip_loss(case.image, case.text, case.logit_scale, case.paraphrase, case.negation,
                              paraphrase_weight=0.5, hard_negative_weight=2.0, backend="tiny")  # fmt: skip
    expected = semclip_loss_float64(case.image, case.text, case.logit_scale, case.paraphrase, case.negation, 0.5, 2.0)
    assert abs(float(softmax.detach()) - float(expected.detach())) <= 1e-5 * abs(float(expected.detach()))
    for got, want in zip(_grads(softmax, leaves), _grads(expected, leaves)):
        assert max_norm_rel_err(got, want) <= 1e-5
    sigmoid = sk.semsiglip_loss(case.image, case.text, case.logit_scale, -3.0, case.paraphrase, case.negation,
                                paraphrase_weight=0.5, hard_negative_weight=2.0, backend="tiny")  # fmt: skip
    expected = semsiglip_loss_float64(case.image, case.text, case.logit_scale, -3.0, case.paraphrase,
                                      case.negation, 0.5, 2.0)  # fmt: skip
    assert abs(float(sigmoid.detach()) - float(expected.detach())) <= 1e-5 * abs(float(expected.detach()))
    for got, want in zip(_grads(sigmoid, leaves), _grads(expected, leaves)):
        assert max_norm_rel_err(got, want) <= 1e-5
    assert torch.ops.semclip.partitions_tiny_forward is not None  # through the layer's custom operators
    assert torch.ops.semclip.sigmoid_pairs_tiny_forward is not None


def test_auto_falls_through_per_primitive_and_an_explicit_backend_names_the_missing_loss(tiny_backends):
    cpu = torch.device("cpu")
    assert backends.resolve_backend("auto", cpu) == "halfway"
    assert backends.resolve_backend("auto", cpu, backends.SIGMOID_PAIRS) != "halfway"
    case = make_case(4, 3, None, None, tau=5.0)
    sk.semsiglip_loss(case.image, case.text, case.logit_scale, -1.0)  # "auto": the next backend runs it
    with pytest.raises(RuntimeError, match=r"backend='halfway' cannot run the sigmoid loss on cpu: .*no kernels"):
        sk.semsiglip_loss(case.image, case.text, case.logit_scale, -1.0, backend="halfway")
    with pytest.raises(ValueError, match="backend name"):
        backends.register_backend("auto", {})


# ----------------------------------------------------------------------------- one owner of the arguments

BAD_WORLDS = [
    (dict(world_size=0), ValueError, "world_size"),
    (dict(world_size=-1), ValueError, "world_size"),
    (dict(world_size=2.0), TypeError, "world_size"),
    (dict(world_size=True), TypeError, "world_size"),
    (dict(rank=5, world_size=1), ValueError, "rank"),
    (dict(rank=-1, world_size=2), ValueError, "rank"),
    (dict(rank=1.0, world_size=2), TypeError, "rank"),
]


@pytest.mark.parametrize("kwargs,error,name", BAD_WORLDS)
def test_both_loss_modules_refuse_the_same_rank_and_world_size(kwargs, error, name):
    messages = []
    for module in (sk.SemCLIPLoss, sk.SemSigLipLoss):
        with pytest.raises(error, match=name) as caught:
            module(**kwargs)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("backend", ["cpp", "torch", "reference"])
def test_huge_tiles_are_clamped_in_both_losses(backend):
    """A tile larger than the problem computes the problem's value (never allocates the tile)."""
    case = make_case(8, 4, None, None, tau=10.0, seed=5)
    tiles = dict(block_rows=10**9, block_cols=10**9)
    got = sk.semsiglip_loss(case.image, case.text, case.logit_scale, -10.0, backend=backend, **tiles)
    want = semsiglip_loss_float64(case.image, case.text, case.logit_scale, -10.0)
    assert abs(float(got.detach()) - float(want.detach())) <= 1e-5 * abs(float(want.detach()))
    got = sk.semclip_loss(case.image, case.text, case.logit_scale, backend=backend, **tiles)
    want = semclip_loss_float64(case.image, case.text, case.logit_scale)
    assert abs(float(got.detach()) - float(want.detach())) <= 1e-5 * abs(float(want.detach()))
