"""LoRA on parameters (``target_parameters``): fused MoE expert weights of transformers 5 (Mixtral: (E, out, in);
GPT-OSS: (E, in, out), ``is_transposed``), a bare 2-D router weight; against the formula by hand and against
peft 0.21 on the same weights, files both ways, merge / unmerge, and the refusals peft shares."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peftkit.core.layer import AdapterLayer
from peftkit.errors import CheckpointError, ConfigError, RoutingError, TargetNotFoundError
from peftkit.methods.lora import LoraParamWrapper

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
E, R = 4, 2


def mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=E, num_experts_per_tok=2,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def gpt_oss() -> GptOssForCausalLM:
    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=E, num_experts_per_tok=2, layer_types=["full_attention"],
    )  # fmt: skip
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():  # the bias tensors start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(std=0.1)
    return model


def qwen3_moe() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=E, num_experts_per_tok=2,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config).eval()


MODELS = [mixtral, gpt_oss, qwen3_moe]
MODEL_IDS = ["mixtral", "gpt_oss", "qwen3_moe"]


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def config(**kw) -> dict:
    return {
        "r": R,
        "lora_alpha": 4,
        "target_modules": [],
        "target_parameters": EXPERTS,
        "init_lora_weights": False,
        **kw,
    }


@pytest.mark.parametrize("build", MODELS, ids=MODEL_IDS)
def test_peftkit_files_load_in_peft_with_equal_outputs_and_keys(build, tmp_path):
    base = build()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config()))
    pm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours_keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ours_keys == set(peft.get_peft_model_state_dict(theirs))
    assert any(".experts.base_layer.lora_A.weight" in k for k in ours_keys)  # gate_up_proj: the inner wrapper
    x = ids()
    out = pm(input_ids=x).logits
    assert not torch.allclose(out, base(input_ids=x).logits, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(out, theirs(input_ids=x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("build", MODELS, ids=MODEL_IDS)
def test_peft_files_load_in_peftkit_with_equal_outputs(build, tmp_path):
    base = build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config(), bias="none")).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    x = ids()
    expected = theirs(input_ids=x).logits
    torch.testing.assert_close(ours(input_ids=x).logits, expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")  # and peftkit's own round trip
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(again(input_ids=x).logits, expected, atol=1e-5, rtol=0)


def by_hand(layer: LoraParamWrapper, name: str) -> torch.Tensor:
    """ΔW_e = s B_e A_e with A_e = rows e r..e r + r - 1 of A, B_e = columns k E + e of B; transposed for GPT-OSS."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    r, s = layer.r[name], layer.scaling[name]
    deltas = []
    for e in range(layer.num_experts):
        a_e = a[e * r : (e + 1) * r]  # (r, in)
        b_e = b[:, [k * layer.num_experts + e for k in range(r)]]  # (out, r)
        delta = s * b_e @ a_e  # (out, in)
        deltas.append(delta.T if layer.transposed else delta)
    return torch.stack(deltas)


@pytest.mark.parametrize("build", MODELS, ids=MODEL_IDS)
def test_update_is_one_low_rank_term_per_expert_and_the_model_runs_with_w_plus_delta(build):
    base = build()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config()))
    layers = [m for m in pm.modules() if isinstance(m, LoraParamWrapper)]
    assert len(layers) == 2 * len(base.model.layers)
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for layer in layers:
            assert torch.linalg.matrix_rank(by_hand(layer, "default")[0]) == R
            torch.testing.assert_close(layer.delta_weight("default"), by_hand(layer, "default"))
        for path, layer in [(p, m) for p, m in pm.model.named_modules() if isinstance(m, LoraParamWrapper)]:
            module_path = path.replace(".base_layer", "")
            target = getattr(expected.get_submodule(module_path), layer.parameter_name)
            target += by_hand(layer, "default")
    x = ids()
    torch.testing.assert_close(pm(input_ids=x).logits, expected(input_ids=x).logits, atol=1e-5, rtol=0)


def test_merge_unmerge_and_merge_and_unload_equal_peft():
    base = mixtral()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config()))
    x = ids()
    unmerged = pm(input_ids=x).logits
    before = pm.model.model.layers[0].mlp.experts.get_base_layer().down_proj.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(pm(input_ids=x).logits, unmerged, atol=1e-5, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(pm.model.model.layers[0].mlp.experts.get_base_layer().down_proj, before)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config()))
    peft.set_peft_model_state_dict(theirs, {k: v for k, v in pm.state_dict().items() if "lora_" in k}, "default")
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert all(torch.equal(theirs_sd[k], v) for k, v in load_ours(pm).items())
    plain, peft_plain = pm.merge_and_unload(), theirs.merge_and_unload()
    assert not any(isinstance(m, LoraParamWrapper) for m in plain.modules())
    for (name, p), (_, q) in zip(plain.state_dict().items(), peft_plain.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(plain(input_ids=x).logits, unmerged, atol=1e-5, rtol=0)


def load_ours(pm) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}


