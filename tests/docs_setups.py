"""What the docs' Python blocks are run with: named setups of small random inputs, and the runner.

A block names its setup in an HTML comment right before it (docs/testing.md):

    <!-- docs-test: setup=features -->
    ```python
    loss = semclip_loss(image_features, text_features, logit_scale.exp(), paraphrase_features, negation_features)
    ```

A setup is a function returning the globals the block runs with (it may also prepare files in the current
folder, a fresh temporary one); `SOURCE_EDITS[name]` lists (old, new) text replacements applied to the block
first, for what a test machine cannot do as written (NCCL without GPUs). A block without a marker runs with
no globals. Run one block by hand:

    python tests/docs_setups.py SETUP block.py
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Callable, Iterator

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, DIM = 8, 16


def unit(*shape: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1).requires_grad_()


def features() -> dict:
    """Unit-norm [B, d] features (one paraphrase and one negation per image), τ and SigLIP's bias."""
    torch.manual_seed(0)
    names = {
        "image_features": unit(BATCH, DIM),
        "text_features": unit(BATCH, DIM),
        "paraphrase_features": unit(BATCH, DIM),
        "negation_features": unit(BATCH, DIM),
        "logit_scale": torch.tensor(math.log(1 / 0.07), requires_grad=True),
        "logit_bias": torch.tensor(-10.0, requires_grad=True),
    }
    aliases = {"P": names["paraphrase_features"], "N": names["negation_features"], "paraphrases":
               names["paraphrase_features"], "negations": names["negation_features"], "tau": names["logit_scale"].exp(),
               "b": names["logit_bias"]}
    return {**names, **aliases}


def tiny_model() -> dict:
    """The training loop's tiny open_clip model (32-pixel images) and its tokenizer."""
    from training.model import build_model

    torch.manual_seed(0)
    bundle = build_model()
    return {"model": bundle.model, "tokenizer": bundle.tokenizer, "image_size": bundle.image_size}


def open_clip_model() -> dict:
    """A tiny open_clip model, a batch of images and tokenized captions, paraphrases and negations; one rank."""
    names = tiny_model()
    tokenizer, size = names["tokenizer"], names["image_size"]
    names.update(
        images=torch.randn(BATCH, 3, size, size),
        captions=tokenizer([f"a red square number {i}" for i in range(BATCH)]),
        paraphrases=tokenizer([f"a square in red, number {i}" for i in range(BATCH)]),
        negations=tokenizer([f"no red square number {i}" for i in range(BATCH)]),
        rank=0,
        world_size=1,
    )
    return names


def grad_cache() -> dict:
    """A tiny model, an endless loader of (images, tokens) micro-batches and an optimizer."""
    names = tiny_model()
    tokenizer, size = names["tokenizer"], names["image_size"]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield torch.randn(4, 3, size, size), tokenizer([f"a blue circle number {i}" for i in range(4)])

    names.update(loader=batches(), optimizer=torch.optim.SGD(names["model"].parameters(), lr=0.1))
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed() -> dict:
    """One Gloo rank (torchrun's environment variables set by hand) and the features."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    return features()


def open_clip_loop() -> dict:
    """What open_clip_train's loop has: its argument namespace, a shared epoch, a batch of images and tokens
    (one caption, 2 paraphrases, 1 negation per image); triplets.csv with its images in the current folder."""
    import argparse

    from open_clip_train.data import SharedEpoch
    from PIL import Image

    os.makedirs("images", exist_ok=True)
    with open("triplets.csv", "w", encoding="utf-8") as handle:
        handle.write("filepath,caption,paraphrase,negation\n")
        for i, color in enumerate(["red", "blue", "green", "yellow"]):
            Image.new("RGB", (32, 32), color).save(f"images/{i}.png")
            handle.write(f"images/{i}.png,a {color} square,a square in {color} || one {color} square,"
                         f"no {color} square\n")
    torch.manual_seed(0)
    args = argparse.Namespace(rank=0, world_size=1, local_loss=False, gather_with_grad=False, horovod=False,
                              siglip=False, distill=False, model="ViT-B-32")
    return {"args": args, "shared_epoch": SharedEpoch(0), "images": torch.randn(2, 3, 224, 224),
            "tokens": torch.randint(1, 1000, (2, 4, 77))}


def sentence_transformer() -> dict:
    """A tiny random BERT `SentenceTransformer` for blocks that load a hub model by name (no download here),
    and a scratch working folder (a trainer writes its output there)."""
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "integrations"))
    from st_tiny import load_model, tiny_model_dir

    folder = tempfile.mkdtemp(prefix="docs-st-")
    os.chdir(folder)
    return {"tiny_sentence_transformer": load_model(tiny_model_dir(os.path.join(folder, "model")), torch.float32)}


SETUPS: dict[str, Callable[[], dict]] = {
    "open_clip_loop": open_clip_loop,
    "none": dict,
    "features": features,
    "open_clip_model": open_clip_model,
    "grad_cache": grad_cache,
    "distributed": distributed,
    "sentence_transformer": sentence_transformer,
}
SOURCE_EDITS: dict[str, list[tuple[str, str]]] = {
    "distributed": [('"nccl"', '"gloo"')],  # no GPU on a test machine; the rest of the block runs as written
    "sentence_transformer": [('SentenceTransformer("all-MiniLM-L6-v2")', "tiny_sentence_transformer")],
}


def run_block(setup: str, source: str, filename: str) -> None:
    if setup not in SETUPS:
        raise SystemExit(f"{filename}: unknown docs-test setup {setup!r}; known: {', '.join(SETUPS)}")
    for old, new in SOURCE_EDITS.get(setup, []):
        source = source.replace(old, new)
    namespace = {"__name__": "__main__", **SETUPS[setup]()}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - the docs' own code, by design


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tests/docs_setups.py SETUP BLOCK.py")
    sys.path.insert(0, ROOT)
    with open(sys.argv[2], encoding="utf-8") as handle:
        run_block(sys.argv[1], handle.read(), os.environ.get("DOCS_BLOCK_NAME", sys.argv[2]))
