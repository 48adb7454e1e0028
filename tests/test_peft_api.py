"""peft's top-level API in peftkit (issue 16 item 1): every name of ``peft.__all__`` is provided or listed, with its
reason, in docs/peft_compat.md; the provided functions give what peft 0.21 gives on the same tiny model."""

from __future__ import annotations

import copy
import inspect
import re
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from models import batch, output, tiny_bert, tiny_llama
from peftkit.errors import CheckpointError, ConfigError

peft = pytest.importorskip("peft")

DOC = Path(__file__).resolve().parents[1] / "docs" / "peft_compat.md"
LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)


def listed_missing() -> dict[str, str]:
    """docs/peft_compat.md's table of peft names peftkit does not provide: name -> reason."""
    text = DOC.read_text().split("## peft names peftkit does not provide", 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return {name: row.rsplit("|", 2)[1].strip() for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_every_peft_name_is_provided_or_listed_with_a_reason():
    missing = listed_missing()
    unaccounted = [n for n in peft.__all__ if n not in peftkit.__all__ and n not in missing]
    assert not unaccounted, f"peft names neither provided by peftkit nor listed in docs/peft_compat.md: {unaccounted}"
    assert all(reason for reason in missing.values())
    for name in peftkit.__all__:
        assert hasattr(peftkit, name), name


def test_the_list_of_missing_names_is_not_stale():
    provided = sorted(n for n in listed_missing() if n in peftkit.__all__)
    assert not provided, f"peftkit now provides {provided}: remove them from docs/peft_compat.md's list"
    assert set(listed_missing()) <= set(peft.__all__)


def pair(seed: int = 0):
    """The same tiny BERT with the same LoRA values in peft and in peftkit (peftkit's copied from peft's)."""
    base = tiny_bert(seed=seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    ours = peftkit.get_peft_model(base, peftkit.LoraConfig(**LORA))
    peftkit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


def test_state_dict_keys_and_values_equal_peft():
    theirs, ours = pair()
    mine, reference = peftkit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(reference)
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
    torch.testing.assert_close(output(ours, batch("bert")), output(theirs, batch("bert")), atol=1e-6, rtol=0)
    # the whole-model state dict form (e.g. gathered by accelerate) gives the same tensors
    whole = peftkit.get_peft_model_state_dict(ours, state_dict=ours.state_dict())
    assert all(torch.equal(whole[k], mine[k]) for k in mine)


def test_set_state_dict_is_all_or_nothing():
    _, ours = pair()
    before = {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(ours).items()}
    broken = {k: torch.zeros(1) for k in before}
    with pytest.raises(CheckpointError, match="wrong shape"):
        peftkit.set_peft_model_state_dict(ours, broken)
    with pytest.raises(ConfigError, match="ignore_mismatched_sizes"):
        peftkit.set_peft_model_state_dict(ours, before, ignore_mismatched_sizes=True)
    after = peftkit.get_peft_model_state_dict(ours)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_peft_weights_reads_peft_folders(tmp_path):
    theirs, _ = pair()
    theirs.save_pretrained(tmp_path)
    mine, reference = peftkit.load_peft_weights(tmp_path), peft.load_peft_weights(str(tmp_path), device="cpu")
    assert sorted(mine) == sorted(reference) and all(torch.equal(mine[k], reference[k]) for k in mine)
    mapping = {r"attention\.self": "attn"}
    remapped = peftkit.load_peft_weights(tmp_path, key_mapping=mapping)
    assert sorted(remapped) == sorted(peft.load_peft_weights(str(tmp_path), device="cpu", key_mapping=mapping))
    assert any(".attn." in k for k in remapped)


def test_get_peft_config_builds_the_named_class():
    data = peft.LoraConfig(**LORA).to_dict()
    config = peftkit.get_peft_config({k: v for k, v in data.items() if k in {"peft_type", "r", "lora_alpha"}})
    assert type(config) is peftkit.LoraConfig and (config.r, config.lora_alpha) == (4, 8)
    assert type(peftkit.get_peft_config({"peft_type": "IA3", "target_modules": ["query"]})) is peftkit.IA3Config


def trainable(model: torch.nn.Module) -> list[str]:
    return sorted(n.replace(".default", "") for n, p in model.named_parameters() if p.requires_grad)


def test_inject_adapter_in_model_matches_peft():
    base = tiny_bert()
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**LORA), copy.deepcopy(base))
    ours = peftkit.inject_adapter_in_model(peftkit.LoraConfig(**LORA), base)
    assert ours is base and trainable(ours) == trainable(theirs)
    assert [s.name for s in peftkit.get_layer_status(ours)] == [s.name for s in peft.get_layer_status(theirs)]
    with pytest.raises(ConfigError, match="get_peft_model"):
        peftkit.inject_adapter_in_model(peftkit.PromptTuningConfig(num_virtual_tokens=2), tiny_bert())


def dtypes(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, bool]]:
    return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("quantized", [False, True])
