"""`peftkit merge`: fold an adapter into its base model and save a plain transformers model folder."""

from __future__ import annotations

from pathlib import Path

import typer

from peftkit.cli.common import load_adapted, run_info
from peftkit.errors import ConfigError


def merge(
    adapter: str = typer.Argument(..., help="Adapter folder (the output of `peftkit train` or save_pretrained)."),
    output: str = typer.Argument(..., help="Folder to write the merged model and its tokenizer to."),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the one the adapter names)."),
) -> None:
    """Merge ADAPTER into its base model: OUTPUT loads with AutoModel*.from_pretrained, no peftkit needed.

    Adapters trained with --pooling mean are refused: plain transformers would read [CLS] again."""
    if run_info(Path(adapter)).get("pooling") == "mean":
        raise ConfigError(
            f"{adapter} was trained with --pooling mean, which replaces BERT's pooler with a mean over the tokens; "
            "a transformers folder would load with BERT's own [CLS] pooler and predict something else. Keep the "
            "adapter and load it with peftkit (`peftkit predict`, PeftModel.from_pretrained after "
            "use_mean_pooling)."
        )
    adapted = load_adapted(adapter, model)
    merged = adapted.model.merge_and_unload()
    Path(output).mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output)
    adapted.tokenizer.save_pretrained(output)
    typer.echo(f"merged {adapter} into {adapted.base} -> {output} ({type(merged).__name__})")
