"""What code written for Hugging Face peft 0.21 expects of peftkit (issue 23): the built-in exception types it catches
(23.4), the config classes' API (23.5) and what it reads from an adapted layer (23.6). Compared with peft itself."""

from __future__ import annotations

import json
import warnings

import packaging.version
import peft
import pytest
import torch

from models import VOCAB, tiny_bert
from peftkit import IA3Config, LoraConfig, PeftConfig, PeftType, TaskType, method_names
from peftkit import get_peft_model as kit_get_peft_model
from peftkit.core.config import peftkit_version
from peftkit.errors import CheckpointError, ConfigError, PeftkitError

IDS = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))


# ---- 23.4: the exception types peft raises, peftkit raises subclasses of -----------------------------------------
def _lora(lib, **changes):
    return lib.LoraConfig(r=4, target_modules=["query"], **changes)


def _unknown_adapter(lib, tmp_path):
    lib.get_peft_model(tiny_bert(), _lora(lib)).set_adapter("nope")


def _bad_task_type(lib, tmp_path):
    _lora(lib, task_type="NOT_A_TASK")


def _rows_in_training(lib, tmp_path):
    lib.get_peft_model(tiny_bert(), _lora(lib)).train()(input_ids=IDS, adapter_names=["default", "default"])


def _delete_merged(lib, tmp_path):
    pm = lib.get_peft_model(tiny_bert(), _lora(lib))
    pm.add_adapter("other", _lora(lib))
    pm.merge_adapter(["other"]) if lib is not peft else pm.base_model.merge_adapter(["other"])
    pm.delete_adapter("other")


def _missing_folder(lib, tmp_path):
    lib.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "absent"))


def _checkpoint_of_another_size(lib, tmp_path):
    lib.get_peft_model(tiny_bert(), _lora(lib)).save_pretrained(tmp_path)
    lib.PeftModel.from_pretrained(tiny_bert(hidden_size=48), tmp_path)


MISUSES = [_unknown_adapter, _bad_task_type, _rows_in_training, _delete_merged, _missing_folder]
MISUSES.append(_checkpoint_of_another_size)


@pytest.mark.parametrize("misuse", MISUSES, ids=lambda f: f.__name__.strip("_"))
def test_errors_are_subclasses_of_what_peft_raises(misuse, tmp_path):
    with pytest.raises(Exception) as theirs, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        misuse(peft, tmp_path / "peft")
    with pytest.raises(PeftkitError) as ours:
        misuse(__import__("peftkit"), tmp_path / "peftkit")
    assert isinstance(ours.value, type(theirs.value)), (type(theirs.value), type(ours.value).__mro__)


# ---- 23.5: config classes as peft's ----------------------------------------------------------------------------
def test_peft_type_and_task_type_are_str_enums_equal_to_their_strings():
    assert PeftType.LORA == "LORA" and f"{PeftType.LORA}" == "LORA" and isinstance(PeftType.IA3, str)
    assert {t.value for t in PeftType} == set(method_names())
    assert {t.value for t in peft.TaskType} <= {t.value for t in TaskType}
    assert TaskType.SEQ_CLS == peft.TaskType.SEQ_CLS == "SEQ_CLS"
    config = LoraConfig(task_type=TaskType.SEQ_CLS)
    assert config.task_type == "SEQ_CLS" and type(config.task_type) is str
    assert LoraConfig(task_type=peft.TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"


@pytest.mark.parametrize("given", ["LORA", PeftType.LORA, peft.PeftType.LORA])
def test_constructor_accepts_its_own_peft_type(given):
    assert LoraConfig(peft_type=given, r=4) == LoraConfig(r=4)


def test_constructor_refuses_another_peft_type():
    with pytest.raises(ConfigError, match="peft_type='IA3' does not match LoraConfig"):
        LoraConfig(peft_type=PeftType.IA3)


def test_from_pretrained_reads_a_folder_and_picks_the_class(tmp_path):
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["query"], task_type="SEQ_CLS")
    config.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path) == config
    assert PeftConfig.from_pretrained(str(tmp_path)) == config  # the class its peft_type names
    assert LoraConfig.from_json_file(tmp_path / "adapter_config.json") == json.loads(
        (tmp_path / "adapter_config.json").read_text()
    )
    with pytest.raises(ConfigError, match="cannot build a IA3Config"):
        IA3Config.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"No adapter_config\.json"):
        LoraConfig.from_pretrained(tmp_path / "absent")


def test_from_pretrained_reads_a_folder_peft_wrote_and_a_subfolder(tmp_path):
    peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query"]).save_pretrained(tmp_path / "sub")
    config = LoraConfig.from_pretrained(tmp_path, subfolder="sub")
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 16, ["query"])


def test_from_pretrained_resolves_a_hub_id_through_the_huggingface_hub_cache(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    LoraConfig(r=2, target_modules=["query"]).save_pretrained(repo / "snapshots" / commit)
    config = LoraConfig.from_pretrained("someone/tiny-lora", cache_dir=tmp_path, local_files_only=True)
    assert config == LoraConfig(r=2, target_modules=["query"])


def test_adapter_config_records_peftkit_version_where_peft_records_its_own(tmp_path):
    LoraConfig(r=4, target_modules=["query"]).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    version = packaging.version.Version(written["peft_version"])  # parseable, as peft's own value
    assert version.local == f"peftkit.{peftkit_version()}".lower().replace("-", ".")
    assert LoraConfig().to_dict()["peft_version"] == written["peft_version"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft loads it without a warning
        theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.LoraConfig) and theirs.r == 4


# ---- 23.6: what third-party code reads from an adapted layer ---------------------------------------------------
@pytest.mark.parametrize(
    "config", [LoraConfig(r=4, target_modules=["query"]), IA3Config(target_modules=["query"], feedforward_modules=[])]
)
def test_adapted_layer_answers_as_peft_layers_do(config):
    pm = kit_get_peft_model(tiny_bert(), config)
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    base = layer.get_base_layer()
    assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features) == (32, 32)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.active_adapters == ["default"]
    assert layer.merged is False and layer.merged_adapters == [] and layer.disable_adapters is False
    with pm.disable_adapter():
        assert layer.disable_adapters is True
    pm.merge_adapter()
    assert layer.merged is True and layer.merged_adapters == ["default"]
    pm.unmerge_adapter()
    assert layer.merged is False
    with pytest.raises(AttributeError):
        layer.not_an_attribute  # noqa: B018  (only the wrapped module's sizes and tensors are passed through)


def test_peft_layers_answer_the_same_names():
    """The names checked above are peft's (so the test pins peft's API, not one we made up)."""
    pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query"]))
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    for name in ("in_features", "out_features", "weight", "bias", "merged", "merged_adapters", "disable_adapters"):
        assert hasattr(layer, name)
    assert isinstance(layer.merged, bool) and isinstance(layer.disable_adapters, bool)
