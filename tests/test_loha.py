"""LoHa: ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r written out by hand (Linear, Conv2d, the Tucker form), peft 0.21
interop both ways on the same weights, and the config's checks."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from models import CONV_TARGETS, ConvNet, batch, build, images, output
from peftkit import LoHaConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError, TargetNotFoundError

peft = pytest.importorskip("peft")

TOL = 1e-5
TARGETS = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj", "down_proj"]}


def perturb_factors(model: nn.Module, seed: int) -> None:
    """Non-zero values for every factor (W2b starts at zero), on peft's and peftkit's models alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_linear_delta_by_hand_and_merge():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    pm = get_peft_model(model, LoHaConfig(r=3, alpha=6, target_modules=["0"]))
    state = pm.adapter_state_dict("default")
    assert torch.equal(state["0.hada_w2_b"], torch.zeros(3, 6))  # identity at init
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "0.hada_w1_a": (5, 3), "0.hada_w1_b": (3, 6), "0.hada_w2_a": (5, 3), "0.hada_w2_b": (3, 6)
    }  # fmt: skip
    perturb_factors(pm, seed=1)
    w1a, w1b, w2a, w2b = (state[f"0.hada_{k}"] for k in ("w1_a", "w1_b", "w2_a", "w2_b"))
    delta = torch.zeros(5, 6)
    for o in range(5):
        for i in range(6):
            delta[o, i] = sum(w1a[o, k] * w1b[k, i] for k in range(3)) * sum(w2a[o, k] * w2b[k, i] for k in range(3))
    delta *= 6 / 3
    x = torch.randn(4, 6)
    base = model[0].get_base_layer()
    expected = x @ (base.weight + delta).T + base.bias
    torch.testing.assert_close(pm(x), expected, atol=TOL, rtol=0)
    before = base.weight.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(base.weight, before + delta, atol=TOL, rtol=0)
    torch.testing.assert_close(pm(x), expected, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(base.weight, before, atol=1e-6, rtol=0)


def test_conv_delta_by_hand_flattened_and_tucker():
    """A 3x3 conv: ΔW flattened (out, in·3·3) and, with use_effective_conv2d, T ×₁ W_a ×₂ W_b, both by hand."""
    for effective in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
        pm = get_peft_model(model, LoHaConfig(r=2, alpha=3, target_modules=["0"], use_effective_conv2d=effective))
        perturb_factors(pm, seed=2)
        s = {k.removeprefix("0.hada_"): v for k, v in pm.adapter_state_dict("default").items()}
        if effective:
            assert tuple(s["t1"].shape) == (2, 2, 3, 3) and tuple(s["w1_a"].shape) == (2, 6)
            halves = [
                sum(s[f"t{i}"][p, q, None, None, :, :] * s[f"w{i}_a"][p, :, None, None, None]
                    * s[f"w{i}_b"][q, None, :, None, None] for p in range(2) for q in range(2))
                for i in (1, 2)
            ]  # fmt: skip
        else:
            assert tuple(s["w1_b"].shape) == (2, 4 * 9)
            halves = [(s[f"w{i}_a"] @ s[f"w{i}_b"]).view(6, 4, 3, 3) for i in (1, 2)]
        delta = halves[0] * halves[1] * 3 / 2
        base = model[0].get_base_layer()
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(pm(x), F.conv2d(x, base.weight + delta, base.bias, padding=1), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peftkit_saves_peft_loads_and_back(kind, tmp_path):
    reference = build(kind)
    config = LoHaConfig(r=4, alpha=8, target_modules=TARGETS[kind], rank_pattern={"v_proj|value": 2})
    ours = get_peft_model(copy.deepcopy(reference), config).eval()
    perturb_factors(ours, seed=4)
    inputs = batch(kind)
    expected = output(ours, inputs)
    assert (expected - output(reference, inputs)).abs().max() > 100 * TOL
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    assert isinstance(theirs.peft_config["default"], peft.LoHaConfig)
    torch.testing.assert_close(output(theirs, inputs), expected, atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    ours_keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(ours_keys) == sorted(theirs_keys)
    assert any(k.endswith("value.hada_w1_a") or k.endswith("v_proj.hada_w1_a") for k in ours_keys)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_saves_peftkit_loads(kind, tmp_path):
    reference = build(kind)
    config = peft.LoHaConfig(r=4, alpha=16, target_modules=TARGETS[kind], alpha_pattern={"q_proj|query": 2})
    theirs = peft.get_peft_model(copy.deepcopy(reference), config)
    perturb_factors(theirs, seed=5)
    theirs.eval()
    inputs = batch(kind)
    expected = output(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert isinstance(ours.peft_config["default"], LoHaConfig)
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)
    ours.merge_adapter()  # the merged weights give peft's outputs too
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("effective", [False, True])
def test_conv_model_both_ways_with_peft(effective, tmp_path):
    reference = ConvNet()
    x = images()
    config = dict(r=3, alpha=6, target_modules=CONV_TARGETS, use_effective_conv2d=effective)
    ours = get_peft_model(copy.deepcopy(reference), LoHaConfig(**config)).eval()
    perturb_factors(ours, seed=6)
    expected = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(x), expected, atol=TOL, rtol=0)
    peft_made = peft.get_peft_model(copy.deepcopy(reference), peft.LoHaConfig(**config))
    perturb_factors(peft_made, seed=7)
    peft_made.eval().save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(x), peft_made(x), atol=TOL, rtol=0)
    with torch.no_grad():
        merged = loaded.merge_and_unload()(x)  # grouped, strided and 1x1 convs merge exactly
    torch.testing.assert_close(merged, peft_made(x), atol=TOL, rtol=0)


def test_a_reflect_padded_conv_pads_the_update_as_the_base():
    """The update runs through the base conv's own padding mode, so merged output equals unmerged output (peft 0.21
    zero-pads the update of a reflect-padded conv, so its merge changes the output)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    pm = get_peft_model(model, LoHaConfig(r=2, target_modules=["0"])).eval()
    perturb_factors(pm, seed=9)
    x = images()
    unmerged = pm(x)
    base = model[0].get_base_layer()
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), base.weight + pm.base_model.model[0].delta_weight(
        "default"), base.bias)  # fmt: skip
    torch.testing.assert_close(unmerged, expected, atol=TOL, rtol=0)
    pm.merge_adapter()
    torch.testing.assert_close(pm(x), unmerged, atol=TOL, rtol=0)


def test_module_and_rank_dropout_only_while_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    pm = get_peft_model(model, LoHaConfig(r=2, target_modules=["0"], module_dropout=0.5, rank_dropout=0.5))
    perturb_factors(pm, seed=8)
    x = torch.randn(3, 8)
    pm.eval()
    assert torch.equal(pm(x), pm(x))  # no dropout at inference
    pm.train()
    outs = {tuple(pm(x).detach().flatten().tolist()) for _ in range(20)}
    assert len(outs) > 2  # skipped, rows dropped, kept: several different outputs


def test_gpt2_conv1d_is_refused_and_bad_values_named():
    with pytest.raises(ConfigError, match=r"c_attn.*Conv1D.*Linear, Conv1d, Conv2d"):
        get_peft_model(build("gpt2"), LoHaConfig(target_modules=["c_attn"]))
    with pytest.raises(TargetNotFoundError):
        get_peft_model(build("gpt2"), LoHaConfig(target_modules="all-linear"))
    with pytest.raises(ConfigError, match=r"r=0 .*\n.*rank_dropout=1.5.*\n.*rank_pattern"):
        LoHaConfig(r=0, rank_dropout=1.5, rank_pattern={"q": 0})


def test_defaults_are_peft_s():
    ours, theirs = LoHaConfig(), peft.LoHaConfig()
    for name in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rank_pattern == theirs.rank_pattern == {} and ours.alpha_pattern == theirs.alpha_pattern == {}
