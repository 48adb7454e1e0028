"""Tiny model folders (with a word-level tokenizer) and tiny data files for the training and CLI tests."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from models import tiny_bert, tiny_llama

WORDS = [
    *("the", "a", "movie", "film", "plot", "actor", "was", "is", "very", "really", "quite", "good", "great"),
    *("fine", "bad", "awful", "poor", "okay", "average", "and", "but", "with", "this", "that", "it", "so"),
    *("not", "story", "music", "scene", "ending", "what", "why", "how", "tell", "me", "about", "say", "hello"),
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE, NEGATIVE, NEUTRAL = ("good", "great", "fine"), ("bad", "awful", "poor"), ("okay", "average")
FILLER = ("the", "a", "movie", "film", "plot", "actor", "was", "is", "very", "really", "quite", "so", "story")


def tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + list(WORDS))}, do_lower_case=True)
    tok.eos_token = "[SEP]"
    return tok


def bert_folder(folder: Path, seed: int = 0, dropout: float = 0.0) -> Path:
    """A 2-layer BERT (hidden 32) saved with its tokenizer; dropout 0 keeps runs comparable across processes."""
    tok = tokenizer(folder)
    model = tiny_bert(
        num_labels=3,
        seed=seed,
        vocab_size=len(tok),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=0.2,  # distinct random features, so a few LoRA steps can separate the classes
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def llama_folder(folder: Path, seed: int = 0) -> Path:
    tok = tokenizer(folder)
    model = tiny_llama(seed, vocab_size=len(tok), eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentences whose label is set by one keyword: learnable in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label, words = [("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)][i % 3]
        sentence = [rng.choice(FILLER) for _ in range(rng.randint(1, 3))] + [rng.choice(words) for _ in range(2)]
        rng.shuffle(sentence)
        rows.append({"text": " ".join(sentence), "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    answers = {"tell me about the movie": "the movie was good", "what about the plot": "the plot is awful"}
    keys = list(answers)
    return [{"instruction": (k := rng.choice(keys)), "input": "", "output": answers[k]} for _ in range(n)]


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path
