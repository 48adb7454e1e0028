"""peft's ``get_layer_status`` / ``get_model_status``: what each adapter layer holds, and the model-wide summary.

Same dataclasses and field names as peft (``TunerLayerStatus``, ``TunerModelStatus``), so code that prints or
checks them runs unchanged. A value that differs between layers is reported as ``"irregular"``, as peft does.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Literal

from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.model import PeftModel
from peftkit.errors import ConfigError

Irregular = Literal["irregular"]


@dataclasses.dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclasses.dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None = None


def _same(values: list) -> object:
    """The one value all entries share, else ``"irregular"``."""
    unique = {repr(v): v for v in values}
    return next(iter(unique.values())) if len(unique) == 1 else "irregular"


def _flag(values: list[bool | Irregular]) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    return False if all(v is False for v in values) else "irregular"


def _layer_status(name: str, layer: AdapterLayer) -> TunerLayerStatus:
    names = layer.adapter_names
    params = {n: layer.adapter_parameters(n) for n in names}
    return TunerLayerStatus(
        name=name,
        module_type=f"{type(layer).__module__.rsplit('.', 1)[-1]}.{type(layer).__name__}",
        enabled=not layer.disable_adapters,
        active_adapters=list(layer.active_adapters),
        merged_adapters=list(layer.merged_adapters),
        requires_grad={n: _flag([p.requires_grad for p in ps]) for n, ps in params.items()},
        available_adapters=sorted(names),
        devices={n: sorted({p.device.type for p in ps}) for n, ps in params.items()},
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapter layer (names as peft's: ``model.<path>`` for a PeftModel)."""
    root = model.base_model if isinstance(model, PeftModel) else model
    status = [_layer_status(n, m) for n, m in root.named_modules() if isinstance(m, AdapterLayer)]
    if not status:
        raise ConfigError(
            f"No adapter layers in this {type(model).__name__}; wrap it with get_peft_model() or "
            "inject_adapter_in_model() first."
        )
    return status


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide summary of :func:`get_layer_status` (values that differ between layers: ``"irregular"``)."""
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_type, adapter_type = type(model.get_base_model()).__name__, type(model.base_model).__name__
        peft_types = {n: str(c.peft_type) for n, c in model.peft_config.items()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        base_type = type(model).__name__ if hasattr(model, "config") else "other"
        adapter_type, peft_types = "None", {}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_same([s.enabled for s in layers]),
        active_adapters=_same([s.active_adapters for s in layers]),
        merged_adapters=_merged(layers),
        requires_grad=_merge_dicts([s.requires_grad for s in layers], _flag),
        available_adapters=sorted({n for s in layers for n in s.available_adapters}),
        devices=_merge_dicts([s.devices for s in layers], lambda v: sorted({d for ds in v for d in ds})),
    )


def _merged(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """Adapters merged everywhere they exist; ``"irregular"`` when one is merged in some layers only."""
    merged = {n for s in layers for n in s.merged_adapters}
    partial = any(merged & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers)
    return "irregular" if partial else sorted(merged)


def _merge_dicts(dicts: list[dict], combine) -> dict:
    values: dict[str, list] = defaultdict(list)
    for d in dicts:
        for key, value in d.items():
            values[key].append(value)
    return {key: combine(v) for key, v in values.items()}
