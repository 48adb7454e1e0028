"""The training loss of a causal LM, computed in one place (``causal_lm_loss``), so that another way of computing
it (a chunked cross-entropy that never holds the full (B, T, V) logits) replaces one function."""

from __future__ import annotations

import torch
from torch import nn

from peftkit.core import loss as chunked


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE (-100): the model's own loss
    (transformers shifts the labels: position t predicts label t + 1), as peft-wrapped models compute it for every
    method (prompt methods prepend their virtual tokens to the labels too). Computed by the chunked cross-entropy
    (``peftkit.core.loss.causal_lm_loss``: no full logits kept), which falls back to the model's own loss where it
    would not be exact."""
    return chunked.causal_lm_loss(model, batch)
