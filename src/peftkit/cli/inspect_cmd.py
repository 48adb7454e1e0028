"""`peftkit inspect`: what a method would change in a model, or what an adapter checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from torch import nn

from peftkit.cli.common import adapter_folders, run_info
from peftkit.cli.options import extend_signature, method_args_from_flags, method_parameters
from peftkit.core import io
from peftkit.core.config import PeftConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.merge import adapter_layers
from peftkit.errors import ConfigError, choices

TASKS = ("auto", "classification", "causal_lm")


def inspect(
    target: str = typer.Argument(..., help="A model (folder, 'minilm', 'smollm2') or an adapter folder."),
    method: str = typer.Option("lora", "--method", help="Method whose targets to show (on a model)."),
    task: str = typer.Option("auto", "--task", help=f"Head to load the model with: {', '.join(TASKS)}."),
    depth: int | None = typer.Option(None, "--depth", help="Show the module tree down to this depth only."),
    **values: Any,
) -> None:
    """Show the module tree with what --method (and its flags) would target and the parameter counts;
    for an adapter folder, list its adapters, their method, tensors and sizes."""
    folders = adapter_folders(target) if Path(target).is_dir() else {}
    if folders:
        _show_checkpoint(folders)
        return
    if task not in TASKS:
        raise ConfigError(f"--task {task!r} is not a task; use one of {choices(TASKS)}.")
    _show_model(target, method, task, depth, method_args_from_flags(method, values))


def _show_checkpoint(folders: dict[str, Path]) -> None:
    for name, folder in folders.items():
        config = PeftConfig.read_dict(folder)
        tensors = io.load_tensors(folder)  # keys as stored (peft's names)
        size = (folder / io.WEIGHTS_NAME).stat().st_size
        typer.echo(
            f"adapter {name!r}: {config.get('peft_type')} task_type={config.get('task_type')} "
            f"base={config.get('base_model_name_or_path')} ({folder})"
        )
        pooling = run_info(folder).get("pooling", "default")
        if pooling != "default":
            typer.echo(f"  trained with --pooling {pooling} (train_config.yaml): load it with the same head")
        typer.echo(f"  {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,d} values, {size:,d} bytes")
        for key, tensor in tensors.items():
            typer.echo(f"    {key} {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}")


def _load_for_inspect(target: str, task: str) -> nn.Module:
    from peftkit.train.models import load_model, resolve_model

    if task == "auto":
        import json

        arch = json.loads((resolve_model(target) / "config.json").read_text()).get("architectures") or []
        task = "causal_lm" if any("CausalLM" in a for a in arch) else "classification"
    return load_model(target, task), task


def _show_model(target: str, method: str, task: str, depth: int | None, args: dict[str, Any]) -> None:
    from peftkit.core.model import get_peft_model
    from peftkit.train.models import TASK_TYPES
    from peftkit.train.setup import build_method_config

    model, task = _load_for_inspect(target, task)
    total = sum(p.numel() for p in model.parameters())
    config = build_method_config(method, args, TASK_TYPES[task], target)
    peft_model = get_peft_model(model, config)
    wrapped = {name: type(layer).__name__ for name, layer in adapter_layers(peft_model.model)}
    trainable_by_module: dict[str, int] = {}
    for name, p in peft_model.model.named_parameters():
        if p.requires_grad:
            owner = next((w for w in wrapped if name.startswith(w + ".")), name.rsplit(".", 1)[0])
            trainable_by_module[owner] = trainable_by_module.get(owner, 0) + p.numel()
    typer.echo(f"{type(model).__name__} ({target}), task {task}: {total:,d} parameters")
    _print_tree(peft_model.model, wrapped, trainable_by_module, depth)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    targets = [n for n, kind in wrapped.items() if kind != "ModulesToSave"]
    typer.echo(f"\n{method} targets {len(targets)} modules: {', '.join(targets) or '(none: it selects parameters)'}")
    saved = [n for n, kind in wrapped.items() if kind == "ModulesToSave"]
    if saved:
        typer.echo(f"trainable copies (modules_to_save): {', '.join(saved)}")
    typer.echo(
        f"trainable params: {trainable:,d} of {total + trainable:,d} ({100 * trainable / total:.4f}% of the base)"
    )


def _print_tree(model: nn.Module, wrapped: dict[str, str], trainable: dict[str, int], depth: int | None) -> None:
    def walk(module: nn.Module, prefix: str, level: int) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            base = child.base_layer if isinstance(child, AdapterLayer) else child
            count = sum(p.numel() for p in base.parameters())
            mark = f"  <- {wrapped[name]}" if name in wrapped else ""
            extra = f", {trainable[name]:,d} trainable" if name in trainable else ""
            descend = not isinstance(child, AdapterLayer) and (depth is None or level + 1 < depth)
            inside = sum(n.startswith(name + ".") for n in wrapped)
            if inside and not descend and not isinstance(child, AdapterLayer):
                mark = f"  ({inside} adapted modules inside)"
            typer.echo(f"{'  ' * level}{child_name} ({type(base).__name__}, {count:,d}{extra}){mark}")
            if descend:
                walk(child, name, level + 1)

    walk(model, "", 0)


extend_signature(inspect, method_parameters())
