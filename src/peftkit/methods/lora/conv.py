"""LoRA on convolutions: A is a convolution with the base layer's kernel, stride and padding, B a 1x1 one, so
ΔW[o, i, ...] = s * sum_r B[o, r] A[r, i, ...]."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.methods.lora.layers import LoraLayer, LoraLinear


class _LoraConv(LoraLayer):
    """LoRA on a convolution; subclasses only name the conv class (Conv1d, Conv2d, Conv3d)."""

    adapter_param_names = ("lora_A", "lora_B")
    conv_class: ClassVar[type[nn.Module]]

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def create(self, adapter_name: str, r: int) -> None:
        base = self.get_base_layer()
        if base.groups != 1:
            raise ConfigError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported; exclude it.")
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
        self.lora_B[adapter_name] = self.conv_class(r, base.out_channels, 1, 1, bias=False)

    reset = LoraLinear.reset

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight  # (r, in, *k), (out, r, 1..)
        delta = b.flatten(1) @ a.flatten(1)  # (out, in * prod(k))
        return delta.view(b.shape[0], *a.shape[1:]) * self.scaling[adapter_name]

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_A[name]
        return self.lora_B[name](lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
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
