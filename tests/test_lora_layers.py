"""LoRA layers peft 0.21 also has (issue 23 item 7): lora_bias, grouped convolutions, nn.MultiheadAttention, the
init_lora_weights values; each checked against peft on the same weights (1e-5) where peft has the behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit import errors as peftkit_errors
from peftkit.errors import ConfigError, MergeError

peft = pytest.importorskip("peft")
TOL = 1e-5


class ConvNet(nn.Module):
    """A Linear, a plain and a grouped Conv2d, a grouped Conv1d: (B, 4, 6, 6) -> (B, 3)."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.gconv1d = nn.Conv1d(8, 4, 3, padding=1, groups=groups)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gconv(torch.relu(self.conv(x)))  # (B, 8, 6, 6)
        h = self.gconv1d(h.flatten(2))  # (B, 4, 36)
        return self.head(h.mean(-1))


def conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet()


def inputs() -> torch.Tensor:
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def via_peft(base: nn.Module, tmp_path, **config):
    """peft's adapter with random factors (init False: B and its bias random), saved; and its outputs."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    return theirs, tmp_path / "peft"


# ---- lora_bias ------------------------------------------------------------------------------------------------
def test_lora_bias_loads_from_peft_with_the_same_outputs_and_keys(tmp_path):
    base = conv_net()
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["conv", "head"], "lora_bias": True}
    theirs, folder = via_peft(base, tmp_path, **config)
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.model.head.lora_B.bias" in keys and "base_model.model.conv.lora_B.bias" in keys
    mine = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x), atol=TOL, rtol=0)
    mine.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == keys
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), atol=TOL, rtol=0)


def test_lora_bias_starts_at_zero_trains_and_merges_into_the_base_bias():
    base = conv_net()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["head"], lora_bias=True))
    lora = pm.get_base_model().head
    bias = lora.lora_B["default"].bias
    assert bias is not None and bias.requires_grad and torch.count_nonzero(bias) == 0
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), base(x))  # identity at start
        bias.add_(1.0)
        lora.lora_B["default"].weight.normal_()
        unmerged = pm(x)
        pm.merge_adapter()
        torch.testing.assert_close(pm.get_base_model().head.bias, base.head.bias + lora.scaling["default"] * bias)
        torch.testing.assert_close(pm(x), unmerged, atol=TOL, rtol=0)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm.get_base_model().head.bias, base.head.bias, atol=1e-6, rtol=0)


def test_lora_bias_on_a_layer_without_bias_refuses_to_merge_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["0"], lora_bias=True, init_lora_weights=False))
    before = model[0].weight.detach().clone() if hasattr(model[0], "weight") else None
    with pytest.raises(MergeError, match="no bias to fold"):
        pm.merge_adapter()
    torch.testing.assert_close(pm.get_base_model()[0].weight, before)
    assert pm.get_base_model()[0].merged_adapters == []


def test_lora_bias_on_an_embedding_is_refused_by_name():
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ConfigError, match=r"lora_bias=True is not supported on '0' \(LoraEmbedding\)"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    assert isinstance(model[0], nn.Embedding)  # nothing half-applied


def test_lora_bias_survives_routing_and_cat_combination():
    base = conv_net()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["head"], lora_bias=True))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["head"], lora_bias=True))
    pm.eval()
    for name in ("default", "b"):
        with torch.no_grad():
            for p in pm.get_base_model().head.adapter_parameters(name):
                p.normal_()
    x = inputs()
    with torch.no_grad():
        pm.set_adapter("default")
        only_a = pm(x)
        pm.set_adapter("b")
        only_b = pm(x)
        routed = pm(x, adapter_names=["default", "b"])
        torch.testing.assert_close(routed, torch.stack([only_a[0], only_b[1]]), atol=TOL, rtol=0)
        pm.add_weighted_adapter(["default", "b"], [1.0, 1.0], "sum", combination_type="cat")
        pm.set_adapter("sum")
        expected = only_a + only_b - base(x)  # the head is linear: the two updates add
        torch.testing.assert_close(pm(x), expected, atol=TOL, rtol=0)


# ---- grouped convolutions -------------------------------------------------------------------------------------
def test_grouped_conv_loads_from_peft_with_the_same_outputs_and_back(tmp_path):
    base = conv_net()
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["gconv", "gconv1d", "conv"]}
    theirs, folder = via_peft(base, tmp_path, **config)
    mine = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert tuple(mine.get_base_model().gconv.lora_B["default"].weight.shape) == (8, 2, 1, 1)  # r / groups columns
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x), atol=TOL, rtol=0)
        assert not torch.allclose(mine(x), base(x), atol=1e-3)
    mine.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), atol=TOL, rtol=0)


def test_grouped_conv_starts_as_the_identity_and_routes_per_row():
    base = conv_net()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["gconv"])).eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), base(x))
        for p in pm.get_base_model().gconv.adapter_parameters("default"):
            p.normal_()
        adapted = pm(x)
        routed = pm(x, adapter_names=["default", "__base__"])
    torch.testing.assert_close(routed, torch.stack([adapted[0], base(x)[1]]), atol=TOL, rtol=0)


def test_grouped_conv_refuses_to_merge_and_leaves_the_model_unchanged():
    base = conv_net()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["gconv"], init_lora_weights=False))
    with pytest.raises(MergeError, match="grouped convolution"):
        pm.merge_adapter()
    torch.testing.assert_close(pm.get_base_model().gconv.weight, base.gconv.weight)


def test_grouped_conv_needs_a_rank_divisible_by_groups():
    model = conv_net()
    with pytest.raises(ConfigError, match=r"'gconv'.*groups=2.*r=3"):
        get_peft_model(model, LoraConfig(r=3, target_modules=["gconv"]))
    assert isinstance(model.gconv, nn.Conv2d)


def test_grouped_conv_refuses_cat_and_svd_combination():
    pm = get_peft_model(conv_net(), LoraConfig(r=2, target_modules=["gconv"]))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["gconv"]))
    for kind in ("cat", "svd"):
        with pytest.raises(ConfigError, match="grouped convolution"):
            pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type=kind)
    assert "mix" not in pm.peft_config


# ---- init_lora_weights ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["mica", "orthogonal"])
def test_peft_inits_peftkit_lacks_are_refused_naming_what_is_supported(init):
    assert init in str(peft.LoraConfig.__dataclass_fields__["init_lora_weights"].type)
    with pytest.raises(ConfigError, match=r"does not implement yet; supported: True .*False .*'gaussian'.*'pissa'"):
        LoraConfig(init_lora_weights=init)


def test_gaussian_init_draws_a_with_std_one_over_r_and_zero_b():
    model = nn.Sequential(nn.Linear(256, 256))
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights="gaussian"))
    layer = pm.get_base_model()[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert abs(a.std().item() - 1 / 4) < 0.02 and abs(a.mean().item()) < 0.02
    assert torch.count_nonzero(b) == 0


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_supported_inits_match_peft_in_distribution_and_identity(init):
    """Same init family as peft: True / 'gaussian' keep the output (B = 0), False does not; A's spread as peft's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    x = torch.randn(3, 128)
    mine = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, target_modules=["0"], init_lora_weights=init))
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=8, target_modules=["0"], init_lora_weights=init)
    )
    with torch.no_grad():
        assert torch.allclose(mine(x), model(x)) == torch.allclose(theirs(x), model(x)) == (init is not False)
    a_mine = mine.get_base_model()[0].lora_A["default"].weight
    a_theirs = theirs.base_model.model[0].lora_A["default"].weight
    assert abs(a_mine.std().item() - a_theirs.std().item()) < 0.2 * a_theirs.std().item()


