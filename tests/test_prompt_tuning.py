"""Prompt tuning checked against [prompt ; input] embeddings fed to the base model by hand."""

from __future__ import annotations

import pytest
import torch

from models import VOCAB, batch, minilm_folder, needs_minilm, tiny_bert, tiny_llama, tiny_t5
from peftkit import BASE, PeftModel, PromptTuningConfig, get_peft_model
from peftkit.errors import ConfigError, MergeError
from peftkit.methods.prompt_tuning import PromptEmbedding

TOL = 1e-5


def prompt_of(pm: PeftModel, name: str = "default") -> torch.Tensor:
    layer = next(m for m in pm.modules() if isinstance(m, PromptEmbedding))
    return layer.prompt_embeddings[name][: layer.num_virtual_tokens[name]].detach()


def llama_pm(tokens: int = 3, seed: int = 0):
    base = tiny_llama()
    torch.manual_seed(seed)
    pm = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=tokens, task_type="CAUSAL_LM")).eval()
    return pm, base


def greedy_reference(base, prompt: torch.Tensor, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by hand: the whole [prompt ; ids ; generated] sequence re-read at every step."""
    out = ids.tolist()
    embed = base.get_input_embeddings()
    for _ in range(steps):
        with torch.no_grad():
            embeds = torch.cat([prompt, embed(torch.tensor(out))])[None]
            logits = base(inputs_embeds=embeds).logits
        out.append(int(logits[0, -1].argmax()))
    return out


# ---- config -------------------------------------------------------------------------------------------------------
def test_config_accepts_lower_case_init_and_reports_every_problem():
    assert PromptTuningConfig(prompt_tuning_init="sample_vocab").prompt_tuning_init == "SAMPLE_VOCAB"
    with pytest.raises(ConfigError) as err:
        PromptTuningConfig(num_virtual_tokens=0, prompt_tuning_init="words", token_dim=-1)
    message = str(err.value)
    assert "num_virtual_tokens=0" in message and "prompt_tuning_init='WORDS'" in message and "'TEXT'" in message
    assert "token_dim=-1" in message
    with pytest.raises(ConfigError, match="prompt_tuning_init_text and tokenizer_name_or_path"):
        PromptTuningConfig(prompt_tuning_init="TEXT")


def test_fills_peft_fields_from_the_model():
    pm, _ = llama_pm()
    config = pm.peft_config["default"]
    assert (config.token_dim, config.num_layers, config.num_attention_heads) == (32, 2, 4)
    assert config.num_transformer_submodules == 1
    t5 = get_peft_model(tiny_t5(), PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"))
    assert t5.peft_config["default"].num_transformer_submodules == 2
    assert t5.adapter_state_dict("default")["prompt_embeddings"].shape == (6, 32)  # peft's (P * 2, d)


def test_sample_vocab_init_takes_rows_of_the_embedding_table():
    base = tiny_llama()
    pm = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="sample_vocab"))
    table = base.get_input_embeddings().weight
    for row in prompt_of(pm):
        assert (table == row).all(dim=1).any()


# ---- the base model sees [prompt ; input] -----------------------------------------------------------------------
def test_base_model_sees_prompt_then_input_embeddings():
    pm, base = llama_pm()
    inputs = batch("llama", rows=2)
    seen = {}
    handle = base.model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        out = pm(**inputs)
    handle.remove()
    prompt = prompt_of(pm)
    expected = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(inputs["input_ids"])], dim=1)
    torch.testing.assert_close(seen["inputs_embeds"], expected, atol=0, rtol=0)
    assert seen["attention_mask"].shape == (2, 3 + 7) and bool(seen["attention_mask"].all())
    with torch.no_grad():
        reference = base(inputs_embeds=expected).logits[:, 3:]
    assert out.logits.shape == (2, 7, VOCAB)  # logits of the real tokens only
    torch.testing.assert_close(out.logits, reference, atol=TOL, rtol=0)


def test_causal_lm_loss_ignores_the_prompt():
    pm, base = llama_pm()
    ids = batch("llama", rows=2)["input_ids"]
    embeds = torch.cat([prompt_of(pm).expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, labels=torch.cat([torch.full((2, 3), -100), ids], 1)).loss
        torch.testing.assert_close(pm(input_ids=ids, labels=ids).loss, expected, atol=TOL, rtol=0)


def test_bert_classifier_sees_prompt_and_token_types():
    base = tiny_bert()
    pm = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS")).eval()
    inputs = batch("bert", rows=3)
    inputs["token_type_ids"] = torch.ones_like(inputs["input_ids"])
    prompt = prompt_of(pm).expand(3, -1, -1)
    embeds = torch.cat([prompt, base.get_input_embeddings()(inputs["input_ids"])], dim=1)
    types = torch.cat([torch.zeros(3, 4, dtype=torch.long), inputs["token_type_ids"]], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, token_type_ids=types).logits
        torch.testing.assert_close(pm(**inputs).logits, expected, atol=TOL, rtol=0)


def test_training_updates_only_the_prompt():
    pm, _ = llama_pm()
    pm.train()
    ids = batch("llama", rows=2)["input_ids"]
    pm(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    assert list(grads) == ["base_model.model.model.embed_tokens.prompt_embeddings.default"]
    assert grads["base_model.model.model.embed_tokens.prompt_embeddings.default"].abs().sum() > 0


def test_merge_is_refused():
    pm, _ = llama_pm()
    with pytest.raises(MergeError, match="soft prompt"):
        pm.merge_adapter()


# ---- generate ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_equals_hand_built_greedy_decoding(use_cache):
    pm, base = llama_pm()
    ids = torch.tensor([[5, 17, 42, 8]])
    tokens = pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=use_cache)
    assert tokens.tolist()[0] == greedy_reference(base, prompt_of(pm), ids[0], 6)


def test_generate_batched_with_left_padding_equals_each_row_alone():
    pm, base = llama_pm()
    rows = [[5, 17, 42, 8, 9], [33, 2, 71]]
    ids = torch.tensor([rows[0], [0, 0, *rows[1]]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    tokens = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert tokens.shape == (2, 10)
    for i, row in enumerate(rows):
        assert tokens[i, 5 - len(row) :].tolist() == greedy_reference(base, prompt_of(pm), torch.tensor(row), 5)


def test_incremental_decoding_with_a_cache_prepends_once():
    pm, _ = llama_pm()
    ids = batch("llama", rows=2)["input_ids"]
    with torch.no_grad():
        full = pm(input_ids=ids).logits
        first = pm(input_ids=ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), use_cache=True)
        nxt = pm(input_ids=ids[:, 5:], past_key_values=first.past_key_values, attention_mask=torch.ones(2, 7))
    torch.testing.assert_close(first.logits, full[:, :5], atol=TOL, rtol=0)
    torch.testing.assert_close(nxt.logits, full[:, 5:], atol=TOL, rtol=0)


# ---- several adapters, per-row routing ----------------------------------------------------------------------------
def routed_pair(kind: str):
    base = {"llama": tiny_llama, "bert": tiny_bert}[kind]()
    task = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}[kind]
    pm = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=2, task_type=task))
    pm.add_adapter("long", PromptTuningConfig(num_virtual_tokens=5, task_type=task))
    return pm.eval()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_rows_with_prompts_of_different_lengths_equal_each_row_alone(kind):
    pm = routed_pair(kind)
    inputs = batch(kind, rows=4)
    names = ["long", "default", BASE, "long"]
    with torch.no_grad():
        mixed = pm(**inputs, adapter_names=names).logits
        for name in ("default", "long"):
            pm.set_adapter(name)
            alone = pm(**inputs).logits
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], alone[rows], atol=TOL, rtol=0)
        with pm.disable_adapter():
            torch.testing.assert_close(mixed[2], pm(**inputs).logits[2], atol=TOL, rtol=0)


def test_routed_generate_equals_each_row_alone():
    pm = routed_pair("llama")
    ids = batch("llama", rows=3, length=4)["input_ids"]
    names = ["long", "default", BASE]
    mixed = pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, adapter_names=names)
    for i, name in enumerate(names):
        if name == BASE:
            with pm.disable_adapter():
                alone = pm.generate(input_ids=ids[i : i + 1], max_new_tokens=4, do_sample=False)
        else:
            pm.set_adapter(name)
            alone = pm.generate(input_ids=ids[i : i + 1], max_new_tokens=4, do_sample=False)
        assert mixed[i].tolist() == alone[0].tolist()


def test_two_active_prompts_concatenate():
    pm = routed_pair("llama")
    pm.set_adapter(["default", "long"])
    ids = batch("llama", rows=2)["input_ids"]
    base = pm.get_base_model()
    prompt = torch.cat([prompt_of(pm, "default"), prompt_of(pm, "long")])
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, base(inputs_embeds=embeds).logits[:, 7:], atol=TOL, rtol=0)


# ---- encoder-decoder ----------------------------------------------------------------------------------------------
def test_t5_prompt_goes_to_the_encoder_and_generate_matches():
    base = tiny_t5()
    pm = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM")).eval()
    inputs = batch("t5", rows=2)
    prompt = prompt_of(pm).expand(2, -1, -1)
    embeds = torch.cat([prompt, base.get_input_embeddings()(inputs["input_ids"])], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, decoder_input_ids=inputs["decoder_input_ids"]).logits
        torch.testing.assert_close(pm(**inputs).logits, expected, atol=TOL, rtol=0)
    reference = base.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
    tokens = pm.generate(input_ids=inputs["input_ids"], max_new_tokens=5, do_sample=False)
    assert tokens.tolist() == reference.tolist()


# ---- real models ------------------------------------------------------------------------------------------------
@needs_minilm
def test_text_init_copies_the_embeddings_of_the_text_on_real_minilm():
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(minilm_folder()).eval()
    text = "classify the sentiment"
    config = PromptTuningConfig(
        num_virtual_tokens=5,
        prompt_tuning_init="text",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(minilm_folder()),
    )
    pm = get_peft_model(base, config).eval()
    ids = AutoTokenizer.from_pretrained(minilm_folder())(text, add_special_tokens=False)["input_ids"]
    expected_ids = (ids * 5)[:5]  # the text's tokens, repeated to fill P
    table = base.get_input_embeddings().weight
    torch.testing.assert_close(prompt_of(pm), table[expected_ids], atol=0, rtol=0)
    inputs = {"input_ids": torch.randint(1000, 5000, (2, 9))}
    embeds = torch.cat([prompt_of(pm).expand(2, -1, -1), table[inputs["input_ids"]]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(
            pm(**inputs).last_hidden_state, base(inputs_embeds=embeds).last_hidden_state[:, 5:], atol=TOL, rtol=0
        )


@needs_minilm
def test_init_text_longer_than_the_prompt_is_refused_and_the_model_is_left_unchanged():
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(minilm_folder()).eval()
    text = "is the sentiment of this review positive or negative"
    length = len(AutoTokenizer.from_pretrained(minilm_folder())(text, add_special_tokens=False)["input_ids"])
    assert length == 9  # counted independently of peftkit
    config = PromptTuningConfig(
        num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(minilm_folder()),
    )  # fmt: skip
    inputs = {"input_ids": torch.randint(1000, 5000, (2, 6))}
    embeddings = base.get_input_embeddings()
    with torch.no_grad():
        before = base(**inputs).last_hidden_state
    with pytest.raises(ConfigError) as err:
        get_peft_model(base, config)
    message = str(err.value)
    assert f"{text!r} is 9 tokens long" in message and "num_virtual_tokens=4" in message
    assert "at least 9" in message  # says how to fix it
    assert base.get_input_embeddings() is embeddings and not any(isinstance(m, PromptEmbedding) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())  # flags restored
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).last_hidden_state, before, atol=0, rtol=0)

    # the same on a model that already holds a prompt adapter: the existing layer keeps only that one
    pm = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=2)).eval()
    with torch.no_grad():
        before = pm(**inputs).last_hidden_state
    with pytest.raises(ConfigError, match="9 tokens long"):
        pm.add_adapter("long_text", config)
    assert list(pm.peft_config) == ["default"]
    assert list(next(m for m in pm.modules() if isinstance(m, PromptEmbedding)).prompt_embeddings) == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs).last_hidden_state, before, atol=0, rtol=0)
    config.num_virtual_tokens = 9  # the fix the message names
    pm.add_adapter("long_text", config)
    ids = AutoTokenizer.from_pretrained(minilm_folder())(text, add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(prompt_of(pm, "long_text"), embeddings.weight[ids], atol=0, rtol=0)


def test_beam_search_equals_the_base_model_on_prompt_then_input():
    pm, base = llama_pm()
    ids = batch("llama", rows=2, length=5)["input_ids"]
    embeds = torch.cat([prompt_of(pm).expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    settings = {"max_new_tokens": 4, "do_sample": False, "num_beams": 3}
    reference = base.generate(inputs_embeds=embeds, attention_mask=torch.ones(2, 8, dtype=torch.long), **settings)
    assert pm.generate(input_ids=ids, **settings)[:, 5:].tolist() == reference.tolist()
