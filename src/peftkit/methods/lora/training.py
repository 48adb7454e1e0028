"""LoRA's hooks into training loops (``Method.training``): EVA's data-driven initialisation on training batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from peftkit.core.method import AdapterHost
from peftkit.methods.lora.eva import initialize_lora_eva_weights


def before_training(host: AdapterHost, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    """``init_lora_weights="eva"``: A of the active adapter from the SVD of the layers' inputs on ``batches``
    (``initialize_lora_eva_weights``), in eval mode (no dropout in the activations). A classifier's labels (one per
    row, not per token) are left out of the batches, so every non-padding token counts; a causal LM's token labels
    stay, so only answer tokens count (EVA's ``use_label_mask``). Other initialisations: nothing to do."""
    config = host.peft_config[host.active_adapter]
    if getattr(config, "init_lora_weights", None) != "eva":
        return
    rows = [{k: v for k, v in b.items() if k != "labels" or v.shape == b["input_ids"].shape} for b in batches]
    model = host.model
    was_training = model.training
    model.eval()
    try:
        initialize_lora_eva_weights(host, rows, adapter_name=host.active_adapter, show_progress_bar=False)
    finally:
        model.train(was_training)