# ---- nn.MultiheadAttention ------------------------------------------------------------------------------------
class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0])


def attn_net() -> AttnNet:
    torch.manual_seed(0)
    return AttnNet()


def by_hand(base: AttnNet, lora: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The formula: a plain copy with in_proj_weight + s B A and out_proj.weight + s B' A' written in."""
    ref, s = copy.deepcopy(base), lora.scaling["default"]
    with torch.no_grad():
        ref.attn.in_proj_weight += s * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
        ref.attn.out_proj.weight += s * lora.out_lora_B["default"].weight @ lora.out_lora_A["default"].weight
        return ref(x)


def test_mha_files_load_both_ways_with_peft_keys_and_the_formula(tmp_path):
    base, x = attn_net(), torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    theirs, folder = via_peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["attn"])
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert keys == {
        f"base_model.model.attn.{k}.weight"
        for k in ("lora_A", "lora_B", "base_layer.out_proj.lora_A", "base_layer.out_proj.lora_B")
    }
    mine = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    lora = mine.get_base_model().attn
    with torch.no_grad():
        torch.testing.assert_close(
            lora.out_lora_B["default"].weight, theirs.attn.base_layer.out_proj.lora_B["default"].weight
        )
        torch.testing.assert_close(mine(x), by_hand(base, lora, x), atol=TOL, rtol=0)
        assert not torch.allclose(mine(x), base(x), atol=1e-3)
    mine.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == keys
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    for key, value in peft.get_peft_model_state_dict(back).items():
        torch.testing.assert_close(value, peft.get_peft_model_state_dict(theirs)[key])


def test_mha_equals_peft_on_the_in_projection(tmp_path):
    """peft 0.21 adds the out_proj update twice (huggingface/peft PR #3774); with B' = 0 the outputs must agree."""
    base, x = attn_net(), torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["attn"], init_lora_weights=False)
    ).eval()
    with torch.no_grad():
        theirs.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
    theirs.save_pretrained(tmp_path)
    mine = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x), atol=TOL, rtol=0)


