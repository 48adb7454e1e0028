"""PeftModel's lifecycle against Hugging Face peft 0.21 on the same weights (peftkit saves, peft loads the files):
loading for inference, merging a named subset, merging twice, switching while merged, the tuner's attributes,
adapter dtypes on a bfloat16 base and the signatures of the entry points."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import peftkit
from models import batch, clone, output, perturb, tiny_bert, tiny_llama
from peftkit.core.merge import adapter_layers

peft = pytest.importorskip("peft")

# no task_type: peft allows several active adapters only without a modules_to_save head copy
CONFIG = dict(r=4, lora_alpha=8, target_modules=["query", "value"])
INPUTS = batch("bert")


def both(tmp_path, **base_changes) -> tuple[peftkit.PeftModel, torch.nn.Module]:
    """peftkit with LoRA adapters 'default' and 'b' (both active, non-trivial), and peft loading the same files."""
    base = tiny_bert(**base_changes)
    reference = clone(base)
    ours = peftkit.get_peft_model(base, peftkit.LoraConfig(**CONFIG))
    ours.add_adapter("b", peftkit.LoraConfig(**CONFIG))
    perturb(ours, "default")
    perturb(ours, "b", seed=7)
    ours.save_pretrained(tmp_path)
    ours.set_adapter(["default", "b"])
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path)
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    theirs.base_model.set_adapter(["default", "b"])
    torch.testing.assert_close(output(ours.eval(), INPUTS), output(theirs, INPUTS), atol=1e-6, rtol=0)
    return ours, theirs


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_from_pretrained_is_for_inference_as_in_peft(tmp_path):
    base = tiny_bert(hidden_dropout_prob=0.3).train()
    ours = peftkit.get_peft_model(clone(base), peftkit.LoraConfig(**CONFIG, lora_dropout=0.3))
    perturb(ours, "default")
    ours.save_pretrained(tmp_path)
    ours_loaded = peftkit.PeftModel.from_pretrained(clone(base).train(), tmp_path)
    theirs_loaded = peft.PeftModel.from_pretrained(clone(base).train(), tmp_path)
    assert ours_loaded.training == theirs_loaded.training is False
    assert torch.equal(output(ours_loaded, INPUTS), output(theirs_loaded, INPUTS))
    ours_trainable = peftkit.PeftModel.from_pretrained(clone(base).train(), tmp_path, is_trainable=True)
    theirs_trainable = peft.PeftModel.from_pretrained(clone(base).train(), tmp_path, is_trainable=True)
    assert ours_trainable.training == theirs_trainable.training is True


def test_merge_and_unload_of_a_named_subset_equals_peft(tmp_path):
    ours, theirs = both(tmp_path)
    ours_plain = ours.merge_and_unload(adapter_names=["default"])
    theirs_plain = theirs.merge_and_unload(adapter_names=["default"])
    ours_state, theirs_state = plain_state(ours_plain), plain_state(theirs_plain)
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(output(ours_plain, INPUTS), output(theirs_plain, INPUTS), atol=1e-6, rtol=0)


def test_merging_twice_warns_and_merges_once_as_peft(tmp_path):
    ours, theirs = both(tmp_path)
    for model in (ours, theirs):
        model.merge_adapter(["default"])
        with pytest.warns(UserWarning, match="[Aa]lready"):
            model.merge_adapter(["default"])
    for name in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"):
        ours_w = ours.base_model.model.get_submodule(name).base_layer.weight
        theirs_w = theirs.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(ours_w, theirs_w, atol=1e-6, rtol=0)


def test_set_adapter_while_merged_unmerges_with_a_warning_as_peft(tmp_path):
    ours, theirs = both(tmp_path)
    ours.set_adapter("default")
    theirs.set_adapter("default")
    for model in (ours, theirs):
        model.merge_adapter()
        with pytest.warns(UserWarning, match="[Uu]nmerg"):
            model.set_adapter("b")
    torch.testing.assert_close(output(ours, INPUTS), output(theirs, INPUTS), atol=1e-6, rtol=0)
    assert not any(layer.merged_adapters for _, layer in adapter_layers(ours.model))


def test_tuner_attributes_read_as_peft(tmp_path):
    ours, theirs = both(tmp_path)
    assert set(ours.base_model.peft_config) == set(theirs.base_model.peft_config) == {"default", "b"}
    assert set(ours.peft_config) == set(theirs.peft_config)
    assert ours.base_model.active_adapters == theirs.base_model.active_adapters == ["default", "b"]
    assert ours.base_model.active_adapter == theirs.base_model.active_adapter == ["default", "b"]
    ours.set_adapter("b")
    theirs.set_adapter("b")
    assert ours.base_model.active_adapter == theirs.base_model.active_adapter == "b"
    assert ours.active_adapters == theirs.active_adapters == ["b"] and ours.active_adapter == theirs.active_adapter
    assert type(ours.base_model.model) is type(theirs.base_model.model)


def test_safe_merge_refuses_non_finite_updates_as_peft(tmp_path):
    ours, theirs = both(tmp_path)
    for model in (ours, theirs):
        with torch.no_grad():
            model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["b"].weight.fill_(float("nan"))
        with pytest.raises(ValueError if model is theirs else peftkit.errors.MergeError):
            model.merge_adapter(safe_merge=True)
    assert not any(layer.merged_adapters for _, layer in adapter_layers(ours.model))  # peftkit: nothing merged


@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_on_a_bfloat16_base_follows_peft(autocast, tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ours = peftkit.get_peft_model(
        tiny_llama().to(torch.bfloat16), peftkit.LoraConfig(**config), autocast_adapter_dtype=autocast
    )
    theirs = peft.get_peft_model(
        tiny_llama().to(torch.bfloat16), peft.LoraConfig(**config), autocast_adapter_dtype=autocast
    )
    ours_dtypes = {n: p.dtype for n, p in ours.named_parameters() if "lora_" in n}
    theirs_dtypes = {n: p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert ours_dtypes == theirs_dtypes
    assert set(ours_dtypes.values()) == {torch.float32 if autocast else torch.bfloat16}
    assert output(ours, batch("llama")).isfinite().all()  # forward runs with adapters in either dtype
    ours.save_pretrained(tmp_path)
    loaded = [
        cls.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast)
        for cls in (peftkit.PeftModel, peft.PeftModel)
    ]
    ours_loaded, theirs_loaded = ({n: p.dtype for n, p in m.named_parameters() if "lora_" in n} for m in loaded)
    assert ours_loaded == theirs_loaded == ours_dtypes


def _options(function) -> dict[str, object]:
    skip = {"self", "cls", "kwargs"}
    return {n: p.default for n, p in inspect.signature(function).parameters.items() if n not in skip}


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (peftkit.get_peft_model, peft.get_peft_model),
        (peftkit.PeftModel.add_adapter, peft.PeftModel.add_adapter),
        (peftkit.PeftModel.merge_adapter, peft.tuners.lora.LoraModel.merge_adapter),
        (peftkit.PeftModel.merge_and_unload, peft.tuners.lora.LoraModel.merge_and_unload),
        (peftkit.PeftModel.unload, peft.tuners.lora.LoraModel.unload),
    ],
    ids=["get_peft_model", "add_adapter", "merge_adapter", "merge_and_unload", "unload"],
)
def test_signatures_are_peft_s(ours, theirs):
    assert _options(ours) == _options(theirs)


def test_from_pretrained_takes_peft_s_main_options():
    theirs = _options(peft.PeftModel.from_pretrained)
    ours = _options(peftkit.PeftModel.from_pretrained)
    for name in ("adapter_name", "is_trainable", "config", "autocast_adapter_dtype", "low_cpu_mem_usage"):
        assert ours[name] == theirs[name], name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="did you mean 'is_trainable'"):
            peftkit.PeftModel.from_pretrained(tiny_bert(), "unused", is_trainble=True)
