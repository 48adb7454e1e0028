"""Config fields are type-checked from their annotations, at construction and at load (issue 15 item 9);
``modules_to_save`` as one name (item 22); add_weighted_adapter refuses non-finite or non-numeric weights and
densities before adding anything (items 20, 29)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from cases import CASES
from models import perturb, tiny_bert
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.layer import ModulesToSave
from peftkit.core.registry import config_from_dict, get_method, method_names
from peftkit.errors import ConfigError, ConfigTypeError, PeftkitError

CONFIG_CLASSES = {name: get_method(name).config_class for name in method_names()}


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _valid(peft_type: str):
    """A valid config of the method (its contract case, tests/cases.py: some methods have required values)."""
    case = CASES[peft_type]
    return case.config(case.models[0])


# ---- every method's config, every field -------------------------------------------------------------------------
@pytest.mark.parametrize("peft_type", method_names())
def test_every_field_of_every_config_refuses_a_value_of_no_accepted_type(peft_type):
    cls = CONFIG_CLASSES[peft_type]
    for name in _fields(cls):  # a complex number is no field's type (bool, int, float, str, list, dict, None)
        with pytest.raises(ConfigTypeError, match=rf"{name}=1j has type complex; expected "):
            cls(**{name: 1j})


@pytest.mark.parametrize("peft_type", method_names())
def test_every_config_round_trips_through_its_dict(peft_type):
    cls = CONFIG_CLASSES[peft_type]
    config = _valid(peft_type)
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("peft_type", method_names())
def test_every_config_refuses_wrong_types_at_load(peft_type):
    data = _valid(peft_type).to_dict()
    data["inference_mode"] = "false"  # the string: Python would read it as true
    with pytest.raises(ConfigTypeError, match=r"inference_mode='false' has type str; expected bool\. Write the value"):
        config_from_dict(data)


def test_all_type_problems_in_one_message():
    with pytest.raises(ConfigTypeError) as info:
        LoraConfig(lora_alpha="x", target_modules=5, rank_pattern=[1], lora_dropout="0.1", use_rslora="false")
    message = str(info.value)
    for expected in (
        "lora_alpha='x' has type str; expected float",
        "target_modules=5 has type int; expected list[str] | str | None",
        "rank_pattern=[1] has type list; expected dict[str, int]",
        "lora_dropout='0.1' has type str; expected float",
        "use_rslora='false' has type str; expected bool",
    ):
        assert expected in message
    assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    "changes",
    [
        {"lora_alpha": "16"},
        {"r": 8.0},
        {"r": True},
        {"rank_pattern": {"query": 2.5}},
        {"alpha_pattern": {1: 2.0}},
        {"target_modules": ["query", 3]},
        {"init_lora_weights": 1},
    ],
)
def test_lora_refuses_values_of_the_wrong_type(changes):
    with pytest.raises(ConfigTypeError, match=next(iter(changes))):
        LoraConfig(**changes)


def test_ints_for_floats_and_tuples_for_lists_are_accepted():
    config = LoraConfig(lora_alpha=16, lora_dropout=0, target_modules=("query", "value"), alpha_pattern={"q": 4})
    assert config.lora_alpha == 16 and config.target_modules == ("query", "value")


def test_quoted_false_in_adapter_config_is_refused_not_read_as_true(tmp_path):
    model = tiny_bert()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query"]))
    perturb(pm, "default", scale=0.5)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["use_rslora"] = "false"
    path.write_text(json.dumps(data))
    with pytest.raises(PeftkitError, match="use_rslora='false' has type str; expected bool"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


# ---- modules_to_save as one name (item 22) ---------------------------------------------------------------------
def test_modules_to_save_as_a_string_is_one_module_name():
    config = LoraConfig(target_modules=["query"], modules_to_save="classifier")
    assert config.modules_to_save == ["classifier"]
    pm = get_peft_model(tiny_bert(), config)
    heads = [name for name, module in pm.named_modules() if isinstance(module, ModulesToSave)]
    assert heads == ["base_model.model.classifier"]
    assert pm.peft_config["default"].to_dict()["modules_to_save"] == ["classifier"]  # peft's file layout: a list


def test_modules_to_save_of_another_type_is_refused():
    with pytest.raises(ConfigTypeError, match="modules_to_save=5 has type int"):
        LoraConfig(target_modules=["query"], modules_to_save=5)


# ---- add_weighted_adapter's numbers (items 20, 29) ----------------------------------------------------------------
@pytest.fixture
def two_adapters():
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"]), adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["query"]))
    return pm


def _state(pm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.state_dict().items()}


@pytest.mark.parametrize(
    ("weights", "options", "match"),
    [
        ([math.nan, 0.5], {}, r"weights\[0\]=nan"),
        ([0.5, "0.5"], {}, r"weights\[1\]='0.5'"),
        ([math.inf, 1.0], {}, r"weights\[0\]=inf"),
        ([True, 1.0], {}, r"weights\[0\]=True"),
        ([0.5, 0.5], {"combination_type": "ties", "density": math.nan}, "density=nan must be a number in"),
        ([0.5, 0.5], {"combination_type": "dare_linear", "density": "0.5"}, "density='0.5' must be a number in"),
        ([0.5, 0.5], {"combination_type": "linear", "density": 1.5}, "density=1.5 must be a number in"),
    ],
)
def test_weighted_adapter_refuses_bad_numbers_before_adding_anything(two_adapters, weights, options, match):
    pm = two_adapters
    before = _state(pm)
    with pytest.raises(ConfigError, match=match):
        pm.add_weighted_adapter(["a", "b"], weights, "mix", **options)
    assert list(pm.peft_config) == ["a", "b"]
    after = _state(pm)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
