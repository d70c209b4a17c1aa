"""Procedural triplet data: coloured shapes at positions, with captions, paraphrases and negations.

A scene holds 1 to 3 objects (8 colours, 7 shapes), each a distinct colour and shape, in
distinct horizontal slots (left / middle / right), drawn anti-aliased on a noisy
background. A caption is a *claim*: a list of object phrases ("a red circle on
the left") in random order (in training, sometimes leaving one object out, as
real captions do), optionally followed by a true absence clause
("and no green cross"). Words are drawn from synonym sets ("red"/"crimson",
"square"/"box", "on the left"/"at the left"), so both the captions seen in
training and their paraphrases use the whole vocabulary.

- A paraphrase states the same claims in other words and/or order.
- A negation is a minimal edit of the caption, keeping its wording, that makes it
  false for the image: "a" -> "no" on a present object (`negate`), an absence
  clause naming a present object, "... and no blue square" (`deny`), "no" -> "a"
  in the absence clause (`affirm`), two objects' colours swapped (`swap_color`),
  two objects' positions swapped (`swap_position`), or an object moved to an
  empty slot (`move`).

Everything is a deterministic function of (seed, split). Validation layouts
(which colour-shape sits in which slot) never occur in the training split, so
validation measures generalisation to unseen combinations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (235, 225, 40),
    "green": (40, 185, 60),
    "cyan": (40, 215, 225),
    "blue": (45, 80, 235),
    "purple": (160, 55, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "bar")
SLOTS = ("left", "middle", "right")

COLOR_WORDS = {
    "red": ("red", "crimson"),
    "orange": ("orange", "amber"),
    "yellow": ("yellow", "golden"),
    "green": ("green", "emerald"),
    "cyan": ("cyan", "turquoise"),
    "blue": ("blue", "azure"),
    "purple": ("purple", "violet"),
    "white": ("white", "ivory"),
}
SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle", "wedge"),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "hoop"),
    "bar": ("bar", "stripe"),
}
SLOT_WORDS = {
    "left": ("on the left", "at the left"),
    "middle": ("in the middle", "in the center"),
    "right": ("on the right", "at the right"),
}
ABSENCE_WORDS = ("and no", "but no", "with no")

NEGATION_TYPES = ("negate", "deny", "affirm", "swap_color", "swap_position", "move")
OBJECT_COUNT_PROBS = (0.2, 0.4, 0.4)  # scenes with 1, 2, 3 objects
SPLIT_IDS = {"train": 0, "val": 1}
# Share of captions with a true absence clause ("... and no green cross"). A `deny` negation appends
# such a clause to a caption that has none, and most other edits keep the caption's clause, so at
# a low share "has an absence clause" alone would tell negations from captions (a shortcut: at 0.02
# SemCLIP learned "absence clause = false" and failed every true one, `affirm` 0/8). At 0.6 the
# share of texts with an "and no X" clause is the same among true captions and among negations
# (measured 59% vs 59%, checked by tests/apps/test_pretrained.py), so the clause carries no information
# about truth and only reading which object it names does.
ABSENCE_PROB = 0.6
# Share of training captions that leave one object out (validation captions describe every
# object, so that retrieval has one right answer). Off by default: at 0.15-0.3 both models
# stay on a colour-and-shape plateau for most of the demo's 500 steps (docs/training.md).
PARTIAL_PROB = 0.0


def indefinite_article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    slot: str
    cx: float  # centre, in pixels
    cy: float
    radius: float


@dataclass(frozen=True)
class Phrase:
    """One claim of a caption: `a|no <color> <shape> <slot>`; the wording indices pick synonyms."""

    color: str
    shape: str
    slot: str
    negated: bool
    color_word: int
    shape_word: int
    slot_word: int

    def text(self) -> str:
        color = COLOR_WORDS[self.color][self.color_word]
        article = "no" if self.negated else indefinite_article(color)
        return (
            f"{article} {color} "
            f"{SHAPE_WORDS[self.shape][self.shape_word]} {SLOT_WORDS[self.slot][self.slot_word]}"
        )


@dataclass(frozen=True)
class Absence:
    """The trailing clause `<and|but|with> no <color> <shape>` (`affirmed` turns `no` into `a`)."""

    color: str
    shape: str
    affirmed: bool
    lead_word: int
    color_word: int
    shape_word: int

    def text(self) -> str:
        lead = ABSENCE_WORDS[self.lead_word]
        color = COLOR_WORDS[self.color][self.color_word]
        if self.affirmed:
            lead = lead[: -len("no")] + indefinite_article(color)
        return f"{lead} {color} {SHAPE_WORDS[self.shape][self.shape_word]}"


@dataclass(frozen=True)
class Claim:
    phrases: tuple[Phrase, ...]
    absence: Absence | None

    def text(self) -> str:
        parts = [p.text() for p in self.phrases]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return body if self.absence is None else f"{body} {self.absence.text()}"


def claim_holds(claim: Claim, objects: tuple[SceneObject, ...]) -> bool:
    """Whether every statement of `claim` is true of the scene."""
    placed = {(o.color, o.shape, o.slot) for o in objects}
    kinds = {(o.color, o.shape) for o in objects}
    for phrase in claim.phrases:
        if ((phrase.color, phrase.shape, phrase.slot) in placed) == phrase.negated:
            return False
    if claim.absence is not None:
        if ((claim.absence.color, claim.absence.shape) in kinds) != claim.absence.affirmed:
            return False
    return True


def claim_meaning(claim: Claim) -> tuple[frozenset, tuple | None]:
    """What a claim states, independent of wording and order."""
    statements = frozenset((p.color, p.shape, p.slot, p.negated) for p in claim.phrases)
    absence = None if claim.absence is None else (claim.absence.color, claim.absence.shape, claim.absence.affirmed)
    return statements, absence


# ----------------------------------------------------------------------------- drawing


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean inside-mask of `shape` centred at 0 for sample offsets (dx, dy)."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius * 1.15
    if shape == "triangle":  # apex up, base at dy = +radius
        depth = (dy + radius) / (2.0 * radius)  # 0 at the apex, 1 at the base
        return (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= depth * radius * 1.1)
    if shape == "ring":
        distance2 = dx * dx + dy * dy
        return (distance2 <= radius * radius) & (distance2 >= (radius * 0.5) ** 2)
    if shape == "bar":  # a wide, short horizontal rectangle
        return (np.abs(dx) <= radius * 1.1) & (np.abs(dy) <= radius * 0.45)
    if shape == "cross":
        arm = radius * 0.38
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def render(objects: tuple[SceneObject, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [3, size, size] image: noisy background, objects anti-aliased with 4x4 supersampling."""
    image = rng.uniform(25, 95) + rng.normal(0.0, 10.0, size=(3, size, size))
    sub = 4
    for obj in objects:
        # Supersample only the object's bounding box: the mask is empty elsewhere.
        reach = obj.radius * 1.2 + 1.0
        x0, x1 = max(int(obj.cx - reach), 0), min(int(obj.cx + reach) + 1, size)
        y0, y1 = max(int(obj.cy - reach), 0), min(int(obj.cy + reach) + 1, size)
        xs = (np.arange(x0 * sub, x1 * sub) + 0.5) / sub - obj.cx
        ys = (np.arange(y0 * sub, y1 * sub) + 0.5) / sub - obj.cy
        inside = shape_mask(obj.shape, xs[None, :], ys[:, None], obj.radius)
        coverage = inside.reshape(y1 - y0, sub, x1 - x0, sub).sum(axis=(1, 3)) / float(sub * sub)
        color = np.array(COLORS[obj.color], dtype=np.float64) * rng.uniform(0.85, 1.05)
        window = image[:, y0:y1, x0:x1]
        image[:, y0:y1, x0:x1] = window * (1.0 - coverage) + color[:, None, None] * coverage
    return np.clip(image, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- sampling


def sample_objects(rng: np.random.Generator, size: int) -> tuple[SceneObject, ...]:
    count = int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS)) + 1
    colors = rng.permutation(list(COLORS))[:count]
    shapes = rng.permutation(SHAPES)[:count]
    slots = rng.permutation(len(SLOTS))[:count]
    third = size / 3.0
    objects = []
    for color, shape, slot in zip(colors, shapes, slots, strict=True):
        radius = rng.uniform(0.11, 0.15) * size
        cx = (slot + 0.5) * third + rng.uniform(-0.12, 0.12) * third
        cy = rng.uniform(radius + 1.0, size - radius - 1.0)
        objects.append(SceneObject(str(color), str(shape), SLOTS[slot], float(cx), float(cy), float(radius)))
    return tuple(objects)


