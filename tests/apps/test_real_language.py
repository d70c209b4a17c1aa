"""`python -m training.real_language`: the split by image, and the program end to end on a tiny random BERT."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import pytest
import torch

# training/ lives at the repository root and is not part of the installed package.
from training import real_language  # noqa: E402
from training.real_language import (  # noqa: E402
    RealLanguageConfig,
    Split,
    image_evaluates,
    rules_triplets,
    split_by_image,
    split_problems,
)
from training.sugarcrepe import DEFAULT_PATH, TextTriplets, load_triplets_with_images  # noqa: E402

transformers = pytest.importorskip("transformers")  # in the [test] extra


def independent_problems(images, triplets, split):
    """The split's properties, recomputed from the rows without the code under test."""
    side = defaultdict(set)
    for i, image in enumerate(images):
        side[image].add(i in set(split.eval_rows))
    mixed = [image for image, sides in side.items() if len(sides) > 1]
    eval_texts = set()
    for i in split.eval_rows:
        eval_texts |= {triplets.captions[i], triplets.paraphrases[i], triplets.negations[i]}
    leaked = [c for c in split.train_captions if c in eval_texts]
    return mixed, leaked


def test_split_of_the_shipped_file_groups_images_and_shares_no_caption():
    images, triplets = load_triplets_with_images(DEFAULT_PATH)
    # 3,892 distinct raw captions; 3,835 once surrounding blanks are stripped (as the loader does)
    assert (len(images), len(set(triplets.captions)), len(set(images))) == (4757, 3835, 1542)
    split = split_by_image(images, triplets, 0.5)
    mixed, leaked = independent_problems(images, triplets, split)
    assert mixed == [] and leaked == []
    assert split_problems(images, triplets, split) == []
    # every image on exactly one side, each side about half of them (the sha256 rule is balanced)
    assert set(split.eval_images) | set(split.train_images) == set(images)
    assert not set(split.eval_images) & set(split.train_images)
    assert 0.45 < len(split.eval_images) / 1542 < 0.55
    # the training captions are exactly the training images' captions minus the evaluation texts
    train_rows = [i for i in range(len(images)) if images[i] in set(split.train_images)]
    expected = {triplets.captions[i] for i in train_rows} - {
        t for i in split.eval_rows for t in (triplets.captions[i], triplets.paraphrases[i], triplets.negations[i])
    }
    assert set(split.train_captions) == expected and len(split.train_captions) == len(expected)
    assert split.dropped_captions, "the file has captions shared across images: some must be dropped"
    # deterministic and independent of row order
    reverse = TextTriplets(*(getattr(triplets, n)[::-1] for n in ("captions", "paraphrases", "negations")))
    again = split_by_image(images[::-1], reverse, 0.5)
    assert again.eval_images == split.eval_images and set(again.train_captions) == set(split.train_captions)


def test_split_problems_catch_a_split_by_row():
    images, triplets = load_triplets_with_images(DEFAULT_PATH)
    rows = list(range(len(images)))
    eval_rows = rows[::2]  # a split by row: an image's rows land on both sides
    by_row = Split(0.5, eval_rows, list(dict.fromkeys(triplets.captions[i] for i in rows[1::2])), [], [])
    problems = split_problems(images, triplets, by_row)
    assert any("both sides" in p for p in problems) and any("evaluation part" in p for p in problems)
    mixed, leaked = independent_problems(images, triplets, by_row)
    assert mixed and leaked


def test_a_caption_of_two_images_on_both_sides_is_dropped_from_training(tmp_path):
    names = [f"{i:012d}.jpg" for i in range(200)]
    evaluating = next(n for n in names if image_evaluates(n, 0.5))
    training = [n for n in names if not image_evaluates(n, 0.5)][:2]
    csv = tmp_path / "t.csv"
    csv.write_text(
        "filename,caption,paraphrased,negation\n"
        f"{evaluating},a dog on a bench,a bench with a dog on it,a cat on a bench\n"
        f"{training[0]},a dog on a bench,there is a dog on a bench,a dog under a bench\n"
        f"{training[0]},a red car,a car that is red,a blue car\n"
        f"{training[1]},a cat on a bench,a bench with a cat,a cat under a bench\n"
    )
    images, triplets = load_triplets_with_images(str(csv))
    split = split_by_image(images, triplets, 0.5)
    assert split.eval_rows == [0]
    assert split.train_captions == ["a red car"]  # the shared caption, and the evaluation negation, are dropped
    assert split.dropped_captions == ["a dog on a bench", "a cat on a bench"]
    with pytest.raises(ValueError, match="eval_fraction"):
        split_by_image(images, triplets, 1.0)


