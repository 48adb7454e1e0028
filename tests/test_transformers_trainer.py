"""transformers' Trainer with default TrainingArguments on peftkit models (issue 16 item 2): columns and labels found
from the forward signature, eval_loss and compute_metrics, adapter-only checkpoints like peft 0.21's, resume,
load_best_model_at_end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import bert_folder, llama_folder, sentiment_rows

import peftkit

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

LABELS = {"negative": 0, "neutral": 1, "positive": 2}
# Trainer's own files next to the adapter (the tokenizer's, training_args.bin, optimizer, scheduler, rng, state)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def accuracy(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, -1) == prediction.label_ids).mean())}


def classification_data(folder: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    rows = sentiment_rows(48)
    data = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "label": [LABELS[r["label"]] for r in rows]})
    data = data.map(lambda row: tokenizer(row["text"], padding="max_length", max_length=12), batched=True)
    return tokenizer, data  # keeps "text": Trainer must drop it (remove_unused_columns=True)


def args(folder: Path, **changes) -> transformers.TrainingArguments:
    """Default TrainingArguments but for the run's length, a checkpoint every step and no reporting."""
    settings = dict(max_steps=2, save_steps=1, per_device_train_batch_size=8)
    settings.update(learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(output_dir=str(folder), **{**settings, **changes})


def lora(library, task: str, targets: list[str]):
    return library.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task)


def bert_trainer(tmp_path: Path, library, out: str, **changes):
    folder = tmp_path / "bert" if (tmp_path / "bert").is_dir() else bert_folder(tmp_path / "bert")
    tokenizer, data = classification_data(folder)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    model = library.get_peft_model(base, lora(library, "SEQ_CLS", ["query", "value"]))
    return transformers.Trainer(
        model=model,
        args=args(tmp_path / out, **changes),
        train_dataset=data,
        eval_dataset=data.select(range(16)),
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_classifier_trains_evaluates_and_checkpoints_like_peft(tmp_path):
    ours = bert_trainer(tmp_path, peftkit, "ours")
    ours._set_signature_columns_if_needed()  # what remove_unused_columns keeps: read from the forward signature
    assert {"input_ids", "attention_mask", "token_type_ids", "labels"} <= set(ours._signature_columns)
    assert ours.label_names == ["labels"]
    history = ours.train()
    metrics = ours.evaluate()
    assert history.global_step == 2 and "eval_loss" in metrics and "eval_accuracy" in metrics
    theirs = bert_trainer(tmp_path, peft, "theirs")
    theirs.train()
    for step in (1, 2):
        mine, reference = tmp_path / "ours" / f"checkpoint-{step}", tmp_path / "theirs" / f"checkpoint-{step}"
        assert listing(mine) == listing(reference)
        assert listing(mine) >= ADAPTER_FILES and not {"model.safetensors", "pytorch_model.bin"} & listing(mine)
        keys = sorted(load_file(mine / "adapter_model.safetensors"))
        assert keys == sorted(load_file(reference / "adapter_model.safetensors"))
    # peft loads the checkpoint peftkit's Trainer wrote
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert")
    peft.PeftModel.from_pretrained(base, tmp_path / "ours" / "checkpoint-2")


def test_resume_from_checkpoint_loads_the_adapter(tmp_path):
    first = bert_trainer(tmp_path, peftkit, "run")
    first.train()
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    resumed = bert_trainer(tmp_path, peftkit, "run", max_steps=3)
    state = resumed.train(resume_from_checkpoint=True)  # the latest checkpoint: checkpoint-2
    assert state.global_step == 3
    # the adapter goes on from the checkpoint's values (not a fresh init): resumed at its last step, it equals them
    again = bert_trainer(tmp_path, peftkit, "run", max_steps=2)
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    now = peftkit.get_peft_model_state_dict(again.model)
    assert all(torch.equal(now[k], saved[k]) for k in saved)


def test_load_best_model_at_end(tmp_path):
    trainer = bert_trainer(
        tmp_path, peftkit, "best", eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, save_total_limit=1
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    saved = load_file(best / "adapter_model.safetensors")
    now = peftkit.get_peft_model_state_dict(trainer.model)
    assert all(torch.equal(now[k], saved[k]) for k in saved)


def test_causal_lm_trains_and_evaluates(tmp_path):
    folder = llama_folder(tmp_path / "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [" ".join(r["text"].split()[:4]) for r in sentiment_rows(32)]
    data = datasets.Dataset.from_dict({"text": rows}).map(
        lambda row: {**tokenizer(row["text"], padding="max_length", max_length=8)}, batched=True
    )
    data = data.map(lambda row: {"labels": row["input_ids"]})
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model = peftkit.get_peft_model(base, lora(peftkit, "CAUSAL_LM", ["q_proj", "v_proj"]))
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path / "out", save_steps=2),
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        compute_metrics=lambda p: {"tokens": float(np.asarray(p.label_ids).size)},
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_tokens" in metrics and np.isfinite(metrics["eval_loss"])
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert listing(checkpoint) >= ADAPTER_FILES and "model.safetensors" not in listing(checkpoint)
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder)
    loaded = peftkit.PeftModel.from_pretrained(plain, checkpoint)
    ids = torch.tensor(data[:2]["input_ids"])
    torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)
    assert os.path.getsize(checkpoint / "adapter_model.safetensors") < 50_000
