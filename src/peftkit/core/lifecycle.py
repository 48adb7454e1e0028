"""A PeftModel's life around its base model: wrapping (refuse a model that already holds adapters, remember its
requires_grad flags), the adapters' dtype, merging (never twice; ``safe_merge``), switching while merged, and
handing the base model back with its flags. :class:`peftkit.PeftModel` calls these; they follow Hugging Face peft.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core.compose import Composition
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.merge import adapter_layers, merge_layers, merged_names, unmerge_layers
from peftkit.core.registry import method_of
from peftkit.errors import ConfigError, MergeError, choices

if TYPE_CHECKING:
    from peftkit.core.config import PeftConfig
    from peftkit.core.method import AdapterHost
    from peftkit.core.model import PeftModel

LOW_PRECISION = {torch.float16, torch.bfloat16}  # what peft's autocast_adapter_dtype upcasts to float32


# ---- wrapping --------------------------------------------------------------------------------------------------
class TunerModel(nn.Module):
    """Holds the user's model at ``.model`` so parameter names read ``base_model.model.<path>`` as in peft; like
    peft's tuner it answers ``peft_config`` and ``active_adapter(s)`` (the PeftModel keeps them here)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_names: list[str] = []

    @property
    def active_adapters(self) -> list[str]:
        return list(self.active_names)

    @property
    def active_adapter(self) -> str | list[str]:
        """As peft's tuner: the name when one adapter is active, else the list of names."""
        return self.active_names[0] if len(self.active_names) == 1 else list(self.active_names)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def with_revision(config: PeftConfig, revision: str | None) -> PeftConfig:
    """get_peft_model(revision=...): the base model's revision, recorded in (a copy of) the config as peft does."""
    if revision is None:
        return config
    if config.revision not in (None, revision):
        warnings.warn(f"peft_config.revision {config.revision!r} is replaced by revision={revision!r}.", stacklevel=3)
    return config.replace(revision=revision)


def _holds_adapter(module: nn.Module) -> bool:
    """A peftkit adapter layer, or Hugging Face peft's (its layers derive from ``BaseTunerLayer``)."""
    return isinstance(module, AdapterLayer) or any(c.__name__ == "BaseTunerLayer" for c in type(module).__mro__)


def refuse_wrapped(model: nn.Module) -> None:
    """Refuse a PeftModel, or a base model another PeftModel already wraps (its modules hold adapter layers), before
    anything is touched: wrapping it again would re-initialise the existing adapters, and a failed load would strip
    them off the model (unload removes every adapter layer it finds)."""
    found = next((path for path, module in model.named_modules() if _holds_adapter(module)), None)
    if found is None:
        return
    loaded = getattr(model, "peft_config", None)
    what = f"a PeftModel (adapters {choices(loaded)})" if isinstance(loaded, dict) else "a model"
    raise ConfigError(
        f"Cannot wrap {what} that already holds adapter layers (e.g. at {found!r}): a PeftModel wraps it "
        "(a notebook cell run twice?), and wrapping it again would re-initialise or remove its adapters. Use the "
        "existing PeftModel's add_adapter() / load_adapter() to add an adapter, or reload the base model."
    )


def grad_flags(model: nn.Module) -> dict[str, bool]:
    """requires_grad of every parameter by name, taken before wrapping (restored by :func:`restore_grad_flags`)."""
    return {name: p.requires_grad for name, p in model.named_parameters()}


def restore_grad_flags(model: nn.Module, flags: dict[str, bool]) -> nn.Module:
    """Give the parameters named in ``flags`` their flag back (after unload: the model as it was handed in)."""
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    return model


def _base_dtype(layer: AdapterLayer) -> torch.dtype | None:
    """The floating dtype of the module the layer wraps (its weight's, else its first floating tensor's)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    tensors = [weight] if isinstance(weight, torch.Tensor) else list(base.parameters())
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


@torch.no_grad()
def cast_adapter(model: nn.Module, adapter_name: str, autocast: bool) -> None:
    """peft's ``autocast_adapter_dtype``: with it (the default) adapter tensors in float16 / bfloat16 become float32,
    so a low-precision base trains its adapter in full precision; without it they take the wrapped module's dtype.
    modules_to_save copies keep the module's own dtype in both cases, as in peft."""
    for _, layer in adapter_layers(model):
        if isinstance(layer, ModulesToSave) or adapter_name not in layer.adapter_names:
            continue
        target = torch.float32 if autocast else _base_dtype(layer)
        for p in layer.adapter_parameters(adapter_name):
            if target is not None and p.is_floating_point() and (p.dtype in LOW_PRECISION or not autocast):
                p.data = p.data.to(target)