def layout_key(objects: tuple[SceneObject, ...]) -> frozenset:
    """What a caption can tell apart: which colour-shape sits in which slot."""
    return frozenset((o.color, o.shape, o.slot) for o in objects)


def sample_claim(
    rng: np.random.Generator, objects: tuple[SceneObject, ...], absence_prob: float, partial_prob: float = 0.0
) -> Claim:
    """A true caption: the objects in random order (one left out with probability `partial_prob`,
    as real captions leave things out), random synonyms, maybe an absence clause."""
    order = rng.permutation(len(objects))
    if len(objects) > 1 and partial_prob > 0 and rng.random() < partial_prob:
        order = order[:-1]
    phrases = tuple(
        Phrase(o.color, o.shape, o.slot, False, int(rng.integers(2)), int(rng.integers(2)), int(rng.integers(2)))
        for o in (objects[i] for i in order)
    )
    absence = None
    if rng.random() < absence_prob:
        kinds = {(o.color, o.shape) for o in objects}
        candidates = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in kinds]
        color, shape = candidates[int(rng.integers(len(candidates)))]
        absence = Absence(color, shape, False, int(rng.integers(len(ABSENCE_WORDS))), int(rng.integers(2)),
                          int(rng.integers(2)))
    return Claim(phrases, absence)


