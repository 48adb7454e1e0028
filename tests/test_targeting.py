"""Which modules LoRA attaches to (core/targeting.py), checked against Hugging Face peft's choice on the same
model where peft defines the rule, and against names listed by hand elsewhere."""

from __future__ import annotations

import re

import pytest
import torch

from models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_unet
from peftkit import LoraConfig, get_peft_model
from peftkit.core.layer import ModulesToSave
from peftkit.errors import ConfigError, TargetNotFoundError
from peftkit.methods.lora import LoraLayer


def ours(model, **config) -> set[str]:
    pm = get_peft_model(model, LoraConfig(r=2, **config))
    return {n for n, m in pm.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def peft_targets(model, **config) -> set[str]:
    import peft
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, **config))
    return {n for n, m in pm.get_base_model().named_modules() if isinstance(m, PeftLoraLayer)}


def named(model, pattern: str) -> set[str]:
    return {n for n, _ in model.named_modules() if re.fullmatch(pattern, n)}


# ---- target_modules forms --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "targets",
    [
        ["query"],  # leaf name
        ["attention.self.value", "output.dense"],  # dotted suffixes
        ["bert.encoder.layer.1.attention.self.key"],  # a full name
        r".*\.layer\.0\.attention\.self\.(query|key)",  # a regex, full match
    ],
    ids=["leaf", "suffix", "full-name", "regex"],
)
def test_target_forms_match_peft(targets):
    got = ours(tiny_bert(), target_modules=targets)
    assert got == peft_targets(tiny_bert(), target_modules=targets)
    assert got  # and something matched


def test_suffix_matches_whole_name_parts_only():
    with pytest.raises(TargetNotFoundError):
        ours(tiny_bert(), target_modules=["uery"])  # not a '.'-separated suffix of '...query'


def test_regex_must_match_the_full_name():
    with pytest.raises(TargetNotFoundError):
        ours(tiny_bert(), target_modules="query")  # a string is a regex over the full name
    got = ours(tiny_bert(), target_modules=".*query")
    assert got == named(tiny_bert(), r".*\.query")


def test_all_linear_excludes_the_output_head():
    model = tiny_llama()
    got = ours(model, target_modules="all-linear")
    assert got == named(model, r"model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
    assert "lm_head" not in got
    assert got == peft_targets(tiny_llama(), target_modules="all-linear")


def test_all_linear_is_case_insensitive_as_in_peft():
    assert ours(tiny_llama(), target_modules="ALL-Linear") == ours(tiny_llama(), target_modules="all-linear")


def test_all_linear_takes_gpt2_conv1d():
    got = ours(tiny_gpt2(), target_modules="all-linear")
    assert got == named(tiny_gpt2(), r"transformer\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)")


def test_all_linear_excludes_task_head_and_modules_to_save():
    model = tiny_bert()
    pm = get_peft_model(
        model, LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=["pooler"])
    )
    base = pm.get_base_model()
    got = {n for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    assert got == named(tiny_bert(), r"bert\.encoder\.layer\.\d\..*(query|key|value|dense)")
    assert isinstance(base.classifier, ModulesToSave) and isinstance(base.bert.pooler, ModulesToSave)
    assert not any(isinstance(m, LoraLayer) for m in base.bert.pooler.modules())


def test_exclude_modules():
    model = tiny_llama()
    got = ours(model, target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])
    assert got == named(model, r"model\.layers\.1\.self_attn\.q_proj|model\.layers\.\d\.self_attn\.v_proj")
    got = ours(tiny_llama(), target_modules="all-linear", exclude_modules=r".*mlp.*")
    assert got == named(model, r"model\.layers\.\d\.self_attn\.[qkvo]_proj")
    assert got == peft_targets(tiny_llama(), target_modules="all-linear", exclude_modules=r".*mlp.*")


