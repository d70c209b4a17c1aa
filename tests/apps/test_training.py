"""Fast tests of training/: synthetic data, metrics and the modules' import graph.

CSV parsing: test_training_csv.py; the loop, resume and checkpoints: test_training_resume.py.

The synthetic captions are checked with a parser written here from the data's
documented grammar (not the generator's own `claim_holds`), against the scene's
objects, whose presence is itself checked on the rendered pixels.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from harness import REPO_ROOT

# training/ lives at the repository root and is not part of the installed package.
from training.data import batch_indices  # noqa: E402
from training.evaluate import negation_accuracy, paraphrase_recall_at_1, recall_at_k  # noqa: E402
from training.synthetic import SyntheticTriplets, layout_key  # noqa: E402
from training.train import warmup_cosine  # noqa: E402

# The vocabulary, restated independently of training/synthetic.py.
COLOR = {"red": "red", "crimson": "red", "orange": "orange", "amber": "orange", "yellow": "yellow",
         "golden": "yellow", "green": "green", "emerald": "green", "cyan": "cyan", "turquoise": "cyan",
         "blue": "blue", "azure": "blue", "purple": "purple", "violet": "purple", "white": "white", "ivory": "white"}
SHAPE = {"circle": "circle", "disk": "circle", "square": "square", "box": "square", "triangle": "triangle",
         "wedge": "triangle", "diamond": "diamond", "rhombus": "diamond", "cross": "cross", "plus sign": "cross",
         "ring": "ring", "hoop": "ring", "bar": "bar", "stripe": "bar"}
SLOT = {"on the left": "left", "at the left": "left", "in the middle": "middle", "in the center": "middle",
        "on the right": "right", "at the right": "right"}
RGB = {"red": (220, 35, 35), "orange": (245, 140, 20), "yellow": (235, 225, 40), "green": (40, 185, 60),
       "cyan": (40, 215, 225), "blue": (45, 80, 235), "purple": (160, 55, 210), "white": (240, 240, 240)}

_alt = lambda words: "|".join(sorted(words, key=len, reverse=True))  # noqa: E731
PHRASE = re.compile(rf"\b(a|an|no) ({_alt(COLOR)}) ({_alt(SHAPE)}) ({_alt(SLOT)})")
ABSENCE = re.compile(rf" (and|but|with) (a|an|no) ({_alt(COLOR)}) ({_alt(SHAPE)})$")


def parse(text: str) -> tuple[frozenset, tuple | None]:
    """(set of (color, shape, slot, negated) statements, (color, shape, affirmed) absence clause or None)."""
    match = ABSENCE.search(text)  # phrases end with a position, the absence clause with a shape
    absence = None
    if match:
        absence = (COLOR[match.group(3)], SHAPE[match.group(4)], match.group(2) != "no")
        text = text[: match.start()]
    statements = frozenset((COLOR[c], SHAPE[s], SLOT[p], art == "no") for art, c, s, p in PHRASE.findall(text))
    rest = PHRASE.sub("", text)
    leftover = re.sub(r"[ ,]|and", "", rest)
    assert leftover == "", f"unparsed words {leftover!r} in {text!r}"
    return statements, absence


def true_of(meaning: tuple[frozenset, tuple | None], objects) -> bool:
    placed = {(o.color, o.shape, o.slot) for o in objects}
    kinds = {(o.color, o.shape) for o in objects}
    statements, absence = meaning
    ok = all(((c, s, p) in placed) != negated for c, s, p, negated in statements)
    if absence is not None:
        ok = ok and (((absence[0], absence[1]) in kinds) == absence[2])
    return ok


@pytest.fixture(scope="module")
def small_splits():
    kwargs = dict(seed=3, image_size=32, n_paraphrases=2, n_negations=3, val_size=60, partial_prob=0.3)
    return SyntheticTriplets("train", size=150, **kwargs), SyntheticTriplets("val", size=60, **kwargs)


def test_synthetic_is_deterministic_and_seeded():
    a = SyntheticTriplets("train", size=40, seed=7, val_size=20)
    b = SyntheticTriplets("train", size=40, seed=7, val_size=20)
    c = SyntheticTriplets("train", size=40, seed=8, val_size=20)
    assert torch.equal(a.images, b.images)
    assert (a.captions, a.paraphrases, a.negations) == (b.captions, b.paraphrases, b.negations)
    assert a.captions != c.captions and not torch.equal(a.images, c.images)
    assert a.images.shape == (40, 3, 32, 32) and a.images.dtype == torch.uint8


def test_synthetic_splits_are_disjoint_and_val_layouts_unique(small_splits):
    train_set, val_set = small_splits
    val_layouts = [layout_key(item.objects) for item in val_set.items]
    assert len(set(val_layouts)) == len(val_layouts)
    assert not set(val_layouts) & {layout_key(item.objects) for item in train_set.items}


def test_synthetic_captions_true_paraphrases_same_negations_false(small_splits):
    kinds = set()
    for dataset in small_splits:
        for index, item in enumerate(dataset.items):
            caption = parse(dataset.captions[index])
            # validation captions describe every object; training ones may leave one out
            assert len(caption[0]) == len(item.objects) or (dataset is small_splits[0] and
                                                          len(caption[0]) == len(item.objects) - 1 >= 1)
            assert true_of(caption, item.objects), dataset.captions[index]
            assert len(dataset.paraphrases[index]) == 2 and len(dataset.negations[index]) == 3
            for paraphrase in dataset.paraphrases[index]:
                assert paraphrase != dataset.captions[index]
                assert parse(paraphrase) == caption, (paraphrase, dataset.captions[index])
            for negation, kind in zip(dataset.negations[index], dataset.negation_types[index], strict=True):
                assert not true_of(parse(negation), item.objects), (negation, dataset.captions[index])
                # minimal edit: an article changed, words swapped, or (deny) one "and no <object>" clause added
                extra_words = len(negation.split()) - len(dataset.captions[index].split())
                assert abs(extra_words) <= 1 or (kind == "deny" and 4 <= extra_words <= 5), (negation, kind)
                kinds.add(kind)
    assert kinds == {"negate", "deny", "affirm", "swap_color", "swap_position", "move"}


def test_synthetic_images_show_the_described_objects(small_splits):
    train_set, _ = small_splits
    for index, item in enumerate(train_set.items[:60]):
        image = train_set.images[index].numpy().astype(np.float64)
        for obj in item.objects:
            # The centre pixel is inside every shape but the ring (sampled on its band); colour ±15% tint and noise.
            y = obj.cy + (0.75 * obj.radius if obj.shape == "ring" else 0.0)
            pixel = image[:, int(y), int(obj.cx)]
            expected = np.array(RGB[obj.color], dtype=np.float64)
            nearest = min(RGB, key=lambda name: np.abs(np.array(RGB[name]) - pixel).sum())
            assert nearest == obj.color, (pixel, expected, train_set.captions[index])
            assert {"left": 0, "middle": 1, "right": 2}[obj.slot] == int(obj.cx // (32 / 3))


# ----------------------------------------------------------------------------- metrics


def test_recall_at_k_hand_case():
    scores = torch.tensor([[0.9, 0.1, 0.0],  # right answer first: rank 0
                           [0.8, 0.5, 0.7],  # two better: rank 2
                           [0.2, 0.3, 0.3]])  # tie is not "better": rank 0
    assert recall_at_k(scores, 1) == pytest.approx(2 / 3)
    assert recall_at_k(scores, 2) == pytest.approx(2 / 3)
    assert recall_at_k(scores, 3) == pytest.approx(1.0)
    # columns as queries: [.9,.8,.2] rank 0, [.1,.5,.3] rank 0, [.0,.7,.3] rank 1
    assert recall_at_k(scores.T, 1) == pytest.approx(2 / 3)
    assert recall_at_k(scores.T, 2) == pytest.approx(1.0)


def test_negation_accuracy_and_paraphrase_r1_hand_case():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    caption = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    negation = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])  # owners 0, 0, 1
    owner = torch.tensor([0, 0, 1])
    # image 0 vs caption 0.8: negations score 0.6 (right), 1.0 (wrong); image 1: 0.8 vs 1.0 (wrong)
    assert negation_accuracy(image, caption, negation, owner).tolist() == [True, False, False]
    para_round_a = torch.tensor([[0.9, 0.1], [0.1, 0.9]])  # both right
    para_round_b = torch.tensor([[0.1, 0.2], [0.3, 0.9]])  # image 0: 0.1 < 0.3 wrong; image 1: 0.9 > 0.2 right
    assert paraphrase_recall_at_1(image, [para_round_a, para_round_b]) == pytest.approx(0.75)


def test_warmup_cosine_and_batch_order():
    factor = warmup_cosine(warmup=4, total=12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5) and factor(12) == pytest.approx(0.0)
    epoch0 = np.concatenate([batch_indices(1, s, 4, 10)[1] for s in range(2)])
    assert len(set(epoch0.tolist())) == 8  # no repeats within an epoch
    assert batch_indices(1, 2, 4, 10)[0] == 1  # 10 // 4 = 2 batches per epoch
    assert np.array_equal(batch_indices(1, 5, 4, 10)[1], batch_indices(1, 5, 4, 10)[1])


# ----------------------------------------------------------------------------- structure


def training_import_graph() -> dict[str, set[str]]:
    """module -> training modules it imports anywhere in its source (lazy imports inside functions count too)."""
    import ast

    folder = os.path.join(REPO_ROOT, "training")
    names = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name in names:
        with open(os.path.join(folder, name + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1:  # from .x import y  /  from . import x
                    targets |= {module.split(".")[0]} if module else {a.name for a in node.names}
                elif module.startswith("training."):
                    targets.add(module.split(".")[1])
            elif isinstance(node, ast.Import):
                targets |= {a.name.split(".")[1] for a in node.names if a.name.startswith("training.")}
        graph[name] = targets & names
    return graph


def test_training_modules_import_without_cycles():
    graph = training_import_graph()
    assert "train" in graph["demo"] and "checkpoint" in graph["train"]  # the graph really was read
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [name, target])}"
            if target not in state:
                visit(target, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
