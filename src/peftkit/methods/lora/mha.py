"""LoRA on nn.MultiheadAttention, in peft's layout, so files load both ways.

nn.MultiheadAttention holds its query / key / value projections as one packed ``in_proj_weight`` (3E, E) and reads
``out_proj.weight`` (E, E) directly: neither is a module whose forward could be wrapped. As in peft, both get an
update, each with the adapter's r and alpha:

    in_proj_weight  + s B A          A: (r, E), B: (3E, r)       file keys  <module>.lora_A.weight, lora_B.weight
    out_proj.weight + s B' A'        A': (r, E), B': (E, r)      <module>.base_layer.out_proj.lora_{A,B}.weight

The forward runs the wrapped module with those sums in place of its two weights (``torch.func.functional_call``):
differentiable in A and B, and the module's own parameters are never replaced. Since the update acts through the
weights, ``lora_dropout`` does not apply here (peft's merged forward does the same). Only packed projections
(kdim = vdim = embed_dim) are supported, as in peft; per-row ``adapter_names`` is refused (peft refuses too).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.layer import AdapterLayer
from peftkit.errors import ConfigError, RoutingError
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layers import LoraLayer

OUT_KEYS = {"out_lora_A.": "base_layer.out_proj.lora_A.", "out_lora_B.": "base_layer.out_proj.lora_B."}


class LoraMultiheadAttention(LoraLayer):
    """LoRA on the packed in-projection and the out-projection of an nn.MultiheadAttention."""

    adapter_param_names = ("lora_A", "lora_B", "out_lora_A", "out_lora_B")
    supports_lora_bias = False  # peft's version ignores B's bias in its forward; refused rather than ignored

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.out_lora_A = nn.ModuleDict()
        self.out_lora_B = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        if not self.get_base_layer()._qkv_same_embed_dim:
            raise ConfigError(
                f"LoRA on {module_name!r} needs packed query/key/value projections (kdim = vdim = embed_dim), as in "
                "peft; this nn.MultiheadAttention has separate ones. Exclude it from target_modules."
            )
        super().update_layer(adapter_name, config, module_name)

    def reference_weight(self) -> torch.Tensor:
        return self.get_base_layer().in_proj_weight

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """False while an adapter is live, so nn.TransformerEncoderLayer skips its fused inference path (which reads
        the base ``in_proj_weight`` directly and would bypass the update) and calls this layer."""
        return not self.live_adapters() and self.get_base_layer()._qkv_same_embed_dim

    def create(self, adapter_name: str, r: int, bias: bool) -> None:
        e = self.get_base_layer().embed_dim
        self.lora_A[adapter_name] = nn.Linear(e, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, 3 * e, bias=False)
        self.out_lora_A[adapter_name] = nn.Linear(e, r, bias=False)
        self.out_lora_B[adapter_name] = nn.Linear(r, e, bias=False)

    def reset(self, adapter_name: str, init: bool | str) -> None:
        """As LoraLinear.reset, on both pairs."""
        for a_attr, b_attr in (("lora_A", "lora_B"), ("out_lora_A", "out_lora_B")):
            a, b = getattr(self, a_attr)[adapter_name], getattr(self, b_attr)[adapter_name]
            if init is False:
                a.reset_parameters()
                b.reset_parameters()
                continue
            if init == "gaussian":
                nn.init.normal_(a.weight, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s B A: the in-projection's update (3E, E)."""
        return (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight) * self.scaling[adapter_name]

    def out_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s B' A': the out-projection's update (E, E)."""
        b, a = self.out_lora_B[adapter_name].weight, self.out_lora_A[adapter_name].weight
        return (b @ a) * self.scaling[adapter_name]

    def file_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """peft's keys: the out-projection's factors under ``base_layer.out_proj.lora_{A,B}``."""
        return {_renamed(k, OUT_KEYS): v for k, v in self.adapter_state_dict(adapter_name).items()}

    def load_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        back = {v: k for k, v in OUT_KEYS.items()}
        return {_renamed(k, back): v for k, v in tensors.items()}

    def merge(self, adapter_names: list[str]) -> None:
        """in_proj_weight += s B A, out_proj.weight += s B' A' (exact inverse in unmerge)."""
        base = self.get_base_layer()
        with torch.no_grad():
            for name in adapter_names:
                base.in_proj_weight += self.delta_weight(name).to(base.in_proj_weight.dtype)
                base.out_proj.weight += self.out_delta_weight(name).to(base.out_proj.weight.dtype)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                base.in_proj_weight -= self.delta_weight(name).to(base.in_proj_weight.dtype)
                base.out_proj.weight -= self.out_delta_weight(name).to(base.out_proj.weight.dtype)

    def _weights_path(self) -> str:
        """Where the MultiheadAttention's tensors sit below ``base_layer`` (other methods may wrap it too)."""
        path, module = "", self.base_layer
        while isinstance(module, AdapterLayer):
            path, module = path + "base_layer.", module.base_layer
        return path

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.routing is not None and not self.disabled:
            if self.has_routed_adapters():
                raise RoutingError(
                    "adapter_names= cannot route rows through LoRA on nn.MultiheadAttention (its update changes the "
                    "packed weights, shared by all rows; peft refuses too). Run one adapter at a time (set_adapter)."
                )
            return self.base_layer(query, *args, **kwargs)
        live = self.live_adapters()
        if not live:
            return self.base_layer(query, *args, **kwargs)
        base, path = self.get_base_layer(), self._weights_path()
        in_w = base.in_proj_weight + sum(self.delta_weight(n).to(base.in_proj_weight.dtype) for n in live)  # (3E, E)
        out_w = base.out_proj.weight + sum(self.out_delta_weight(n).to(base.out_proj.weight.dtype) for n in live)
        weights = {f"{path}in_proj_weight": in_w, f"{path}out_proj.weight": out_w}
        return functional_call(self.base_layer, weights, (query, *args), kwargs)


def _renamed(key: str, prefixes: dict[str, str]) -> str:
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    return prefixes[prefix] + key[len(prefix) :] if prefix else key
