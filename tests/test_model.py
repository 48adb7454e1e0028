"""PeftModel (core/model.py) with LoRA: atomic saves, resuming training, torch.compile, gradient checkpointing,
per-row generate, attribute forwarding and the trainable-parameter report."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from models import batch, output, perturb, tiny_bert, tiny_llama, tiny_t5
from peftkit import BASE, LoraConfig, PeftModel, get_peft_model
from peftkit.core import config as config_module

CONFIG = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


def files(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


# ---- atomic save -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crash_at", [1, 2, 3], ids=["first-file", "second-file", "sub-folder-adapter"])
def test_save_is_atomic(crash_at, tmp_path, monkeypatch):
    """A crash while writing any file (data written, not yet synced) leaves the old checkpoint byte for byte,
    config and tensors together, and no temporary file."""
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    pm.add_adapter("other", LoraConfig(**CONFIG))
    pm.save_pretrained(tmp_path)
    old = files(tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json", "other/adapter_model.safetensors"} <= set(old)

    perturb(pm, "default")
    perturb(pm, "other", seed=1)
    calls = {"n": 0}
    real_fsync = os.fsync

    def crashing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise OSError("simulated crash: disk full")
        real_fsync(fd)

    monkeypatch.setattr(config_module.os, "fsync", crashing_fsync)
    with pytest.raises(OSError, match="simulated crash"):
        pm.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert files(tmp_path) == old  # nothing replaced, no partial or temporary file left

    pm.save_pretrained(tmp_path)  # and a later save goes through
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(output(loaded, batch("bert")), output(pm, batch("bert")), atol=1e-6, rtol=0)


# ---- resuming training -------------------------------------------------------------------------------------
def test_from_pretrained_is_trainable_resumes_training(tmp_path):
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    perturb(pm, "default")
    pm.save_pretrained(tmp_path)

    frozen = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())

    resumed = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    trainable = [p for p in resumed.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(t) for t in resumed.adapter_state_dict("default").values()}
    names = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or "classifier.modules_to_save" in n for n in names)

    inputs = batch("bert", rows=8)
    labels = torch.arange(8) % 3
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    base_before = {n: p.detach().clone() for n, p in resumed.named_parameters() if not p.requires_grad}

    def loss() -> float:
        resumed.eval()
        with torch.no_grad():
            return resumed(**inputs, labels=labels).loss.item()

    start = loss()
    resumed.train()
    for _ in range(5):
        optimizer.zero_grad()
        resumed(**inputs, labels=labels).loss.backward()
        optimizer.step()
    assert loss() < start - 1e-3
    for n, p in resumed.named_parameters():  # the optimizer saw only adapter parameters
        if n in base_before:
            torch.testing.assert_close(p, base_before[n], atol=0, rtol=0)


# ---- torch.compile, gradient checkpointing -----------------------------------------------------------------
def test_torch_compile_matches_eager():
    """Compiled (dynamo, eager backend: inductor is too slow on these CPUs) loss and gradients equal eager ones."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    perturb(pm, "default")
    pm.train()  # no dropout in tiny_llama: train and eval compute the same
    inputs = batch("llama")
    labels = inputs["input_ids"]

    def run(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pm.zero_grad()
        out = model(**inputs, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    eager_logits, eager_grads = run(pm)
    compiled_logits, compiled_grads = run(torch.compile(pm, backend="eager"))
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-5, rtol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == 2 * 2 * 2
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        pm = get_peft_model(
            tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
        )
        perturb(pm, "default")
        if checkpointing:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert pm.get_base_model().is_gradient_checkpointing
        pm.train()
        inputs = batch("llama")
        pm(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 3 * 2
    for name, grad in plain.items():
        assert checkpointed[name] is not None, f"no gradient reached {name} under checkpointing"
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- generate with per-row adapters ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generate_per_row_equals_per_adapter(kind):
    build = {"llama": tiny_llama, "t5": tiny_t5}[kind]
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "t5": ["q", "v", "wo"]}[kind]
    task = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}[kind]
    pm = get_peft_model(build(), LoraConfig(r=4, target_modules=targets, task_type=task))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=targets, task_type=task))
    perturb(pm, "default", seed=1, scale=0.5)
    perturb(pm, "b", seed=2, scale=0.5)
    pm.eval()
    inputs = {k: v for k, v in batch(kind, rows=4).items() if k != "decoder_input_ids"}
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)

    def generate(**kwargs):
        with torch.no_grad():
            return pm.generate(**inputs, **settings, **kwargs)

    alone = {}
    for name in ("default", "b"):
        pm.set_adapter(name)
        alone[name] = generate()
    with pm.disable_adapter():
        alone[BASE] = generate()
    assert not torch.equal(alone["default"], alone["b"]) and not torch.equal(alone["b"], alone[BASE])

    pm.set_adapter("default")
    rows = ["b", BASE, "default", "b"]
    routed = generate(adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(routed[i], alone[name][i], atol=0, rtol=0, msg=f"row {i} ({name})")


# ---- attribute forwarding, parameter counts ----------------------------------------------------------------
def test_attribute_access_is_forwarded_to_the_base_model():
    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert pm.config is model.config and pm.config.model_type == "llama"
    assert pm.get_input_embeddings() is model.model.embed_tokens
    assert pm.generation_config is model.generation_config
    assert pm.lm_head is model.lm_head
    assert pm.get_base_model() is model and pm.base_model.model is model
    with pytest.raises(AttributeError, match="no_such_attribute"):
        pm.no_such_attribute  # noqa: B018


def test_print_trainable_parameters(capsys):
    import peft

    reference = tiny_bert()
    pm = get_peft_model(copy.deepcopy(reference), LoraConfig(**CONFIG))
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.LoraConfig(**CONFIG))

    lora = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert lora == 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers x (query, value) x (A + B)
    head = sum(p.numel() for p in reference.classifier.parameters())
    total = sum(p.numel() for p in reference.parameters()) + lora + head  # the head's trainable copy counts too
    assert pm.get_nb_trainable_parameters() == (lora + head, total) == theirs.get_nb_trainable_parameters()

    pm.print_trainable_parameters()
    ours = capsys.readouterr().out
    expected = (
        f"trainable params: {lora + head:,d} || all params: {total:,d} || trainable%: {100 * (lora + head) / total:.4f}"
    )
    assert ours.strip() == expected
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == expected
