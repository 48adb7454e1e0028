"""`peftkit merge`: fold an adapter into its base model and save a plain transformers model folder."""

from __future__ import annotations

from pathlib import Path

import typer

from peftkit.cli.common import base_model_ref, load_adapted, run_info
from peftkit.core.config import CONFIG_NAME
from peftkit.errors import CheckpointError, ConfigError
from peftkit.integrations import kbit
from peftkit.train.output_dir import writable_dir


def merge(
    adapter: str = typer.Argument(..., help="Adapter folder (the output of `peftkit train` or save_pretrained)."),
    output: str = typer.Argument(..., help="Folder to write the merged model and its tokenizer to."),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the one the adapter names)."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="bf16|fp16|fp32: merge in fp32 into the (dequantized) base weights, save in this dtype."
    ),
) -> None:
    """Merge ADAPTER into its base model: OUTPUT loads with AutoModel*.from_pretrained, no peftkit needed.

    OUTPUT may not be the base model's folder or the adapter's, nor lie inside either. Adapters trained with
    --pooling mean are refused: plain transformers would read [CLS] again."""
    if run_info(Path(adapter)).get("pooling") == "mean":
        raise ConfigError(
            f"{adapter} was trained with --pooling mean, which replaces BERT's pooler with a mean over the tokens; "
            "a transformers folder would load with BERT's own [CLS] pooler and predict something else. Keep the "
            "adapter and load it with peftkit (`peftkit predict`, PeftModel.from_pretrained after "
            "use_mean_pooling)."
        )
    check_output_apart(Path(adapter), model, Path(output))
    writable_dir(output, "OUTPUT")
    adapted = load_adapted(adapter, model)
    if dtype:  # an adapter trained with --quantize merges into dequant(Q(W)), the weights it saw
        merged = kbit.export_merged(adapted.model, dtype, kbit.recorded_quantization(adapter))
    else:
        merged = adapted.model.merge_and_unload()
    merged.save_pretrained(output)
    adapted.tokenizer.save_pretrained(output)
    typer.echo(f"merged {adapter} into {adapted.base} -> {output} ({type(merged).__name__})")


def check_output_apart(adapter: Path, model: str | None, output: Path) -> None:
    """Refuse an OUTPUT that is, or lies inside, the adapter's folder or the base model's folder: the merged
    model's files would overwrite or mix with the inputs."""
    from peftkit.train.models import resolve_model

    if not (adapter / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"ADAPTER {str(adapter)!r} holds no {CONFIG_NAME}; pass the output folder of `peftkit train` "
            "or any folder written by save_pretrained."
        )
    inputs = {"the adapter's folder": adapter, "the base model's folder": resolve_model(base_model_ref(adapter, model))}
    target = output.resolve()
    for what, folder in inputs.items():
        if target.is_relative_to(folder.resolve()):
            raise ConfigError(
                f"OUTPUT {str(output)!r} would overwrite {what} ({folder}) or write inside it; "
                "pick a new folder outside both the adapter and the base model."
            )
