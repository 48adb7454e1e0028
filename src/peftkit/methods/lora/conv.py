"""LoRA on convolutions: A is a convolution with the base layer's kernel, stride and padding, B a 1x1 one, so
ΔW[o, i, ...] = s * sum_r B[o, r] A[r, i, ...].

Grouped convolutions (groups = g > 1) follow peft: A is a dense convolution (in -> r), B a grouped 1x1 one
(r -> out in g groups, r divisible by g). The update then reads every input channel while the base weight of
output channel o only holds the in / g channels of its group, so it has no weight-shaped ΔW: such a layer
trains, saves, loads and routes, but cannot merge (peft refuses too).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.errors import ConfigError, MergeError
from peftkit.methods.lora import dora
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layers import LoraLayer, LoraLinear


class _LoraConv(LoraLayer):
    """LoRA on a convolution; subclasses only name the conv class (Conv1d, Conv2d, Conv3d)."""

    adapter_param_names = ("lora_A", "lora_B")
    dora_layout = "conv"
    conv_class: ClassVar[type[nn.Module]]

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        groups, r = self.get_base_layer().groups, config.rank_for(module_name)
        if r % groups:
            raise ConfigError(
                f"{module_name!r} is a convolution with groups={groups}: LoRA's B is grouped like it, so the rank "
                f"must be divisible by {groups}; r={r} is not. Choose r={groups * max(1, r // groups)} (rank_pattern "
                "for this module alone), or exclude it."
            )
        super().update_layer(adapter_name, config, module_name)

    def create(self, adapter_name: str, r: int, bias: bool) -> None:
        base = self.get_base_layer()
        self.lora_A[adapter_name] = self.conv_class(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
        )
        self.lora_B[adapter_name] = self.conv_class(r, base.out_channels, 1, 1, groups=base.groups, bias=bias)

    reset = LoraLinear.reset

    def check_mergeable(self, adapter_names: list[str]) -> None:
        groups = self.get_base_layer().groups
        if groups > 1 and adapter_names:
            raise MergeError(
                f"LoRA on a grouped convolution (groups={groups}) cannot merge: its update reads every input channel, "
                f"the base weight only in_channels / {groups} per output channel (peft refuses too). Keep adapters "
                f"{adapter_names} unmerged, or exclude grouped convolutions from target_modules."
            )
        super().check_mergeable(adapter_names)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight  # (r, in, *k), (out, r, 1..)
        delta = b.flatten(1) @ a.flatten(1)  # (out, in * prod(k))
        return delta.view(b.shape[0], *a.shape[1:]) * self.scaling[adapter_name]

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_A[name]
        return self.lora_B[name](lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.lora_magnitude_vector and not self.disabled:
            return dora.forward_conv(self, x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (B, out, ...)
        if self.routing is not None and not self.disabled:
            groups = self.routed_groups(x.shape[0])  # a loop over adapters present, not over rows
            if groups:
                delta = torch.zeros_like(result)
                for name, idx in groups:
                    delta[idx] = self._branch(name, x[idx]).to(result.dtype)
                result = result + delta
            return result
        for name in self.live_adapters():
            result = result + self._branch(name, x).to(result.dtype)
        return result


class LoraConv1d(_LoraConv):
    conv_class = nn.Conv1d


class LoraConv2d(_LoraConv):
    conv_class = nn.Conv2d


class LoraConv3d(_LoraConv):
    conv_class = nn.Conv3d
