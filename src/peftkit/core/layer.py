"""AdapterLayer: a module that wraps ``base_layer`` and keeps one set of parameters per adapter name.

Every "wrap" method's layers derive from it (LoRA, (IA)3, bottleneck adapters...), and so does
:class:`ModulesToSave`. The core finds adapters by ``isinstance(m, AdapterLayer)``; it never searches
parameter names for a substring. A layer lists its own adapter containers in ``adapter_param_names``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.errors import MergeError, RoutingError

BASE = "__base__"  # per-row adapter name meaning "no adapter"

# What third-party code reads from an adapted layer as from the module it wraps (peft's tuner layers answer these too).
DELEGATED = frozenset(
    {"weight", "bias", "in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
     "padding", "dilation", "groups", "num_embeddings", "embedding_dim", "padding_idx", "nx", "nf"}
)  # fmt: skip


# Parameters and submodules registered anywhere in this process (a new adapter, a replaced factor, a reload): a layer's
# cache of its own tensors is current while this count and those tensors' version counters are unchanged. Not counted:
# modules put in a ModuleList or Sequential, which models build on each forward by slicing (``self.layers[:n]``); a
# layer put there is a new object with its own caches.
_REGISTRATIONS = [0]


def _count_parameter(*_: Any) -> None:
    _REGISTRATIONS[0] += 1


def _count_module(parent: nn.Module, *_: Any) -> None:
    if not isinstance(parent, (nn.ModuleList, nn.Sequential)):
        _REGISTRATIONS[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_count_parameter)
nn.modules.module.register_module_module_registration_hook(_count_module)


def registrations() -> int:
    """How many parameters and submodules have been registered in this process so far (grows only)."""
    return _REGISTRATIONS[0]


_FIXED: ContextVar[bool] = ContextVar("peftkit_fixed_weights", default=False)


@contextmanager
def fixed_weights() -> Iterator[None]:
    """A promise by the caller (a server between adapter loads): no adapter tensor changes in place inside. Caches of
    tensors derived from them (per-row LoRA's factor stacks) then skip reading every tensor's version counter on each
    call, which at 32 adapters costs tens of microseconds a layer in cache misses; new or replaced parameters are
    still noticed (``registrations``)."""
    token = _FIXED.set(True)
    try:
        yield
    finally:
        _FIXED.reset(token)


def weights_fixed() -> bool:
    return _FIXED.get()


@dataclass(frozen=True)
class Routing:
    """Per-row adapters for one forward pass: row i uses ``names[index[i]]`` (``BASE`` = none).

    ``repeats`` marks a generate call, where beam search and ``num_return_sequences`` repeat each row k times.
    """

    names: tuple[str, ...]
    index: torch.Tensor  # (B,) long
    repeats: bool = False

    def rows(self, batch: int) -> torch.Tensor:
        """The index for a batch of ``batch`` rows; only a generate call may repeat each row k times."""
        n = self.index.numel()
        if batch == n:
            return self.index
        if self.repeats and batch % n == 0:
            return self.index.repeat_interleave(batch // n)
        raise RoutingError(
            f"per-row adapter_names has {n} entries but a layer saw a batch of {batch} rows; give one name per row "
            "of the batch the model runs (pass the batch as input_ids=, inputs_embeds=... so it can be checked)."
        )


# The per-row routing of the call in progress, per thread / asyncio task: concurrent calls never see each other's.
_ROUTING: ContextVar[Routing | None] = ContextVar("peftkit_routing", default=None)
# Layer-specific routings set inside that call (an enclosing layer routing a subset of rows through inner ones).
_LAYER_ROUTING: ContextVar[dict[nn.Module, Routing | None]] = ContextVar("peftkit_layer_routing", default={})  # noqa: B039


@contextmanager
def routed(routing: Routing | None) -> Iterator[None]:
    """Run the calls inside with this per-row routing (None: none), visible only to the current thread / task."""
    token, layer_token = _ROUTING.set(routing), _LAYER_ROUTING.set({})
    try:
        yield
    finally:
        _LAYER_ROUTING.reset(layer_token)
        _ROUTING.reset(token)


class AdapterLayer(nn.Module):
    """Base of every adapter wrapper. Subclasses set ``adapter_param_names`` and implement
    ``update_layer`` and ``forward``; merging methods also implement ``merge`` / ``unmerge``."""

    # Attributes (ModuleDict / ParameterDict keyed by adapter name) holding this layer's adapter tensors.
    adapter_param_names: ClassVar[tuple[str, ...]] = ()
    # Other per-adapter dict attributes (dropout modules, scalings) to clean up on delete.
    adapter_other_names: ClassVar[tuple[str, ...]] = ()
    # adapter_state_dict keys that name model-level tensors: saved without the module path or peft's
    # "base_model.model." prefix (peft's prompt learning writes its prompt table as 'prompt_embeddings').
    root_state_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in DELEGATED:
                raise
            return getattr(self.base_layer, name)  # ``weight``, ``in_features``...: the wrapped module's

    # ---- peft's tuner-layer state, read by third-party code -----------------------------------------------
    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weights."""
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        """Whether the adapters are switched off (``PeftModel.disable_adapter()``), as peft's layers report it."""
        return self.disabled

    # ---- per-row routing (see ``routed``) -----------------------------------------------------------------
    @property
    def routing(self) -> Routing | None:
        """The per-row routing of the call in progress in this thread / task, or None."""
        own = _LAYER_ROUTING.get()
        routing = own[self] if self in own else _ROUTING.get()
        if routing is not None and self.merged_adapters:
            raise RoutingError("adapter_names= cannot route while adapters are merged; call unmerge_adapter() first.")
        return routing

    @routing.setter
    def routing(self, value: Routing | None) -> None:
        """Route this layer alone, until the enclosing ``routed`` call ends (this thread / task only)."""
        _LAYER_ROUTING.set({**_LAYER_ROUTING.get(), self: value})

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: Any, module_name: str) -> None:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement update_layer")

    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_param_names:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    def base_prefix(self) -> str:
        """The ``base_layer.`` steps from this wrapper's ``base_layer`` to the innermost wrapped module (whose tensors
        ``torch.func.functional_call`` on ``base_layer`` then names ``<prefix><param>``)."""
        module, prefix = self.base_layer, ""
        while isinstance(module, AdapterLayer):
            module, prefix = module.base_layer, prefix + "base_layer."
        return prefix

    def set_adapter(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        params = []
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            params.extend([item] if isinstance(item, nn.Parameter) else item.parameters())
        return params

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise MergeError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        for attr in (*self.adapter_param_names, *self.adapter_other_names):
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # ---- state dict (relative keys, no adapter name: the checkpoint layout) ---------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                out[attr] = item
            else:
                out.update({f"{attr}.{k}": v for k, v in item.state_dict(keep_vars=True).items()})
        return out

    def file_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """What save_pretrained writes for this adapter (relative keys). By default its live tensors; a method
        whose checkpoint layout differs from its training layout (diff pruning's sparse delta) converts here."""
        return self.adapter_state_dict(adapter_name)

    def load_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This layer's checkpoint tensors (relative keys, as ``file_state_dict`` wrote them) -> tensors that fit
        ``adapter_state_dict`` (keys and shapes), which the loader then checks and copies. By default unchanged."""
        return tensors

    # ---- merging ----------------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str]) -> None:
        raise MergeError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge(self) -> None:
        if self.merged_adapters:
            raise MergeError(f"{type(self).__name__} cannot unmerge.")

    def unload(self, merge: bool) -> nn.Module:
        """The module that replaces this wrapper when adapters are removed (merged in first if ``merge``)."""
        if merge:
            self.merge([n for n in self.active_adapters if n not in self.merged_adapters])
        else:
            self.unmerge()
        return self.base_layer

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A regulariser the training loop adds to the task loss (e.g. diff pruning's L0 penalty), or None."""
        return None

    # ---- forward helpers ----------------------------------------------------------------------------------
    def live_adapters(self) -> list[str]:
        """Active adapters whose effect is not already in the base weights."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def routed_groups(self, batch: int) -> list[tuple[str, torch.Tensor]]:
        """(adapter name, row indices) for each adapter present in the per-row routing, BASE excluded."""
        routing = self.routing
        if routing is None:
            return []
        rows = routing.rows(batch)
        groups = []
        for k, name in enumerate(routing.names):
            if name == BASE or name not in self.adapter_names:
                continue
            idx = (rows == k).nonzero(as_tuple=True)[0]
            if idx.numel():
                groups.append((name, idx))
        return groups


class AdditiveLayer(AdapterLayer):
    """Adapters that add a branch to the wrapped module's output, h = base(x) + sum_a branch_a(x), and fold into its
    weight as W + ΔW_a (merge) and the exact inverse W - ΔW_a (unmerge). Subclasses give ``branch`` and
    ``delta_weight`` (and ``skips`` for adapters to leave out of a call, e.g. module dropout while training)."""

    def branch(self, name: str, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Adapter ``name``'s term for input ``x``, in the output's shape."""
        raise NotImplementedError(f"{type(self).__name__} must implement branch")

    def delta_weight(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        """Adapter ``name``'s ΔW in the base weight's shape."""
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight")

    def skips(self, name: str) -> bool:
        """Whether adapter ``name`` sits this (unrouted) call out."""
        return False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (B, ..., out)
        if self.routing is not None and not self.disabled:
            groups = self.routed_groups(x.shape[0])
            if groups:
                result = result.clone()
            for name, rows in groups:
                result[rows] = result[rows] + self.branch(name, x[rows]).to(result.dtype)
            return result
        for name in self.live_adapters():
            if not self.skips(name):
                result = result + self.branch(name, x).to(result.dtype)
        return result

    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        weight = self.get_base_layer().weight
        for name in adapter_names:
            weight.add_(self.delta_weight(name).to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            weight.sub_(self.delta_weight(self.merged_adapters.pop()).to(weight.dtype))


class WrapsInPlace(AdapterLayer):
    """An adapter layer that stands in for the module it wraps: attributes it does not have itself (``weight``,
    ``bias``, sizes such as ``in_features``) are read from the wrapped module, since model code reads them (T5 reads
    ``wo.weight.dtype``). Methods that change the module's own tensors (freezing, diff pruning) build on it."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("_"):
                raise
            return getattr(self.base_layer, name)


class ModulesToSave(AdapterLayer):
    """A trainable copy of a whole module per adapter (e.g. a classifier head), saved with the adapter."""

    adapter_param_names = ("modules_to_save",)
    composable = True  # under a composition block (core/compose.py) the copy of its last adapter runs

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: Any = None, module_name: str = "") -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.base_layer)

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        # peft's layout: the copy's tensors under the module's own name (none for an adapter without a copy here).
        if adapter_name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[adapter_name].state_dict(keep_vars=True))

    def load_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft (LoRA with ``bias="all"``) also writes the copy's biases as ``modules_to_save.<name>`` and the
        frozen original's as ``original_module.<name>``: drop those duplicates where they equal the copy's tensor
        in the file and the base module's; anything else stays and is reported as unexpected."""
        base = self.base_layer.state_dict()
        out = {}
        for key, value in tensors.items():
            prefix, _, rest = key.partition(".")
            reference = {"modules_to_save": tensors, "original_module": base}.get(prefix, {}).get(rest)
            if reference is None or reference.shape != value.shape or not torch.equal(reference.cpu(), value.cpu()):
                out[key] = value
        return out

    def _current(self) -> nn.Module:
        live = [n for n in self.active_adapters if not self.disabled]
        return self.modules_to_save[live[-1]] if live else self.base_layer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routing is None or self.disabled:
            return self._current()(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        groups = self.routed_groups(x.shape[0])
        if not groups:
            return out
        out = out.clone()
        for name, idx in groups:
            out[idx] = self.modules_to_save[name](x[idx], *args, **kwargs).to(out.dtype)
        return out

    def merge(self, adapter_names: list[str]) -> None:
        """Nothing to fold: the copy already replaces the module; merged output equals unmerged output."""

    def unmerge(self) -> None:
        """Nothing to undo (see merge)."""

    def unload(self, merge: bool) -> nn.Module:
        return self._current() if merge else self.base_layer
