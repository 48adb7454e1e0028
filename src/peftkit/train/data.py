"""Training data: read ``--data`` (``peftkit.train.sources``), pick the columns and task, tokenize, and batch.

Rows are plain dicts. Classification rows are encoded as text (pair) + class index; causal-LM rows (OpenAI
``messages``, ShareGPT ``conversations`` or prompt / completion pairs) through the tokenizer's chat template with
the loss on the assistant's turns only (``peftkit.train.chat``), optionally packed (``peftkit.train.packing``).
The batch order of every epoch is a pure function of (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted run would, and each process of a distributed run takes its own slice of the same global batch.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.core.registry import get_method
from peftkit.errors import ConfigError, choices
from peftkit.train import chat, packing
from peftkit.train.config import TrainConfig
from peftkit.train.sources import DEV_NAMES, SUFFIXES, TWEETS_DEV_ROWS, load_source, package_dir, read_rows, tweets

__all__ = ["DEV_NAMES", "SUFFIXES", "TWEETS_DEV_ROWS", "package_dir", "read_rows", "tweets"]  # re-exported

TEXT_COLUMNS = ("text", "sentence", "sentence1", "#1 String", "question1", "premise", "question", "content")
PAIR_COLUMNS = ("text_pair", "sentence2", "#2 String", "question2", "hypothesis")
LABEL_COLUMNS = ("label", "labels", "sentiment", "Quality", "class", "target")
PROMPT_COLUMNS = ("instruction", "prompt", "question", "source")
RESPONSE_COLUMNS = ("output", "response", "answer", "completion", "target_text")
CHAT_COLUMNS = ("messages", "conversations", "conversation")
IGNORE = chat.IGNORE  # label positions the loss skips (the prompt, padding)
SHOWN_ROWS = 5  # row numbers named in an error


# ---- splits --------------------------------------------------------------------------------------------
def load_splits(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, dev rows) for ``config.data``, capped by max_train_rows / max_eval_rows. Without a dev split,
    a seeded ``dev_fraction`` of the training rows is split off, stratified by label for classification."""
    train, dev = load_source(config)
    if config.data == "tweets":  # built in: every label present, a fixed dev split
        return train[: config.max_train_rows], dev[: config.max_eval_rows]
    if not train:
        raise ConfigError(f"--data {config.data!r} has no training rows.")
    columns = _checked(train, config, "train")
    if dev is None:
        train, dev = split_dev(train, config, columns.label if columns.task == "classification" else None)
    else:
        _checked(dev, config, "dev")
    return train[: config.max_train_rows], dev[: config.max_eval_rows]


def _checked(rows: list[dict], config: TrainConfig, split: str) -> Columns:
    """The columns of ``rows``, with every label cell filled in (classification), checked before any shuffle so
    that errors name the rows' own numbers."""
    columns = detect_columns(rows, config)
    if columns.task == "classification" and rows:
        check_labels(rows, columns.label, f"--data {config.data!r} ({split} rows)")
    return columns


def split_dev(rows: list[dict], config: TrainConfig, label: str | None) -> tuple[list[dict], list[dict]]:
    """(train, dev): round(n * dev_fraction) rows (at least 1) for dev, in a seeded order; with ``label``, each class
    gives its share (largest remainder), so dev has the class balance of the whole."""
    order = list(rows)
    random.Random(config.seed).shuffle(order)
    cut = max(1, round(len(order) * config.dev_fraction))
    if label is None:
        return order[cut:], order[:cut]
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(order):
        groups.setdefault(label_key(row[label]), []).append(i)
    exact = {name: len(members) * cut / len(order) for name, members in groups.items()}
    quota = {name: int(share) for name, share in exact.items()}
    by_remainder = sorted(groups, key=lambda name: (quota[name] - exact[name], name))
    for name in by_remainder[: cut - sum(quota.values())]:
        quota[name] += 1
    chosen = {i for name, members in groups.items() for i in members[: quota[name]]}
    return [r for i, r in enumerate(order) if i not in chosen], [r for i, r in enumerate(order) if i in chosen]


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
    messages: str | None = None  # a conversation column (format "messages" or "sharegpt")
    format: str | None = None  # causal_lm: "messages", "sharegpt" or "pairs"

    def describe(self) -> str:
        names = ("text", "pair", "label", "prompt", "extra_input", "response", "messages")
        chosen = ", ".join(f"{n}={getattr(self, n)!r}" for n in names if getattr(self, n) is not None)
        return f"task {self.task}" + (f" ({self.format})" if self.format else "") + f"; columns: {chosen}"


def pick_column(given: str | None, candidates: tuple[str, ...], columns: list[str], flag: str) -> str | None:
    """``given`` (a flag's value) or the first of ``candidates`` among ``columns``, matched case-insensitively
    (an exact match first); returns the data's own spelling."""
    lower = {c.lower(): c for c in reversed(columns)}
    if given is not None:
        found = given if given in columns else lower.get(given.lower())
        if found is None:
            raise ConfigError(f"--{flag} {given!r} is not a column of the data; columns: {choices(columns)}.")
        return found
    return next((lower[c.lower()] for c in candidates if c.lower() in lower), None)


