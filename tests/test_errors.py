"""Bad input gets a clear error from peftkit.errors (the value, the choices, the fix), and a failed call
leaves the model exactly as it was: same modules, same outputs, same requires_grad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import batch, output, perturb, tiny_bert
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import (
    AdapterNameError,
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    PeftkitError,
    RoutingError,
    TargetNotFoundError,
)

CONFIG = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
WEIGHTS = "adapter_model.safetensors"


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed call must not change."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "tensors": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "output": output(model, batch("bert")),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][name], tensor, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(after["output"], before["output"], atol=0, rtol=0)


@pytest.fixture
def saved(tmp_path) -> Path:
    """A LoRA checkpoint for tiny_bert (hidden 32) at tmp_path / 'ckpt'."""
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    perturb(pm, "default")
    pm.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


# ---- configs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, -2])
def test_rank_must_be_positive(r):
    with pytest.raises(ConfigError, match=rf"r={r} must be a positive integer"):
        LoraConfig(r=r, target_modules=["query"])


def test_all_config_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        LoraConfig(r=0, lora_dropout=1.5, bias="some", init_lora_weights="loftq", rank_pattern={"q": 0})
    message = str(info.value)
    for part in ("r=0", "lora_dropout=1.5", "bias='some'", "init_lora_weights='loftq'", "rank_pattern"):
        assert part in message


def test_unknown_task_type_lists_choices():
    with pytest.raises(ConfigError, match=r"task_type='CLASSIFY'.*'CAUSAL_LM'.*'SEQ_CLS'"):
        LoraConfig(target_modules=["query"], task_type="CLASSIFY")


def test_unknown_target_names_leave_model_untouched():
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(TargetNotFoundError, match=r"target_modules=\['q', 'v'\].*Candidates"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q", "v"]))
    assert_unchanged(model, before)


# ---- adapter names ----------------------------------------------------------------------------------------
def test_unknown_adapter_name():
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    for call in (pm.set_adapter, pm.delete_adapter, pm.adapter_state_dict):
        with pytest.raises(AdapterNotFoundError, match=r"No adapter named 'nope'. Loaded adapters: 'default'"):
            call("nope")
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        pm.merge_adapter(["nope"])
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        pm.save_pretrained("unused", selected_adapters=["nope"])


@pytest.mark.parametrize("name", ["", "   ", "..", ".", "../escape", "a/b", "/abs/path", "a\\b", "__base__"])
def test_bad_adapter_names_rejected(name, saved):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(AdapterNameError, match="Invalid adapter name"):
        get_peft_model(model, LoraConfig(**CONFIG), adapter_name=name)
    assert_unchanged(model, before)
    with pytest.raises(AdapterNameError):
        PeftModel.from_pretrained(model, saved, adapter_name=name)
    assert_unchanged(model, before)
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    with pytest.raises(AdapterNameError):
        pm.add_adapter(name, LoraConfig(**CONFIG))
    with pytest.raises(AdapterNameError):
        pm.load_adapter(saved, adapter_name=name)
    assert list(pm.peft_config) == ["default"]


def test_duplicate_adapter_name():
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    with pytest.raises(AdapterNameError, match="already exists"):
        pm.add_adapter("default", LoraConfig(**CONFIG))


# ---- checkpoints -----------------------------------------------------------------------------------------
def _drop_one(tensors: dict) -> None:
    del tensors[next(k for k in sorted(tensors) if "lora_B" in k)]


def _add_one(tensors: dict) -> None:
    tensors["base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight"] = torch.zeros(4, 32)


def _reshape_one(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = torch.zeros(3, tensors[key].shape[1])


@pytest.mark.parametrize(
    ("change", "what"),
    [(_drop_one, "1 missing"), (_add_one, "1 unexpected"), (_reshape_one, "1 with a wrong shape")],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_checkpoint_that_does_not_fit(change, what, saved):
    edit_tensors(saved, change)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=f"does not fit this model: tensors {what}"):
        PeftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)

    pm = get_peft_model(tiny_bert(seed=3), LoraConfig(**CONFIG))
    perturb(pm, "default")
    pm.add_adapter("kept", LoraConfig(r=2, target_modules=["key"], task_type="SEQ_CLS"))
    pm.set_adapter(["default", "kept"])
    pm.eval()
    before = snapshot(pm)
    with pytest.raises(CheckpointError, match=what):
        pm.load_adapter(saved, adapter_name="other")
    assert_unchanged(pm, before)
    assert list(pm.peft_config) == ["default", "kept"] and pm.active_adapters == ["default", "kept"]


def test_checkpoint_for_a_model_of_another_size(saved):
    """A bert with hidden size 48: every LoRA factor has the wrong shape."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"wrong shape \(e\.g\. .*file \(4, 32\) vs model \(4, 48\)"):
        PeftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)


def test_checkpoint_for_another_architecture(saved):
    """Targets named in the config that the model lacks: a CheckpointError, not a bare targeting error."""
    from models import tiny_llama

    model = tiny_llama()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(CheckpointError, match="does not fit this model"):
        PeftModel.from_pretrained(model, saved)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [type(m) for m in model.modules()] == modules


@pytest.mark.parametrize(
    "damage",
    [b"not a safetensors file at all", None],
    ids=["garbage", "truncated"],
)
def test_corrupt_safetensors(damage, saved):
    path = saved / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(damage if damage is not None else data[: len(data) // 2])
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        PeftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)


def test_missing_folder_and_pickle_only(tmp_path, saved):
    with pytest.raises(CheckpointError, match="is not a folder"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path / "nowhere")
    (saved / WEIGHTS).rename(saved / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        PeftModel.from_pretrained(tiny_bert(), saved)


def test_corrupt_config_json(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        PeftModel.from_pretrained(tiny_bert(), saved)


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_unsupported_option_checkpoint_refused(saved):
    _edit_config(saved, use_qalora=True)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"use_qalora=True"):
        PeftModel.from_pretrained(model, saved)
    assert_unchanged(model, before)


def test_unknown_config_keys_tolerated_with_warning(saved):
    reference = PeftModel.from_pretrained(tiny_bert(), saved)
    _edit_config(saved, some_future_option=3, peft_version="9.9.9")
    with pytest.warns(UserWarning, match="some_future_option"):
        loaded = PeftModel.from_pretrained(tiny_bert(), saved)
    torch.testing.assert_close(output(loaded, batch("bert")), output(reference, batch("bert")), atol=0, rtol=0)


# ---- per-row routing --------------------------------------------------------------------------------------
def test_adapter_names_errors():
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    pm.add_adapter("b", LoraConfig(**CONFIG))
    inputs = batch("bert", rows=4)
    pm.eval()
    before = output(pm, inputs)
    with pytest.raises(RoutingError, match="has 3 entries for a batch of 4 rows"):
        pm(**inputs, adapter_names=["default", "b", "default"])
    with pytest.raises(RoutingError, match=r"unknown adapters 'zzz'.*loaded: 'b', 'default'"):
        pm(**inputs, adapter_names=["default", "zzz", "b", "b"])
    pm.train()
    with pytest.raises(RoutingError, match=r"inference only; call model\.eval"):
        pm(**inputs, adapter_names=["default", "b", "b", "default"])
    pm.eval()
    torch.testing.assert_close(output(pm, inputs), before, atol=0, rtol=0)  # no routing left behind
    assert all(getattr(m, "routing", None) is None for m in pm.modules())


def test_every_error_is_a_peftkit_error():
    for cls in (AdapterNameError, AdapterNotFoundError, CheckpointError, ConfigError, RoutingError):
        assert issubclass(cls, PeftkitError) and issubclass(cls, ValueError)
