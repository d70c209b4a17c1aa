"""A tiny random BERT `SentenceTransformer` built from a `transformers` config (no download), and batches for it."""

from __future__ import annotations

import os
import random

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(60)]


def tiny_model_dir(path: str, hidden: int = 16, layers: int = 1, seed: int = 0) -> str:
    """Save a random BERT (dropout off, so that two losses see the same forward) and its tokenizer in `path`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as file:
        file.write("\n".join(VOCAB))
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    BertTokenizerFast(vocab_file=vocab_file).save_pretrained(path)
    return path


def load_model(path: str, dtype: torch.dtype = torch.float64):
    """The `SentenceTransformer` (mean pooling) of `tiny_model_dir`'s files, in `dtype`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(path)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                device="cpu")  # fmt: skip
    return model.to(dtype)


def sentences(count: int, seed: int) -> list[str]:
    """Random word sequences of 2 to 9 words (ragged, so that padding is exercised)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB[5:]) for _ in range(rng.randint(2, 9))) for _ in range(count)]


def columns(n_columns: int, batch: int, seed: int = 0) -> list[list[str]]:
    """`n_columns` columns (anchor, positive, ...) of `batch` sentences each."""
    return [sentences(batch, seed * 100 + column) for column in range(n_columns)]


def features(model, texts: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    """The model inputs of each column, as the trainer's collator makes them."""
    return [model.preprocess(column) for column in texts]


def train(model_dir: str, loss_factory, out_dir: str, batch: int = 8, steps: int = 2, **arguments):
    """`steps` SGD steps of SentenceTransformerTrainer on a (anchor, positive, negative) Dataset; the parameters."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = load_model(model_dir)
    texts = columns(3, batch * steps, seed=7)
    dataset = Dataset.from_dict({"anchor": texts[0], "positive": texts[1], "negative": texts[2]})
    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, seed=0, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_drop_last=True,
        **arguments,
    )  # fmt: skip
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss_factory(model)).train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}