def detect_columns(rows: list[dict], config: TrainConfig) -> Columns:
    """Which columns hold what, and the task (unless --task says it): a conversation column (messages /
    conversations) or a response column without a label column is causal_lm, anything else classification."""
    columns = list(rows[0]) if rows else []
    if config.task != "classification":
        conversation = _conversation_column(rows, columns, config)
        if conversation is not None:
            return conversation
    response = pick_column(config.response_column, RESPONSE_COLUMNS, columns, "response-column")
    task = config.task
    if task == "auto":
        label = pick_column(config.label_column, LABEL_COLUMNS, columns, "label-column")
        task = "causal_lm" if response and not label else "classification"
    if task == "causal_lm":
        return _pair_columns(columns, response, config)
    text = pick_column(config.text_column, TEXT_COLUMNS, columns, "text-column")
    label = pick_column(config.label_column, LABEL_COLUMNS, columns, "label-column")
    if text is None or label is None:
        raise ConfigError(
            f"--task classification needs a text and a label column; the data has {choices(columns)}. "
            "Name them with --text-column and --label-column."
        )
    pair = pick_column(config.text_pair_column, PAIR_COLUMNS, columns, "text-pair-column")
    return Columns(task, text=text, pair=pair, label=label)


def _conversation_column(rows: list[dict], columns: list[str], config: TrainConfig) -> Columns | None:
    """A column of turn lists (unless --prompt-column / --response-column ask for pairs): "messages" when the
    turns have a role, "sharegpt" when they have a from."""
    if config.prompt_column or config.response_column:
        return None
    name = pick_column(None, CHAT_COLUMNS, columns, "messages-column")
    turns = rows[0][name] if name else None
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return None
    fmt = "sharegpt" if "from" in turns[0] else "messages"
    return Columns("causal_lm", messages=name, format=fmt)


def _pair_columns(columns: list[str], response: str | None, config: TrainConfig) -> Columns:
    prompt = pick_column(config.prompt_column, PROMPT_COLUMNS, columns, "prompt-column")
    if prompt is None or response is None:
        raise ConfigError(
            f"--task causal_lm needs a conversation column ({choices(CHAT_COLUMNS)}) or a prompt and a response "
            f"column; the data has {choices(columns)}. Name them with --prompt-column and --response-column."
        )
    extra = pick_column(None, ("input",), columns, "prompt-column")
    return Columns(
        "causal_lm", prompt=prompt, extra_input=extra if extra != prompt else None, response=response, format="pairs"
    )


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


def prepare(config: TrainConfig, tokenizer, say: Callable[[str], None] | None = None) -> Encoded:
    """Read ``config.data``, pick its columns and task, and encode both splits (causal LM: the training rows
    packed with --packing); ``say`` gets a summary: the row counts, the columns chosen, the label set."""
    train_rows, dev_rows = load_splits(config)
    columns = detect_columns(train_rows, config)
    say = say or (lambda line: None)
    say(f"data {config.data!r}: {len(train_rows)} training rows, {len(dev_rows)} dev rows; {columns.describe()}")
    if config.packing:
        check_packing(config, columns)
    if columns.task == "classification":
        return _encode_classes(config, columns, tokenizer, train_rows, dev_rows, say)
    train, dev = (_usable(encode_causal_lm(rows, columns, tokenizer, config.max_length), name, config, say)
                  for rows, name in ((train_rows, "training"), (dev_rows, "dev")))  # fmt: skip
    trained = sum(sum(t != IGNORE for t in e["labels"]) for e in train)
    say(f"loss on {trained} of {sum(len(e['input_ids']) for e in train)} training tokens (assistant turns)")
    if config.packing:
        packed = packing.pack(train, config.max_length)
        fill = sum(len(r["input_ids"]) for r in packed) / (len(packed) * config.max_length)
        say(f"packing: {len(train)} examples in {len(packed)} rows of <= {config.max_length} tokens ({fill:.0%} full)")
        train = packed
    return Encoded(columns, None, train, dev)


def check_packing(config: TrainConfig, columns: Columns) -> None:
    """--packing needs causal-LM rows and a method that leaves the attention mask alone (prompt methods extend a
    2-D mask; packed batches carry a 4-D one)."""
    if columns.task == "classification":
        raise ConfigError("--packing is for causal_lm data (conversations or prompt / response); drop it.")
    try:
        method = get_method(config.method)
    except ConfigError:
        return  # an unknown method is named when the trainer builds its config
    if method.prepare_inputs is not None:
        raise ConfigError(
            f"--packing with --method {config.method!r}: the method prepends virtual tokens and extends a 2-D "
            "attention mask, while packed rows carry a 4-D block mask. Drop --packing (--group-by-length also "
            "cuts padding) or use a method that wraps layers, such as lora."
        )


