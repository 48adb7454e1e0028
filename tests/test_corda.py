"""CorDA (init_lora_weights="corda", after preprocess_corda): the decomposition of W oriented by the inputs'
covariance, by hand and against peft 0.21's CorDA on the same weights and batches; the residual keeps the model
equal to the base model; caches; refusals."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import sys
import types

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig as CordaConfigPeft
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import CordaConfig, LoraConfig, PeftModel, get_peft_model, preprocess_corda
from peftkit.errors import ConfigError

R = 2
TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_preprocess_corda(monkeypatch):
    """peft 0.21's preprocess_corda. Its module (peft/tuners/lora/corda.py) starts with ``from attr import dataclass``
    although attrs is not among peft's dependencies (nor peftkit's), so the import fails where attrs is missing, as
    here; it uses that decorator once, on a plain data class (CordaEigens), for which the standard library's
    dataclass is equivalent. Only when attrs is missing, a stand-in module is put in sys.modules for the duration of
    the test (monkeypatch removes it afterwards), so no later ``import attr`` sees it; peft's corda module stays
    imported, holding a standard-library data class."""
    if importlib.util.find_spec("attr") is None:
        monkeypatch.setitem(sys.modules, "attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
    return importlib.import_module("peft.tuners.lora.corda").preprocess_corda


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (1, 20), generator=g) for _ in range(6)]  # batch 1, as peft's hook expects


def runner(model):
    def run() -> None:
        with torch.no_grad():
            for ids in samples():
                model(input_ids=ids)

    return run


def corda_config(method: str = "ipm", **kw) -> dict:
    return {
        "r": R, "lora_alpha": 4, "target_modules": TARGETS, "init_lora_weights": "corda",
        "corda_config": {"corda_method": method, **kw},
    }  # fmt: skip


def inputs_of(model, name: str) -> list[torch.Tensor]:
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, 16)))
    runner(model)()
    handle.remove()
    return seen


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_factors_are_the_context_oriented_svd_by_hand_and_the_model_starts_as_the_base(method):
    base = llama()
    name = "model.layers.0.self_attn.q_proj"
    w = base.get_submodule(name).weight.detach().clone()
    xs = [x / x.max().abs() for x in inputs_of(base, name)]
    c = sum(x.T @ x for x in xs) / len(xs)  # (in, in)
    c = c + torch.eye(16) * c.diagonal().mean() * 0.01  # damped once (it inverts well here)
    u, s, vh = torch.linalg.svd(w @ c, full_matrices=False)
    keep = slice(None, R) if method == "ipm" else slice(-R, None)
    expected_delta = u[:, keep] @ torch.diag(s[keep]) @ vh[keep] @ torch.linalg.inv(c)  # s B A
    model = copy.deepcopy(base)
    config = LoraConfig(**corda_config(method))
    preprocess_corda(model, config, runner(model))
    pm = get_peft_model(model, config)
    layer = pm.base_model.model.get_submodule(name)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer.scaling["default"] * b @ a, expected_delta, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.get_base_layer().weight + layer.delta_weight("default"), w, atol=1e-5, rtol=0)
    ids = samples()[0]
    torch.testing.assert_close(pm(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_equals_peft_corda_on_the_same_weights_and_batches(method, monkeypatch):
    base = llama()
    theirs_model = copy.deepcopy(base)
    their_config = peft.LoraConfig(**{**corda_config(method), "corda_config": CordaConfigPeft(corda_method=method)})
    peft_preprocess_corda(monkeypatch)(theirs_model, their_config, run_model=runner(theirs_model))
    theirs = peft.get_peft_model(theirs_model, their_config)
    ours_model = copy.deepcopy(base)
    config = LoraConfig(**corda_config(method))
    preprocess_corda(ours_model, config, runner(ours_model))
    ours = get_peft_model(ours_model, config)
    their_layers = dict(theirs.base_model.model.named_modules())
    for path, layer in ours.base_model.model.named_modules():
        if not hasattr(layer, "lora_A"):
            continue
        other = their_layers[path]
        ours_delta = layer.delta_weight("default")
        torch.testing.assert_close(ours_delta, other.get_delta_weight("default"), atol=1e-5, rtol=1e-4, msg=path)
        their_w = other.get_base_layer().weight
        torch.testing.assert_close(layer.get_base_layer().weight, their_w, atol=1e-5, rtol=0, msg=path)
    ids = samples()[1]
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_cache_files_skip_the_batches_and_a_saved_adapter_reloads_after_preprocessing(tmp_path):
    base = llama()
    kw = corda_config(cache_file=str(tmp_path / "cache.safetensors"), covariance_file=str(tmp_path / "cov.st"))
    first = copy.deepcopy(base)
    preprocess_corda(first, LoraConfig(**kw), runner(first))
    pm = get_peft_model(first, LoraConfig(**kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # "trained"
    pm.save_pretrained(tmp_path / "adapter")
    ids = samples()[2]
    expected = pm(input_ids=ids).logits
    second = copy.deepcopy(base)
    preprocess_corda(second, LoraConfig(**kw))  # from the cache: no run_model
    back = PeftModel.from_pretrained(second, tmp_path / "adapter")  # re-runs the init on the original base, then loads
    torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_without_preprocessing_nothing_changes_and_the_error_says_what_to_run():
    base = llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match="Run preprocess_corda"):
        get_peft_model(base, LoraConfig(**corda_config()))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ConfigError, match="corda_method='svd'"):
        CordaConfig(corda_method="svd")
    with pytest.raises(ConfigError, match="needs run_model"):
        preprocess_corda(base, LoraConfig(**corda_config()))


def test_converted_adapter_on_the_untouched_base_equals_the_trained_model(tmp_path):
    """CorDA leaves a residual in W as PiSSA does: path_initial_model_for_weight_conversion gives a plain LoRA for the
    original weights ([A ; A0], [B | -B0], r and alpha doubled) with the trained model's outputs."""
    base = llama()
    model = copy.deepcopy(base)
    config = LoraConfig(**corda_config("kpm"))
    preprocess_corda(model, config, runner(model))
    pm = get_peft_model(model, config)
    pm.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))  # "trained"
    ids = samples()[4]
    expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
    assert plain.peft_config["default"].init_lora_weights is True and plain.peft_config["default"].r == 2 * R
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