def test_prepare_model_for_kbit_training_matches_peft(quantized):
    ours, theirs = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    for model in (ours, theirs):
        model.is_loaded_in_4bit = quantized  # peft reads only this flag; the steps run on any model
    peftkit.prepare_model_for_kbit_training(ours)
    peft.prepare_model_for_kbit_training(theirs)
    assert dtypes(ours) == dtypes(theirs)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing == quantized


def test_cast_mixed_precision_params_matches_peft():
    theirs, ours = pair()
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    peftkit.cast_mixed_precision_params(ours, torch.bfloat16)
    mine = {n.replace(".default", ""): v for n, v in dtypes(ours).items()}
    reference = {n.replace(".default", ""): v for n, v in dtypes(theirs).items()}
    shared = set(mine) & set(reference)
    assert len(shared) > 20 and all(mine[n] == reference[n] for n in shared)


def test_layer_and_model_status_match_peft():
    theirs, ours = pair()
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["query"]))
    ours.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["query"]))
    query = "bert.encoder.layer.0.attention.self.query"  # one layer merged: merged_adapters becomes "irregular"
    theirs.get_base_model().get_submodule(query).merge(adapter_names=["default"])
    ours.get_base_model().get_submodule(query).merge(["default"])
    fields = ["name", "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"]
    mine, reference = peftkit.get_layer_status(ours), peft.get_layer_status(theirs)
    assert [[getattr(s, f) for f in fields] for s in mine] == [[getattr(s, f) for f in fields] for s in reference]
    skip = {"adapter_model_type", "quantization_backend"}  # peftkit's tuner class is TunerModel, peft's LoraModel
    mine, reference = vars(peftkit.get_model_status(ours)), vars(peft.get_model_status(theirs))
    assert {k: v for k, v in mine.items() if k not in skip} == {k: v for k, v in reference.items() if k not in skip}
    assert mine["merged_adapters"] == "irregular"


def test_task_classes_and_mixed_model():
    model = peftkit.PeftModelForSequenceClassification(tiny_bert(), peftkit.LoraConfig(**LORA, task_type="SEQ_CLS"))
    assert isinstance(model, peftkit.PeftModel)
    assert peftkit.MODEL_TYPE_TO_PEFT_MODEL_MAPPING["SEQ_CLS"] is peftkit.PeftModelForSequenceClassification
    mixed = peftkit.PeftMixedModel(tiny_bert(), peftkit.LoraConfig(**LORA))
    mixed.add_adapter("ia3", peftkit.IA3Config(target_modules=["key"], feedforward_modules=[]))
    mixed.set_adapter(["default", "ia3"])
    assert mixed.active_adapters == ["default", "ia3"] and mixed.get_base_model() is mixed.base_model.model
    with mixed.disable_adapter():
        plain = output(mixed, batch("bert"))
    assert not torch.equal(output(mixed, batch("bert")), plain)


def test_forward_signature_is_the_base_models():
    model = peftkit.get_peft_model(tiny_bert(), peftkit.LoraConfig(**LORA))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    assert list(params)[:2] == list(inspect.signature(model.get_base_model().forward).parameters)[:2]


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    config = peftkit.LoraConfig(**LORA, task_type="SEQ_CLS", base_model_name_or_path=str(tmp_path / "base"))
    model = peftkit.get_peft_model(base, config)
    model.save_pretrained(tmp_path / "adapter")
    loaded = peftkit.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, peftkit.PeftModelForSequenceClassification) and not loaded.training
    torch.testing.assert_close(output(loaded, batch("bert")), output(model, batch("bert")))
    with pytest.raises(ConfigError, match="AutoPeftModelForSequenceClassification"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    # peft's own loader reads the same folder
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(output(theirs, batch("bert")), output(model, batch("bert")))


def test_peft_config_from_pretrained_reads_peft_folders(tmp_path):
    theirs, _ = pair()
    theirs.save_pretrained(tmp_path)
    config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert type(config) is peftkit.LoraConfig and config.r == 4
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == sorted(peftkit.load_peft_weights(tmp_path))


def test_peft_quicktour_runs_with_only_the_import_changed(tmp_path, capsys):
    script = Path(__file__).resolve().parents[1] / "scripts" / "peft_quicktour.py"
    imports = [line for line in script.read_text().splitlines() if re.match(r"\s*(from|import) peft", line)]
    assert len(imports) == 1 and imports[0].startswith("from peftkit import ")  # peft's: from peft import ...
    runpy.run_path(str(script), run_name="quicktour").get("main")(tmp_path)
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "loaded adapters: ['default']" in printed
    assert sorted(p.name for p in (tmp_path / "output_dir").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
