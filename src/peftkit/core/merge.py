"""Merge, unmerge and unload over every adapter layer of a model.

Each layer merges as a composition and its exact inverse (``W + ΔW`` / ``W - ΔW``, ``W * s`` / ``W / s``),
so unmerge restores the base weights to float tolerance. Merging is always an explicit call.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from peftkit.core.inject import replace_module
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.errors import MergeError


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """(name, layer) for every adapter layer, outermost first (a wrapper before any wrapper inside it)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def merge_layers(model: nn.Module, adapter_names: Iterable[str]) -> None:
    names = list(adapter_names)
    plan = []
    for path, layer in adapter_layers(model):
        todo = [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]
        if todo:
            plan.append((path, layer, todo))
    check_not_tied(model, [(path, layer) for path, layer, _ in plan if not isinstance(layer, ModulesToSave)])
    # innermost first: an outer wrapper adds to the output of the inner one (LoRA around (IA)3: l W x + s B A x),
    # so it merges into a weight that already holds the inner merge; unmerge_layers undoes it outermost first
    for _, layer, todo in reversed(plan):
        layer.merge(todo)


def check_not_tied(model: nn.Module, layers: list[tuple[str, AdapterLayer]]) -> None:
    """Refuse to merge into a base tensor another module shares (tied input / output embeddings): the merge
    would change that module too, so merged output would differ from unmerged output."""
    if not layers:
        return
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for path, layer in layers:
        for param in layer.get_base_layer().parameters():
            others = [n for n in owners.get(id(param), []) if not n.startswith(path + ".")]
            if others:
                raise MergeError(
                    f"Cannot merge into {path!r}: its base weight is shared with {others[0]!r} (tied weights), "
                    "so merging would change that module too. Keep the adapter unmerged, or untie the weights "
                    "first (e.g. copy the output embedding's weight into its own nn.Parameter)."
                )


def unmerge_layers(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merged_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for _, layer in adapter_layers(model) for n in layer.merged_adapters))


def unload_layers(model: nn.Module, merge: bool) -> nn.Module:
    """Replace every adapter layer by what it wraps (after merging its active adapters if ``merge``)."""
    for name, layer in reversed(adapter_layers(model)):  # innermost first
        replace_module(model, name, layer.unload(merge))
    return model
