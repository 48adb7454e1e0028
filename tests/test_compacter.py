"""Compacter: PHM weights as sums of Kronecker products, the shared rule saved once, parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models import batch, build, minilm_folder, needs_minilm, output, perturb
from peftkit import CompacterConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError
from peftkit.methods.bottleneck import BottleneckLayer
from peftkit.methods.compacter import PHMLinear, PHMRule, kron_sum, parameter_count

TOL = 1e-5


def compacter_layers(pm) -> list[BottleneckLayer]:
    return [m for m in pm.get_base_model().modules() if isinstance(m, BottleneckLayer)]


def test_phm_weight_is_a_sum_of_kronecker_products_of_rule_and_low_rank_fast_matrices():
    torch.manual_seed(0)
    n, d_in, d_out, rank = 4, 8, 12, 2
    rule = PHMRule(n).phm_rule
    phm = PHMLinear(d_in, d_out, n, rank)
    fast = [phm.phm_s[i] @ phm.phm_t[i] for i in range(n)]  # B_i = s_i t_i^T, (d_in / n, d_out / n)
    expected = sum(torch.kron(rule[i], fast[i]) for i in range(n))
    assert torch.linalg.matrix_rank(fast[0]) == rank
    torch.testing.assert_close(phm.weight(rule), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(kron_sum(rule, torch.stack(fast)), expected, atol=1e-6, rtol=0)
    x = torch.randn(3, d_in)
    torch.testing.assert_close(phm(x, rule), x @ expected + phm.bias, atol=1e-6, rtol=0)


def test_inference_reuses_the_weight_until_a_factor_changes():
    torch.manual_seed(0)
    rule, phm = PHMRule(2).phm_rule, PHMLinear(4, 6, 2, 1)
    with torch.no_grad():
        first = phm.weight(rule)
        assert phm.weight(rule) is first  # built once
        for factor in (phm.phm_t, phm.phm_s, rule):  # an optimizer step or a load writes in place
            factor.add_(0.5)
            again = phm.weight(rule)
            assert again is not first
            expected = sum(torch.kron(rule[i], phm.phm_s[i] @ phm.phm_t[i]) for i in range(2))
            torch.testing.assert_close(again, expected, atol=1e-6, rtol=0)
            first = again
    with_grad = phm.weight(rule)  # training: a fresh graph every call
    assert with_grad.requires_grad and with_grad is not phm.weight(rule)


def test_compacter_layer_output_against_the_equation():
    pm = get_peft_model(build("bert"), CompacterConfig(preset="compacter++", bottleneck_size=8))
    perturb(pm, "default")
    layer = compacter_layers(pm)[0]
    rule = layer.compacter_rule["default"].phm_rule
    down, up = layer.compacter_down["default"], layer.compacter_up["default"]
    x = torch.randn(2, 3, 64)
    h = layer.base_layer(x)
    w_down = sum(torch.kron(rule[i], down.phm_s[i] @ down.phm_t[i]) for i in range(4))  # (32, 8)
    w_up = sum(torch.kron(rule[i], up.phm_s[i] @ up.phm_t[i]) for i in range(4))  # (8, 32)
    expected = h + F.gelu(h @ w_down + down.bias) @ w_up + up.bias
    torch.testing.assert_close(layer(x), expected, atol=TOL, rtol=0)


def test_shared_rule_is_one_tensor_saved_once_and_shared_again_after_loading(tmp_path):
    base = build("llama")
    reference = copy.deepcopy(base)
    pm = get_peft_model(base, CompacterConfig(bottleneck_size=8, task_type="CAUSAL_LM"))
    rules = {id(layer.compacter_rule["default"].phm_rule) for layer in compacter_layers(pm)}
    assert len(rules) == 1 and len(compacter_layers(pm)) == 4
    perturb(pm, "default")
    state = pm.adapter_state_dict("default")
    assert [k for k in state if "compacter_rule" in k] == ["model.layers.0.self_attn.o_proj.compacter_rule.phm_rule"]
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
    inputs = batch("llama")
    torch.testing.assert_close(output(loaded, inputs), output(pm.eval(), inputs), atol=TOL, rtol=0)
    loaded_rules = [layer.compacter_rule["default"].phm_rule for layer in compacter_layers(loaded)]
    assert len({id(r) for r in loaded_rules}) == 1
    torch.testing.assert_close(loaded_rules[0], pm.adapter_state_dict("default")[next(k for k in state if "rule" in k)])


@pytest.mark.parametrize(("preset", "per_layer"), [("compacter", 2), ("compacter++", 1)])
def test_parameter_count_follows_the_paper(preset, per_layer):
    pm = get_peft_model(build("llama"), CompacterConfig(preset=preset, bottleneck_size=8))
    trainable, _ = pm.get_nb_trainable_parameters()
    d, k, n, layers = 32, 8, 4, 2
    # n^3 + 4L(k + d) weights (paper, Houlsby placement) + one (k + d) of biases per adapter
    assert trainable == n**3 + 2 * per_layer * layers * (k + d) + per_layer * layers * (k + d)
    assert trainable == parameter_count(d, k, n, n_adapters=per_layer * layers)


def test_phm_dim_must_divide_the_widths():
    model = build("bert")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=r"phm_dim=4 must divide.*'k': 6"):
        get_peft_model(model, CompacterConfig(bottleneck_size=6))
    assert [n for n, _ in model.named_modules()] == before
    with pytest.raises(ConfigError, match=r"(?s)preset='lowrank'.*'compacter', 'compacter\+\+'.*phm_dim=0"):
        CompacterConfig(phm_dim=0, preset="lowrank")


@needs_minilm
def test_real_minilm_counts():
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm_folder()).eval()
    inputs = {"input_ids": torch.randint(1000, 5000, (2, 12))}
    expected = base(**inputs).last_hidden_state
    counts = {}
    for preset in ("compacter", "compacter++"):
        pm = get_peft_model(base, CompacterConfig(preset=preset))
        counts[preset] = pm.get_nb_trainable_parameters()[0]
        with torch.no_grad():
            torch.testing.assert_close(pm(**inputs).last_hidden_state, expected, atol=TOL, rtol=0)
        base = pm.unload()
    # d = 384, k = 384 / 32 = 12, n = 4, 6 layers
    assert counts == {"compacter": parameter_count(384, 12, 4, 12), "compacter++": parameter_count(384, 12, 4, 6)}
    assert counts == {"compacter": 14_320, "compacter++": 7_192}


def test_dtype_conversion_keeps_the_rule_shared():
    base = build("llama")
    reference = copy.deepcopy(base).double()
    pm = get_peft_model(base, CompacterConfig(bottleneck_size=8)).double()
    rules = {id(layer.compacter_rule["default"].phm_rule) for layer in compacter_layers(pm)}
    assert len(rules) == 1
    inputs = batch("llama")
    out = output(pm, inputs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, output(reference, inputs), atol=1e-10, rtol=0)
