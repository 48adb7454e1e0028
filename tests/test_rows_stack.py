"""Issue 22 item 3: the per-row LoRA path keeps one stack of all a layer's adapters (methods/lora/rows.py
``FactorStack``), reused whatever adapters a call routes and in whatever order, rebuilt when a factor changes, and
exact: every row equals its adapter run alone (rows without an adapter: the base model)."""

from __future__ import annotations

import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.core.layer import BASE


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 4, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.emb(ids))))


def adapted(names: list[str], bias: bool = False):
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["emb", "up", "down"], init_lora_weights=False)
    pm = get_peft_model(Net(), config, adapter_name=names[0])
    for i, name in enumerate(names[1:], 1):
        torch.manual_seed(i)
        pm.add_adapter(name, LoraConfig(r=2 + i, target_modules=["emb", "up"], init_lora_weights=False))
    return pm.eval()


def alone(pm, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        if name == BASE:
            with pm.disable_adapter():
                rows.append(pm(ids[i : i + 1])[0])
        else:
            pm.set_adapter(name)
            rows.append(pm(ids[i : i + 1])[0])
    return torch.stack(rows)


def test_rows_equal_each_adapter_alone_in_any_order_with_base_rows_and_uneven_use():
    pm = adapted(["a", "b", "c"])
    ids = torch.randint(0, 20, (7, 3), generator=torch.Generator().manual_seed(1))
    orders = [
        ["c", "a", BASE, "b", "a", "c", "b"],  # names first seen in another order than added
        ["b", "b", "b", "b", "b", "b", "a"],  # very uneven use
        [BASE, "c", "c", BASE, "a", "a", BASE],  # adapter b absent; c present only where its layers are
    ]
    with torch.no_grad():
        for names in orders:
            torch.testing.assert_close(pm(ids, adapter_names=names), alone(pm, ids, names), atol=1e-5, rtol=0)


def test_the_stack_survives_a_new_routing_order_and_follows_a_changed_factor():
    pm = adapted(["a", "b"])
    layer = pm.get_base_model().up
    ids = torch.randint(0, 20, (4, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pm(ids, adapter_names=["a", "b", "a", "b"])
        stack = layer._stack_cache[1]
        pm(ids, adapter_names=["b", "a", BASE, "b"])  # the old code restacked on every new order of names
        assert layer._stack_cache[1] is stack and list(stack.slots) == ["a", "b"]
        layer.lora_B["b"].weight.mul_(2.0)  # an in-place change: version counter
        names = ["b", "a", BASE, "b"]
        torch.testing.assert_close(pm(ids, adapter_names=names), alone(pm, ids, names), atol=1e-5, rtol=0)
        assert layer._stack_cache[1] is not stack
        pm.delete_adapter("b")
        assert layer._stack_cache is None  # a deleted adapter's factors are not kept alive by the stack
