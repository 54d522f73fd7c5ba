"""Tiny offline inputs for the fine-tuning tests: a random-init BERT and small labelled files."""
from __future__ import annotations

import json
import pathlib
import random

POSITIVE = "good great fine superb moving lovely smart funny warm brilliant".split()
NEGATIVE = "bad dull awful boring weak messy flat tedious silly poor".split()
FILLER = "the film movie plot story cast a was is and this it very quite".split()


def make_tiny_model(folder: pathlib.Path, dropout: float = 0.0) -> pathlib.Path:
    """A 2-layer, 32-wide BERT with a word-level vocab, saved with its tokenizer (``dropout`` > 0
    makes training consume the RNG, which resume tests must then restore)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, initializer_range=0.2)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def review(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
    rng.shuffle(words)
    return " ".join(words)


def make_rows(n: int, seed: int = 0, labels=("pos", "neg")) -> list[tuple[str, object]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        y = rng.random() < 0.5
        text = review(rng, y)
        if text not in seen:
            seen.add(text)
            rows.append((text, labels[0] if y else labels[1]))
    return rows


def write_csv(path: pathlib.Path, rows, text_col="review", label_col="sentiment") -> pathlib.Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", text_col, label_col])
        for i, (t, y) in enumerate(rows):
            w.writerow([i, t, y])
    return path


def write_jsonl(path: pathlib.Path, rows, text_col="text", label_col="label") -> pathlib.Path:
    path.write_text("".join(json.dumps({text_col: t, label_col: y}) + "\n" for t, y in rows), encoding="utf-8")
    return path
