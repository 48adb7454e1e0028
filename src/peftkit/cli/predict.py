"""`peftkit predict` and `peftkit generate`: try a trained adapter."""

from __future__ import annotations

import torch
import typer

from peftkit.cli.common import load_adapted
from peftkit.errors import ConfigError
from peftkit.train import data as D


def predict(
    adapter: str = typer.Argument(..., help="Adapter folder of a classification run."),
    text: list[str] = typer.Option(None, "--text", help="A text to classify (repeat for several)."),  # noqa: B008
    file: str | None = typer.Option(None, "--file", help="A csv/tsv/json/jsonl file of texts (and labels)."),
    text_column: str | None = typer.Option(None, "--text-column", help="Text column of --file (default: guessed)."),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the one the adapter names)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows per batch."),
) -> None:
    """Print the predicted label (and its probability) for each text; with labelled --file, the accuracy."""
    adapted = load_adapted(adapter, model)
    if adapted.task != "classification":
        raise ConfigError(f"ADAPTER {adapter!r} is a {adapted.task} adapter; use `peftkit generate` for it.")
    rows = D.read_rows(file, "--file") if file else []
    column = text_column or (D.pick_column(None, D.TEXT_COLUMNS, list(rows[0]), "text-column") if rows else None)
    texts = list(text or []) + [str(r[column]) for r in rows]
    if not texts:
        raise ConfigError("Nothing to predict: pass --text 'some text' (repeatable) or --file data.csv.")
    labels = adapted.labels or [str(i) for i in range(adapted.model.config.num_labels)]
    predicted = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = adapted.tokenizer(chunk, truncation=True, max_length=512, padding=True, return_tensors="pt")
            probs = adapted.model(**enc).logits.softmax(-1)
            for row_text, p in zip(chunk, probs):
                predicted.append(labels[int(p.argmax())])
                typer.echo(f"{predicted[-1]}\t{float(p.max()):.3f}\t{row_text}")
    gold_column = D.pick_column(None, D.LABEL_COLUMNS, list(rows[0]), "label-column") if rows else None
    if gold_column:
        gold = [D.label_key(r[gold_column]) for r in rows]  # '01' is class '1', as in training
        right = sum(p == g for p, g in zip(predicted[len(text or []) :], gold))
        typer.echo(f"accuracy {right / len(gold):.4f} on {len(gold)} rows of {file}")


def generate(
    adapter: str = typer.Argument(..., help="Adapter folder of a causal_lm run."),
    prompt: list[str] = typer.Option(..., "--prompt", help="A prompt (repeat for several)."),  # noqa: B008
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sample at this temperature."),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the one the adapter names)."),
) -> None:
    """Generate a response to each prompt, formatted as in training (the chat template where there is one)."""
    adapted = load_adapted(adapter, model)
    if adapted.task != "causal_lm":
        raise ConfigError(f"ADAPTER {adapter!r} is a {adapted.task} adapter; use `peftkit predict` for it.")
    columns = D.Columns("causal_lm", prompt="prompt", response="response")
    tok = adapted.tokenizer
    for text in prompt:
        enc = tok(D.prompt_text({"prompt": text}, columns, tok), return_tensors="pt")
        enc = {k: enc[k] for k in ("input_ids", "attention_mask")}  # decoders take no token_type_ids
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = adapted.model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling
            )
        typer.echo(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
