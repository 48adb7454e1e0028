"""Wrap, replace and restore modules, as one transaction: a failed injection leaves the model as it was."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from peftkit.core.config import TASK_HEADS, PeftConfig
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.targeting import iter_free_modules, no_match_message
from peftkit.errors import TargetNotFoundError

LayerFactory = Callable[[nn.Module], type[AdapterLayer] | None]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``name`` is in ``model``; return what was there."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


class Injection:
    """Attach one adapter to many modules; on any exception, undo everything done so far.

    with Injection(model, "default") as inj:
        for name in targets:
            inj.wrap(name, LoraLinear, config)
    """

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self._wrapped: list[tuple[str, nn.Module]] = []  # (name, original module)
        self._updated: list[AdapterLayer] = []

    def __enter__(self) -> Injection:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False

    def wrap(self, name: str, layer_class: type[AdapterLayer], config: PeftConfig) -> AdapterLayer:
        """Add the adapter to the module at ``name``: into its existing wrapper of this class, or a new one."""
        module = self.model.get_submodule(name)
        if isinstance(module, layer_class):
            self._updated.append(module)
            module.update_layer(self.adapter_name, config, name)
            return module
        layer = layer_class(module)
        layer.update_layer(self.adapter_name, config, name)
        self._wrapped.append((name, replace_module(self.model, name, layer)))
        return layer

    def rollback(self) -> None:
        for layer in self._updated:
            layer.delete_adapter(self.adapter_name)
        for name, original in reversed(self._wrapped):
            replace_module(self.model, name, original)
        self._wrapped.clear()
        self._updated.clear()


def own_layer_path(model: nn.Module, name: str, layer_class: type[AdapterLayer]) -> str:
    """The path of the ``layer_class`` layer already inside ``name``'s wrappers (another method may have wrapped it
    since), so a module holds one layer per method, whose merge and unmerge see all its adapters; else ``name``."""
    module, path = model.get_submodule(name), name
    while isinstance(module, AdapterLayer):
        if isinstance(module, layer_class):
            return path
        module, path = module.base_layer, f"{path}.base_layer"
    return name


def inject_layers(
    model: nn.Module, config: PeftConfig, adapter_name: str, targets: list[str], dispatch: LayerFactory
) -> None:
    """Wrap every target with the layer class ``dispatch`` picks for it (first match wins), plus the
    config's modules_to_save, as one transaction."""
    with Injection(model, adapter_name) as inj:
        for name in targets:
            module = model.get_submodule(name)
            base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
            layer_class = dispatch(base)
            if layer_class is None:  # find_targets filtered by support; this guards custom dispatchers
                raise TargetNotFoundError(
                    f"No {type(config).__name__} layer can wrap {name!r} ({type(base).__name__})."
                )
            inj.wrap(name, layer_class, config)
        add_modules_to_save(model, config, inj)


def modules_to_save_names(config: PeftConfig) -> tuple[list[str], bool]:
    """The config's modules_to_save plus the task head names; and whether the user asked for any."""
    user = list(config.modules_to_save or [])
    heads = [h for h in TASK_HEADS.get(config.task_type or "", ()) if h not in user]
    return user + heads, bool(user)


def add_modules_to_save(model: nn.Module, config: PeftConfig, inj: Injection) -> None:
    """Give each module named in modules_to_save (or the task's head) a trainable copy for this adapter.

    Like peft, names that match nothing are tolerated (a SEQ_CLS model has a 'classifier' or a 'score',
    not both), unless none of the user-given names matches anything.
    """
    names, user_given = modules_to_save_names(config)
    if not names:
        return
    found = [
        n
        for n, m in iter_free_modules(model)
        if _named(n, names) and (not isinstance(m, AdapterLayer) or isinstance(m, ModulesToSave))
    ]
    if not found and user_given:
        raise TargetNotFoundError(no_match_message(model, config.modules_to_save, "modules_to_save", lambda m: True))
    for name in found:
        inj.wrap(name, ModulesToSave, config)


def _named(name: str, keys: list[str]) -> bool:
    return any(re.fullmatch(rf"(.*\.)?{re.escape(key)}", name) for key in keys)


def trainable_biases(model: nn.Module, every: bool, layer_class: type[AdapterLayer]) -> dict[str, nn.Parameter]:
    """The base biases a method trains and saves beside its adapters (peft's ``bias="all"`` / ``"<method>_only"``):
    every leaf module's bias (``every``), or only those of the modules ``layer_class`` wraps; named as peft saves
    them (``<module>.base_layer.bias`` for a wrapped module). A ModulesToSave copy holds (and saves) its own bias."""
    out: dict[str, nn.Parameter] = {}
    for name, module in iter_free_modules(model):
        wrapped = isinstance(module, AdapterLayer)
        if isinstance(module, ModulesToSave) or (wrapped and not every and not isinstance(module, layer_class)):
            continue
        if not wrapped and (not every or any(True for _ in module.children())):
            continue
        path = name
        while isinstance(module, AdapterLayer):
            module, path = module.base_layer, f"{path}.base_layer"
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            out[f"{path}.bias"] = module.bias
    return out
