"""LoKr: ΔW = kron(W1, W2) · alpha / r written out by hand (Linear, Conv2d, the Tucker form), peft's factorisation of
the sizes and choice of full or factored W1 / W2, peft 0.21 interop both ways on the same weights, the config's
checks."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from models import CONV_TARGETS, ConvNet, batch, build, images, output
from peftkit import LoKrConfig, PeftModel, get_peft_model
from peftkit.core.factorised import factorization
from peftkit.errors import ConfigError

peft = pytest.importorskip("peft")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

TOL = 1e-5
TARGETS = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj", "down_proj"]}


def perturb_factors(model: nn.Module, seed: int) -> None:
    """Non-zero values for every factor (W1 starts at zero), on peft's and peftkit's models alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lokr_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def kron_by_hand(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """out[i c + p, j d + q, ...] = w1[i, j] w2[p, q, ...]."""
    (a, b), (c, d) = w1.shape, w2.shape[:2]
    out = torch.zeros(a * c, b * d, *w2.shape[2:])
    for i in range(a):
        for j in range(b):
            out[i * c : (i + 1) * c, j * d : (j + 1) * d] = w1[i, j] * w2
    return out


WIDTHS = (4, 16, 12)  # LoKr splits channel counts into factors: wider layers than LoHa's tests


def conv_net() -> ConvNet:
    return ConvNet(WIDTHS)


@pytest.mark.parametrize("dimension", [1, 7, 12, 16, 32, 127, 128, 256, 768, 3072])
@pytest.mark.parametrize("factor", [-1, 2, 4, 8, 5])
def test_factorization_splits_sizes_as_peft_does(dimension, factor):
    m, n = factorization(dimension, factor)
    assert (m, n) == peft_factorization(dimension, factor) and m * n == dimension


def test_linear_delta_by_hand_full_and_factored_w2():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 32))
    # layer 0: out 16 = 4 · 4, in 12 = 3 · 4; r=2 >= max(4, 4) / 2: W2 full. layer 1: W2 (8, 4), r=2 < 4: factored
    pm = get_peft_model(model, LoKrConfig(r=2, alpha=3, target_modules=["0", "1"]))
    state = pm.adapter_state_dict("default")
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "0.lokr_w1": (4, 3), "0.lokr_w2": (4, 4),
        "1.lokr_w1": (4, 4), "1.lokr_w2_a": (8, 2), "1.lokr_w2_b": (2, 4),
    }  # fmt: skip
    assert not state["0.lokr_w1"].any() and not state["1.lokr_w1"].any()  # identity at init
    perturb_factors(pm, seed=1)
    deltas = [
        kron_by_hand(state["0.lokr_w1"], state["0.lokr_w2"]) * 3 / 2,
        kron_by_hand(state["1.lokr_w1"], state["1.lokr_w2_a"] @ state["1.lokr_w2_b"]) * 3 / 2,
    ]
    x = torch.randn(5, 12)
    h = x
    for layer, delta in zip(model, deltas, strict=True):
        base = layer.get_base_layer()
        h = h @ (base.weight + delta).T + base.bias
    torch.testing.assert_close(pm(x), h, atol=TOL, rtol=0)
    before = model[1].get_base_layer().weight.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(model[1].get_base_layer().weight, before + deltas[1], atol=TOL, rtol=0)
    torch.testing.assert_close(pm(x), h, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(model[1].get_base_layer().weight, before, atol=1e-6, rtol=0)


def test_decompose_both_and_decompose_factor_shape_the_factors_as_peft():
    model = nn.Sequential(nn.Linear(64, 64))
    config = dict(r=1, target_modules=["0"], decompose_both=True, decompose_factor=4)
    ours = get_peft_model(copy.deepcopy(model), LoKrConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoKrConfig(**config))
    shapes = {k: tuple(v.shape) for k, v in ours.adapter_state_dict("default").items()}
    assert shapes == {"0.lokr_w1_a": (4, 1), "0.lokr_w1_b": (1, 4), "0.lokr_w2_a": (16, 1), "0.lokr_w2_b": (1, 16)}
    peft_shapes = {k.replace(".default", ""): tuple(p.shape) for k, p in theirs.named_parameters() if "lokr_" in k}
    assert sorted(peft_shapes.values()) == sorted(shapes.values())


def test_conv_delta_by_hand_flattened_and_tucker():
    """A 3x3 conv 8 -> 8 (8 = 2 · 4 both ways), r=1: W2 (4, 4·3·3) as a product, or T ×₁ W2a ×₂ W2b."""
    for effective in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
        pm = get_peft_model(model, LoKrConfig(r=1, alpha=2, target_modules=["0"], use_effective_conv2d=effective))
        perturb_factors(pm, seed=2)
        s = {k.removeprefix("0.lokr_"): v for k, v in pm.adapter_state_dict("default").items()}
        if effective:
            assert tuple(s["t2"].shape) == (1, 1, 3, 3) and tuple(s["w2_a"].shape) == (1, 4)
            w2 = s["t2"][0, 0][None, None] * s["w2_a"][0][:, None, None, None] * s["w2_b"][0][None, :, None, None]
        else:
            assert tuple(s["w2_b"].shape) == (1, 4 * 9)
            w2 = (s["w2_a"] @ s["w2_b"]).view(4, 4, 3, 3)
        delta = kron_by_hand(s["w1"], w2) * 2
        base = model[0].get_base_layer()
        x = torch.randn(2, 8, 5, 5)
        torch.testing.assert_close(pm(x), F.conv2d(x, base.weight + delta, base.bias, padding=1), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peftkit_saves_peft_loads_and_back(kind, tmp_path):
    reference = build(kind)
    config = LoKrConfig(r=2, alpha=4, target_modules=TARGETS[kind], rank_pattern={"v_proj|value": 8})
    ours = get_peft_model(copy.deepcopy(reference), config).eval()
    perturb_factors(ours, seed=4)
    inputs = batch(kind)
    expected = output(ours, inputs)
    assert (expected - output(reference, inputs)).abs().max() > 100 * TOL
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    assert isinstance(theirs.peft_config["default"], peft.LoKrConfig)
    torch.testing.assert_close(output(theirs, inputs), expected, atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    ours_keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(ours_keys) == sorted(theirs_keys)
    assert any(k.endswith(".lokr_w2") for k in ours_keys) and any(k.endswith(".lokr_w2_a") for k in ours_keys)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("init", [True, "lycoris"])
def test_peft_saves_peftkit_loads(kind, init, tmp_path):
    reference = build(kind)
    config = peft.LoKrConfig(r=2, alpha=6, target_modules=TARGETS[kind], decompose_both=True, init_weights=init)
    theirs = peft.get_peft_model(copy.deepcopy(reference), config)
    perturb_factors(theirs, seed=5)
    theirs.eval()
    inputs = batch(kind)
    expected = output(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert isinstance(ours.peft_config["default"], LoKrConfig) and ours.peft_config["default"].init_weights == init
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("effective", [False, True])
def test_conv_model_both_ways_with_peft(effective, tmp_path):
    """Conv2d (3x3, grouped and strided, 1x1), Conv1d and Linear; r=1 keeps W2 factored in every one. In the Tucker
    form the Conv1d is left out: peft 0.21 cannot run it (torch.kron fails on its (c, d, k, 1) W2's strides)."""
    reference = conv_net()
    x = images(WIDTHS[0])
    targets = [t for t in CONV_TARGETS if not (effective and t == "temporal")]
    config = dict(r=1, alpha=2, target_modules=targets, use_effective_conv2d=effective)
    ours = get_peft_model(copy.deepcopy(reference), LoKrConfig(**config)).eval()
    perturb_factors(ours, seed=6)
    expected = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(x), expected, atol=TOL, rtol=0)
    peft_made = peft.get_peft_model(copy.deepcopy(reference), peft.LoKrConfig(**config))
    perturb_factors(peft_made, seed=7)
    peft_made.eval().save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(x), peft_made(x), atol=TOL, rtol=0)
    with torch.no_grad():
        merged = loaded.merge_and_unload()(x)
    torch.testing.assert_close(merged, peft_made(x), atol=TOL, rtol=0)


def test_conv1d_updates_keep_the_kernel_apart_from_the_channels():
    """W2 (c, d, k) in full: ΔW[i c + p, j d + q, t] = W1[i, j] W2[p, q, t] (torch.kron alone, as peft 0.21 calls it,
    gives (c, a d, b k): the kernel mixed into the channels); and the Tucker form of a Conv1d runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1))
    pm = get_peft_model(model, LoKrConfig(r=8, target_modules=["0"]))
    perturb_factors(pm, seed=8)
    s = pm.adapter_state_dict("default")
    delta = kron_by_hand(s["0.lokr_w1"], s["0.lokr_w2"]) * 8 / 8
    torch.testing.assert_close(model[0].delta_weight("default"), delta, atol=TOL, rtol=0)
    model = nn.Sequential(nn.Conv1d(16, 16, 3, padding=1))
    pm = get_peft_model(model, LoKrConfig(r=1, target_modules=["0"], use_effective_conv2d=True))
    perturb_factors(pm, seed=9)
    s = pm.adapter_state_dict("default")
    assert tuple(s["0.lokr_t2"].shape) == (1, 1, 3, 1)
    w2 = s["0.lokr_t2"][0, 0, :, 0] * s["0.lokr_w2_a"][0][:, None, None] * s["0.lokr_w2_b"][0][None, :, None]
    delta = kron_by_hand(s["0.lokr_w1"], w2) * 8 / 1
    x = torch.randn(2, 16, 6)
    base = model[0].get_base_layer()
    torch.testing.assert_close(pm(x), F.conv1d(x, base.weight + delta, base.bias, padding=1), atol=TOL, rtol=0)


def test_bad_values_are_named_and_defaults_are_peft_s():
    with pytest.raises(ConfigError, match=r"r=0 .*\n.*decompose_factor=0"):
        LoKrConfig(r=0, decompose_factor=0)
    with pytest.raises(ConfigError, match=r"init_weights"):
        LoKrConfig(init_weights="gaussian")
    ours, theirs = LoKrConfig(), peft.LoKrConfig()
    for name in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights",
                 "decompose_both", "decompose_factor", "rank_dropout_scale"):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name
