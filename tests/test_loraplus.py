"""LoRA+ (methods/lora/loraplus.py): B at ratio x lr, A at lr, LoRA on embeddings at their own rate, and the same
groups as peft 0.21's create_loraplus_optimizer on the same model; ``peftkit train --loraplus-lr-ratio``."""

from __future__ import annotations

import peft
import pytest
import tiny_runs as T
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

from models import tiny_bert
from peftkit import LoraConfig, create_loraplus_optimizer, get_peft_model
from peftkit.errors import ConfigError
from peftkit.train.config import TrainConfig
from peftkit.train.trainer import Trainer

TARGETS = ["query", "value", "word_embeddings"]


def _named_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[float, float, list[str]]]:
    """(lr, weight_decay, sorted parameter names) per group; DoRA's magnitude named as peft names it."""
    names = {id(p): n.removesuffix(".weight") for n, p in model.named_parameters()}
    return [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]


def test_groups_rates():
    pm = get_peft_model(tiny_bert(num_labels=3), LoraConfig(r=4, target_modules=TARGETS, task_type="SEQ_CLS"))
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5)
    a, emb, b, b_no_decay = _named_groups(pm, opt)
    assert a[0] == 1e-3 and a[2] and all("lora_A" in n or "classifier" in n for n in a[2])
    assert emb[0] == 1e-5 and emb[2] and all("lora_embedding" in n for n in emb[2])
    assert b[0] == b_no_decay[0] == 16e-3 and b[2] and all("lora_B" in n for n in b[2])
    assert b_no_decay[1] == 0.0 and any("classifier" in n and "bias" in n for n in b_no_decay[2])
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("use_dora", [False, True])
def test_groups_equal_peft(use_dora):
    targets = ["query", "value"] if use_dora else TARGETS  # peftkit's DoRA is on Linear only
    config = dict(r=4, target_modules=targets, task_type="SEQ_CLS", use_dora=use_dora, lora_dropout=0.0)
    ours = get_peft_model(tiny_bert(num_labels=3), LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_bert(num_labels=3), peft.LoraConfig(**config))
    kw = dict(lr=2e-4, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.01, loraplus_lr_embedding=3e-6, eps=1e-7)
    got = create_loraplus_optimizer(ours, torch.optim.AdamW, **kw)
    expected = peft_loraplus(theirs, torch.optim.AdamW, **kw)
    assert _named_groups(ours, got) == _named_groups(theirs, expected)
    assert got.defaults["eps"] == 1e-7


@pytest.mark.parametrize("ratio", [0, -2.0])
def test_bad_ratio_refused(ratio):
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)


def test_train_flag_only_for_lora():
    with pytest.raises(ConfigError, match=r"--loraplus-lr-ratio 16\.0 with --method 'ia3'"):
        TrainConfig(method="ia3", loraplus_lr_ratio=16.0)
    with pytest.raises(ConfigError, match="ratio > 0"):
        TrainConfig(loraplus_lr_ratio=0.0)


def test_trainer_uses_loraplus_groups(tmp_path):
    data = T.write_csv(tmp_path / "rows.csv", T.sentiment_rows(48))
    settings = dict(
        model=str(T.bert_folder(tmp_path / "bert")),
        data=str(data),
        method_args={"r": 4, "target_modules": ["query", "value"]},
        output_dir=str(tmp_path / "out"),
        lr=1e-3,
        max_steps=2,
        batch_size=8,
        progress=False,
        threads=1,
        eval_before=False,
    )
    trainer = Trainer(TrainConfig(**settings, loraplus_lr_ratio=4.0))
    rates = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in trainer.pm.named_parameters():
        if "lora_B" in name:
            assert rates[id(p)] == pytest.approx(4e-3)
        elif "lora_A" in name:
            assert rates[id(p)] == pytest.approx(1e-3)
    trainer.train()
    plain = Trainer(TrainConfig(**{**settings, "output_dir": str(tmp_path / "plain")}))
    assert {g["initial_lr"] for g in plain.optimizer.param_groups} == {1e-3}
