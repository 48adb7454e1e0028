"""LoKr: low-rank Kronecker product (LyCORIS; KohakuBlueleaf et al. 2023, "Navigating Text-To-Image Customization:
From LyCORIS Fine-Tuning to Model Evaluation", section 3.3; as Hugging Face peft trains it).

The output and input sizes are each split in two, out = a c and in = b d (peft's ``factorization``: near the square
root, or with ``decompose_factor`` as one part), and the update is a Kronecker product:

    ΔW = kron(W1, W2) · alpha / r                  W1 (a, b); W2 (c, d), or (c, d, kh, kw) for a convolution
    W1 = lokr_w1, or lokr_w1_a lokr_w1_b (rank r) with ``decompose_both`` when r < max(a, b) / 2
    W2 = lokr_w2 when r >= max(c, d) / 2, else lokr_w2_a lokr_w2_b (rank r), or for a kernel larger than 1 with
         ``use_effective_conv2d`` the Tucker form T ×₁ lokr_w2_a ×₂ lokr_w2_b (core lokr_t2 (r, r, kh, kw))

For a convolution without the Tucker form, W2's columns hold d · kh · kw (the kernel flattened). Initialisation is
peft's: W1 (or lokr_w1_a) = 0 and the rest Kaiming-uniform, so ΔW = 0 at init; ``init_weights="lycoris"`` zeroes W2
(or lokr_w2_b) instead, ``False`` draws everything. Merging adds ΔW, unmerging subtracts it; per-row routing, rank
dropout (rescaled only with ``rank_dropout_scale``) and module dropout come from :mod:`peftkit.core.factorised`.

The checkpoint is peft's: ``<module>.lokr_w1`` or ``lokr_w1_a`` / ``lokr_w1_b``, and ``lokr_w2`` or ``lokr_w2_a`` /
``lokr_w2_b`` (plus ``lokr_t2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from peftkit.core.factorised import (
    SUPPORTED,
    FactorisedConfig,
    FactorisedLayer,
    factorization,
    kaiming_,
    kron,
    supported,
    tucker,
    weight_shape,
)
from peftkit.core.inject import inject_layers, own_layer_path
from peftkit.core.method import Method, Training
from peftkit.core.targeting import find_targets, resolve_targets


@dataclass(kw_only=True)
class LoKrConfig(FactorisedConfig):
    """LoKr's settings, with Hugging Face peft's names and defaults (r=8, alpha=8, decompose_factor=-1)."""

    peft_type: ClassVar[str] = "LOKR"

    decompose_both: bool = field(
        default=False, metadata={"help": "Also factor W1 as a rank-r product when r < max(its sides) / 2."}
    )
    decompose_factor: int = field(
        default=-1, metadata={"help": "Split each size as (factor, size / factor) when it divides; -1: near sqrt."}
    )
    rank_dropout_scale: bool = field(
        default=False, metadata={"help": "Rescale the rows kept by rank_dropout by 1 / their share."}
    )
    init_weights: bool | Literal["lycoris"] = field(
        default=True,
        metadata={"help": "True: W1 = 0 (identity at init); 'lycoris': W2 = 0 instead; False: every factor random."},
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            problems.append(f"decompose_factor={self.decompose_factor!r} must be -1 (near the square root) or > 0.")
        return problems


# ---- layer ----------------------------------------------------------------------------------------------------
class LoKrLayer(FactorisedLayer):
    """LoKr on nn.Linear, nn.Conv1d and nn.Conv2d: per adapter W1 and W2, each full or a rank-r product."""

    adapter_param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_param_names:
            setattr(self, attr, nn.ParameterDict())

    def update_layer(self, adapter_name: str, config: LoKrConfig, module_name: str) -> None:
        r = self.set_scale(adapter_name, config, module_name, rescale=config.rank_dropout_scale)
        out_f, in_f, kernel = weight_shape(self.get_base_layer())
        (a, c), (b, d) = factorization(out_f, config.decompose_factor), factorization(in_f, config.decompose_factor)
        if config.decompose_both and r < max(a, b) / 2:
            self.lokr_w1_a[adapter_name], self.lokr_w1_b[adapter_name] = self.new_factor(a, r), self.new_factor(r, b)
        else:
            self.lokr_w1[adapter_name] = self.new_factor(a, b)
        self._create_w2(adapter_name, r, (c, d), kernel, config.use_effective_conv2d)
        self._initialise(adapter_name, config.init_weights)

    def _create_w2(self, name: str, r: int, cd: tuple[int, int], kernel: tuple[int, ...], effective: bool) -> None:
        """W2 (c, d, *kernel) in full, in the Tucker form, or as (c, r) @ (r, d · prod(kernel))."""
        (c, d), core = cd, (*kernel, 1) if len(kernel) == 1 else kernel  # peft keeps a Conv1d core 4-D: (r, r, k, 1)
        if r >= max(c, d) / 2:
            self.lokr_w2[name] = self.new_factor(c, d, *kernel)
        elif effective and any(k != 1 for k in kernel):
            self.lokr_t2[name] = self.new_factor(r, r, *core)
            self.lokr_w2_a[name], self.lokr_w2_b[name] = self.new_factor(r, c), self.new_factor(r, d)
        else:
            columns = d * math.prod(kernel)
            self.lokr_w2_a[name], self.lokr_w2_b[name] = self.new_factor(c, r), self.new_factor(r, columns)

    def _initialise(self, name: str, init: bool | str) -> None:
        """Kaiming-uniform everywhere, then (peft's choice) W1 or lokr_w1_a = 0 (True), or W2 or lokr_w2_b = 0
        ('lycoris'), so that ΔW = 0; False leaves everything random."""
        for attr in self.adapter_param_names:
            if name in getattr(self, attr):
                kaiming_(getattr(self, attr)[name])
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(init, ())
        for attr in zero:
            if name in getattr(self, attr):
                nn.init.zeros_(getattr(self, attr)[name])

    def _w1(self, name: str) -> torch.Tensor:
        return self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]

    def _w2(self, name: str) -> torch.Tensor:
        if name in self.lokr_w2:
            return self.lokr_w2[name]
        if name in self.lokr_t2:
            return tucker(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])  # (c, d, kh, kw)
        return self.lokr_w2_a[name] @ self.lokr_w2_b[name]  # (c, d · kh · kw)

    def factor_delta(self, name: str) -> torch.Tensor:
        """kron(W1, W2), unscaled."""
        return kron(self._w1(name), self._w2(name))


# ---- attaching ----------------------------------------------------------------------------------------------
def inject(model: nn.Module, config: LoKrConfig, adapter_name: str) -> None:
    """Resolve peft's default targets into the (copied) config, so it is saved explicit, then wrap."""
    config.target_modules = resolve_targets(model, config)
    targets = find_targets(model, config, supported, supported_label=SUPPORTED)
    targets = [own_layer_path(model, n, LoKrLayer) for n in targets]
    inject_layers(model, config, adapter_name, targets, lambda m: LoKrLayer if supported(m) else None)


METHOD = Method(
    name="lokr",
    config_class=LoKrConfig,
    inject=inject,
    can_merge=True,
    # 1e-2: the update starts from a zero factor and grows from a product with it; at 1e-3 it did not move SST-2's
    # classifier in 125 steps nor SmolLM2's held-out answer loss in 20 (docs/benchmarks.md, issue 20's methods)
    training=Training(learning_rate=1e-2),
)
