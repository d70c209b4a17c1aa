"""`SemCLIPRankingLoss` against sentence-transformers' own losses on the same model and batch.

A tiny random BERT `SentenceTransformer` (from a `transformers` config, dropout off) in float64: the loss within
1e-10 and every parameter's gradient within 1e-8 of `MultipleNegativesRankingLoss`,
`MultipleNegativesSymmetricRankingLoss` and `CachedMultipleNegativesRankingLoss` (without and with hard
negatives, several mini-batch sizes, ragged last mini-batch), of their `gather_across_devices` on 2 Gloo ranks,
and one `SentenceTransformerTrainer` step (SGD) on a `datasets.Dataset`, single process and under torchrun
(2 Gloo ranks, DDP). Paraphrase columns against the float64 oracle of docs/contract.md §1.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from harness import free_port
from oracle import semclip_loss_float64
from sentence_transformers.sentence_transformer import losses
from sentence_transformers.util import cos_sim, dot_score, pairwise_cos_sim
from st_tiny import columns, features, load_model, tiny_model_dir, train

from semclip_kernels import SemCLIPLoss
from semclip_kernels.integrations.sentence_transformers import SemCLIPRankingLoss

LOSS_TOL, GRAD_TOL = 1e-10, 1e-8
BATCH = 8
SYMMETRIC = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}

warnings.filterwarnings("ignore", category=DeprecationWarning)  # MultipleNegativesSymmetricRankingLoss


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


def loss_and_grads(model, loss_fn, feats):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(feats, None)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_equal(theirs, ours, what):
    (their_loss, their_grads), (our_loss, our_grads) = theirs, ours
    assert our_loss.dtype == torch.float64
    assert abs(float(our_loss - their_loss)) <= LOSS_TOL, (what, float(our_loss), float(their_loss))
    assert our_grads.keys() == their_grads.keys(), what
    assert max(float(g.abs().max()) for g in their_grads.values()) > 1e-3, what  # a gradient to compare
    for name, grad in their_grads.items():
        err = float((our_grads[name] - grad).abs().max())
        assert err <= GRAD_TOL, f"{what}: gradient of {name} off by {err:.2e}"


@pytest.mark.parametrize("n_negatives", [0, 1, 2])
@pytest.mark.parametrize(
    "name,theirs,ours",
    [
        ("MNRL", lambda m: losses.MultipleNegativesRankingLoss(m), {}),
        ("MNRL scale 7", lambda m: losses.MultipleNegativesRankingLoss(m, scale=7.0), {"scale": 7.0}),
        ("MNRL dot", lambda m: losses.MultipleNegativesRankingLoss(m, scale=0.5, similarity_fct=dot_score),
         {"scale": 0.5, "similarity_fct": dot_score}),
        ("MNSRL", lambda m: losses.MultipleNegativesSymmetricRankingLoss(m), SYMMETRIC),
        ("MNRL per_direction", lambda m: losses.MultipleNegativesRankingLoss(m, **SYMMETRIC), SYMMETRIC),
    ],
)  # fmt: skip
def test_equals_multiple_negatives_ranking_losses(model, name, theirs, ours, n_negatives):
    feats = features(model, columns(2 + n_negatives, BATCH, seed=n_negatives))
    assert_equal(loss_and_grads(model, theirs(model), feats),
                 loss_and_grads(model, SemCLIPRankingLoss(model, **ours), feats), name)  # fmt: skip


@pytest.mark.parametrize("n_negatives", [0, 1, 2])
@pytest.mark.parametrize("mini_batch_size", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_equals_cached_multiple_negatives_ranking_loss(model, mini_batch_size, n_negatives, symmetric):
    feats = features(model, columns(2 + n_negatives, BATCH, seed=10 + n_negatives))
    options = SYMMETRIC if symmetric else {}
    theirs = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **options)
    ours = SemCLIPRankingLoss(model, mini_batch_size=mini_batch_size, **options)
    assert_equal(loss_and_grads(model, theirs, feats), loss_and_grads(model, ours, feats),
                 f"cached, mini-batches of {mini_batch_size}")  # fmt: skip


def test_cached_loss_runs_the_fused_loss_once_and_equals_uncached(model, monkeypatch):
    feats = features(model, columns(3, BATCH, seed=3))
    calls = []
    ours = SemCLIPRankingLoss(model, mini_batch_size=3)
    original = SemCLIPLoss.forward
    monkeypatch.setattr(SemCLIPLoss, "forward", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    cached = loss_and_grads(model, ours, feats)
    monkeypatch.setattr(SemCLIPLoss, "forward", original)
    assert calls == [1]
    assert_equal(loss_and_grads(model, SemCLIPRankingLoss(model), feats), cached, "cached vs uncached")


def test_evaluation_without_grad(model):
    feats = features(model, columns(3, BATCH, seed=4))
    with torch.no_grad():
        theirs = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)(feats, None)
        ours = SemCLIPRankingLoss(model, mini_batch_size=3)(feats, None)
    assert not ours.requires_grad and abs(float(ours - theirs)) <= LOSS_TOL


@pytest.mark.parametrize("mini_batch_size", [None, 3])
def test_paraphrase_columns_match_the_oracle(model, mini_batch_size):
    """Columns anchor, positive, 2 paraphrases, 1 hard negative: the loss of the normalized embeddings is the
    float64 oracle's (w = 0.5, β = 2), in both directions settings."""
    feats = features(model, columns(5, BATCH, seed=5))
    with torch.no_grad():
        emb = [F.normalize(model(f)["sentence_embedding"], dim=-1) for f in feats]
    for directions, name in ((("query_to_doc",), "image_to_text"), (SYMMETRIC["directions"], "both")):
        ours = SemCLIPRankingLoss(model, directions=directions, partition_mode="per_direction", n_paraphrase_columns=2,
                                  paraphrase_weight=0.5, hard_negative_weight=2.0,
                                  mini_batch_size=mini_batch_size)  # fmt: skip
        want = semclip_loss_float64(emb[0], emb[1], 20.0, torch.stack(emb[2:4], 1), emb[4][:, None], 0.5, 2.0, name)
        got, _ = loss_and_grads(model, ours, feats)  # fmt: skip
        assert abs(float(got - want)) <= LOSS_TOL, (directions, float(got), float(want))


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"similarity_fct": pairwise_cos_sim}, "similarity_fct"),
        ({"directions": ("query_to_doc", "query_to_query")}, "directions"),
        ({"directions": ("query_to_doc", "doc_to_doc")}, "directions"),
        ({"directions": ("doc_to_query",)}, "directions"),
        ({"directions": ("query_to_doc", "doc_to_query")}, "partition_mode"),  # joint over both: not computed
        ({"partition_mode": "other"}, "partition_mode"),
        ({"hardness_mode": "hard_negatives", "hardness_strength": 5.0}, "hardness_mode"),
        ({"scale": 0.0}, "scale"),
        ({"mini_batch_size": 0}, "mini_batch_size"),
        ({"mini_batch_num_tokens": 512}, "mini_batch_num_tokens"),
        ({"n_paraphrase_columns": -1}, "n_paraphrase_columns"),
        ({"paraphrase_weight": -1.0}, "paraphrase_weight"),
        ({"backend": "nope"}, "backend"),
        ({"distributed_mode": "nope"}, "distributed_mode"),
    ],
)
def test_unsupported_arguments_name_the_argument(model, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SemCLIPRankingLoss(model, **kwargs)


def test_too_few_columns_names_n_paraphrase_columns(model):
    feats = features(model, columns(3, BATCH))
    with pytest.raises(ValueError, match="n_paraphrase_columns=2"):
        SemCLIPRankingLoss(model, n_paraphrase_columns=2)(feats, None)


def test_config_dict(model):
    config = SemCLIPRankingLoss(model, similarity_fct=cos_sim, mini_batch_size=4).get_config_dict()
    assert config["similarity_fct"] == "cos_sim" and config["mini_batch_size"] == 4


# --------------------------------------------------------------------------- SentenceTransformerTrainer


def test_trainer_step_equals_cached_mnrl(model_dir, tmp_path):
    """Two trainer steps with our loss (mini-batches of 3: ragged) move every parameter as CachedMNRL does."""
    theirs = train(model_dir, lambda m: losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3), tmp_path)
    ours = train(model_dir, lambda m: SemCLIPRankingLoss(m, mini_batch_size=3), tmp_path)
    start = {name: p.detach() for name, p in load_model(model_dir).named_parameters()}
    moved = max(float((theirs[name] - start[name]).abs().max()) for name in theirs if name in start)
    assert moved > 1e-3  # the steps did move the parameters
    for name, value in theirs.items():
        assert float((ours[name] - value).abs().max()) <= 1e-10, name


