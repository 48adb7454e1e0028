"""PeftModel's lifecycle guarantees (issues 14.4, 15, 23): loading for inference, merging exactly what is named,
safe merges, refusing a model that is already wrapped, nested disable_adapter, switching while merged, the
requires_grad flags handed back by unload, and clear errors for misspelt options and mistyped adapter names."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import batch, clone, output, perturb, tiny_bert
from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftkit.core.merge import adapter_layers
from peftkit.errors import ConfigError, MergeError

CONFIG = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
INPUTS = batch("bert")


def lora(**changes) -> LoraConfig:
    return LoraConfig(**{**CONFIG, **changes})


def two_adapters() -> PeftModel:
    """LoRA adapters 'default' and 'b', both active, both non-trivial."""
    pm = get_peft_model(tiny_bert(), lora())
    pm.add_adapter("b", lora())
    perturb(pm, "default")
    perturb(pm, "b", seed=7)
    pm.set_adapter(["default", "b"])
    return pm.eval()


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every base tensor of a (wrapped or plain) model under its plain name."""
    return {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
        for k, v in model.state_dict().items()
        if "lora_" not in k and "modules_to_save" not in k and "original_module" not in k
    }


# ---- 23.1 / 15.18: from_pretrained loads for inference ---------------------------------------------------------
def test_from_pretrained_is_in_eval_mode_and_frozen_unless_trainable(tmp_path):
    base = tiny_bert(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).train()
    reference = clone(base)
    pm = get_peft_model(base, lora(lora_dropout=0.5))
    perturb(pm, "default")
    expected = output(pm.eval(), INPUTS)
    pm.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(clone(reference).train(), tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(output(loaded, INPUTS), expected)  # dropout off: exactly the saved model's eval output

    trainable = PeftModel.from_pretrained(clone(reference).train(), tmp_path, is_trainable=True)
    assert trainable.training  # left as the caller had it, as in peft
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if "lora_" in n or "modules_to_save" in n
    }


def test_from_pretrained_with_a_config_follows_is_trainable(tmp_path):
    pm = get_peft_model(tiny_bert(), lora())
    pm.save_pretrained(tmp_path)
    config = lora()  # inference_mode=False: the caller's config must not make the loaded adapter trainable
    frozen = PeftModel.from_pretrained(tiny_bert(), tmp_path, config=config)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.peft_config["default"].inference_mode and not config.inference_mode  # the caller's is untouched
    trainable = PeftModel.from_pretrained(tiny_bert(), tmp_path, config=lora(inference_mode=True), is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


# ---- 23.2: merge_and_unload(adapter_names=...) merges exactly the named subset ------------------------------------
def test_merge_and_unload_merges_only_the_named_adapters():
    pm = two_adapters()
    layer = dict(adapter_layers(pm.model))["bert.encoder.layer.0.attention.self.query"]
    w = layer.base_layer.weight.detach().clone()
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    expected = (w + s * b @ a).detach()  # W + (alpha / r) B A of 'default' only; 'b' is dropped unmerged
    plain = pm.merge_and_unload(adapter_names=["default"])
    torch.testing.assert_close(plain.bert.encoder.layer[0].attention.self.query.weight, expected, atol=1e-7, rtol=0)
    assert not adapter_layers(plain)


# ---- 23.3: safe_merge ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_a_non_finite_result_and_changes_nothing(call):
    pm = two_adapters()
    with torch.no_grad():  # one layer's update overflows to inf
        dict(adapter_layers(pm.model))["bert.encoder.layer.1.attention.self.value"].lora_B["b"].weight.fill_(3e38)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(MergeError, match="non-finite"):
        getattr(pm, call)(safe_merge=True)
    after = pm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged_adapters for _, layer in adapter_layers(pm.model)) and adapter_layers(pm.model)


def test_safe_merge_of_finite_adapters_equals_a_plain_merge():
    pm, other = two_adapters(), two_adapters()
    pm.merge_adapter(safe_merge=True)
    other.merge_adapter()
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in pm.state_dict().items())


# ---- 23.6: merging what is merged warns and does not merge twice ---------------------------------------------------
def test_merging_an_already_merged_adapter_warns_and_changes_nothing():
    pm = two_adapters()
    pm.merge_adapter(["default"])
    merged = base_weights(pm)
    with pytest.warns(UserWarning, match="already merged"):
        pm.merge_adapter(["default"])
    assert all(torch.equal(v, base_weights(pm)[k]) for k, v in merged.items())


def test_base_model_answers_peft_config_and_active_adapters():
    pm = two_adapters()
    assert pm.base_model.peft_config is pm.peft_config and set(pm.base_model.peft_config) == {"default", "b"}
    assert pm.base_model.active_adapters == ["default", "b"] and pm.base_model.active_adapter == ["default", "b"]
    pm.set_adapter("b")
    assert pm.base_model.active_adapter == "b" and pm.active_adapters == ["b"] and pm.active_adapter == "b"
    assert isinstance(pm.base_model.model, type(tiny_bert()))


