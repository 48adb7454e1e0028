"""LoRA reliability: what third-party code reads from an adapted layer (issue 23 item 6, LoRA part) and
add_weighted_adapter's svd_rank bounds (issue 15 item 20)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3)
        self.emb = nn.Embedding(11, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(ids))


def adapted() -> tuple[Net, nn.Module]:
    torch.manual_seed(0)
    base = Net()
    return base, get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj", "conv", "emb"]))


# ---- issue 15 item 20: svd_rank above a layer's size -----------------------------------------------------------
def test_svd_rank_above_the_layer_size_is_clamped_with_a_warning():
    torch.manual_seed(0)
    pm = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj", "conv"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["proj", "conv"], init_lora_weights=False))
    with pytest.warns(UserWarning, match=r"svd_rank=1000000 exceeds min\(out_features, in_features\) of 2 layer"):
        pm.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix", combination_type="svd", svd_rank=10**6)
    layers = pm.get_base_model()
    assert layers.proj.r["mix"] == 5 and tuple(layers.proj.lora_A["mix"].weight.shape) == (5, 6)
    assert layers.conv.r["mix"] == 4 and tuple(layers.conv.lora_B["mix"].weight.shape) == (4, 4, 1, 1)
    # full rank there: the combination is exact
    for name in ("proj", "conv"):
        layer = getattr(layers, name)
        expected = 0.7 * layer.delta_weight("default") + 0.3 * layer.delta_weight("b")
        torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-5, rtol=0)


def test_svd_rank_within_bounds_warns_nothing(recwarn):
    pm = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj"]))
    pm.add_weighted_adapter(["default"], [1.0], "mix", combination_type="svd", svd_rank=3)
    assert pm.get_base_model().proj.r["mix"] == 3
    assert not [w for w in recwarn if "svd_rank" in str(w.message)]


# ---- issue 23 item 6 (LoRA part): what third-party code reads from an adapted layer ---------------------------
def test_adapted_layers_expose_the_wrapped_modules_attributes():
    _, pm = adapted()
    model = pm.get_base_model()
    assert (model.proj.in_features, model.proj.out_features) == (6, 5)
    assert (model.conv.in_channels, model.conv.out_channels, model.conv.kernel_size) == (3, 4, (3, 3))
    assert (model.emb.num_embeddings, model.emb.embedding_dim, model.emb.padding_idx) == (11, 6, None)
    assert model.proj.weight is model.proj.base_layer.weight and model.proj.bias is model.proj.base_layer.bias
    assert model.conv.weight.shape == (4, 3, 3, 3) and model.emb.weight.shape == (11, 6)
    with pytest.raises(AttributeError):
        model.proj.no_such_attribute  # noqa: B018 - still an AttributeError, not silently None


def test_adapted_layers_report_their_adapter_state():
    _, pm = adapted()
    proj = pm.get_base_model().proj
    assert proj.active_adapters == ["default"] and proj.merged_adapters == []
    pm.merge_adapter()
    assert proj.merged_adapters == ["default"]
    pm.unmerge_adapter()
    assert proj.merged_adapters == []


def test_adapted_layers_have_peft_merged_and_disable_adapters_flags():
    _, pm = adapted()
    proj = pm.get_base_model().proj
    assert proj.merged is False and proj.disable_adapters is False
    pm.merge_adapter()
    assert proj.merged is True
    pm.unmerge_adapter()
    with pm.disable_adapter():
        assert proj.disable_adapters is True
    assert proj.disable_adapters is False
