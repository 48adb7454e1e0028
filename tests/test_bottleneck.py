"""Bottleneck adapters against their equations, on every built-in architecture, and on the real models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import batch, build, minilm_folder, needs_minilm, needs_smollm2, output, perturb, smollm2_folder
from peftkit import BottleneckConfig, LoraConfig, get_peft_model
from peftkit.errors import ConfigError, MergeError, TargetNotFoundError
from peftkit.methods.bottleneck import BottleneckLayer, parameter_count

TOL = 1e-5


def layers(pm) -> dict[str, BottleneckLayer]:
    return {n: m for n, m in pm.get_base_model().named_modules() if isinstance(m, BottleneckLayer)}


def adapter_weights(layer: BottleneckLayer, name: str = "default"):
    down, up = layer.bottleneck_down[name], layer.bottleneck_up[name]
    return down.weight, down.bias, up.weight, up.bias


# ---- equations ----------------------------------------------------------------------------------------------
def test_houlsby_places_two_adapters_per_layer_and_follows_the_equation():
    pm = get_peft_model(build("bert"), BottleneckConfig(preset="houlsby", init_weights="bert"))
    names = sorted(layers(pm))
    assert names == sorted(
        f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense", "output.dense")
    )
    layer = layers(pm)["bert.encoder.layer.0.attention.output.dense"]
    x = torch.randn(3, 5, 32)
    h = layer.base_layer(x)
    wd, bd, wu, bu = adapter_weights(layer)
    assert wd.shape == (2, 32)  # k = 32 / 16
    expected = h + F.silu(h @ wd.T + bd) @ wu.T + bu  # Houlsby: swish, scaling 1
    torch.testing.assert_close(layer(x), expected, atol=TOL, rtol=0)


def test_pfeiffer_places_one_adapter_after_the_feed_forward_with_layer_norm_options():
    config = BottleneckConfig(preset="pfeiffer", ln_before=True, residual_before_ln=False, scaling=0.5)
    pm = get_peft_model(build("bert"), config)
    assert sorted(layers(pm)) == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    layer = layers(pm)["bert.encoder.layer.1.output.dense"]
    perturb(pm, "default")
    x = torch.randn(2, 4, 64)
    h = layer.base_layer(x)
    ln = layer.bottleneck_ln_before["default"]
    z = F.layer_norm(h, (32,), ln.weight, ln.bias, ln.eps)
    wd, bd, wu, bu = adapter_weights(layer)
    expected = z + 0.5 * (F.relu(z @ wd.T + bd) @ wu.T + bu)  # residual taken after the LayerNorm
    torch.testing.assert_close(layer(x), expected, atol=TOL, rtol=0)


def test_parallel_adapter_reads_the_block_input_and_scales():
    pm = get_peft_model(build("llama"), BottleneckConfig(preset="parallel"))
    assert sorted(layers(pm)) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    perturb(pm, "default")
    mlp = pm.get_base_model().model.layers[0].mlp
    layer = mlp.down_proj
    x = torch.randn(2, 3, 32)
    with pm.disable_adapter():
        base = mlp(x)
    wd, bd, wu, bu = adapter_weights(layer)
    assert wd.shape == (16, 32)  # k = d / 2
    expected = base + 4.0 * (F.relu(x @ wd.T + bd) @ wu.T + bu)  # He et al.: h + s f(x W_down) W_up
    torch.testing.assert_close(mlp(x), expected, atol=TOL, rtol=0)


def test_parallel_beside_attention_on_bert_reads_the_attention_input():
    pm = get_peft_model(build("bert"), BottleneckConfig(preset="parallel", mh_adapter=True, output_adapter=False))
    layer = layers(pm)["bert.encoder.layer.0.attention.output.dense"]
    assert layer.taps["default"].module is pm.get_base_model().bert.encoder.layer[0].attention
    perturb(pm, "default")
    seen = {}
    attention = pm.get_base_model().bert.encoder.layer[0].attention
    attention.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    layer.base_layer.register_forward_hook(lambda m, args, out: seen.setdefault("h", out))
    layer.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    output(pm, batch("bert"))
    wd, bd, wu, bu = adapter_weights(layer)
    expected = seen["h"] + 4.0 * (F.relu(seen["x"] @ wd.T + bd) @ wu.T + bu)
    torch.testing.assert_close(seen["out"], expected, atol=TOL, rtol=0)


# ---- architectures ----------------------------------------------------------------------------------------------
def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return WhisperForConditionalGeneration(config).eval()


def tiny_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return CLIPTextModel(config).eval()


# model -> (number of Houlsby sites, inputs)
ARCHS = {
    "bert": 4,
    "gpt2": 4,
    "llama": 4,
    "t5": 2 * 2 + 2 * 3,  # encoder: self-attn + ffn; decoder: self-attn + cross-attn + ffn
}


@pytest.mark.parametrize("kind", list(ARCHS))
@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel"])
def test_presets_on_every_tiny_architecture(kind, preset):
    base = build(kind)
    reference = copy.deepcopy(base)
    config = BottleneckConfig(preset=preset, mh_adapter=True if preset == "parallel" else None)
    pm = get_peft_model(base, config)
    expected_sites = ARCHS[kind] if preset != "pfeiffer" else {"t5": 4}.get(kind, 2)
    assert len(layers(pm)) == expected_sites
    inputs = batch(kind)
    torch.testing.assert_close(output(pm, inputs), output(reference, inputs), atol=TOL, rtol=0)
    perturb(pm, "default")
    pm.train()
    loss = output_with_grad(pm, inputs).pow(2).mean()
    loss.backward()
    for layer in layers(pm).values():  # the up-projection's bias gets dL/dh' at every position
        assert layer.bottleneck_up["default"].bias.grad.abs().sum() > 0


def output_with_grad(pm, inputs):
    return pm(**inputs).logits


@pytest.mark.parametrize(("build_model", "inputs"), [
    (tiny_whisper, {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.tensor([[1, 5, 6]] * 2)}),
    (tiny_clip_text, {"input_ids": torch.randint(1, 100, (2, 6))}),
])  # fmt: skip
def test_whisper_and_clip_placements(build_model, inputs):
    base = build_model()
    reference = copy.deepcopy(base)
    pm = get_peft_model(base, BottleneckConfig(preset="houlsby"))
    kinds = {n.rsplit(".", 1)[-1] for n in layers(pm)}
    assert kinds in ({"out_proj", "fc2"},)
    pm_par = get_peft_model(copy.deepcopy(reference), BottleneckConfig(preset="parallel", mh_adapter=True))
    perturb(pm_par, "default")
    with torch.no_grad():
        first = lambda out: out[0]  # noqa: E731
        torch.testing.assert_close(first(pm(**inputs)), first(reference(**inputs)), atol=TOL, rtol=0)
        assert not torch.allclose(first(pm_par(**inputs)), first(reference(**inputs)), atol=1e-4)


def test_any_module_by_name():
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    reference = copy.deepcopy(model)
    config = BottleneckConfig(
        preset="parallel", ffn_output_modules=["block.2"], ffn_modules=["block"], bottleneck_size=4
    )
    pm = get_peft_model(model, config)
    perturb(pm, "default")
    x = torch.randn(5, 8)
    layer = layers(pm)["block.2"]
    wd, bd, wu, bu = adapter_weights(layer)
    torch.testing.assert_close(pm(x), reference(x) + 4.0 * (F.relu(x @ wd.T + bd) @ wu.T + bu), atol=TOL, rtol=0)
    seq = get_peft_model(copy.deepcopy(reference), BottleneckConfig(target_modules=["block.0"], bottleneck_size=2))
    assert list(layers(seq)) == ["block.0"]


# ---- errors ---------------------------------------------------------------------------------------------------
def test_bad_configs_name_the_value_and_the_choices():
    with pytest.raises(ConfigError, match=r"preset='adapterhub'.*'houlsby', 'parallel', 'pfeiffer'"):
        BottleneckConfig(preset="adapterhub")
    with pytest.raises(ConfigError, match=r"non_linearity='softplus'") as err:
        BottleneckConfig(non_linearity="softplus", dropout=1.5)
    assert "dropout=1.5" in str(err.value)  # every problem at once


def test_reduction_factor_larger_than_hidden_size_leaves_the_model_unchanged():
    model = build("bert")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=r"reduction_factor=64 is larger than the width 32"):
        get_peft_model(model, BottleneckConfig(reduction_factor=64))
    assert [n for n, _ in model.named_modules()] == before


def test_placement_that_matches_nothing():
    with pytest.raises(TargetNotFoundError, match=r"ffn_output_modules|target_modules=\['mlp.nope'\]"):
        get_peft_model(build("llama"), BottleneckConfig(ffn_output_modules=["mlp.nope"]))
    with pytest.raises(ConfigError, match=r"no built-in placement for model type 'Sequential'.*ffn_output_modules"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), BottleneckConfig())


def test_merge_explains_why_it_cannot():
    pm = get_peft_model(build("bert"), BottleneckConfig())
    with pytest.raises(MergeError, match=r"add new layers.*cannot be folded into a weight"):
        pm.merge_adapter()
    with pytest.raises(MergeError, match="cannot be merged"):
        pm.merge_and_unload()


def test_with_lora_on_the_same_model():
    base = build("llama")
    reference = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(target_modules=["o_proj"]))
    pm.add_adapter("adapter", BottleneckConfig(preset="houlsby"))
    pm.set_adapter(["default", "adapter"])
    inputs = batch("llama")
    torch.testing.assert_close(output(pm, inputs), output(reference, inputs), atol=TOL, rtol=0)
    pm.delete_adapter("adapter")
    assert not layers(pm)


# ---- real models ------------------------------------------------------------------------------------------------
@needs_minilm
def test_real_minilm_houlsby_and_pfeiffer_counts_and_identity():
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm_folder()).eval()
    inputs = {"input_ids": torch.randint(1000, 5000, (2, 12))}
    expected = base(**inputs).last_hidden_state
    for preset, per_layer in (("houlsby", 2), ("pfeiffer", 1)):
        pm = get_peft_model(base, BottleneckConfig(preset=preset))
        trainable, _ = pm.get_nb_trainable_parameters()
        assert trainable == parameter_count(384, 24, n_adapters=6 * per_layer)  # 226,080 / 113,040
        with torch.no_grad():
            torch.testing.assert_close(pm(**inputs).last_hidden_state, expected, atol=TOL, rtol=0)
        base = pm.unload()


@needs_smollm2
def test_real_smollm2_generate_is_unchanged_by_an_identity_adapter():
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3145, 314, 4849, 314]])
    expected = base.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    pm = get_peft_model(base, BottleneckConfig(preset="houlsby", task_type="CAUSAL_LM")).eval()
    assert len(layers(pm)) == 2 * base.config.num_hidden_layers
    tokens = pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert tokens.tolist() == expected.tolist()