def test_mha_trains_merges_exactly_and_refuses_routing():
    base, x = attn_net(), torch.randn(2, 5, 16)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["attn"]))
    lora = pm.get_base_model().attn
    with torch.no_grad():
        torch.testing.assert_close(pm(x), base(x))  # B = B' = 0 at init
    pm(x).sum().backward()
    assert lora.lora_B["default"].weight.grad.abs().sum() > 0 and lora.out_lora_B["default"].weight.grad.abs().sum() > 0
    assert lora.in_proj_weight.grad is None  # the base stays frozen
    with torch.no_grad():
        for p in lora.adapter_parameters("default"):
            p.normal_(std=0.1)
        unmerged = pm(x)
        torch.testing.assert_close(unmerged, by_hand(base, lora, x), atol=TOL, rtol=0)
        pm.merge_adapter()
        torch.testing.assert_close(pm(x), unmerged, atol=TOL, rtol=0)
        pm.unmerge_adapter()
        torch.testing.assert_close(lora.in_proj_weight, base.attn.in_proj_weight, atol=1e-6, rtol=0)
    pm.eval()
    with pytest.raises(peftkit_errors.RoutingError, match="MultiheadAttention"):
        pm(x, adapter_names=["default", "__base__"])
    plain = pm.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(plain(x), unmerged, atol=TOL, rtol=0)


def test_mha_inside_a_transformer_layer_is_not_bypassed_by_its_fused_inference_path():
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    pm = get_peft_model(copy.deepcopy(block), LoraConfig(r=2, target_modules=["self_attn"], init_lora_weights=False))
    pm.eval()
    with torch.no_grad():
        adapted, base_out = pm(x), block(x)
        assert not torch.allclose(adapted, base_out, atol=1e-3)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x), base_out, atol=TOL, rtol=0)
    pm.train()
    torch.testing.assert_close(pm(x), adapted, atol=TOL, rtol=0)  # the unfused path gives the same


def test_out_proj_inside_mha_is_refused_as_a_target():
    model = attn_net()
    with pytest.raises(ConfigError, match=r"inside nn.MultiheadAttention \['attn'\].*Target the attention module"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["out_proj"]))
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_mha_with_lora_bias_or_separate_projections_is_refused():
    with pytest.raises(ConfigError, match="lora_bias=True is not supported on 'attn'"):
        get_peft_model(attn_net(), LoraConfig(r=2, target_modules=["attn"], lora_bias=True))
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(16, 2, kdim=8, vdim=8))
    with pytest.raises(ConfigError, match="packed query/key/value"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["attn"]))
