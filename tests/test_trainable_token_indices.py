"""LoRA's trainable_token_indices: chosen embedding rows train beside LoRA (methods/trainable_tokens.py's layer
through with_token_rows), by hand, tied heads, merge, all-or-nothing attach, and peft 0.21's files both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from models import batch, build, output
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError, MergeError

peft = pytest.importorskip("peft")

TOL = 1e-5
ROWS = [3, 5, 7]
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
EMBEDDING = {
    "llama": "model.embed_tokens",
    "gpt2": "transformer.wte",
    "bert": "bert.embeddings.word_embeddings",
}


def randomise(pm: torch.nn.Module, seed: int) -> None:
    """Random LoRA factors and token rows, so outputs depend on both."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def config(kind: str, **changes) -> LoraConfig:
    return LoraConfig(r=2, target_modules=TARGETS[kind], trainable_token_indices=ROWS, **changes)


def test_the_rows_train_beside_lora_and_replace_the_embedding_rows():
    model = build("llama")
    pm = get_peft_model(model, config("llama"))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert "base_model.model.model.embed_tokens.trainable_tokens_delta.default" in trainable
    assert sum("lora_" in n for n in trainable) == 8 and len(trainable) == 9
    randomise(pm, seed=1)
    embedding = model.model.embed_tokens
    rows = embedding.trainable_tokens_delta["default"]
    table = embedding.get_base_layer().weight.detach().clone()
    table[ROWS] = rows.detach()
    ids = torch.tensor([[3, 4, 5, 7, 9]])
    torch.testing.assert_close(embedding(ids), table[ids], atol=0, rtol=0)  # E'[i] = T[k] for i = R[k]
    expected = output(pm, batch("llama"))
    pm.merge_adapter()  # LoRA's ΔW and the rows, both written into the weights
    torch.testing.assert_close(output(pm, batch("llama")), expected, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    with pm.disable_adapter():
        torch.testing.assert_close(output(pm, batch("llama")), output(build("llama"), batch("llama")), atol=TOL, rtol=0)


def test_a_tied_lm_head_reads_the_same_rows_and_the_file_holds_them_once(tmp_path):
    model = build("gpt2")
    pm = get_peft_model(model, config("gpt2"))
    randomise(pm, seed=2)
    rows = model.transformer.wte.trainable_tokens_delta["default"].detach()
    hidden = torch.randn(1, 2, 32)
    torch.testing.assert_close(model.lm_head(hidden)[..., ROWS], hidden @ rows.T, atol=TOL, rtol=0)
    pm.save_pretrained(tmp_path)
    keys = [k for k in load_file(str(tmp_path / "adapter_model.safetensors")) if "lora_" not in k]
    assert keys == ["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"]


def test_a_dict_names_the_embeddings_and_bad_rows_leave_the_model_unchanged():
    model = build("bert")
    pm = get_peft_model(
        model, LoraConfig(r=2, target_modules=["query"], trainable_token_indices={"word_embeddings": [1, 2]})
    )
    assert pm.model.bert.embeddings.word_embeddings.token_indices["default"] == [1, 2]
    fresh = build("bert")
    names = [n for n, _ in fresh.named_modules()]
    with pytest.raises(ConfigError, match="token_indices=\\[1, 500\\] holds 500"):
        get_peft_model(fresh, LoraConfig(r=2, target_modules=["query"], trainable_token_indices=[1, 500]))
    assert [n for n, _ in fresh.named_modules()] == names  # neither the rows nor LoRA stayed
    with pytest.raises(ConfigError, match="no rows"):
        get_peft_model(build("bert"), LoraConfig(r=2, target_modules=["query"], trainable_token_indices=[]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_files_both_ways_with_peft(kind, tmp_path):
    ours = get_peft_model(build(kind), config(kind))
    randomise(ours, seed=3)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == ROWS
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert f"base_model.model.{EMBEDDING[kind]}.token_adapter.trainable_tokens_delta" in keys
    in_peft = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(output(in_peft, batch(kind)), output(ours.eval(), batch(kind)), atol=TOL, rtol=0)
    theirs = peft.get_peft_model(build(kind), peft.LoraConfig(r=2, target_modules=TARGETS[kind],
                                                              trainable_token_indices=ROWS))  # fmt: skip
    randomise(theirs, seed=4)
    theirs.save_pretrained(tmp_path / "theirs")
    assert set(load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))) == keys
    loaded = PeftModel.from_pretrained(build(kind), tmp_path / "theirs").eval()
    torch.testing.assert_close(output(loaded, batch(kind)), output(theirs.eval(), batch(kind)), atol=TOL, rtol=0)
    if kind == "gpt2":  # the rows live in a tensor the LM head shares: the core refuses to merge into it
        with pytest.raises(MergeError, match="tied weights"):
            loaded.merge_adapter()
        return
    merged = copy.deepcopy(loaded).merge_and_unload()
    torch.testing.assert_close(output(merged, batch(kind)), output(theirs, batch(kind)), atol=TOL, rtol=0)