def test_torchrun_trainer_with_gather_equals_cached_mnrl(model_dir, tmp_path):
    """torchrun, 2 Gloo ranks, DDP: our loss with gather_across_devices and mini-batches equals theirs."""
    result = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(os.path.dirname(__file__), "st_torchrun_trainer.py"), model_dir,
               str(tmp_path), str(result)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    errors = json.loads(result.read_text())
    assert errors["moved"] > 1e-3, errors
    assert errors["max_param_diff"] <= 1e-10, errors


# --------------------------------------------------------------------------- gather_across_devices, 2 Gloo ranks

WORLD = 2



def _rank(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    results = {}
    try:
        model = load_model(model_dir)
        for n_negatives in (0, 1):
            texts = [column[rank * 4 : (rank + 1) * 4] for column in columns(2 + n_negatives, 4 * WORLD, seed=20)]
            feats = features(model, texts)
            pairs = {
                "MNRL": (losses.MultipleNegativesRankingLoss(model, gather_across_devices=True),
                         SemCLIPRankingLoss(model, gather_across_devices=True)),
                "MNSRL": (losses.MultipleNegativesSymmetricRankingLoss(model, gather_across_devices=True),
                          SemCLIPRankingLoss(model, gather_across_devices=True, **SYMMETRIC)),
                "CachedMNRL": (losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3,
                                                                         gather_across_devices=True),
                               SemCLIPRankingLoss(model, mini_batch_size=3, gather_across_devices=True)),
            }  # fmt: skip
            for name, (theirs, ours) in pairs.items():
                results[name, n_negatives] = (loss_and_grads(model, theirs, feats), loss_and_grads(model, ours, feats))
    except Exception:  # noqa: BLE001 - reported by the parent
        results = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(model_dir, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("st_gather"))
    mp.start_processes(_rank, args=(free_port(), model_dir, out_dir), nprocs=WORLD, start_method="spawn", join=True)
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for result in results:
        assert not isinstance(result, str), result
    return results


@pytest.mark.parametrize("n_negatives", [0, 1])
@pytest.mark.parametrize("name", ["MNRL", "MNSRL", "CachedMNRL"])
def test_gather_across_devices_equals_theirs(ranks, name, n_negatives):
    for rank, result in enumerate(ranks):
        theirs, ours = result[name, n_negatives]
        assert_equal(theirs, ours, f"{name}, rank {rank}")
