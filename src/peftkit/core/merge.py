"""Merge, unmerge and unload over every adapter layer of a model.

Each layer merges as a composition and its exact inverse (``W + ΔW`` / ``W - ΔW``, ``W * s`` / ``W / s``),
so unmerge restores the base weights to float tolerance. Merging is always an explicit call.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from peftkit.core.inject import replace_module
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.errors import MergeError


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """(name, layer) for every adapter layer, outermost first (a wrapper before any wrapper inside it)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def merge_layers(model: nn.Module, adapter_names: Iterable[str], safe_merge: bool = False) -> None:
    """Fold ``adapter_names`` into the base weights of every layer holding them (already merged ones are skipped).

    ``safe_merge``: after each layer's merge its base tensors are checked for NaN / inf; on the first non-finite
    one every layer merged by this call gets its tensors (kept as copies: extra memory the size of the merged
    weights) and its merged list back, and MergeError is raised: the weights are left exactly as they were.
    """
    names = list(adapter_names)
    plan = []
    for path, layer in adapter_layers(model):
        todo = [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]
        if todo:
            plan.append((path, layer, todo))
    check_not_tied(model, [(path, layer) for path, layer, _ in plan if not isinstance(layer, ModulesToSave)])
    saved = [(layer, _snapshot(layer)) for _, layer, _ in plan] if safe_merge else []
    try:
        # innermost first: an outer wrapper adds to the output of the inner one (LoRA around (IA)3: l W x + s B A x),
        # so it merges into a weight that already holds the inner merge; unmerge_layers undoes it outermost first
        for path, layer, todo in reversed(plan):
            layer.merge(todo)
            if safe_merge:
                _check_finite(path, layer, todo)
    except Exception:
        for layer, state in reversed(saved):
            _restore(layer, state)
        raise


Snapshot = tuple[list[str], list[tuple[nn.Module, dict[str, nn.Parameter | None]]], list[torch.Tensor]]


def _snapshot(layer: AdapterLayer) -> Snapshot:
    """The layer's merged list, its base modules' parameter slots (a merge may add a tensor, e.g. BitFit's bias)
    and copies of their values."""
    slots = [(m, dict(m._parameters)) for m in layer.get_base_layer().modules()]
    values = [p.detach().clone() for _, params in slots for p in params.values() if p is not None]
    return list(layer.merged_adapters), slots, values


@torch.no_grad()
def _restore(layer: AdapterLayer, state: Snapshot) -> None:
    merged, slots, values = state
    layer.merged_adapters[:] = merged
    for module, params in slots:
        module._parameters.clear()
        module._parameters.update(params)
    originals = [p for _, params in slots for p in params.values() if p is not None]
    for param, value in zip(originals, values, strict=True):
        param.copy_(value)


def _check_finite(path: str, layer: AdapterLayer, todo: list[str]) -> None:
    bad = [n for n, p in layer.get_base_layer().named_parameters() if p.is_floating_point() and not p.isfinite().all()]
    if bad:
        raise MergeError(
            f"safe_merge: merging {todo} into {path!r} gives non-finite values (NaN / inf) in {bad}; nothing was "
            "merged and the weights are unchanged. Check the adapter's tensors (a diverged training run?) or merge "
            "in a wider dtype."
        )


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


def unload_layers(model: nn.Module, merged: list[str] | None = None, progressbar: bool = False) -> nn.Module:
    """Replace every adapter layer by what it wraps, innermost first.

    ``merged`` None: every adapter is removed unmerged (call unmerge_layers first). A list: the adapters merge_layers
    just merged; what is merged stays in the weights, every other adapter is dropped unmerged (a modules_to_save
    copy of the last of ``merged`` it holds replaces the module).
    """
    layers = list(reversed(adapter_layers(model)))
    for name, layer in tqdm(layers, disable=not progressbar, desc="Unloading" + (" and merging" if merged else "")):
        if merged is not None:
            layer.set_adapter([n for n in merged if n in layer.adapter_names])
        keep = merged is not None and bool(layer.active_adapters or layer.merged_adapters)
        replace_module(model, name, layer.unload(keep))
    return model
