"""TRL 1.x trainers on peftkit models (issue 16 item 3): SFTTrainer on a ``messages`` data set with assistant-only
loss and gradient checkpointing, its adapter loaded by peft; DPOTrainer without a reference model."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_runs import llama_folder

import peftkit

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")  # TRL's PEFT code paths name peft's classes (docs/peft_compat.md)

# the assistant's turns are wrapped in {% generation %} so TRL can mask everything else out of the loss
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} [SEP] "
    "{% endgeneration %}{% else %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endif %}{% endfor %}"
)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """TRL's configs default to bf16: without a reset, accelerate's process-wide AcceleratorState would keep bf16
    autocast for every later Accelerator in this process (tests/test_accelerate.py, test_fsdp.py run after these)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


COMMON = dict(report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=5e-2)


def tiny_chat_model(tmp_path):
    folder = llama_folder(tmp_path / "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template, tokenizer.pad_token = TEMPLATE, "[PAD]"
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    config = peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return folder, tokenizer, peftkit.get_peft_model(base, config)


def test_sft_trainer_assistant_only_loss_and_peft_loads_the_adapter(tmp_path):
    folder, tokenizer, model = tiny_chat_model(tmp_path)
    chat = [
        {"role": "user", "content": "tell me about the movie"},
        {"role": "assistant", "content": "the movie was good"},
    ]
    data = datasets.Dataset.from_list([{"messages": chat}] * 32)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=5,
        per_device_train_batch_size=8,
        assistant_only_loss=True,
        gradient_checkpointing=True,
        **COMMON,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.model is model
    labels = trainer.train_dataset[0]["labels"] if "labels" in trainer.train_dataset.column_names else None
    masks = trainer.train_dataset[0].get("assistant_masks")
    trained_on = masks if masks is not None else [int(label != -100) for label in labels]
    assert 0 < sum(trained_on) < len(trained_on)  # the user's turn is out of the loss
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert model.get_base_model().is_gradient_checkpointing
    trainer.save_model(str(tmp_path / "adapter"))
    # peft and peftkit load the saved adapter to the same model (on one base: two loads of this tiny folder are not
    # bit-identical), and peftkit's copy holds the trained values
    fresh = transformers.AutoModelForCausalLM.from_pretrained(folder)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path / "adapter"))
    ours = peftkit.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    ids = torch.tensor([tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"][:8]])
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
    saved, trained = peftkit.get_peft_model_state_dict(ours), peftkit.get_peft_model_state_dict(model)
    assert sorted(saved) == sorted(peft.get_peft_model_state_dict(theirs))
    assert all(torch.equal(saved[k], trained[k]) for k in trained)


def test_dpo_trainer_uses_the_base_model_as_reference(tmp_path):
    _, tokenizer, model = tiny_chat_model(tmp_path)
    pair = {"prompt": "tell me about the movie", "chosen": " the movie was good", "rejected": " the plot is awful"}
    data = datasets.Dataset.from_list([pair] * 8)
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4, **COMMON)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.ref_model is None  # no second model: the reference comes from the same model
    start = {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(model).items()}
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 2 and history[0]["rewards/margins"] == 0.0 and history[1]["rewards/margins"] != 0.0
    # TRL's reference is a frozen copy of the adapter as it started (LoRA B = 0): the base model's outputs
    ids = torch.tensor([tokenizer("tell me about the movie")["input_ids"]])
    model.eval()
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    references = [name for name in model.peft_config if name != "default"]
    for name in references:
        kept = peftkit.get_peft_model_state_dict(model, adapter_name=name)
        assert all(torch.equal(kept[k], start[k]) for k in start)
        model.set_adapter(name)
        torch.testing.assert_close(model(input_ids=ids).logits, base)
        model.set_adapter("default")
    trained = peftkit.get_peft_model_state_dict(model)
    assert any(not torch.equal(trained[k], start[k]) for k in start)
