"""`peftkit predict` and `peftkit generate`: try a trained adapter (or, with `generate --base`, the base model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
import typer

from peftkit.cli.common import base_model_ref, load_adapted, run_info
from peftkit.errors import ConfigError
from peftkit.train import data as D

DEFAULT_MAX_LENGTH = 512  # an adapter whose run did not record --max-length
OUTPUT_SUFFIXES = (".csv", ".tsv", ".jsonl")


def predict(
    adapter: str = typer.Argument(..., help="Adapter folder of a classification run."),
    text: list[str] = typer.Option(None, "--text", help="A text to classify (repeat for several)."),  # noqa: B008
    text_pair: list[str] = typer.Option(  # noqa: B008
        None, "--text-pair", help="The second text of each --text, in order (pair tasks such as MRPC, RTE)."
    ),
    file: str | None = typer.Option(None, "--file", help="A csv/tsv/json/jsonl file of texts (and labels)."),
    text_column: str | None = typer.Option(None, "--text-column", help="Text column of --file (default: guessed)."),
    text_pair_column: str | None = typer.Option(
        None, "--text-pair-column", help="Second-text column of --file (default: the run's, or guessed)."
    ),
    output: str | None = typer.Option(None, "--output", "-o", help="Write the predictions to a .csv/.tsv/.jsonl file."),
    max_length: int | None = typer.Option(
        None, "--max-length", help="Truncate to this many tokens (default: the run's)."
    ),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the one the adapter names)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows per batch."),
) -> None:
    """Print the predicted label (and its probability) for each text or pair; with labelled --file, the accuracy.

    Texts are tokenized as in training: the run's --max-length and its text / text-pair columns."""
    adapted = load_adapted(adapter, model)
    if adapted.task != "classification":
        raise ConfigError(f"ADAPTER {adapter!r} is a {adapted.task} adapter; use `peftkit generate` for it.")
    info = run_info(Path(adapter))
    rows = D.read_rows(file, "--file") if file else []
    inputs = _inputs(list(text or []), list(text_pair or []), rows, text_column, text_pair_column, info)
    if not inputs:
        raise ConfigError("Nothing to predict: pass --text 'some text' (repeatable) or --file data.csv.")
    length = max_length or info.get("max_length") or DEFAULT_MAX_LENGTH
    labels = adapted.labels or [str(i) for i in range(adapted.model.config.num_labels)]
    predicted = _classify(adapted, inputs, labels, length, batch_size)
    for (first, second), (label, p) in zip(inputs, predicted):
        typer.echo(f"{label}\t{p:.3f}\t{first}" + (f"\t{second}" if second is not None else ""))
    gold_column = (
        D.pick_column(info.get("label_column"), D.LABEL_COLUMNS, list(rows[0]), "label-column") if rows else None
    )
    gold = [D.label_key(r[gold_column]) for r in rows] if gold_column else None
    if output:
        _write_predictions(Path(output), inputs, predicted, [None] * len(text or []) + (gold or [None] * len(rows)))
        typer.echo(f"predictions: {output}", err=True)
    if gold:
        right = sum(p == g for (p, _), g in zip(predicted[len(text or []) :], gold))  # '01' is class '1'
        typer.echo(f"accuracy {right / len(gold):.4f} on {len(gold)} rows of {file}")


def _inputs(
    texts: list[str], pairs: list[str], rows: list[dict], column: str | None, pair_column: str | None, info: dict
) -> list[tuple[str, str | None]]:
    """(text, second text or None) for each --text and each row of --file."""
    if pairs and len(pairs) != len(texts):
        raise ConfigError(f"--text-pair was given {len(pairs)} times for {len(texts)} --text; give one per --text.")
    out = [(t, pairs[i] if pairs else None) for i, t in enumerate(texts)]
    if rows:
        names = list(rows[0])
        first = D.pick_column(column or _known(info.get("text_column"), names), D.TEXT_COLUMNS, names, "text-column")
        if first is None:
            raise ConfigError(f"--file has no text column among {names}; name it with --text-column.")
        second = D.pick_column(
            pair_column or _known(info.get("text_pair_column"), names), D.PAIR_COLUMNS, names, "text-pair-column"
        )
        out += [(str(r[first]), str(r[second]) if second else None) for r in rows]
    return out


