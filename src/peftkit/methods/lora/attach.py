"""Which modules LoRA wraps (first match wins) and which base biases also train (``bias=``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.core import quantized
from peftkit.core.inject import inject_layers, trainable_biases
from peftkit.core.layer import AdapterLayer
from peftkit.core.targeting import find_targets, is_conv1d_gpt2
from peftkit.errors import ConfigError
from peftkit.methods.lora import inits, loftq
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.conv import LoraConv1d, LoraConv2d, LoraConv3d
from peftkit.methods.lora.layers import LoraEmbedding, LoraLayer, LoraLinear
from peftkit.methods.lora.mha import LoraMultiheadAttention
from peftkit.methods.lora.quantized import QuantizedLoraLinear
from peftkit.methods.trainable_tokens import with_token_rows

_DISPATCH: list[tuple[Any, type[LoraLayer]]] = [  # first match wins
    (quantized.is_quantized, QuantizedLoraLinear),  # bitsandbytes 4/8-bit, torchao int8 (nn.Linear subclasses)
    (nn.Linear, LoraLinear),
    (is_conv1d_gpt2, LoraLinear),
    (nn.Embedding, LoraEmbedding),
    (nn.Conv2d, LoraConv2d),
    (nn.Conv1d, LoraConv1d),
    (nn.Conv3d, LoraConv3d),
    (nn.MultiheadAttention, LoraMultiheadAttention),
]
SUPPORTED = (
    "Linear (bitsandbytes 4/8-bit and torchao int8 too), Embedding, Conv1d, Conv2d, Conv3d (grouped too), GPT-2 "
    "Conv1D, MultiheadAttention"
)


def dispatch(module: nn.Module) -> type[LoraLayer] | None:
    for kind, layer_class in _DISPATCH:
        if (isinstance(kind, type) and isinstance(module, kind)) or (not isinstance(kind, type) and kind(module)):
            return layer_class
    return None


def inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    targets = find_targets(model, config, lambda m: dispatch(m) is not None, supported_label=SUPPORTED)
    _check_not_in_attention(model, targets)
    _check_weight_inits(model, config, targets)
    is_loftq = config.init_lora_weights == "loftq"
    if is_loftq:
        loftq.check(model, config, targets)  # before anything changes: LoftQ rewrites the base weights

    def attach() -> None:
        inject_layers(model, config, adapter_name, targets, dispatch)
        if is_loftq:
            loftq.initialise(model, config, adapter_name, targets)

    with_token_rows(model, config.trainable_token_indices, adapter_name, attach)  # trainable_token_indices


def _check_not_in_attention(model: nn.Module, targets: list[str]) -> None:
    """Refuse an nn.MultiheadAttention's out_proj as a target: the attention reads ``out_proj.weight`` and never
    calls its forward, so a LoRA there would silently do nothing."""
    inside = [t for t in targets if isinstance(model.get_submodule(t.rpartition(".")[0]), nn.MultiheadAttention)]
    if inside:
        parents = sorted({t.rpartition(".")[0] or "<model>" for t in inside})
        raise ConfigError(
            f"target_modules matched {inside}, inside nn.MultiheadAttention {parents}, which never calls their "
            "forward: "
            f"a LoRA there would have no effect. Target the attention module itself ({parents[0]!r}: LoRA on its "
            "in- and out-projections, as in peft), or leave them out with exclude_modules."
        )


def _check_weight_inits(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """PiSSA / OLoRA change the base weights in place, which a rolled-back injection cannot undo: refuse every
    target they cannot initialise before the first one is touched."""
    if not inits.is_weight_init(config.init_lora_weights):
        return
    for name in targets:
        module = model.get_submodule(name)
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        layer_class = dispatch(base)
        shape = tuple(getattr(base, "weight", torch.empty(0)).shape)
        r = config.rank_for(name)
        if layer_class is None or not layer_class.supports_weight_inits or r > min(shape, default=0):
            raise ConfigError(
                f"init_lora_weights={config.init_lora_weights!r} cannot initialise {name!r} ({type(base).__name__}, "
                f"weight {shape}, r={r}): it decomposes a Linear / GPT-2 Conv1D weight into r <= min(out, in) "
                "directions. Exclude the module, lower r there (rank_pattern), or use init_lora_weights=True."
            )


def extra_trainable(model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
    """``bias="all"``: every bias of the base model; ``"lora_only"``: biases of the layers LoRA wraps."""
    return {} if config.bias == "none" else trainable_biases(model, config.bias == "all", LoraLayer)