def reword(rng: np.random.Generator, claim: Claim) -> Claim:
    """The same claim in other words and/or another order (guaranteed to read differently)."""
    for _ in range(100):
        order = rng.permutation(len(claim.phrases))
        phrases = tuple(
            replace(claim.phrases[i], color_word=int(rng.integers(2)), shape_word=int(rng.integers(2)),
                    slot_word=int(rng.integers(2)))
            for i in order
        )
        absence = claim.absence
        if absence is not None:
            absence = replace(absence, lead_word=int(rng.integers(len(ABSENCE_WORDS))),
                              color_word=int(rng.integers(2)), shape_word=int(rng.integers(2)))
        paraphrase = Claim(phrases, absence)
        if paraphrase.text() != claim.text():
            return paraphrase
    raise RuntimeError(f"could not reword {claim.text()!r}")  # unreachable: every claim has synonyms


def negation_edits(claim: Claim, objects: tuple[SceneObject, ...]) -> list[tuple[str, Claim]]:
    """Every minimal edit of `claim` (same wording) that makes it false for `objects`."""
    edits: list[tuple[str, Claim]] = []
    phrases = claim.phrases
    for i in range(len(phrases)):
        edited = list(phrases)
        edited[i] = replace(phrases[i], negated=True)
        edits.append(("negate", Claim(tuple(edited), claim.absence)))
    if claim.absence is not None:
        edits.append(("affirm", Claim(phrases, replace(claim.absence, affirmed=True))))
    wording = {(p.color, p.shape): (p.color_word, p.shape_word) for p in phrases}
    for obj in objects:
        # Deny an object that is there (mentioned or not), in the caption's words: "... and no blue
        # square". The negation then holds *more* words that match the image than the caption: a
        # bag-of-words text encoder prefers it, one that reads "no" does not (CC-Neg's failure mode).
        color_word, shape_word = wording.get((obj.color, obj.shape), (0, 0))
        if claim.absence is None:
            denial = Absence(obj.color, obj.shape, False, 0, color_word, shape_word)
        else:
            denial = replace(claim.absence, color=obj.color, shape=obj.shape, color_word=color_word,
                             shape_word=shape_word)
        edits.append(("deny", Claim(phrases, denial)))
    occupied = {o.slot for o in objects}
    for i in range(len(phrases)):
        for j in range(i + 1, len(phrases)):
            a, b = phrases[i], phrases[j]
            edited = list(phrases)
            # Swap the words with the meanings, so only the swap differs from the caption.
            edited[i] = replace(a, color=b.color, color_word=b.color_word)
            edited[j] = replace(b, color=a.color, color_word=a.color_word)
            edits.append(("swap_color", Claim(tuple(edited), claim.absence)))
            edited = list(phrases)
            edited[i] = replace(a, slot=b.slot, slot_word=b.slot_word)
            edited[j] = replace(b, slot=a.slot, slot_word=a.slot_word)
            edits.append(("swap_position", Claim(tuple(edited), claim.absence)))
        for slot in SLOTS:
            if slot not in occupied:
                edited = list(phrases)
                edited[i] = replace(phrases[i], slot=slot)
                edits.append(("move", Claim(tuple(edited), claim.absence)))
    return [(kind, edit) for kind, edit in edits if not claim_holds(edit, objects)]