@pytest.mark.parametrize(
    ("build", "config"),
    [
        (tiny_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")),
        (tiny_llama, dict(target_modules=["q_proj"], layers_to_transform=0)),
        (tiny_t5, dict(target_modules=["q", "v"], layers_to_transform=[1], layers_pattern="block")),
        (tiny_bert, dict(target_modules=["query"], layers_to_transform=[0, 1], layers_pattern=["layer"])),
    ],
    ids=["llama-layers", "llama-int", "t5-block", "bert-list"],
)
def test_layers_to_transform_matches_peft(build, config):
    got = ours(build(), **config)
    assert got and got == peft_targets(build(), **config)
    wanted = config["layers_to_transform"]
    wanted = {wanted} if isinstance(wanted, int) else set(wanted)
    assert {int(re.search(r"\.(\d+)\.", n).group(1)) for n in got} == wanted


# ---- defaults when target_modules is None ---------------------------------------------------------------------
def _peft_default(kind: str) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[kind]


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return WhisperForConditionalGeneration(config).eval()


def tiny_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2)  # fmt: skip
    return CLIPTextModel(config).eval()


@pytest.mark.parametrize(
    ("build", "suffixes"),
    [
        (tiny_bert, _peft_default("bert")),
        (tiny_gpt2, _peft_default("gpt2")),
        (tiny_llama, _peft_default("llama")),
        (tiny_t5, _peft_default("t5")),
        (tiny_whisper, ["q_proj", "v_proj"]),
        (tiny_clip_text, ["q_proj", "v_proj"]),
        (tiny_unet, ["to_q", "to_k", "to_v", "to_out.0"]),
    ],
    ids=["bert", "gpt2", "llama", "t5", "whisper", "clip-text", "unet"],
)
def test_default_targets_per_model_type(build, suffixes):
    model = build()
    expected = {n for n, _ in model.named_modules() if any(n.endswith("." + s) for s in suffixes)}
    assert expected, "the tiny model should contain the default targets"
    assert ours(model) == expected


def test_no_default_for_unknown_model_type():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"no default target_modules for model type 'Sequential'"):
        ours(model)


# ---- task heads -------------------------------------------------------------------------------------------------
def _bert_for(head: str):
    from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)  # fmt: skip
    return {"TOKEN_CLS": BertForTokenClassification, "QUESTION_ANS": BertForQuestionAnswering}[head](config)


def _llama_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=3, pad_token_id=0)  # fmt: skip
    return LlamaForSequenceClassification(config)


@pytest.mark.parametrize(
    ("build", "task", "head"),
    [
        (tiny_bert, "SEQ_CLS", "classifier"),
        (_llama_cls, "SEQ_CLS", "score"),
        (lambda: _bert_for("TOKEN_CLS"), "TOKEN_CLS", "classifier"),
        (lambda: _bert_for("QUESTION_ANS"), "QUESTION_ANS", "qa_outputs"),
    ],
    ids=["bert-seq-cls", "llama-seq-cls", "token-cls", "qa"],
)
def test_task_head_becomes_modules_to_save(build, task, head):
    target = ["query"] if "bert" in type(build()).__name__.lower() else ["q_proj"]
    pm = get_peft_model(build(), LoraConfig(r=2, target_modules=target, task_type=task))
    wrapper = pm.get_base_model().get_submodule(head)
    assert isinstance(wrapper, ModulesToSave)
    copy = wrapper.modules_to_save["default"]
    assert all(p.requires_grad for p in copy.parameters())
    assert not any(p.requires_grad for p in wrapper.base_layer.parameters())
    saved = pm.adapter_state_dict("default")
    assert {f"{head}.{n}" for n, _ in copy.named_parameters()} <= set(saved)
    reference = get_peft_model(build(), LoraConfig(r=2, target_modules=target, task_type=task))
    torch.testing.assert_close(saved[f"{head}.weight"], reference.adapter_state_dict("default")[f"{head}.weight"])


# ---- nothing matched -------------------------------------------------------------------------------------------
def test_target_not_found_lists_candidates():
    with pytest.raises(TargetNotFoundError) as info:
        ours(tiny_bert(), target_modules=["q", "v"])
    message = str(info.value)
    assert "target_modules=['q', 'v']" in message
    assert "Candidates" in message and "self.query" in message and "self.value" in message
    assert isinstance(info.value, ValueError)  # code written for peft catches ValueError


def test_layers_to_transform_out_of_range_matches_nothing():
    with pytest.raises(TargetNotFoundError):
        ours(tiny_llama(), target_modules=["q_proj"], layers_to_transform=[7], layers_pattern="layers")
