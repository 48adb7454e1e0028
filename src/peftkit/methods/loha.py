"""LoHa: low-rank Hadamard product (Hyeon-Woo, Ye-Bin & Oh 2022, "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning", section 3.1; as LyCORIS and Hugging Face peft train it).

Each adapted layer learns two rank-r pairs whose products are multiplied elementwise:

    ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r          W1a, W2a (out, r); W1b, W2b (r, in)
    h  = W x + ΔW x

so a rank-r budget reaches a ΔW of rank up to r². For a convolution, in = in_channels / groups · kh · kw (the kernel
flattened), or with ``use_effective_conv2d`` (kernels larger than 1) the Tucker form of FedPara's Proposition 3:
W_i = T_i ×₁ W_ia ×₂ W_ib with cores T_i (r, r, kh, kw), W_ia (r, out), W_ib (r, in).

Initialisation is peft's: W1a, W1b, W2a (and the cores) Kaiming-uniform, W2b = 0, so ΔW = 0 and the model starts
unchanged (``init_weights=False``: W2b random too). Merging adds ΔW to W, unmerging subtracts it; per-row routing,
rank dropout and module dropout come from :mod:`peftkit.core.factorised`.

The checkpoint is peft's: ``<module>.hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and ``hada_t1``,
``hada_t2`` in the Tucker form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from peftkit.core.factorised import (
    SUPPORTED,
    FactorisedConfig,
    FactorisedLayer,
    kaiming_,
    supported,
    tucker,
    weight_shape,
)
from peftkit.core.inject import inject_layers, own_layer_path
from peftkit.core.method import Method, Training
from peftkit.core.targeting import find_targets, resolve_targets


@dataclass(kw_only=True)
class LoHaConfig(FactorisedConfig):
    """LoHa's settings, with Hugging Face peft's names and defaults (r=8, alpha=8)."""

    peft_type: ClassVar[str] = "LOHA"

    init_weights: bool = field(
        default=True, metadata={"help": "True: W2b = 0 (identity at init); False: every factor random."}
    )


# ---- layer ----------------------------------------------------------------------------------------------------
class LoHaLayer(FactorisedLayer):
    """LoHa on nn.Linear, nn.Conv1d and nn.Conv2d: per adapter two factor pairs (and Tucker cores for kernels)."""

    adapter_param_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_param_names:
            setattr(self, attr, nn.ParameterDict())

    def update_layer(self, adapter_name: str, config: LoHaConfig, module_name: str) -> None:
        r = self.set_scale(adapter_name, config, module_name, rescale=True)
        out_f, in_f, kernel = weight_shape(self.get_base_layer())
        if config.use_effective_conv2d and kernel and any(k != 1 for k in kernel):
            core = (*kernel, 1) if len(kernel) == 1 else kernel  # peft keeps a Conv1d core 4-D: (r, r, k, 1)
            for i in ("1", "2"):
                getattr(self, f"hada_t{i}")[adapter_name] = kaiming_(self.new_factor(r, r, *core))
                getattr(self, f"hada_w{i}_a")[adapter_name] = self.new_factor(r, out_f)  # (r, out)
                getattr(self, f"hada_w{i}_b")[adapter_name] = self.new_factor(r, in_f)  # (r, in)
        else:
            columns = in_f * math.prod(kernel)
            for i in ("1", "2"):
                getattr(self, f"hada_w{i}_a")[adapter_name] = self.new_factor(out_f, r)  # (out, r)
                getattr(self, f"hada_w{i}_b")[adapter_name] = self.new_factor(r, columns)  # (r, in · kh · kw)
        for attr in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            kaiming_(getattr(self, attr)[adapter_name])
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b[adapter_name])

    def _half(self, name: str, i: str) -> torch.Tensor:
        """W_ia W_ib, or the Tucker rebuild T_i ×₁ W_ia ×₂ W_ib (out, in, kh, kw)."""
        a, b = getattr(self, f"hada_w{i}_a")[name], getattr(self, f"hada_w{i}_b")[name]
        cores = getattr(self, f"hada_t{i}")
        return tucker(cores[name], a, b) if name in cores else a @ b

    def factor_delta(self, name: str) -> torch.Tensor:
        """(W1a W1b) ⊙ (W2a W2b), unscaled."""
        return self._half(name, "1") * self._half(name, "2")


# ---- attaching ----------------------------------------------------------------------------------------------
def inject(model: nn.Module, config: LoHaConfig, adapter_name: str) -> None:
    """Resolve peft's default targets into the (copied) config, so it is saved explicit, then wrap."""
    config.target_modules = resolve_targets(model, config)
    targets = find_targets(model, config, supported, supported_label=SUPPORTED)
    targets = [own_layer_path(model, n, LoHaLayer) for n in targets]
    inject_layers(model, config, adapter_name, targets, lambda m: LoHaLayer if supported(m) else None)


METHOD = Method(
    name="loha",
    config_class=LoHaConfig,
    inject=inject,
    can_merge=True,
    # 1e-2: the update starts from a zero factor and grows from a product with it; at 1e-3 it did not move SST-2's
    # classifier in 125 steps nor SmolLM2's held-out answer loss in 20 (docs/benchmarks.md, issue 20's methods)
    training=Training(learning_rate=1e-2),
)
