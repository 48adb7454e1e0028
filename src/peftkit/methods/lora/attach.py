"""Which modules LoRA wraps (first match wins) and which base biases also train (``bias=``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.core.inject import inject_layers
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.targeting import base_of, find_targets, is_conv1d_gpt2, iter_free_modules
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.conv import LoraConv1d, LoraConv2d, LoraConv3d
from peftkit.methods.lora.layers import LoraEmbedding, LoraLayer, LoraLinear

_DISPATCH: list[tuple[Any, type[LoraLayer]]] = [  # first match wins
    (nn.Linear, LoraLinear),
    (is_conv1d_gpt2, LoraLinear),
    (nn.Embedding, LoraEmbedding),
    (nn.Conv2d, LoraConv2d),
    (nn.Conv1d, LoraConv1d),
    (nn.Conv3d, LoraConv3d),
]
SUPPORTED = "Linear, Embedding, Conv1d, Conv2d, Conv3d, GPT-2 Conv1D"


def dispatch(module: nn.Module) -> type[LoraLayer] | None:
    for kind, layer_class in _DISPATCH:
        if (isinstance(kind, type) and isinstance(module, kind)) or (not isinstance(kind, type) and kind(module)):
            return layer_class
    return None


def inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    targets = find_targets(model, config, lambda m: dispatch(m) is not None, supported_label=SUPPORTED)
    inject_layers(model, config, adapter_name, targets, dispatch)


def extra_trainable(model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
    """``bias="all"``: every bias of the base model; ``"lora_only"``: biases of the layers LoRA wraps."""
    if config.bias == "none":
        return {}
    out = {}
    for name, module in iter_free_modules(model):
        if isinstance(module, ModulesToSave):  # its trainable copy already holds (and saves) its bias
            continue
        if isinstance(module, AdapterLayer):
            if config.bias == "lora_only" and not isinstance(module, LoraLayer):
                continue
            prefix, base = _base_path(name, module)
        elif config.bias == "all" and not any(True for _ in module.children()):
            prefix, base = name, module
        else:
            continue
        if getattr(base, "bias", None) is not None and isinstance(base.bias, nn.Parameter):
            out[f"{prefix}.bias"] = base.bias
    return out


def _base_path(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    path = name
    while isinstance(module, AdapterLayer):
        path, module = f"{path}.base_layer", module.base_layer
    return path, base_of(module)
