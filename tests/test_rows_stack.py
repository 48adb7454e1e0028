"""Issue 22 item 3: the per-row LoRA path keeps one stack of all a layer's adapters (methods/lora/rows.py
``FactorStack``), reused whatever adapters a call routes and in whatever order, rebuilt when a factor changes, and
exact: every row equals its adapter run alone (rows without an adapter: the base model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.core.layer import BASE, fixed_weights
from peftkit.errors import RoutingError


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


def test_a_replaced_factor_or_scaling_rebuilds_the_stack_and_a_sliced_module_list_does_not():
    """The cache check reads no module: a parameter registered anywhere (a replaced factor, a new adapter) or a
    changed scaling rebuilds it; a ModuleList sliced on every forward (transformers' ``self.layers[:n]``) does not."""
    pm = adapted(["a", "b"])
    layer = pm.get_base_model().up
    ids = torch.randint(0, 20, (4, 3), generator=torch.Generator().manual_seed(3))
    names = ["b", "a", "a", BASE]
    with torch.no_grad():
        pm(ids, adapter_names=names)
        stack = layer._stack_cache[1]
        nn.ModuleList([nn.ReLU(), nn.ReLU()])[:1], nn.Sequential(nn.ReLU(), nn.ReLU())[:1]  # what forwards may do
        pm(ids, adapter_names=names)
        assert layer._stack_cache[1] is stack
        layer.lora_A["a"].weight = nn.Parameter(torch.randn_like(layer.lora_A["a"].weight))  # a new tensor
        torch.testing.assert_close(pm(ids, adapter_names=names), alone(pm, ids, names), atol=1e-4, rtol=1e-5)
        assert layer._stack_cache[1] is not stack
        stack = layer._stack_cache[1]
        layer.scaling["b"] *= 3.0
        torch.testing.assert_close(pm(ids, adapter_names=names), alone(pm, ids, names), atol=1e-4, rtol=1e-5)
        assert layer._stack_cache[1] is not stack


def test_routing_refuses_merged_adapters_and_leaves_the_weights_alone():
    pm = adapted(["a", "b"])
    ids = torch.randint(0, 20, (2, 3), generator=torch.Generator().manual_seed(4))
    pm.set_adapter("a")
    pm.merge_adapter()
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with torch.no_grad(), pytest.raises(RoutingError, match="merged"):
        pm(ids, adapter_names=["a", "b"])
    assert all(torch.equal(before[k], v) for k, v in pm.state_dict().items())
    pm.unmerge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids, adapter_names=["a", "b"]), alone(pm, ids, ["a", "b"]), atol=1e-5, rtol=0)


def test_fixed_weights_skips_the_version_check_but_still_sees_new_parameters():
    """core/layer.py ``fixed_weights()`` (what the server's engine runs its steps under): the stack is reused without
    reading version counters, so an in-place edit made inside is not seen until the block ends (the caller's
    promise), while a replaced parameter still is."""
    pm = adapted(["a", "b"])
    layer = pm.get_base_model().up
    ids = torch.randint(0, 20, (4, 3), generator=torch.Generator().manual_seed(5))
    names = ["a", "b", "a", BASE]
    with torch.no_grad():
        before = pm(ids, adapter_names=names)
        stack = layer._stack_cache[1]
        with fixed_weights():
            layer.lora_B["a"].weight.mul_(2.0)
            torch.testing.assert_close(pm(ids, adapter_names=names), before)  # the promise: nothing edited in place
            assert layer._stack_cache[1] is stack
            layer.lora_A["b"].weight = nn.Parameter(layer.lora_A["b"].weight * 3.0)  # a new parameter: seen
            torch.testing.assert_close(pm(ids, adapter_names=names), alone(pm, ids, names), atol=1e-4, rtol=1e-5)
        assert layer._stack_cache[1] is not stack
        torch.testing.assert_close(pm(ids, adapter_names=names), alone(pm, ids, names), atol=1e-4, rtol=1e-5)


def test_consecutive_slots_are_views_and_other_subsets_one_kept_copy():
    from peftkit.methods.lora.rows import FactorStack

    a, b, c = torch.randn(4, 5, 2), torch.randn(4, 2, 3), torch.randn(4, 3)
    stack = FactorStack({"p": 0, "q": 1, "r": 2, "s": 3}, a, b, c)
    for used in [(0, 1, 2, 3), (1, 2), (3,)]:
        got = stack.select(used)
        assert all(t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for t, s in zip(got, (a, b, c)))
        assert all(torch.equal(t, s[list(used)]) for t, s in zip(got, (a, b, c)))
    first = stack.select((0, 2))
    assert all(torch.equal(t, s[[0, 2]]) for t, s in zip(first, (a, b, c)))
    assert stack.select((0, 2))[0] is first[0]  # kept for the next step