def _known(name: str | None, columns: list[str]) -> str | None:
    return name if name and name.lower() in {c.lower() for c in columns} else None


@torch.no_grad()
def _classify(adapted: Any, inputs: list, labels: list[str], max_length: int, batch_size: int) -> list:
    """(label, probability) per input, tokenized as `peftkit train` does (pairs together, truncated to max_length)."""
    out = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        firsts, seconds = [a for a, _ in chunk], [b for _, b in chunk]
        pair = seconds if any(b is not None for b in seconds) else None
        if pair is not None:
            pair = [b or "" for b in pair]
        enc = adapted.tokenizer(firsts, pair, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        probs = adapted.model(**enc).logits.softmax(-1)
        out += [(labels[int(p.argmax())], float(p.max())) for p in probs]
    return out


def _write_predictions(path: Path, inputs: list, predicted: list, gold: list) -> None:
    """The predictions file: text, text_pair (for pairs), prediction, probability, label (when --file has one)."""
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--output {str(path)!r}: write a {', '.join(OUTPUT_SUFFIXES)} file.")
    records = []
    for (first, second), (label, p), g in zip(inputs, predicted, gold):
        record = {"text": first, **({"text_pair": second} if any(b is not None for _, b in inputs) else {})}
        record.update(prediction=label, probability=round(p, 6), **({"label": g} if any(gold) else {}))
        records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(records)


def generate(
    adapter: str | None = typer.Argument(None, help="Adapter folder of a causal_lm run (optional with --base)."),
    prompt: list[str] = typer.Option(..., "--prompt", help="A prompt (repeat for several: one batch)."),  # noqa: B008
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sample at this temperature."),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the one the adapter names)."),
    base: bool = typer.Option(False, "--base", help="The base model alone, without the adapter (to compare)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts generated together (left-padded)."),
) -> None:
    """Generate a response to each prompt, formatted as in training (the chat template where there is one).

    Several prompts are generated in batches; each output then follows a '=== [n] prompt' line."""
    from peftkit.train.generation_eval import generate as run

    lm, tok = _causal_lm(adapter, model, base)
    texts = [
        tok(D.prompt_text({"prompt": p}, D.Columns("causal_lm", prompt="prompt"), tok))["input_ids"] for p in prompt
    ]
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    outputs: list[str] = []
    for start in range(0, len(texts), batch_size):
        outputs += run(lm, tok, texts[start : start + batch_size], max_new_tokens, **sampling)
    if len(prompt) == 1:
        typer.echo(outputs[0])
        return
    for i, (question, answer) in enumerate(zip(prompt, outputs), 1):
        typer.echo(f"=== [{i}] {question}\n{answer}\n")


def _causal_lm(adapter: str | None, model: str | None, base: bool) -> tuple[Any, Any]:
    """(model, tokenizer): the adapter on its base, or with ``base`` the base model alone."""
    if not base:
        if adapter is None:
            raise ConfigError("ADAPTER is missing: pass an adapter folder, or --base --model smollm2 for a base model.")
        adapted = load_adapted(adapter, model)
        if adapted.task != "causal_lm":
            raise ConfigError(f"ADAPTER {adapter!r} is a {adapted.task} adapter; use `peftkit predict` for it.")
        return adapted.model, adapted.tokenizer
    from peftkit.train.models import load_model, load_tokenizer

    if adapter is None and model is None:
        raise ConfigError("--base needs --model (such as smollm2) or an ADAPTER folder whose base model to use.")
    ref = model or base_model_ref(Path(adapter), None)
    return load_model(ref, "causal_lm").eval(), load_tokenizer(ref)