# ---- names -----------------------------------------------------------------------------------------------------
def name_list(value: object, argument: str) -> list[str]:
    """A list of adapter names given as ``argument``; a bare str is refused (never iterated as letters), as peft's
    TypeError does."""
    if isinstance(value, str):
        raise TypeError(f"{argument} must be a list of adapter names, got the str {value!r}; write [{value!r}].")
    names = list(value) if isinstance(value, Iterable) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{argument} must be a list of adapter names (str), got {value!r}.")
    return names


def single_name(value: object, function: str, loaded: Iterable[str]) -> str:
    """One adapter name (a str), for functions that take exactly one."""
    if not isinstance(value, str):
        raise TypeError(
            f"{function}() takes one adapter name (a str), got {value!r}; call it once per adapter. "
            f"Loaded adapters: {choices(loaded) or '(none)'}."
        )
    return value


def selection(host: AdapterHost, value: object) -> tuple[list[str], Composition | None]:
    """set_adapter's argument (a name, a list of names or a composition block; never None) -> the adapter names and
    the composition, each name checked to be loaded and a layer-level block checked to run on every layer."""
    if value is None:
        raise TypeError(
            f"set_adapter() takes an adapter name, a list of names or a composition block, got None. Loaded adapters: "
            f"{choices(host.peft_config) or '(none)'}. To run the base model use `with model.disable_adapter():`."
        )
    composition = value if isinstance(value, Composition) else None
    if composition is not None:
        names = composition.adapters()
    else:
        names = [value] if isinstance(value, str) else name_list(value, "set_adapter()")
    for name in names:
        host.check_exists(name)
    if composition is not None and composition.layer_level:
        check_composable(host.model, composition)
    return names, composition


def check_composable(model: nn.Module, composition: Composition) -> None:
    names = set(composition.adapters())
    for path, layer in adapter_layers(model):
        if names & set(layer.adapter_names) and not getattr(layer, "composable", False):
            raise ConfigError(
                f"{composition!r} cannot run: the layer at {path!r} ({type(layer).__name__}) does not support "
                "composition blocks. Use set_adapter([...]) to add the adapters' effects, or Parallel(...)."
            )


# ---- disabling -------------------------------------------------------------------------------------------------
@contextmanager
def adapters_off(host: PeftModel) -> Iterator[None]:
    """PeftModel.disable_adapter: the base model's output inside the block. A depth count on the model, which every
    layer's ``disabled`` follows (``_refresh``), so blocks nest (adapters come back when the outermost one ends) and
    an adapter added inside a block is off there too. Merged adapters are unmerged at the outermost block and merged
    again when it ends (those still active then)."""
    if host._disable_depth == 0:
        host._remerge = merged_names(host.model)
        unmerge_layers(host.model)
    host._disable_depth += 1
    host._refresh()
    try:
        yield
    finally:
        host._disable_depth -= 1
        host._refresh()
        if host._disable_depth == 0 and host._remerge:
            merge_layers(host.model, host._remerge)


# ---- merging ---------------------------------------------------------------------------------------------------
def merge_names(host: AdapterHost, adapter_names: object) -> list[str]:
    """The adapters a merge call names (default: the active ones), each loaded and of a method that can merge."""
    names = name_list(adapter_names, "adapter_names") if adapter_names is not None else host.active_adapters
    for name in names:
        host.check_exists(name)
        method = method_of(host.peft_config[name])
        if not method.can_merge:
            raise MergeError(
                f"Adapter {name!r} ({method.name}) cannot be merged into the base weights: {method.merge_hint} "
                "Keep it unmerged (or use unload() to remove it)."
            )
    return names


def merge(model: nn.Module, names: list[str], safe_merge: bool) -> None:
    """Merge ``names`` (see :func:`peftkit.core.merge.merge_layers`); one already merged is skipped with a
    warning, as in peft: merging it again would add its update ΔW to the weights a second time."""
    already = [n for n in names if n in merged_names(model)]
    if already:
        rest = [n for n in names if n not in already]
        tail = f"merging only {choices(rest)}." if rest else "nothing to do."
        warnings.warn(f"Adapters {choices(already)} are already merged; {tail}", UserWarning, stacklevel=3)
    merge_layers(model, names, safe_merge=safe_merge)


def unmerge_stale(model: nn.Module, names: list[str]) -> None:
    """Before switching to ``names``: merged adapters that will not be active would stay in the weights, so every
    adapter is unmerged first, with a warning (peft: "Unmerging the model first")."""
    stale = [n for n in merged_names(model) if n not in names]
    if stale:
        warnings.warn(
            f"Adapters {choices(stale)} are merged into the weights and will not be active: unmerging every adapter "
            "before switching (merge_adapter() again after set_adapter() to run merged).",
            UserWarning,
            stacklevel=3,
        )
        unmerge_layers(model)
