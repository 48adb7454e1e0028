"""BitFit against its formula by hand (h = f(x; W, b) + d), its gradients, its merge and its checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from models import batch, build, clone, output, perturb
from peftkit import BASE, BitFitConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError, TargetNotFoundError
from peftkit.methods.bitfit import BitFitLayer

TOL = 1e-5
MINIMAL = r".*(attention\.self\.query|layer\.\d+\.output\.dense)"  # the paper's b_q and b_m2 (section 4.2)


def deltas(pm, name: str = "default") -> dict[str, torch.Tensor]:
    return {n: m.bitfit_bias[name].detach() for n, m in pm.model.named_modules() if isinstance(m, BitFitLayer)}


def test_output_is_base_plus_delta_on_linear_layernorm_and_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(1), nn.Linear(4 * 4 * 4, 5), nn.LayerNorm(5))
    conv, lin, norm = (clone(m) for m in (net[0], net[2], net[3]))
    pm = get_peft_model(net, BitFitConfig())
    perturb(pm, "default", scale=0.5)
    d = deltas(pm)
    assert sorted(d) == ["0", "2", "3"]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        h = F.conv2d(x, conv.weight, conv.bias + d["0"])  # the channel bias, shifted
        h = F.linear(h.flatten(1), lin.weight, lin.bias + d["2"])
        expected = F.layer_norm(h, (5,), norm.weight, norm.bias + d["3"])
        torch.testing.assert_close(pm(x), expected, atol=TOL, rtol=0)
        pm.merge_adapter()  # b <- b + d, written into the base
        torch.testing.assert_close(pm.model[2].get_base_layer().bias, lin.bias + d["2"], atol=TOL, rtol=0)
        torch.testing.assert_close(pm(x), expected, atol=TOL, rtol=0)
        pm.unmerge_adapter()  # the original, bit for bit
        assert torch.equal(pm.model[0].get_base_layer().bias, conv.bias)
        assert torch.equal(pm.model[3].get_base_layer().bias, norm.bias)


def test_only_biases_and_head_get_gradients():
    model = build("bert")
    n_bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and "classifier" not in n)
    n_head = sum(p.numel() for p in model.classifier.parameters())
    pm = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"))
    assert pm.get_nb_trainable_parameters()[0] == n_bias + n_head  # every bias (Linear and LayerNorm) + the head
    pm.train()
    pm(**batch("bert"), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert all(n.endswith(".bitfit_bias.default") or ".classifier.modules_to_save." in n for n in with_grad)
    assert sum(n.endswith(".bitfit_bias.default") for n in with_grad) == len(deltas(pm))
    # d enters where b does, so dL/dd equals the base model's dL/db (same weights, same dropout masks)
    delta = pm.model.bert.encoder.layer[0].attention.self.query.bitfit_bias["default"]
    base = build("bert").train()
    pm.zero_grad()
    torch.manual_seed(1)
    pm(**batch("bert"), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    torch.manual_seed(1)
    base(**batch("bert"), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    query_bias = base.bert.encoder.layer[0].attention.self.query.bias
    torch.testing.assert_close(delta.grad, query_bias.grad, atol=1e-6, rtol=1e-4)


def test_minimal_variant_query_and_second_mlp_bias():
    pm = get_peft_model(build("bert"), BitFitConfig(bias_patterns=MINIMAL, task_type="SEQ_CLS"))
    names = sorted(deltas(pm))
    assert names == [f"bert.encoder.layer.{i}.{m}" for i in (0, 1) for m in ("attention.self.query", "output.dense")]
    trainable = pm.get_nb_trainable_parameters()[0]
    assert trainable == 2 * (32 + 32) + (32 * 3 + 3)


def test_llama_missing_bias_added_merged_and_removed():
    model = build("llama")
    reference = clone(model)
    pm = get_peft_model(model, BitFitConfig(add_missing_bias=True, task_type="CAUSAL_LM"))
    targets = {n.split(".")[-1] for n in deltas(pm)}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head
    inputs = batch("llama")
    torch.testing.assert_close(output(pm, inputs), output(reference, inputs), atol=TOL, rtol=0)
    perturb(pm, "default")
    q = pm.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ q.get_base_layer().weight.T + q.bitfit_bias["default"], atol=TOL, rtol=0)
    adapted = output(pm, inputs)
    keys = set(pm.get_base_model().state_dict())
    pm.merge_adapter()
    assert torch.equal(q.get_base_layer().bias, q.bitfit_bias["default"])  # a new bias, = 0 + d
    assert not q.get_base_layer().bias.requires_grad
    torch.testing.assert_close(output(pm, inputs), adapted, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    assert q.get_base_layer().bias is None and set(pm.get_base_model().state_dict()) == keys
    plain = pm.merge_and_unload()
    assert plain.model.layers[1].mlp.down_proj.bias is not None
    torch.testing.assert_close(output(plain, inputs), adapted, atol=TOL, rtol=0)


def test_checkpoint_holds_only_deltas(tmp_path):
    pm = get_peft_model(build("bert"), BitFitConfig(bias_patterns=["query", "value"], task_type="SEQ_CLS"))
    perturb(pm, "default")
    pm.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    bias_keys = sorted(k for k in tensors if "classifier" not in k)
    assert bias_keys == [
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.bitfit_bias"
        for i in (0, 1)
        for m in ("query", "value")
    ]
    assert sorted(k for k in tensors if "classifier" in k) == [
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
    ]
    # deltas, not biases: loading onto a model whose biases differ shifts them by the same amount
    other = build("bert")
    with torch.no_grad():
        other.bert.encoder.layer[0].attention.self.query.bias.add_(1.0)
    loaded = PeftModel.from_pretrained(other, tmp_path)
    loaded.merge_adapter()
    expected = pm.model.bert.encoder.layer[0].attention.self.query
    torch.testing.assert_close(
        loaded.model.bert.encoder.layer[0].attention.self.query.get_base_layer().bias,
        expected.get_base_layer().bias + expected.bitfit_bias["default"] + 1.0,
        atol=TOL,
        rtol=0,
    )


def test_two_adapters_route_per_row_and_live_beside_lora():
    pm = get_peft_model(build("llama"), BitFitConfig(add_missing_bias=True, task_type="CAUSAL_LM"))
    pm.add_adapter("b", BitFitConfig(add_missing_bias=True, bias_patterns=["v_proj"], task_type="CAUSAL_LM"))
    pm.add_adapter("lora", LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for seed, name in enumerate(("default", "b", "lora")):
        perturb(pm, name, seed=seed)
    pm.eval()
    v = pm.model.model.layers[0].self_attn.v_proj.base_layer  # LoRA around BitFit (default + b) around Linear
    assert isinstance(v, BitFitLayer) and v.adapter_names == ["default", "b"]
    x = torch.randn(3, 4, 32)
    with torch.no_grad():
        inner = v.base_layer(x)
        pm.set_adapter(["default", "b"])
        both = v(x)
        torch.testing.assert_close(both, inner + v.bitfit_bias["default"] + v.bitfit_bias["b"], atol=TOL, rtol=0)
    inputs = batch("llama", rows=3)
    alone = {}
    for name in ("default", "b", "lora"):
        pm.set_adapter(name)
        alone[name] = output(pm, inputs)
    assert not torch.allclose(alone["default"], alone["lora"], atol=1e-3)
    mixed = output(pm, inputs, adapter_names=["b", "lora", "default"])
    for row, name in enumerate(["b", "lora", "default"]):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=TOL, rtol=0)
    with pm.disable_adapter():
        base_out = output(pm, inputs)
    torch.testing.assert_close(output(pm, inputs, adapter_names=[BASE] * 3), base_out, atol=TOL, rtol=0)


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_no_bias_matched_on_a_bias_free_model():
    model = build("llama")
    with pytest.raises(TargetNotFoundError, match=r"No bias matched bias_patterns=None\..*add_missing_bias=True"):
        get_peft_model(model, BitFitConfig(task_type="CAUSAL_LM"))
    assert not any(isinstance(m, BitFitLayer) for m in model.modules())  # nothing half-applied


def test_pattern_that_matches_nothing_lists_candidates():
    with pytest.raises(TargetNotFoundError, match=r"bias_patterns=\['q_proj'\].*'output.LayerNorm'.*'self.query'"):
        get_peft_model(build("bert"), BitFitConfig(bias_patterns=["q_proj"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bias_patterns": []}, r"bias_patterns=\[\] selects nothing"),
        ({"bias_patterns": "("}, r"bias_patterns='\(' is not a valid regex"),
        ({"bias_patterns": 5}, r"bias_patterns=5 must be a list of module names"),
        ({"add_missing_bias": "yes"}, r"add_missing_bias='yes' must be True or False"),
        ({"task_type": "CLS"}, r"task_type='CLS' is not a task type; use one of"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BitFitConfig(**kwargs)


def test_config_round_trips_through_json(tmp_path):
    config = BitFitConfig(bias_patterns=MINIMAL, add_missing_bias=True, task_type="SEQ_CLS")
    config.save_pretrained(tmp_path)
    from peftkit.core.registry import config_from_dict

    assert config_from_dict(config.read_dict(tmp_path)) == config


def test_linear_combination_by_hand():
    pm = get_peft_model(build("llama"), BitFitConfig(add_missing_bias=True, task_type="CAUSAL_LM"))
    pm.add_adapter("b", BitFitConfig(add_missing_bias=True, bias_patterns=["v_proj"], task_type="CAUSAL_LM"))
    pm.add_adapter("lora", LoraConfig(target_modules=["v_proj"], task_type="CAUSAL_LM"))  # wraps the BitFit layers
    perturb(pm, "default", seed=0)
    perturb(pm, "b", seed=1)
    pm.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type="linear")
    held: dict[str, dict[str, torch.Tensor]] = {}  # module -> adapter -> delta, over nested BitFit wrappers
    for name, layer in pm.model.named_modules():
        if isinstance(layer, BitFitLayer):
            held.setdefault(name.replace(".base_layer", ""), {}).update(layer.bitfit_bias.items())
    assert len(held) == 2 * 7 and all("mix" in h for h in held.values())
    assert sum(isinstance(m, BitFitLayer) for m in pm.modules()) == 2 * 7  # one BitFit layer per module, under LoRA
    for name, h in held.items():
        expected = 0.5 * h["default"] + 2.0 * h.get("b", 0.0)
        torch.testing.assert_close(h["mix"], expected, atol=TOL, rtol=0, msg=name)
    before = {k: v.clone() for k, v in pm.get_base_model().state_dict().items()}
    pm.set_adapter(["mix", "lora"])
    mixed = output(pm, batch("llama"))
    pm.merge_adapter()
    torch.testing.assert_close(output(pm, batch("llama")), mixed, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    after = pm.get_base_model().state_dict()
    assert set(after) == set(before) and all(torch.allclose(after[k], v, atol=TOL) for k, v in before.items())
    with pytest.raises(ConfigError, match=r"combination_type='ties'.*only with 'linear'"):
        pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "bad", combination_type="ties", density=0.5)
