"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B trains at a higher rate.

Section 3 shows that with one learning rate for A and B, feature learning in wide models is inefficient; setting
eta_B = lambda * eta_A with lambda >> 1 (the paper suggests about 16) fixes it at no cost. The optimizer groups are
Hugging Face peft's (``create_loraplus_optimizer``), so a run transfers between the two libraries:

  - A:        the remaining trainable matrices (LoRA A, modules_to_save weights)      lr,           weight decay wd
  - embedding: both factors of LoRA on nn.Embedding                                   lr_embedding, wd
  - B:        LoRA B, and every trainable 1-D tensor (DoRA's magnitude, head biases)  lambda * lr,  wd
  - B no decay: the B-group tensors that are biases or LayerNorm parameters           lambda * lr,  0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.methods.lora.layers import LoraEmbedding, LoraLayer


def _roles(model: nn.Module) -> tuple[set[int], set[int], set[int]]:
    """ids of (LoRA-on-embedding factors, B factors, parameters without weight decay), found from the layers."""
    embedding, b_factors, no_decay = set(), set(), set()
    for module in model.modules():
        if isinstance(module, LoraEmbedding):
            embedding.update(id(p) for name in module.r for p in module.adapter_parameters(name))
        elif isinstance(module, LoraLayer):
            for attr in (a for a in module.adapter_param_names if a.endswith("lora_B")):  # lora_B, out_lora_B
                b_factors.update(id(p) for p in getattr(module, attr).parameters())
        for pname, p in module.named_parameters(recurse=False):
            if pname == "bias" or isinstance(module, nn.LayerNorm):  # as transformers' Trainer: no decay there
                no_decay.add(id(p))
    return embedding, b_factors, no_decay


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float,
    *,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """The four optimizer groups of LoRA+ (see the module docstring), in peft's order: A, embedding, B, B no decay."""
    if not loraplus_lr_ratio > 0:
        raise ConfigError(
            f"loraplus_lr_ratio={loraplus_lr_ratio!r} must be > 0: B trains at ratio x lr (the paper suggests 16; "
            "1 is plain LoRA)."
        )
    embedding, b_factors, no_decay = _roles(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif id(p) in b_factors or p.ndim == 1:
            groups["B_no_decay" if id(p) in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    return [
        {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """peft's ``create_loraplus_optimizer``: ``optimizer_cls`` over LoRA+'s groups (B at ``loraplus_lr_ratio`` x
    ``lr``); ``kwargs`` (betas, eps...) go to the optimizer.

        opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    """
    groups = loraplus_param_groups(
        model,
        lr,
        loraplus_lr_ratio,
        loraplus_weight_decay=loraplus_weight_decay,
        loraplus_lr_embedding=loraplus_lr_embedding,
    )
    return optimizer_cls(groups, lr=lr, **kwargs)