def _encode_classes(config: TrainConfig, columns: Columns, tokenizer, train_rows: list, dev_rows: list, say) -> Encoded:
    labels = label_names(train_rows, columns.label)
    if len(labels) < 2:
        raise ConfigError(f"--label-column {columns.label!r} has one value only ({labels}).")
    counts = {name: 0 for name in labels}
    for row in train_rows:
        counts[label_key(row[columns.label])] += 1
    say("labels (training rows): " + ", ".join(f"{name!r} {n}" for name, n in counts.items()))
    length = config.max_length
    train, dev = (encode_classification(rows, columns, tokenizer, labels, length) for rows in (train_rows, dev_rows))
    return Encoded(columns, labels, train, dev)


def _usable(examples: list[dict], split: str, config: TrainConfig, say) -> list[dict]:
    """Drop examples without a trained token (the assistant's turns cut off by --max-length)."""
    kept = [e for e in examples if any(t != IGNORE for t in e["labels"])]
    if len(kept) < len(examples):
        say(f"{len(examples) - len(kept)} {split} rows have no assistant token within --max-length "
            f"{config.max_length}; they are left out")  # fmt: skip
    if examples and not kept:
        raise ConfigError(f"No {split} row has an assistant token within --max-length {config.max_length}; raise it.")
    return kept


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


def conversation(row: dict, cols: Columns, where: str = "a row") -> list[dict[str, str]]:
    """A causal-LM row as OpenAI messages (``peftkit.train.chat``)."""
    if cols.format == "messages":
        return chat.openai_messages(row[cols.messages], where)
    if cols.format == "sharegpt":
        return chat.sharegpt_messages(row[cols.messages], where)
    return chat.pair_messages(row[cols.prompt], row[cols.response], row.get(cols.extra_input or ""))


def encode_causal_lm(rows: list[dict], cols: Columns, tokenizer, max_length: int) -> list:
    """input_ids and labels (IGNORE except on the assistant's turns) of each row, through the chat template.
    A prompt / response pair with a tokenizer without a template is ``prompt\\n`` + response + eos."""
    if cols.format in (None, "pairs") and not getattr(tokenizer, "chat_template", None):
        return [_plain_pair(row, cols, tokenizer, max_length) for row in rows]
    return [
        chat.encode_conversation(conversation(row, cols, f"row {i}"), tokenizer, max_length)
        for i, row in enumerate(rows, 1)
    ]


def _plain_pair(row: dict, cols: Columns, tokenizer, max_length: int) -> dict[str, list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt = tokenizer(prompt_text(row, cols, tokenizer), add_special_tokens=True)["input_ids"]
    response = tokenizer(str(row[cols.response]), add_special_tokens=False)["input_ids"] + eos
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE] * len(prompt) + response)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row on the right; sequence labels pad with IGNORE. Packed rows
    (``peftkit.train.packing``) get position ids and a 4-D block-diagonal causal mask."""
    if "seq_lens" in examples[0]:
        return packing.collate_packed(examples, pad_id)
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
LENGTH_GROUP_BATCHES = 50  # --group-by-length sorts windows of this many global batches (as transformers' sampler)


def epoch_batches(
    n: int, batch_size: int, epoch: int, seed: int, world: int = 1, rank: int = 0, lengths: list[int] | None = None
) -> list[list[int]]:
    """This process's row indices for each step of ``epoch``: a seeded permutation cut into global batches
    of ``batch_size * world`` rows (a short last batch is dropped so every process has the same share).

    With ``lengths`` (--group-by-length), each window of 50 global batches of the permutation is sorted by length
    and the batches are then shuffled: rows of similar length share a batch (less padding), in a random order."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    step = batch_size * world
    full = n // step
    if full == 0:  # fewer rows than one global batch: use them all, one per process in turn
        return [order[rank::world]] if len(order[rank::world]) else []
    if lengths is not None:
        order = _grouped_by_length(order, lengths, step, generator)
    return [order[i * step + rank * batch_size : i * step + (rank + 1) * batch_size] for i in range(full)]


def _grouped_by_length(order: list[int], lengths: list[int], step: int, generator: torch.Generator) -> list[int]:
    window = step * LENGTH_GROUP_BATCHES
    ranked: list[int] = []
    for start in range(0, len(order), window):
        ranked += sorted(order[start : start + window], key=lambda i: -lengths[i])
    full = len(order) // step
    batches = [ranked[i * step : (i + 1) * step] for i in range(full)]
    shuffled = [batches[i] for i in torch.randperm(full, generator=generator).tolist()]
    return [i for batch in shuffled for i in batch] + ranked[full * step :]


def lengths(rows: list[dict]) -> list[int]:
    """Token counts of encoded rows (for --group-by-length)."""
    return [len(r["input_ids"]) for r in rows]


def token_count(rows: list[dict], index: list[int]) -> int:
    """Tokens in the rows of one batch, padding not counted (a packed batch's mask is 4-D: read the rows)."""
    return sum(len(rows[i]["input_ids"]) for i in index)


def eval_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
