"""`peftkit train`: fine-tune a model with any registered method; with no arguments, the embedded demo."""

from __future__ import annotations

from typing import Any

import typer

from peftkit.cli.options import build_train_config, extend_signature, method_parameters, train_parameters


def train(
    config: str | None = typer.Option(None, "--config", "-c", help="YAML file of settings (flags override it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --output-dir."),
    demo: bool = typer.Option(False, "--demo", help="Start from the embedded demo settings (no arguments = --demo)."),
    **values: Any,
) -> None:
    """Fine-tune a model with a PEFT method; writes the adapter, metrics.json, train_config.yaml, curves.png.

    With no arguments: LoRA on the real MiniLM, 3-way tweet sentiment, offline, a few minutes on 2 CPU cores,
    printing dev accuracy before and after. Works the same under `torchrun --nproc_per_node N` (DDP).
    """
    from peftkit.train.trainer import train as run

    demo = demo or (config is None and all(v is None for v in values.values()))
    settings = build_train_config(values, config, demo)
    if demo:
        typer.echo(
            f"peftkit train: {settings.method} on {settings.model}, data {settings.data} (demo settings)", err=True
        )
    result = run(settings, resume=resume)
    if result.main_process:
        typer.echo(
            f"trainable params: {result.trainable_params:,d} of {result.total_params:,d}; "
            f"{result.steps} steps in {result.train_seconds:.1f} s; output: {result.output_dir}"
        )


extend_signature(train, train_parameters() + method_parameters())
