"""Layers whose adapters are deltas on the wrapped module's own tensors: the module runs with W + ΔW.

For every own floating-point tensor W of the wrapped module (``weight``, ``bias``...) and every live adapter a
subclass gives a delta of W's shape; the module then runs through ``torch.func.functional_call`` with

    W' = W + sum_a ΔW_a        (W itself is never written; merge is W += ΔW, unmerge W -= ΔW)

so the base model stays untouched, and adapters switch, disable and route per row (``adapter_names=``) like any
other. A subclass says which adapters it holds (``held``) and what each one's delta is (``delta``).
"""

from __future__ import annotations

import warnings
from collections.abc import Container
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.layer import AdapterLayer, Routing, WrapsInPlace
from peftkit.core.targeting import base_of
from peftkit.errors import RoutingError

# Modules whose first input is not batch-first (T5's relative position buckets: (query, key)); per-row routing
# over them works only when every row uses the same adapter.
SHARED_INPUT_MODULES = ("relative_attention_bias",)


def logical(path: str) -> str:
    """A path without the wrappers' ``.base_layer`` steps: the name the user sees in the plain model."""
    return path.replace(".base_layer", "")


def own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The floating-point tensors the (innermost wrapped) module holds itself, not its children's."""
    return [(n, p) for n, p in base_of(module).named_parameters(recurse=False) if p.is_floating_point()]


class DeltaLayer(WrapsInPlace):
    """Runs the wrapped module with W + ΔW for each of its own tensors; subclasses define ``held`` and ``delta``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.shared_input = False  # the first input is not the batch (see SHARED_INPUT_MODULES)

    def set_shared_input(self, module_name: str) -> None:
        self.shared_input = logical(module_name).split(".")[-1] in SHARED_INPUT_MODULES

    def held(self) -> Container[str]:  # pragma: no cover - interface
        """The adapters this layer holds a delta for."""
        raise NotImplementedError(f"{type(self).__name__} must implement held")

    def delta(self, name: str, key: str, sample: bool = False) -> torch.Tensor:  # pragma: no cover - interface
        """ΔW of adapter ``name`` for own tensor ``key`` (W's shape); ``sample``: the training-time value where a
        method's delta is stochastic (it is the layer's ``training`` flag at forward)."""
        raise NotImplementedError(f"{type(self).__name__} must implement delta")

    def _run(self, names: list[str], args: tuple, kwargs: dict) -> Any:
        """The wrapped module with W + sum of the named adapters' ΔW (W itself is never written)."""
        prefix, weights, held = self.base_prefix(), {}, self.held()
        for key, param in own_params(self):
            deltas = [self.delta(n, key, self.training).to(param.dtype) for n in names if n in held]
            if deltas:
                weights[prefix + key] = param + sum(deltas)  # same shape as W
        return functional_call(self.base_layer, weights, args, kwargs, tie_weights=False, strict=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is not None and not self.disabled:
            return routed_forward(self, self.held(), args, kwargs)
        held = self.held()
        live = [n for n in self.live_adapters() if n in held]
        return self._run(live, args, kwargs) if live else self.base_layer(*args, **kwargs)

    # ---- merging: W <- W + ΔW, and its inverse W <- W - ΔW -----------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        for name in adapter_names:
            for key, param in own_params(self):
                param.add_(self.delta(name, key).to(param.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        for name in reversed(self.merged_adapters):
            for key, param in own_params(self):
                param.sub_(self.delta(name, key).to(param.dtype))
        self.merged_adapters.clear()


def routed_forward(layer: DeltaLayer, adapters: Container[str], args: tuple, kwargs: dict) -> Any:
    """Per-row adapters (inference): each group of rows runs the module with its adapter's weights.

    A module fed one row shared by the whole batch (BERT's and GPT-2's position ids, shape (1, T)) returns one
    row per batch row, each with its own adapter; the caller's addition broadcasts as before.
    """
    routing = layer.routing
    names = routing.names
    if not any(n in adapters for n in names):
        return layer.base_layer(*args, **kwargs)
    x = args[0] if args else None
    leaf = not any(True for _ in base_of(layer).children())
    if len(names) == 1:  # every row uses the same adapter
        return layer._run([names[0]], args, kwargs)
    if not torch.is_tensor(x) or layer.shared_input or not leaf:
        raise RoutingError(
            f"adapter_names= cannot mix adapters per row through {type(base_of(layer)).__name__}: its input is not "
            "one row per batch element. Route every row to the same adapter, or run the adapters in separate calls."
        )
    batch = routing.index.numel()
    if x.shape[0] == 1 and batch > 1:  # (1, ...) shared row -> (B, ...), row i with its adapter
        outs = [layer._run([n], args, kwargs) if n in adapters else layer.base_layer(*args, **kwargs) for n in names]
        return torch.cat(outs)[routing.index]  # (U, ...) -> (B, ...)
    try:
        groups, rows = layer.routed_groups(x.shape[0]), routing.rows(x.shape[0])
    except ValueError as err:
        raise RoutingError(f"adapter_names= cannot route {type(base_of(layer)).__name__}: {err}.") from err
    inner, module = [], layer.base_layer  # adapter wrappers inside this one (LoRA...) route the same rows
    while isinstance(module, AdapterLayer):
        inner.append(module)
        module = module.base_layer
    out = layer.base_layer(*args, **kwargs).clone()  # (B, ...)
    for name, idx in groups:
        for wrapper in inner:
            wrapper.routing = Routing(routing.names, rows[idx])
        try:
            out[idx] = layer._run([name], (x[idx], *args[1:]), kwargs).to(out.dtype)  # (G, ...)
        finally:
            for wrapper in inner:
                wrapper.routing = routing
    return out


def warn_tied(model: nn.Module, targets: list[str]) -> None:
    """Warn when a target's tensor is shared with a module outside the targets (tied embeddings): its delta acts
    only where the target itself runs, and merging (which would change both) is refused."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(logical(name.rpartition(".")[0]))  # the owning module
    roots = [logical(t) for t in targets]
    for target in targets:
        for _, param in own_params(model.get_submodule(target)):
            others = [n for n in owners[id(param)] if not any(n == r or n.startswith(r + ".") for r in roots)]
            if others:
                warnings.warn(
                    f"{logical(target)!r} shares its weight with {others[0]!r} (tied weights): the delta applies only "
                    f"where {logical(target)!r} runs, not through {others[0]!r}, and merging will be refused. "
                    "Untie the weights first, or target the module the model actually calls.",
                    UserWarning,
                    stacklevel=4,
                )
