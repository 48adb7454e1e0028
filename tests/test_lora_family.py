"""Issue 19's leftovers: EVA through the training loop's ``before_training`` hook, and trainable_token_indices next to
target_parameters with no target_modules."""

from __future__ import annotations

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from peftkit import LoraConfig, get_peft_model
from peftkit.core.registry import get_method
from peftkit.methods.trainable_tokens import TokensBesideLayer


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.emb(input_ids))).mean(1))


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 50, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long),
         "labels": torch.randint(0, 2, (4,), generator=g)}
        for _ in range(6)
    ]  # fmt: skip


def test_training_hook_runs_eva_on_classifier_batches():
    """init_lora_weights='eva': the hook sets A to orthonormal principal directions of proj's inputs (row labels are
    left out of EVA's token mask); plain LoRA: A stays as it was."""
    torch.manual_seed(0)
    hook = get_method("lora").training.before_training
    pm = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["proj"], init_lora_weights="eva"))
    a_before = pm.model.proj.lora_A["default"].weight.clone()
    hook(pm, _batches())
    a = pm.model.proj.lora_A["default"].weight
    assert not torch.allclose(a, a_before[: a.shape[0]])
    assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-5)  # EVA's A: right singular vectors
    assert pm.model.training  # the mode the loop had is restored
    torch.manual_seed(0)
    plain = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["proj"]))
    a_plain = plain.model.proj.lora_A["default"].weight.clone()
    hook(plain, _batches())
    assert torch.equal(plain.model.proj.lora_A["default"].weight, a_plain)


def test_token_rows_beside_target_parameters_without_target_modules():
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    lora = LoraConfig(r=2, target_modules=[], target_parameters=["experts.down_proj"], trainable_token_indices=[3, 5])
    pm = get_peft_model(MixtralForCausalLM(config).eval(), lora)
    assert any(isinstance(m, TokensBesideLayer) for m in pm.modules())
    keys = pm.adapter_state_dict("default")
    assert any("trainable_tokens" in k for k in keys), sorted(keys)
    assert any(k.endswith("experts.lora_A.weight") for k in keys)
