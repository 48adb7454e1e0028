"""Training causal LMs the way people do now (issue 17, items 3-7): base weights in bf16/fp16 with float32
adapters, the causal-LM default lr, logs and trackers (tensorboard read back for real, log.csv), the time budget,
evaluation by generation, `peftkit generate --base` / batched prompts, `peftkit predict` on pairs with a
predictions file, YAML numbers typed from the field, and `peftkit compare`'s majority baseline and MCC."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import tiny_runs as T
import torch
from typer.testing import CliRunner

from peftkit.cli.main import build_app
from peftkit.errors import ConfigError
from peftkit.train import TrainConfig, Trainer, train
from peftkit.train import generation_eval as G
from peftkit.train.setup import CAUSAL_LM_LR_FACTOR

LORA_BERT = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
LORA_LLAMA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    return {
        "bert": T.bert_folder(root / "bert"),
        "llama": T.llama_folder(root / "llama"),
        "csv": T.write_csv(root / "sentiment.csv", T.sentiment_rows(120)),
        "inst": T.write_json(root / "inst.json", T.instruction_rows(48)),
    }


def lm_config(files, out: Path, **changes) -> TrainConfig:
    settings = dict(
        model=str(files["llama"]),
        data=str(files["inst"]),
        method_args=LORA_LLAMA,
        output_dir=str(out),
        batch_size=8,
        lr=3e-2,
        max_steps=6,
        progress=False,
        threads=1,
    )
    return TrainConfig(**{**settings, **changes})


def run(*args) -> str:
    result = CliRunner().invoke(build_app(), [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


# ---- item 3: weights and precision ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_dtype_loads_the_base_in_half_precision_and_trains_float32_adapters(files, tmp_path, dtype):
    trainer = Trainer(lm_config(files, tmp_path, dtype=dtype, max_steps=8))
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    frozen = {p.dtype for p in trainer.pm.parameters() if not p.requires_grad}
    trained = {p.dtype for p in trainer.pm.parameters() if p.requires_grad}
    assert frozen == {half} and trained == {torch.float32}
    result = trainer.train()
    assert result.after["loss"] < result.before["loss"] - 0.05


def test_dtype_bf16_classifier_head_trains_in_float32_and_bf16_autocast_still_works(files, tmp_path):
    settings = dict(model=str(files["bert"]), data=str(files["csv"]), method_args=LORA_BERT, batch_size=16, lr=3e-2,
                    max_steps=20, progress=False, threads=1, eval_before=False)  # fmt: skip
    trainer = Trainer(TrainConfig(**settings, output_dir=str(tmp_path / "a"), dtype="bf16"))
    head = [n for n, p in trainer.pm.named_parameters() if p.requires_grad and "classifier" in n]
    assert head and all(dict(trainer.pm.named_parameters())[n].dtype == torch.float32 for n in head)
    assert trainer.train().after["accuracy"] > 0.6
    autocast = train(TrainConfig(**settings, output_dir=str(tmp_path / "b"), bf16=True))
    assert autocast.after["accuracy"] > 0.6


def test_a_bad_dtype_names_the_choices(files, tmp_path):
    with pytest.raises(ConfigError, match=r"--dtype 'int8' is not a dtype; use one of 'bf16', 'fp16', 'fp32'"):
        lm_config(files, tmp_path, dtype="int8")


# ---- activation checkpointing: on by default for causal LMs (as TRL's SFTConfig), same losses ----------------
def checkpointing(trainer: Trainer) -> bool:
    base = trainer.pm.get_base_model()
    return bool(getattr(base, "is_activation_checkpointing", None) or getattr(base, "is_gradient_checkpointing", False))


def test_causal_lm_checkpoints_activations_by_default_and_says_so(files, tmp_path, capsys):
    assert TrainConfig().gradient_checkpointing is None  # unset: the task decides
    assert checkpointing(Trainer(lm_config(files, tmp_path / "lm")))
    assert "activation checkpointing on (default for causal_lm)" in capsys.readouterr().out
    assert not checkpointing(Trainer(lm_config(files, tmp_path / "off", gradient_checkpointing=False)))
    assert "activation checkpointing off (--gradient-checkpointing)" in capsys.readouterr().out
    cls = TrainConfig(model=str(files["bert"]), data=str(files["csv"]), method_args=LORA_BERT, max_steps=1,
                      progress=False, threads=1, output_dir=str(tmp_path / "cls"))  # fmt: skip
    assert not checkpointing(Trainer(cls))
    assert "activation checkpointing off (default for classification)" in capsys.readouterr().out


@pytest.mark.parametrize("packing", [False, True])
def test_checkpointing_does_not_change_the_losses(files, tmp_path, packing):
    on = train(lm_config(files, tmp_path / "on", max_steps=3, packing=packing, max_length=64))
    off = train(lm_config(files, tmp_path / "off", max_steps=3, packing=packing, max_length=64,
                          gradient_checkpointing=False))  # fmt: skip
    assert on.history["train_loss"] == pytest.approx(off.history["train_loss"], abs=1e-5)
    assert on.after["loss"] == pytest.approx(off.after["loss"], abs=1e-5)


def test_no_gradient_checkpointing_flag_and_help(files, tmp_path):
    from peftkit.cli.options import build_train_config

    shown = CliRunner().invoke(build_app(), ["train", "--help"], env={"COLUMNS": "250"}).stdout
    assert "--no-gradient-checkpointing" in shown and "default: on for causal_lm" in shown
    assert "(default: None)" not in shown.split("--gradient-checkpointing")[1].split("--bf16")[0]  # said in words
    assert "Text column (default: guessed)." in shown and "guessed). (default" not in shown
    settings = build_train_config({"gradient_checkpointing": False}, None, demo=False)
    assert settings.gradient_checkpointing is False
    assert build_train_config({}, None, demo=False).gradient_checkpointing is None


# ---- item 4: learning rate per task -------------------------------------------------------------------------
def test_causal_lm_default_lr_is_lower_than_the_classification_one_and_printed(files, tmp_path, capsys):
    from peftkit.core.registry import get_method

    lora = get_method("lora").training.learning_rate
    result = train(lm_config(files, tmp_path / "lm", lr=None, max_steps=1, eval_before=False))
    assert result.lr == pytest.approx(lora * CAUSAL_LM_LR_FACTOR) and result.lr == pytest.approx(1e-3)
    assert "lr 1e-03 (lora's default for causal LMs" in capsys.readouterr().out
    cls = TrainConfig(model=str(files["bert"]), data=str(files["csv"]), method_args=LORA_BERT, max_steps=1,
                      progress=False, threads=1, eval_before=False, output_dir=str(tmp_path / "cls"))  # fmt: skip
    assert train(cls).lr == lora == 2e-3  # the classifier demo's rate is unchanged


# ---- item 5: logs, trackers, time budget ---------------------------------------------------------------------
def test_tensorboard_events_read_back(files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(lm_config(files, tmp_path, report_to="tensorboard", log_steps=2, eval_steps=3))
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/perplexity"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    losses = result.history["train_loss"]
    assert events.Scalars("train/loss")[0].value == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-5)
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 3, 6]
    assert events.Scalars("eval/loss")[-1].value == pytest.approx(result.history["eval"][-1]["loss"], rel=1e-5)
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_s"))


def test_csv_log_and_line_logs_without_progress(files, tmp_path, capsys):
    train(lm_config(files, tmp_path, report_to="csv", log_steps=3))
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = [(r["step"], bool(r["train/loss"]), bool(r["eval/loss"])) for r in rows]
    assert steps == [("0", False, True), ("3", True, False), ("6", True, False), ("6", False, True)]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 3/6: loss ") and "tokens/s" in lines[0]


def test_log_lines_when_stdout_is_not_a_terminal(files, tmp_path, capsys, monkeypatch):
    from peftkit.train import trackers

    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    assert trackers.interactive(True) and not trackers.interactive(False)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    assert not trackers.interactive(True)
    train(lm_config(files, tmp_path, progress=True, log_steps=2, max_steps=2))  # progress on, stdout captured
    lines = capsys.readouterr()
    assert "step 2/2: loss " in lines.out and "train lora" not in lines.err  # a line, no bar


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "trackio"])
def test_a_tracker_that_is_not_installed_names_its_package(files, tmp_path, tracker):
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(ConfigError, match=rf"--report-to {tracker} needs the '{tracker}' package.*pip install"):
        Trainer(lm_config(files, tmp_path, report_to=tracker))


def test_max_minutes_stops_evaluates_and_saves(files, tmp_path, monkeypatch):
    clock = {"t": 1000.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    original = Trainer._step

    def slow_step(self, micro):
        clock["t"] += 25.0  # each step "takes" 25 s: a 1-minute budget ends after step 3
        return original(self, micro)

    monkeypatch.setattr(Trainer, "_step", slow_step)
    result = train(lm_config(files, tmp_path, max_steps=50, max_minutes=1.0))
    assert result.steps == 3 and result.history["eval_step"][-1] == 3
    assert result.stop_reason.startswith("time budget of 1 min spent at step 3")
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3


# ---- item 6: evaluation by generation ------------------------------------------------------------------------
def test_gsm8k_final_numbers_and_exact_match():
    reference = "She sold 48/2 = <<48/2=24>>24 clips.\n#### 72"
    assert G.final_number(reference) == "72"
    assert G.exact_match("so 48 + 24 = 72", reference)  # no ####: the last number
    assert G.exact_match("#### 72.", reference) and G.exact_match("answer: #### 72 clips", reference)
    assert not G.exact_match("#### 27", reference) and not G.exact_match("no number", reference)
    assert G.final_number("#### 1,000") == "1000" and G.exact_match("The cost is 1000.0", "#### 1,000")
    assert G.exact_match(" Paris. ", "paris") and not G.exact_match("Paris is big", "Paris")


def test_prompt_and_reference_read_back_from_the_labels():
    row = {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "labels": [-100, -100, 3, 4, -100, -100, 7, 8]}
    assert G.prompt_and_reference(row) == ([1, 2, 3, 4, 5, 6], [7, 8])  # the last assistant turn
    assert G.prompt_and_reference({"input_ids": [1], "labels": [-100]}) is None


def test_eval_generate_scores_exact_match_and_writes_samples(files, tmp_path):
    result = train(lm_config(files, tmp_path, eval_generate=3, max_new_tokens=6, max_steps=30, lr=5e-2))
    assert "exact_match" in result.before and "exact_match" in result.after and "loss" in result.after
    saved = json.loads((tmp_path / "metrics.json").read_text())
    samples = saved["samples"]["after"]
    assert len(samples) == 3 and set(samples[0]) == {"prompt", "reference", "generated", "exact_match"}
    assert samples[0]["reference"] in ("the movie was good", "the plot is awful")
    share = sum(s["exact_match"] for s in samples) / 3
    assert saved["after"]["exact_match"] == pytest.approx(share)
    assert result.after["exact_match"] >= result.before["exact_match"]


# ---- item 7: YAML numbers, method syntax, compare --------------------------------------------------------------
def test_yaml_numbers_are_typed_from_the_field(files, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 2e-4\nmax_steps: '3'\nbf16: 'false'\nmax_grad_norm: null\nwarmup_ratio: 1e-1\n")
    config = TrainConfig.from_yaml(path)
    assert (config.lr, config.max_steps, config.bf16, config.max_grad_norm) == (2e-4, 3, False, None)
    assert config.warmup_ratio == 0.1
    path.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"lr: 'fast' in .*run.yaml is not a float"):
        TrainConfig.from_yaml(path)


def test_method_settings_one_syntax_in_train_and_compare(files, tmp_path):
    from peftkit.cli.options import build_train_config

    spec = build_train_config({"method": "lora:r=2,lora_alpha=4,target_modules=[query,value]"}, None, demo=False)
    flags = build_train_config({"method": "lora", "m_r": "2", "m_lora_alpha": "4", "m_target_modules": "query,value"},
                               None, demo=False)  # fmt: skip
    assert spec.method == flags.method == "lora" and spec.method_args == flags.method_args
    assert spec.method_args == {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}
    (tmp_path / "run.yaml").write_text("method: 'ia3:target_modules=[query]'\n")
    from_yaml = build_train_config({}, str(tmp_path / "run.yaml"), demo=False)
    assert from_yaml.method == "ia3" and from_yaml.method_args == {"target_modules": ["query"]}


def test_compare_shows_majority_baseline_and_mcc_and_flags_a_one_class_model(files, tmp_path):
    run("compare", "--model", files["bert"], "--data", files["csv"], "--output-dir", tmp_path, "--max-steps", "20",
        "--no-progress", "--threads", "1", "--no-isolate", "--lr", "3e-2",
        "-m", "lora:r=4,target_modules=[query,value]", "-m", "lora:r=1,target_modules=[query]")  # fmt: skip
    with open(tmp_path / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["majority"]) == pytest.approx(1 / 3, abs=0.05) for r in rows)
    assert float(rows[0]["mcc"]) > 0.3 and rows[0]["note"] == ""
    table = (tmp_path / "comparison.md").read_text()
    assert "| majority class | dev MCC |" in table


def test_compare_note_for_a_majority_only_method(tmp_path):
    from peftkit.cli.compare import write_tables

    rows = [{"method": "a", "after": 0.45, "majority": 0.45, "mcc": 0.0, "note": "predicts one class only"},
            {"method": "b", "after": 0.7, "majority": 0.45, "mcc": 0.5, "note": ""}]  # fmt: skip
    write_tables(rows, tmp_path)
    lines = (tmp_path / "comparison.md").read_text().splitlines()
    assert lines[0].endswith("| note |") and lines[2].endswith("| predicts one class only |")


# ---- item 6: generate and predict on the command line ----------------------------------------------------------
def test_generate_base_batches_prompts_and_separates_outputs(files, tmp_path):
    prompts = ["tell me about the movie", "what about the plot", "say hello"]
    args = [arg for p in prompts for arg in ("--prompt", p)]
    out = run("generate", "--base", "--model", files["llama"], *args, "--max-new-tokens", "5", "--batch-size", "3")
    blocks = [b for b in out.split("=== [") if b.strip()]
    assert [b.split("\n", 1)[0] for b in blocks] == [f"{i}] {p}" for i, p in enumerate(prompts, 1)]
    alone = [run("generate", "--base", "--model", files["llama"], "--prompt", p, "--max-new-tokens", "5").strip()
             for p in prompts]  # fmt: skip
    assert [b.split("\n", 1)[1].strip() for b in blocks] == alone  # left-padded batch = one prompt at a time
    train(lm_config(files, tmp_path / "lm", max_steps=2))
    base_of_adapter = run("generate", tmp_path / "lm", "--base", "--prompt", prompts[0], "--max-new-tokens", "5")
    assert base_of_adapter.strip() == alone[0]


def test_predict_reads_pairs_truncates_like_training_and_writes_a_predictions_file(files, tmp_path):
    cls = TrainConfig(model=str(files["bert"]), data=str(files["csv"]), method_args=LORA_BERT, max_steps=10, lr=3e-2,
                      max_length=8, progress=False, threads=1, eval_before=False,
                      output_dir=str(tmp_path / "cls"))  # fmt: skip
    train(cls)
    short, long = "good good movie" + " bad" * 20, "good good movie" + " bad" * 30
    lines = run("predict", tmp_path / "cls", "--text", short, "--text", long).splitlines()
    assert lines[0].split("\t")[:2] == lines[1].split("\t")[:2]  # both cut to the run's 8 tokens
    untruncated = run("predict", tmp_path / "cls", "--text", short, "--text", long, "--max-length", "64").splitlines()
    assert untruncated[0].split("\t")[1] != untruncated[1].split("\t")[1]
    rows = [{"sentence1": "good film", "sentence2": "awful plot", "label": "negative"},
            {"sentence1": "okay", "sentence2": "great great", "label": "positive"}]  # fmt: skip
    T.write_csv(tmp_path / "pairs.csv", rows)
    out = run("predict", tmp_path / "cls", "--text", "fine", "--text-pair", "bad", "--file", tmp_path / "pairs.csv",
              "--output", tmp_path / "pred.jsonl")  # fmt: skip
    assert out.splitlines()[1].endswith("\tgood film\tawful plot") and "accuracy" in out.splitlines()[-1]
    written = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [w["text_pair"] for w in written] == ["bad", "awful plot", "great great"]
    assert [w.get("label") for w in written] == [None, "negative", "positive"]
    assert all(w["prediction"] in ("negative", "neutral", "positive") and 0 < w["probability"] <= 1 for w in written)
    run("predict", tmp_path / "cls", "--file", tmp_path / "pairs.csv", "--output", tmp_path / "pred.csv")
    with open(tmp_path / "pred.csv") as fh:
        assert next(iter(csv.DictReader(fh))).keys() == {"text", "text_pair", "prediction", "probability", "label"}