def sample_negations(
    rng: np.random.Generator, claim: Claim, objects: tuple[SceneObject, ...], count: int
) -> list[tuple[str, Claim]]:
    """`count` negations: first a random edit type, then a random edit of that type (types balanced)."""
    edits = negation_edits(claim, objects)
    chosen: list[tuple[str, Claim]] = []
    for _ in range(count):
        pool = [e for e in edits if e not in chosen] or edits
        kinds = sorted({kind for kind, _ in pool})
        kind = kinds[int(rng.integers(len(kinds)))]
        of_kind = [e for e in pool if e[0] == kind]
        chosen.append(of_kind[int(rng.integers(len(of_kind)))])
    return chosen


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class SyntheticItem:
    objects: tuple[SceneObject, ...]
    caption: Claim
    paraphrases: tuple[Claim, ...]
    negations: tuple[Claim, ...]
    negation_types: tuple[str, ...]


def generate_items(
    split: str, size: int, seed: int, image_size: int, n_paraphrases: int, n_negations: int,
    absence_prob: float = ABSENCE_PROB, partial_prob: float = 0.0, exclude_layouts: set | None = None,
    unique_layouts: bool = False,
) -> tuple[list[SyntheticItem], np.ndarray]:
    """`size` items and their uint8 images `[size, 3, H, W]`, deterministic in (split, seed)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split]])
    items: list[SyntheticItem] = []
    images = np.empty((size, 3, image_size, image_size), dtype=np.uint8)
    seen: set = set()
    attempts = 0
    while len(items) < size:
        attempts += 1
        if attempts > 50 * size + 1000:
            raise ValueError(f"cannot draw {size} distinct {split} layouts; lower the split size")
        objects = sample_objects(rng, image_size)
        key = layout_key(objects)
        if exclude_layouts is not None and key in exclude_layouts:
            continue
        if unique_layouts:
            if key in seen:
                continue
            seen.add(key)
        caption = sample_claim(rng, objects, absence_prob, partial_prob)
        paraphrases = tuple(reword(rng, caption) for _ in range(n_paraphrases))
        negations = sample_negations(rng, caption, objects, n_negations)
        images[len(items)] = render(objects, image_size, rng)
        items.append(SyntheticItem(objects, caption, paraphrases, tuple(c for _, c in negations),
                                   tuple(k for k, _ in negations)))
    return items, images


class SyntheticTriplets(Dataset):
    """A split of the synthetic data as `(image [3,H,W] float, caption, [paraphrases], [negations])`.

    Validation layouts are unique within the split (so retrieval has one right
    answer) and excluded from training.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 20000,
        seed: int = 0,
        image_size: int = 32,
        n_paraphrases: int = 1,
        n_negations: int = 2,
        val_size: int = 1000,
        absence_prob: float = ABSENCE_PROB,
        partial_prob: float = PARTIAL_PROB,
    ) -> None:
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {tuple(SPLIT_IDS)}, got {split!r}")
        val_kwargs = dict(seed=seed, image_size=image_size, n_paraphrases=n_paraphrases, n_negations=n_negations,
                          absence_prob=absence_prob)
        if split == "val":
            self.items, images = generate_items("val", size, unique_layouts=True, **val_kwargs)
        else:
            val_layouts = {layout_key(item.objects) for item in
                           generate_items("val", val_size, unique_layouts=True, **val_kwargs)[0]}
            self.items, images = generate_items("train", size, exclude_layouts=val_layouts, partial_prob=partial_prob,
                                                **val_kwargs)
        self.images = torch.from_numpy(images)
        self.captions = [item.caption.text() for item in self.items]
        self.paraphrases = [[p.text() for p in item.paraphrases] for item in self.items]
        self.negations = [[n.text() for n in item.negations] for item in self.items]
        self.negation_types = [list(item.negation_types) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> torch.Tensor:
        """Image `index` as float32 in [-1, 1] (mean 0.5, std 0.5 normalisation)."""
        return self.images[index].float().div_(127.5).sub_(1.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, list[str], list[str]]:
        return self.image(index), self.captions[index], self.paraphrases[index], self.negations[index]
