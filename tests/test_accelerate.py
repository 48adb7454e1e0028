"""accelerate on a peftkit model (issue 16 item 5): prepare, a few steps, save_state / load_state, and
unwrap_model(...).save_pretrained round-trip the adapter."""

from __future__ import annotations

import pytest
import torch

import peftkit
from models import batch, output, tiny_bert

accelerate = pytest.importorskip("accelerate")


def trained(accelerator, steps: int = 2):
    model = peftkit.get_peft_model(tiny_bert(), peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    inputs = batch("bert")
    for _ in range(steps):
        loss = model(**inputs, labels=torch.tensor([0, 1, 2, 0])).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), optimizer


def test_save_state_load_state_round_trip(tmp_path):
    accelerator = accelerate.Accelerator(cpu=True)
    model, _ = trained(accelerator)
    expected = {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(accelerator.unwrap_model(model)).items()}
    accelerator.save_state(tmp_path / "state")
    fresh_accelerator = accelerate.Accelerator(cpu=True)
    fresh, _ = trained(fresh_accelerator, steps=0)
    fresh_accelerator.load_state(tmp_path / "state")
    loaded = peftkit.get_peft_model_state_dict(fresh_accelerator.unwrap_model(fresh))
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_unwrap_model_save_pretrained_round_trip(tmp_path):
    accelerator = accelerate.Accelerator(cpu=True)
    model, _ = trained(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    assert isinstance(unwrapped, peftkit.PeftModel)
    unwrapped.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = peftkit.PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    torch.testing.assert_close(output(loaded, batch("bert")), output(unwrapped, batch("bert")))