def test_a_bare_2d_parameter_and_rank_alpha_patterns_match_peft(tmp_path):
    base = mixtral()
    kw = config(
        target_parameters=["gate.weight", *EXPERTS],
        rank_pattern={"layers.1.mlp.experts.down_proj": 3},
        alpha_pattern={"gate.weight": 1.0},
    )
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    router = pm.model.model.layers[0].mlp.gate
    assert isinstance(router, LoraParamWrapper) and router.num_experts == 1 and router.scaling["default"] == 0.5
    assert pm.model.model.layers[1].mlp.experts.r["default"] == 3
    assert pm.model.model.layers[0].mlp.experts.r["default"] == R
    pm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = ids()
    torch.testing.assert_close(pm(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=0)
    a, b = router.lora_A["default"].weight, router.lora_B["default"].weight
    torch.testing.assert_close(router.delta_weight("default"), 0.5 * b @ a)


def test_identity_at_init_only_lora_trains_and_no_default_target_modules_as_in_peft():
    base = mixtral()
    kw = {"r": R, "target_parameters": EXPERTS}  # target_modules None: no model-type default (peft)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    assert {k.replace(".default", "") for k, p in pm.named_parameters() if p.requires_grad} == {
        k.replace(".default", "") for k, p in theirs.named_parameters() if p.requires_grad
    }
    assert not any("q_proj.lora" in k for k, _ in pm.named_parameters())
    x = ids()
    torch.testing.assert_close(pm(input_ids=x).logits, base(input_ids=x).logits)
    pm.train()
    pm(input_ids=x, labels=x).loss.backward()
    experts = pm.model.model.layers[0].mlp.experts
    assert experts.lora_B["default"].weight.grad.abs().sum() > 0  # B = 0 at init: B's gradient flows
    assert experts.get_base_layer().down_proj.grad is None


def test_two_adapters_switch_disable_and_route_one_adapter_per_batch():
    base = mixtral()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config()))
    pm.add_adapter("other", LoraConfig(**config(r=3)))
    pm.eval()
    x = ids()
    first = pm(input_ids=x).logits
    pm.set_adapter("other")
    second = pm(input_ids=x).logits
    assert not torch.allclose(first, second, atol=1e-4)
    with pm.disable_adapter():
        torch.testing.assert_close(pm(input_ids=x).logits, base(input_ids=x).logits)
    torch.testing.assert_close(pm(input_ids=x, adapter_names=["default"] * 3).logits, first)
    torch.testing.assert_close(pm(input_ids=x, adapter_names=["__base__"] * 3).logits, base(input_ids=x).logits)
    with pytest.raises(RoutingError, match="mix adapters"):
        pm(input_ids=x, adapter_names=["default", "other", "__base__"])
    pm.set_adapter(["default", "other"])  # both: W + ΔW_default + ΔW_other
    both = pm(input_ids=x).logits
    assert not torch.allclose(both, first, atol=1e-4) and not torch.allclose(both, second, atol=1e-4)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lora_dropout": 0.1}, "lora_dropout=0.1"),
        ({"use_dora": True}, "use_dora=True"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"target_parameters": ["experts.nope"]}, "Candidates: .*experts.gate_up_proj"),
        ({"target_modules": ["q_proj"], "target_parameters": ["q_proj.weight"]}, "also wraps"),
    ],
)
def test_refusals_name_the_value_and_leave_the_model_unchanged(kw, match):
    base = mixtral()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises((ConfigError, TargetNotFoundError), match=match):
        get_peft_model(base, LoraConfig(**config(**kw)))
    assert not any(isinstance(m, LoraParamWrapper) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_adapters_must_target_the_same_parameters_and_weighted_combination_is_refused():
    pm = get_peft_model(mixtral(), LoraConfig(**config()))
    with pytest.raises(ConfigError, match="same target_parameters"):
        pm.add_adapter("other", LoraConfig(**config(target_parameters=["experts.down_proj"])))
    assert "other" not in pm.peft_config
    pm.add_adapter("other", LoraConfig(**config()))
    with pytest.raises(ConfigError, match="target_parameters"):
        pm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")
    assert "mix" not in pm.peft_config


def test_hotswap_is_refused_by_name_and_leaves_the_adapter_unchanged(tmp_path):
    base = mixtral()
    get_peft_model(copy.deepcopy(base), LoraConfig(**config())).save_pretrained(tmp_path)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config())).eval()
    x = ids()
    before = pm(input_ids=x).logits
    with pytest.raises(ConfigError, match="target_parameters"):
        hotswap_adapter(pm, tmp_path, "default")
    with pytest.raises(ConfigError, match="target_parameters"):
        prepare_model_for_compiled_hotswap(pm)
    torch.testing.assert_close(pm(input_ids=x).logits, before)


def test_a_checkpoint_that_does_not_fit_leaves_the_model_as_it_was(tmp_path):
    base = mixtral()
    get_peft_model(copy.deepcopy(base), LoraConfig(**config())).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "r": R + 1}))  # shapes no longer fit
    model = copy.deepcopy(base)
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    x = ids()
    torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits)


def test_bf16_experts_train_fp32_factors_and_merge():
    pm = get_peft_model(mixtral().to(torch.bfloat16), LoraConfig(**config(init_lora_weights=True)))
    x = ids()
    pm(input_ids=x, labels=x).loss.backward()
    experts = pm.model.model.layers[0].mlp.experts
    assert experts.lora_A["default"].weight.dtype == torch.float32  # trained in fp32, applied in bf16
    assert experts.lora_B["default"].weight.grad.abs().sum() > 0
    before = experts.get_base_layer().down_proj.detach().clone()
    pm.merge_adapter()  # B = 0: the merge adds nothing
    pm.unmerge_adapter()
    assert torch.equal(experts.get_base_layer().down_proj, before)
