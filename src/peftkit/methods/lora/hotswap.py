"""Hot-swapping LoRA checkpoints into a loaded adapter in place (peftkit.core.hotswap), torch.compile-stable."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from peftkit.core.merge import adapter_layers
from peftkit.core.method import AdapterHost
from peftkit.errors import CheckpointError, ConfigError
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layers import LoraLayer, factors_of


def _lora_layers(peft_model: AdapterHost, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    """The adapter's LoRA layers; ConfigError for layers with two factor pairs (nn.MultiheadAttention)."""
    if getattr(peft_model.peft_config.get(adapter_name), "use_dora", False):
        raise ConfigError(
            f"Hot-swapping cannot handle the DoRA adapter {adapter_name!r} (its magnitude vectors are not swapped in "
            "place); use load_adapter() and set_adapter() to switch DoRA adapters."
        )
    layers = [(p, m) for p, m in adapter_layers(peft_model.model) if isinstance(m, LoraLayer) and adapter_name in m.r]
    paired = [p for p, m in layers if len(m.adapter_param_names) > 2]
    if paired:
        raise ConfigError(
            f"Hot-swapping cannot handle LoRA on nn.MultiheadAttention ({paired}); use load_adapter() and "
            "set_adapter() to switch such adapters."
        )
    return layers


def _describe(
    peft_model: AdapterHost, name: str, config: LoraConfig, scales: dict[str, float] | None = None
) -> LoraConfig:
    """``config`` restated for the loaded (padded) ranks and the scales (``scales`` overrides some), so that what
    save_pretrained writes loads back."""
    layers = _lora_layers(peft_model, name)
    scales = {p: float(m.scaling[name]) for p, m in layers} | (scales or {})
    ranks = [m.r[name] for _, m in layers]
    r0 = max(set(ranks), key=ranks.count) if ranks else config.r
    rank_pattern = {re.escape(p): m.r[name] for p, m in layers if m.r[name] != r0}
    alpha_pattern = {re.escape(p): scales[p] * m.r[name] for p, m in layers}
    return config.replace(r=r0, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=False)


def _check_layer(path: str, layer: LoraLayer, name: str, tensors: dict[str, torch.Tensor]) -> tuple:
    """(keys, layer, A, B, new A, new B, new B bias or None) for one layer, or CheckpointError when they do not fit.

    On a grouped convolution (groups g) B holds r / g columns per output and its groups fix the rank: no padding."""
    keys, (a, b) = [f"{path}.{k}" for k in layer.adapter_state_dict(name)], factors_of(layer, name)
    new_a, new_b = tensors[keys[0]], tensors[keys[1]]
    new_c = tensors.get(keys[2]) if len(keys) > 2 else None  # lora_B.bias under lora_bias
    r, groups = new_a.shape[0], getattr(layer.get_base_layer(), "groups", 1)
    fits = r <= a.shape[0] and (groups == 1 or r == a.shape[0])
    if not fits or new_a.shape[1:] != a.shape[1:] or new_b.shape != (b.shape[0], r // groups, *b.shape[2:]):
        raise CheckpointError(
            f"{path!r}: the checkpoint's factors {tuple(new_a.shape)}, {tuple(new_b.shape)} do not fit the loaded "
            f"{tuple(a.shape)}, {tuple(b.shape)}. Ranks above the loaded one need padding first: "
            f"prepare_model_for_compiled_hotswap(model, target_rank={r}) before compiling (grouped convolutions "
            "keep their rank)."
        )
    if len(keys) > 2 and new_c is None:
        raise CheckpointError(f"{path!r}: the loaded adapter has lora_bias=True; the checkpoint has no {keys[2]!r}.")
    return keys, layer, a, b, new_a, new_b, new_c


def hotswap(peft_model: AdapterHost, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]):
    """Check a checkpoint's factors against the loaded (possibly padded) ones; return the keys handled, a function
    that writes them (A into the first r rows, B into the first r columns, zeros elsewhere) and the new config."""
    if config.use_dora:
        raise ConfigError(
            "Hot-swapping cannot load a DoRA checkpoint (use_dora=True) in place; use load_adapter() and set_adapter()."
        )
    writes, scales = [], {}
    for path, layer in _lora_layers(peft_model, name):
        write = _check_layer(path, layer, name, tensors)
        r, alpha = write[4].shape[0], config.alpha_for(path)
        scales[path] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        writes.append((*write, scales[path]))

    def commit() -> None:
        for _, layer, a, b, new_a, new_b, new_c, scale in writes:
            r = new_b.shape[1]
            a.zero_()[: new_a.shape[0]].copy_(new_a.to(a))
            b.zero_()[:, :r].copy_(new_b.to(b))
            if new_c is not None:
                getattr(layer, layer.adapter_param_names[1])[name].bias.copy_(new_c)
            if isinstance(layer.scaling[name], torch.Tensor):  # compile-stable: same tensor, new value
                layer.scaling[name].fill_(scale)
            else:
                layer.scaling[name] = scale

    handled = {k for keys, *_ in writes for k in keys}
    return handled, commit, _describe(peft_model, name, config, scales)


def _pad(layer: LoraLayer, attr: str, name: str, dim: int, size: int) -> None:
    """Zero-pad factor ``attr`` of adapter ``name`` along its rank dimension ``dim`` to ``size``."""
    holder = getattr(layer, attr)
    owner = holder[name]
    old = owner if isinstance(owner, nn.Parameter) else owner.weight
    shape = list(old.shape)
    shape[dim] = size - shape[dim]
    new = nn.Parameter(torch.cat([old.data, old.new_zeros(shape)], dim), requires_grad=old.requires_grad)
    if isinstance(owner, nn.Parameter):
        holder[name] = new
        return
    owner.weight = new
    for field_name in ("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels"):
        if hasattr(owner, field_name):  # keep the module's repr truthful
            setattr(owner, field_name, size)


def prepare_hotswap(peft_model: AdapterHost, name: str, target_rank: int | None) -> None:
    """Pad adapter ``name`` to ``target_rank`` (zeros: same output) and hold its scales as 0-dim tensors."""
    layers = _lora_layers(peft_model, name)
    target = target_rank or max((m.r[name] for _, m in layers), default=1)
    too_big = {p: m.r[name] for p, m in layers if m.r[name] > target}
    if too_big:
        raise ConfigError(f"target_rank={target} is below adapter {name!r}'s ranks {too_big}; raise it.")
    grouped = {p: m.get_base_layer().groups for p, m in layers if getattr(m.get_base_layer(), "groups", 1) > 1}
    if any(layers_r < target for layers_r in (m.r[name] for p, m in layers if p in grouped)):
        raise ConfigError(
            f"target_rank={target} would pad LoRA on grouped convolutions {grouped}, whose B is grouped by rank, so "
            "zero padding would move ranks between groups. Use target_rank equal to their rank, or exclude them."
        )
    for _, layer in layers:
        if layer.r[name] < target:
            _pad(layer, layer.adapter_param_names[0], name, 0, target)  # A: (r, ...)
            _pad(layer, layer.adapter_param_names[1], name, 1, target)  # B: (out, r, ...)
            layer.r[name] = target
        if not isinstance(layer.scaling[name], torch.Tensor):
            device = factors_of(layer, name)[0].device
            layer.scaling[name] = torch.tensor(float(layer.scaling[name]), device=device)
    peft_model.peft_config[name] = _describe(peft_model, name, peft_model.peft_config[name])
