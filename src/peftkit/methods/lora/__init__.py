"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W gets a trainable low-rank update (section 4.1, eq. 3):

    h = W x + (alpha / r) * B A x          A: (r, in), B: (out, r), B = 0 at init so h = W x

rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead, which keeps the update's magnitude stable as r
grows. Merging is ``W += s * B A`` and its exact inverse ``W -= s * B A``.

Layers: nn.Linear and GPT-2's Conv1D (weight stored transposed, "fan_in_fan_out"), nn.Embedding (A acts as
an embedding table, as in peft), nn.Conv1d / 2d / 3d, where A is a convolution with the base layer's kernel, stride
and padding and B a 1x1 convolution, so ΔW[o, i, ...] = s * sum_r B[o, r] A[r, i, ...] (grouped ones as in peft),
and nn.MultiheadAttention (its packed in-projection and its out-projection, peft's layout); ``target_parameters``
puts LoRA on bare nn.Parameters such as fused MoE expert weights (one update per expert, ``params``).

The package: ``config`` (LoraConfig), ``layers`` (LoraLayer, Linear / GPT-2 Conv1D, Embedding), ``conv``
(Conv1d/2d/3d), ``mha`` (MultiheadAttention), ``attach`` (which modules are wrapped, ``bias=``), ``arithmetic``
(add_weighted_adapter), ``hotswap`` (in-place checkpoint swaps) and ``params`` (LoRA on parameters; LoRA's attach).
"""

from __future__ import annotations

from peftkit.core.method import Method, Training
from peftkit.methods.lora import params
from peftkit.methods.lora.attach import SUPPORTED, dispatch, extra_trainable
from peftkit.methods.lora.config import BIAS_CHOICES, INIT_CHOICES, CordaConfig, EvaConfig, LoraConfig
from peftkit.methods.lora.conv import LoraConv1d, LoraConv2d, LoraConv3d
from peftkit.methods.lora.conversion import to_plain_lora
from peftkit.methods.lora.layers import LoraEmbedding, LoraLayer, LoraLinear, factors_of
from peftkit.methods.lora.mha import LoraMultiheadAttention
from peftkit.methods.lora.params import LoraParamWrapper, inject
from peftkit.methods.lora.training import before_training

__all__ = [
    "BIAS_CHOICES",
    "INIT_CHOICES",
    "METHOD",
    "SUPPORTED",
    "CordaConfig",
    "EvaConfig",
    "LoraConfig",
    "LoraConv1d",
    "LoraConv2d",
    "LoraConv3d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraParamWrapper",
    "dispatch",
    "extra_trainable",
    "factors_of",
    "inject",
]

METHOD = Method(
    name="lora",
    config_class=LoraConfig,
    inject=inject,
    can_merge=True,
    extra_trainable=extra_trainable,
    combine=params.combine,
    hotswap=params.hotswap,
    prepare_hotswap=params.prepare_hotswap,
    weight_conversion=to_plain_lora,
    training=Training(learning_rate=2e-3, before_training=before_training),
)