def test_rules_triplets_fill_every_slot_and_filter_families():
    data = rules_triplets(["A man is holding a red umbrella next to a dog.", "zzz"], 3, 2)
    assert data.captions == ["A man is holding a red umbrella next to a dog."] and data.skipped == 1
    assert len(data.paraphrases[0]) == 3 and len(data.negations[0]) == 2
    only_negate = rules_triplets(data.captions, 1, 2, ("negate",))
    assert all(" not " in n.lower() for n in only_negate.negations[0])
    with pytest.raises(ValueError, match="negation_families"):
        rules_triplets(data.captions, 1, 1, ("shuffle",))


def tiny_bert(tmp_path, texts):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *words]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return BertModel(config).eval().requires_grad_(False), BertTokenizerFast(vocab_file=str(vocab_file))


def test_program_end_to_end_on_a_tiny_bert_and_resumes(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    _, triplets = load_triplets_with_images(DEFAULT_PATH, limit=60)
    model = tiny_bert(tmp_path, triplets.captions + triplets.paraphrases + triplets.negations)
    config = RealLanguageConfig(
        out=str(tmp_path / "out"),
        limit_rows=60,
        steps=2,
        batch_size=4,
        layers=1,
        seeds=(0, 1),
        paraphrases=2,
        negations=2,
        progress=False,
        jobs=1,  # side by side: test_runs_side_by_side_give_the_same_numbers_as_one_process
    )
    results = real_language.run(config, model)
    assert list(results["table"]) == list(real_language.METHODS)
    assert results["table"]["untouched"]["seeds"] == 1 and results["table"]["semclip"]["seeds"] == 2
    for row in results["table"].values():
        assert 0.0 <= row["min"] <= row["mean"] <= row["max"] <= 1.0
    for name in ("results.json", "real_language.png", "split.json"):
        assert os.path.getsize(tmp_path / "out" / name) > 0
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert split["eval_rows"] > 0 and split["train_captions"] > 0
    assert split["eval_images"] == len(split["eval_image_files"]) > 0
    assert not set(split["eval_image_files"]) & set(split["train_image_files"])
    runs = sorted(os.listdir(tmp_path / "out" / "runs"))
    assert len(runs) == 1 + 3 * 2
    for name in runs:  # the trained weights moved: every trained run logged its losses
        record = json.loads((tmp_path / "out" / "runs" / name).read_text())
        assert len(record["losses"]) == (0 if record["method"] == "untouched" else 2)
        assert all(loss == loss and loss >= 0 for loss in record["losses"])
    # a rerun with the same settings trains nothing and reports the same table
    stamps = {name: os.path.getmtime(tmp_path / "out" / "runs" / name) for name in runs}
    again = real_language.run(config, model)
    assert again["table"] == results["table"]
    assert stamps == {name: os.path.getmtime(tmp_path / "out" / "runs" / name) for name in runs}
    with pytest.raises(ValueError, match="--layers"):
        real_language.run(RealLanguageConfig(out=str(tmp_path / "bad"), layers=9, limit_rows=8), model)


def states_of(states, text):
    start, end = int(states.offsets[states.index[text]]), int(states.offsets[states.index[text] + 1])
    return states.flat[start:end]


def test_frozen_states_from_the_cut_model_and_the_pool_equal_the_full_forward(tmp_path):
    """The states after the frozen layers, from the model cut there (in this process and across worker
    processes), equal the full model's hidden states at that depth (`bottom_states` on the whole model)."""
    from training.pretrained import bottom_states

    _, triplets = load_triplets_with_images(DEFAULT_PATH, limit=40)
    texts = list(dict.fromkeys(triplets.captions + triplets.negations))
    model, tokenizer = tiny_bert(tmp_path, texts)
    for n_frozen in (1, 2):
        full = bottom_states(model, tokenizer, texts, n_frozen, progress=False)
        here = real_language.compute_states(model, tokenizer, texts, n_frozen, None, False, "")
        pool, _ = real_language.start_pool(RealLanguageConfig(jobs=2))
        try:
            pooled = real_language.compute_states(model, tokenizer, texts, n_frozen, pool, False, "")
        finally:
            pool.close()
            pool.join()
        assert set(here.index) == set(pooled.index) == set(texts)
        for text in texts:
            assert torch.equal(states_of(here, text), states_of(full, text))
            assert torch.equal(states_of(pooled, text), states_of(full, text))
        # depth matters (so the equalities above would catch a model cut at the wrong layer)
        deeper = bottom_states(model, tokenizer, texts, n_frozen + 1, progress=False)
        assert not torch.equal(states_of(deeper, texts[0]), states_of(here, texts[0]))


def test_state_cache_computes_only_missing_texts_and_rejects_a_foreign_file(tmp_path, monkeypatch):
    _, triplets = load_triplets_with_images(DEFAULT_PATH, limit=30)
    texts = list(dict.fromkeys(triplets.captions + triplets.paraphrases))
    model, tokenizer = tiny_bert(tmp_path, texts + triplets.negations)
    computed = []
    original = real_language.compute_states

    def counting(model, tokenizer, texts, *args):
        computed.append(len(texts))
        return original(model, tokenizer, texts, *args)

    monkeypatch.setattr(real_language, "compute_states", counting)
    folder = str(tmp_path / "cache")
    first = real_language.text_states(model, tokenizer, texts[:20], 2, folder, False)
    grown = real_language.text_states(model, tokenizer, texts, 2, folder, False)  # 20 cached, the rest new
    again = real_language.text_states(model, tokenizer, texts, 2, folder, False)  # all cached: nothing computed
    assert computed == [20, len(texts) - 20]
    uncached = real_language.text_states(model, tokenizer, texts, 2, None, False)
    for text in texts:
        assert torch.equal(states_of(grown, text), states_of(uncached, text))
        assert torch.equal(states_of(again, text), states_of(uncached, text))
    for text in texts[:20]:
        assert torch.equal(states_of(first, text), states_of(uncached, text))
    # other weights: another file; a file whose stored key differs (stale, foreign) is recomputed, not trusted
    (path,) = [os.path.join(folder, name) for name in os.listdir(folder)]
    stored = torch.load(path, weights_only=False)
    stored["key"]["model"] = "another model"
    torch.save(stored, path)
    computed.clear()
    real_language.text_states(model, tokenizer, texts, 2, folder, False)
    assert computed == [len(texts)]
    assert len(os.listdir(folder)) == 1  # rewritten in place (atomically): no second file, no partial left


def test_runs_side_by_side_give_the_same_numbers_as_one_process(tmp_path):
    pytest.importorskip("sentence_transformers")
    _, triplets = load_triplets_with_images(DEFAULT_PATH, limit=60)
    model = tiny_bert(tmp_path, triplets.captions + triplets.paraphrases + triplets.negations)
    settings = dict(limit_rows=60, steps=3, batch_size=4, seeds=(0, 1), negations=2, progress=False, cache_dir="")
    serial = real_language.run(RealLanguageConfig(out=str(tmp_path / "one"), jobs=1, **settings), model)
    parallel = real_language.run(RealLanguageConfig(out=str(tmp_path / "two"), jobs=2, **settings), model)

    def accuracies(table):
        return {method: {k: v for k, v in row.items() if k != "train_seconds_mean"} for method, row in table.items()}

    assert accuracies(parallel["table"]) == accuracies(serial["table"])
    for name in os.listdir(tmp_path / "one" / "runs"):
        one = json.loads((tmp_path / "one" / "runs" / name).read_text())
        two = json.loads((tmp_path / "two" / "runs" / name).read_text())
        assert (one["losses"], one["text_accuracy"]) == (two["losses"], two["text_accuracy"])
    assert parallel["seconds"]["cpu"] > 0


def test_cli_jobs_and_threads():
    config = real_language.parse_args(["--jobs", "1", "--threads", "2"])
    assert (config.jobs, config.threads) == (1, 2)
    assert real_language.parse_args([]).threads == 1  # one thread per process unless asked
    with pytest.raises(ValueError, match="--jobs"):
        real_language.check_config(RealLanguageConfig(jobs=-1), 6)
