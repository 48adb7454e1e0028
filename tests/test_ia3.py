"""(IA)3 against its formulas written out by hand: l ⊙ (W x + b) for key/value, W (l ⊙ x) + b for feed-forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import batch, build, clone, output, perturb
from peftkit import BASE, IA3Config, LoraConfig, get_peft_model
from peftkit.errors import ConfigError, TargetNotFoundError
from peftkit.methods.ia3 import UNMERGE_GUARD, IA3Layer

TOL = 1e-5


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def randomise(pm, name: str = "default", seed: int = 0) -> None:
    perturb(pm, name, seed=seed, scale=0.5)


def vec(layer: IA3Layer, name: str = "default") -> torch.Tensor:
    return layer.ia3_l[name].detach().reshape(-1)


def test_linear_output_and_input_scaling_by_hand():
    net = mlp()
    w0, b0, w2, b2 = (t.detach().clone() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    pm = get_peft_model(net, IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    randomise(pm)
    l0, l2 = vec(pm.model[0]), vec(pm.model[2])
    assert pm.model[0].ia3_l["default"].shape == (5, 1) and pm.model[2].ia3_l["default"].shape == (1, 5)  # peft's
    x = torch.randn(3, 6)
    h = l0 * (x @ w0.T + b0)  # key/value rule: scale the output (bias included)
    expected = (l2 * torch.relu(h)) @ w2.T + b2  # feed-forward rule: scale the input
    torch.testing.assert_close(pm(x), expected, atol=TOL, rtol=0)


def test_merge_formula_scales_rows_and_bias_or_columns():
    net = mlp()
    w0, b0, w2, b2 = (t.detach().clone() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    pm = get_peft_model(net, IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    randomise(pm)
    l0, l2 = vec(pm.model[0]), vec(pm.model[2])
    pm.merge_adapter()
    base0, base2 = pm.model[0].get_base_layer(), pm.model[2].get_base_layer()
    torch.testing.assert_close(base0.weight, w0 * l0[:, None], atol=TOL, rtol=0)
    torch.testing.assert_close(base0.bias, b0 * l0, atol=TOL, rtol=0)
    torch.testing.assert_close(base2.weight, w2 * l2[None, :], atol=TOL, rtol=0)
    assert torch.equal(base2.bias, b2)  # feed-forward: the bias is added after W, not scaled


def test_gpt2_conv1d_layers_by_hand():
    pm = get_peft_model(build("gpt2"), IA3Config(task_type="CAUSAL_LM"))  # c_attn (k/v rule), mlp.c_proj (ff)
    randomise(pm)
    attn, proj = pm.model.transformer.h[0].attn.c_attn, pm.model.transformer.h[0].mlp.c_proj
    assert not attn.is_feedforward and proj.is_feedforward and attn.fan_in_fan_out
    x = torch.randn(2, 3, 32)
    w, b = attn.get_base_layer().weight, attn.get_base_layer().bias  # (in, out)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), vec(attn) * (x @ w + b), atol=TOL, rtol=0)
        x = torch.randn(2, 3, 128)
        w, b = proj.get_base_layer().weight, proj.get_base_layer().bias
        torch.testing.assert_close(proj(x), (vec(proj) * x) @ w + b, atol=TOL, rtol=0)


def test_conv2d_output_and_grouped_input_scaling_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1, groups=2))
    c0, c2 = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 4, 1, groups=2)
    c0.load_state_dict(net[0].state_dict())
    c2.load_state_dict(net[2].state_dict())
    pm = get_peft_model(net, IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    randomise(pm)
    l0, l2 = vec(pm.model[0]), vec(pm.model[2])
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        h = torch.relu(c0(x) * l0[None, :, None, None])
        expected = F.conv2d(h * l2[None, :, None, None], c2.weight, c2.bias, groups=2)
        torch.testing.assert_close(pm(x), expected, atol=TOL, rtol=0)
        pm.merge_adapter()  # the grouped weight scale must line input channels up with their groups
        torch.testing.assert_close(pm(x), expected, atol=TOL, rtol=0)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm.model[2].get_base_layer().weight, c2.weight, atol=TOL, rtol=0)


def test_unmerge_is_exact_with_zero_and_tiny_scales():
    net = mlp()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    pm = get_peft_model(net, IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    randomise(pm)
    with torch.no_grad():  # scales a naive W * s / s cannot invert: 0, subnormal-making, just under the guard
        pm.model[0].ia3_l["default"][:3, 0] = torch.tensor([0.0, 1e-30, UNMERGE_GUARD / 2])
        pm.model[2].ia3_l["default"][0, :2] = torch.tensor([0.0, -1e-12])
    out = pm(torch.ones(2, 6))
    pm.merge_adapter()
    assert torch.all(pm.model[0].get_base_layer().weight[0] == 0)  # the information is gone from W ...
    torch.testing.assert_close(pm(torch.ones(2, 6)), out, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    restored = pm.get_base_model().state_dict()
    for key, value in original.items():
        key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.isfinite(restored[key]).all()
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=1e-6)
    # ... and the guarded slices come back bit for bit
    assert torch.equal(pm.model[0].get_base_layer().weight[:3], original["0.weight"][:3])
    assert torch.equal(pm.model[0].get_base_layer().bias[:3], original["0.bias"][:3])
    assert torch.equal(pm.model[2].get_base_layer().weight[:, :2], original["2.weight"][:, :2])


def test_unmerge_uses_the_scale_of_merge_time():
    pm = get_peft_model(mlp(), IA3Config(target_modules=["0"], feedforward_modules=[]))
    randomise(pm)
    w = pm.model[0].get_base_layer().weight.clone()
    pm.merge_adapter()
    with torch.no_grad():
        pm.model[0].ia3_l["default"].mul_(3)  # an optimiser step while merged
    pm.unmerge_adapter()
    torch.testing.assert_close(pm.model[0].get_base_layer().weight, w, atol=TOL, rtol=0)


def test_two_active_adapters_multiply_and_route_per_row():
    pm = get_peft_model(mlp(), IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    pm.add_adapter("b", IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    randomise(pm, "default", 0)
    randomise(pm, "b", 1)
    lin0, lin2 = pm.model[0].get_base_layer(), pm.model[2].get_base_layer()

    def by_hand(x, l0, l2):
        return lin2(l2 * torch.relu(l0 * lin0(x)))

    x = torch.randn(4, 6)
    la = (vec(pm.model[0]), vec(pm.model[2]))
    lb = (vec(pm.model[0], "b"), vec(pm.model[2], "b"))
    with torch.no_grad():
        pm.set_adapter(["default", "b"])
        torch.testing.assert_close(pm(x), by_hand(x, la[0] * lb[0], la[1] * lb[1]), atol=TOL, rtol=0)
        pm.eval()
        mixed = pm(x, adapter_names=["b", BASE, "default", "b"])
        ones = (torch.ones(5), torch.ones(5))
        for row, scales in enumerate([lb, ones, la, lb]):
            torch.testing.assert_close(mixed[row], by_hand(x[row], *scales), atol=TOL, rtol=0)


def test_peft_defaults_per_model_type():
    pm = get_peft_model(build("bert"), IA3Config(task_type="SEQ_CLS"))
    layers = {n: m for n, m in pm.model.named_modules() if isinstance(m, IA3Layer)}
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in layers})
    assert suffixes == ["output.dense", "self.key", "self.value"]  # both attention.output.dense and output.dense
    ff = sorted({".".join(n.split(".")[-3:]) for n, m in layers.items() if m.is_feedforward})
    assert ff == ["0.output.dense", "1.output.dense", "attention.output.dense"]  # peft's suffix rule
    assert pm.peft_config["default"].feedforward_modules == ["output.dense"]

    pm = get_peft_model(build("llama"), IA3Config(task_type="CAUSAL_LM"))
    layers = {n.split(".")[-1]: m for n, m in pm.model.named_modules() if isinstance(m, IA3Layer)}
    assert sorted(layers) == ["down_proj", "k_proj", "v_proj"]
    assert layers["down_proj"].is_feedforward and not layers["k_proj"].is_feedforward
    assert layers["down_proj"].ia3_l["default"].shape == (1, 64) and layers["k_proj"].ia3_l["default"].shape == (16, 1)


def test_only_vectors_and_head_get_gradients():
    pm = get_peft_model(build("bert"), IA3Config(task_type="SEQ_CLS"))
    pm.train()
    loss = pm(**batch("bert"), labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad and all(".ia3_l." in n or ".modules_to_save." in n for n in with_grad)
    assert sum(".ia3_l." in n for n in with_grad) == 2 * 4  # key, value, two output.dense per layer


def test_init_false_is_random_and_lives_beside_lora():
    base = build("llama")
    reference = clone(base)
    pm = get_peft_model(base, IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    inputs = batch("llama")
    assert not torch.allclose(output(pm, inputs), output(reference, inputs), atol=1e-3)
    pm.add_adapter("lora", LoraConfig(target_modules=["k_proj", "q_proj"], task_type="CAUSAL_LM"))
    perturb(pm, "lora")
    ia3_out = output(pm, inputs)
    pm.set_adapter("lora")
    lora_out = output(pm, inputs)
    pm.set_adapter("default")
    torch.testing.assert_close(output(pm, inputs), ia3_out, atol=TOL, rtol=0)
    assert not torch.allclose(ia3_out, lora_out, atol=1e-3)
    # a second (IA)3 adapter joins the (IA)3 layer now inside LoRA's wrapper: one (IA)3 layer per module
    pm.add_adapter("c", IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    assert sum(isinstance(m, IA3Layer) for m in pm.modules()) == 2 * 3
    assert pm.model.model.layers[0].self_attn.k_proj.base_layer.adapter_names == ["default", "c"]
    before = {k: v.clone() for k, v in pm.get_base_model().state_dict().items()}
    pm.set_adapter(["default", "lora", "c"])
    combined = output(pm, inputs)
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, inputs), combined, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    after = pm.get_base_model().state_dict()
    assert all(torch.allclose(after[k], v, atol=TOL) for k, v in before.items())


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_feedforward_not_subset_of_targets():
    with pytest.raises(ConfigError, match=r"feedforward_modules=\['down_proj'\].*subset of target_modules"):
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])


def test_bad_values_reported_together():
    with pytest.raises(ConfigError) as err:
        IA3Config(target_modules="(", feedforward_modules="[", init_ia3_weights="yes")
    message = str(err.value)
    assert "target_modules='('" in message and "feedforward_modules='['" in message and "init_ia3_weights" in message


def test_unknown_model_type_needs_targets():
    with pytest.raises(
        ConfigError, match=r"no default target_modules for model type 'Sequential'.*Pass target_modules"
    ):
        get_peft_model(mlp(), IA3Config())


def test_unsupported_and_unmatched_targets():
    model = build("bert")
    with pytest.raises(ConfigError, match=r"word_embeddings.*Embedding.*Supported: Linear, GPT-2 Conv1D, Conv2d"):
        get_peft_model(model, IA3Config(target_modules=["word_embeddings", "query"], feedforward_modules=[]))
    with pytest.raises(TargetNotFoundError, match=r"No module matched target_modules=\['q_proj'\]. Candidates"):
        get_peft_model(model, IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    assert not any(isinstance(m, IA3Layer) for m in model.modules())  # nothing half-applied


def test_conflicting_feedforward_roles_leave_model_unchanged():
    pm = get_peft_model(mlp(), IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    with pytest.raises(ConfigError, match=r"'2' is a feed-forward \(IA\)3 layer for one adapter"):
        pm.add_adapter("b", IA3Config(target_modules=["0", "2"], feedforward_modules=[]))
    assert pm.model[0].adapter_names == ["default"] and list(pm.peft_config) == ["default"]


def test_linear_combination_by_hand():
    pm = get_peft_model(mlp(), IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    pm.add_adapter("b", IA3Config(target_modules=["0"], feedforward_modules=[]))
    randomise(pm, "default", 0)
    randomise(pm, "b", 1)
    pm.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix", combination_type="linear")
    assert pm.active_adapters == ["default"] and pm.peft_config["mix"].feedforward_modules == ["2"]
    l0, l2 = pm.model[0], pm.model[2]
    torch.testing.assert_close(vec(l0, "mix"), 0.7 * vec(l0) + 0.3 * vec(l0, "b"), atol=TOL, rtol=0)
    torch.testing.assert_close(vec(l2, "mix"), 0.7 * vec(l2) + 0.3, atol=TOL, rtol=0)  # "b" absent: l = 1
    with pytest.raises(ConfigError, match=r"combination_type='svd'.*only with 'linear'"):
        pm.add_weighted_adapter(["default", "b"], [0.7, 0.3], "bad", combination_type="svd")
    assert "bad" not in pm.peft_config