# ---- 14.4: unknown keyword arguments name the closest valid one ---------------------------------------------------
CALLS = {
    "from_pretrained": (
        lambda pm, path: PeftModel.from_pretrained(tiny_bert(), path, is_trainble=True),
        "is_trainable",
    ),
    "get_peft_model": (lambda pm, path: get_peft_model(tiny_bert(), lora(), adapter_nme="x"), "adapter_name"),
    "PeftModel": (
        lambda pm, path: PeftModel(tiny_bert(), lora(), autocast_adapter_dtyp=False),
        "autocast_adapter_dtype",
    ),
    "add_adapter": (lambda pm, path: pm.add_adapter("c", lora(), low_cpu_mem_usag=True), "low_cpu_mem_usage"),
    "merge_adapter": (lambda pm, path: pm.merge_adapter(safe_merg=True), "safe_merge"),
    "merge_and_unload": (lambda pm, path: pm.merge_and_unload(adapter_name=["b"]), "adapter_names"),
    "add_weighted_adapter": (
        lambda pm, path: pm.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination="cat"),
        "combination_type",
    ),
}


@pytest.mark.parametrize("entry", list(CALLS))
def test_unknown_keyword_arguments_name_the_closest_valid_one(entry, tmp_path):
    pm = two_adapters()
    pm.save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    call, suggestion = CALLS[entry]
    with pytest.raises(TypeError, match=rf"did you mean '{suggestion}'\?"):
        call(pm, tmp_path)
    assert before.keys() == pm.state_dict().keys() and list(pm.peft_config) == ["default", "b"]


# ---- 15.1 / 15.2: a model that already holds adapters is refused ---------------------------------------------------
def test_a_failed_from_pretrained_on_a_peft_model_leaves_its_adapters(tmp_path):
    pm = two_adapters()
    pm.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key].reshape(-1).repeat(2)  # a checkpoint that does not fit: the load would fail
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    out, layers = output(pm, INPUTS), len(adapter_layers(pm.model))
    for model in (pm, pm.model):
        with pytest.raises(ConfigError, match="already holds adapter layers"):
            PeftModel.from_pretrained(model, tmp_path)
    assert len(adapter_layers(pm.model)) == layers and torch.equal(output(pm, INPUTS), out)


def test_get_peft_model_twice_on_one_base_is_refused():
    base = tiny_bert()
    first = get_peft_model(base, lora())
    perturb(first, "default")  # the trained adapter a second call would re-initialise
    out = output(first.eval(), INPUTS)
    with pytest.raises(ConfigError, match=r"add_adapter\(\) / load_adapter\(\).*reload the base model"):
        get_peft_model(base, lora())
    with pytest.raises(ConfigError, match="already holds adapter layers"):
        get_peft_model(first, IA3Config(task_type="SEQ_CLS"))
    assert torch.equal(output(first, INPUTS), out)


# ---- 15.10: nested disable_adapter ---------------------------------------------------------------------------------
def test_nested_disable_adapter_and_adapters_added_inside():
    base = tiny_bert()
    plain = output(clone(base), INPUTS)
    pm = get_peft_model(base, lora()).eval()
    perturb(pm, "default")
    adapted = output(pm, INPUTS)
    with pm.disable_adapter():
        with pm.disable_adapter():
            assert torch.equal(output(pm, INPUTS), plain)
        assert torch.equal(output(pm, INPUTS), plain)  # leaving the inner block keeps adapters off
        pm.add_adapter("new", lora())
        perturb(pm, "new", seed=3)
        pm.set_adapter(["default", "new"])
        assert torch.equal(output(pm, INPUTS), plain)  # an adapter added inside the block is off there too
    pm.set_adapter("default")
    assert torch.equal(output(pm, INPUTS), adapted)


# ---- 15.11: set_adapter while merged --------------------------------------------------------------------------------
def test_set_adapter_while_merged_unmerges_first_with_a_warning():
    pm = two_adapters()
    pm.set_adapter("b")
    only_b = output(pm, INPUTS)
    unmerged = base_weights(pm)
    pm.set_adapter("default")
    pm.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        pm.set_adapter("b")
    torch.testing.assert_close(output(pm, INPUTS), only_b, atol=1e-6, rtol=0)
    for k, v in unmerged.items():
        torch.testing.assert_close(base_weights(pm)[k], v, atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.merge_adapter()
        pm.set_adapter("b")  # the merged adapter stays active: nothing to unmerge, no warning


# ---- 15.19: unload hands the model back with its requires_grad flags ------------------------------------------------
@pytest.mark.parametrize("call", ["unload", "merge_and_unload"])
def test_unload_restores_the_requires_grad_flags(call):
    base = tiny_bert()
    base.bert.embeddings.requires_grad_(False)  # the user had frozen the embeddings before wrapping
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    pm = get_peft_model(base, lora())
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    plain = getattr(pm, call)()
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags


# ---- 23: mistyped adapter names are clear errors, never iterated as letters -----------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda pm: pm.set_adapter(None), r"set_adapter\(\) takes an adapter name.*disable_adapter"),
        (lambda pm: pm.delete_adapter(["default", "b"]), r"delete_adapter\(\) takes one adapter name"),
        (lambda pm: pm.merge_adapter(adapter_names="default"), r"got the str 'default'; write \['default'\]"),
        (lambda pm: pm.merge_and_unload(adapter_names="b"), r"got the str 'b'"),
        (lambda pm: pm.add_weighted_adapter("default", [1.0], "mix"), r"adapters must be a list"),
        (lambda pm: pm.set_adapter(["default", 3]), r"list of adapter names \(str\)"),
    ],
    ids=["set_adapter-None", "delete_adapter-list", "merge_adapter-str", "merge_and_unload-str", "weighted-str", "int"],
)
def test_adapter_names_of_the_wrong_type_raise_type_errors(call, message):
    pm = two_adapters()
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(TypeError, match=message):
        call(pm)
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in before.items())
    assert pm.active_adapters == ["default", "b"] and list(pm.peft_config) == ["default", "b"]
