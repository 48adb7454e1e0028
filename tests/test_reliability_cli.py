"""Regression tests for the command line's reliability fixes (issue 15: items 5, 6, 12, 24, 25, 26, 30, 31).

Each test fails on the code before its fix: files deleted or overwritten, labels read as 'None', raw OS errors
and tracebacks, torch's advice to load a pickle unsafely, half-written conversions, hidden adapters."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import tiny_runs as T

from models import perturb
from peftkit import LoraConfig, get_peft_model
from peftkit.cli.main import main
from peftkit.errors import CheckpointError, ConfigError
from peftkit.train import TrainConfig, output_dir, train
from peftkit.train import data as D


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    return {
        "root": root,
        "bert": T.bert_folder(root / "bert"),
        "csv": T.write_csv(root / "sentiment.csv", T.sentiment_rows(48)),
    }


def run(capsys, *args: object) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err[-2000:]
    return captured.out


def fail(capsys, *args: object) -> str:
    """The one-line error of a refused command (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err[-2000:]
    lines = [line for line in captured.err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def train_args(files, out: Path, *extra: object) -> list[object]:
    return ["train", "--model", files["bert"], "--data", files["csv"], "--output-dir", out, "--threads", "1",
            "--no-progress", "--batch-size", "8", "--max-steps", "2", "--no-eval-before", "--r", "2",
            "--target-modules", "query", *extra]  # fmt: skip


def config(files, out: Path, **changes) -> TrainConfig:
    settings = dict(model=str(files["bert"]), data=str(files["csv"]), method_args={"r": 2, "target_modules": ["query"]},
                    output_dir=str(out), batch_size=8, max_steps=2, save_steps=2, progress=False, threads=1,
                    eval_before=False)  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def saved_adapter(files, folder: Path, names: tuple[str, ...] = ("default",)) -> None:
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(files["bert"])
    pm = None
    for name in names:
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS")
        if pm is None:
            pm = get_peft_model(base, lora, adapter_name=name)
        else:
            pm.add_adapter(name, lora)
        perturb(pm, name, scale=0.3)
    pm.save_pretrained(folder)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- [5] a new run deletes only what peftkit wrote ---------------------------------------------------------------
def test_train_refuses_to_delete_files_it_did_not_write_and_clears_its_own(files, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "best").mkdir()
    (out / "best" / "weights.bin").write_bytes(b"mine")
    err = fail(capsys, *train_args(files, out))
    assert "notes.txt" in err and "did not write" in err
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"
    assert (out / "best" / "weights.bin").read_bytes() == b"mine"
    (out / "checkpoints" / "notes.txt").unlink()
    err = fail(capsys, *train_args(files, out))
    assert "weights.bin" in err and (out / "best" / "weights.bin").read_bytes() == b"mine"
    # peftkit's own step folders and best adapter are replaced by the next run
    (out / "best" / "weights.bin").unlink()
    run(capsys, *train_args(files, out, "--max-steps", "4", "--save-steps", "2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    run(capsys, *train_args(files, out, "--max-steps", "1", "--save-steps", "1"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]


# ---- [6] merge never writes into its inputs --------------------------------------------------------------------
def test_merge_refuses_to_write_into_the_base_model_or_the_adapter(files, tmp_path, capsys):
    saved_adapter(files, tmp_path / "adapter")
    before_base, before_adapter = tree(files["bert"]), tree(tmp_path / "adapter")
    for out in (files["bert"], files["bert"] / "merged", tmp_path / "adapter", tmp_path / "adapter" / "m"):
        err = fail(capsys, "merge", tmp_path / "adapter", out, "--model", files["bert"])
        assert "would overwrite" in err and str(out) in err
    assert tree(files["bert"]) == before_base and tree(tmp_path / "adapter") == before_adapter
    assert not (files["bert"] / "merged").exists() and not (tmp_path / "adapter" / "m").exists()


# ---- [12] missing or empty labels --------------------------------------------------------------------------------
def test_train_refuses_missing_or_empty_labels_naming_the_rows(files, tmp_path, capsys):
    rows = T.sentiment_rows(24)
    path = tmp_path / "holes.csv"
    T.write_csv(path, rows)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ","  # data row 3: empty label
    lines[6] = lines[6].rsplit(",", 1)[0]  # data row 6: the cell is missing
    path.write_text("\n".join(lines) + "\n")
    err = fail(capsys, *train_args({**files, "csv": path}, tmp_path / "out"))
    assert "rows 3, 6" in err and "'label'" in err and "holes.csv" in err
    records = [*rows[:4], {"text": "good", "label": None}, {"text": "bad"}]
    err = fail(capsys, *train_args({**files, "csv": T.write_json(tmp_path / "h.json", records)}, tmp_path / "o2"))
    assert "rows 5, 6" in err


# ---- [24] output paths that cannot be written ------------------------------------------------------------------
def test_output_paths_that_cannot_be_written_are_one_line_errors(files, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in fail(capsys, *train_args(files, a_file))
    assert "lies under" in fail(capsys, *train_args(files, a_file / "sub"))
    saved_adapter(files, tmp_path / "adapter")
    assert "lies under" in fail(capsys, "convert", tmp_path / "adapter", a_file / "out")
    assert "is a file" in fail(capsys, "convert", tmp_path / "adapter", a_file)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: stand in for the refusal the kernel gives other users

        def refuse(path: Path) -> None:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(output_dir, "_probe_write", refuse)
    try:
        assert "cannot be written (Permission denied)" in fail(capsys, *train_args(files, locked / "run"))
        assert "cannot be written" in fail(capsys, "convert", tmp_path / "adapter", locked / "out")
    finally:
        locked.chmod(0o755)


# ---- [25] bad data files -----------------------------------------------------------------------------------------
def test_unreadable_data_files_are_errors_naming_the_file_and_line(files, tmp_path, capsys):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9 good,positive\nbad,negative\n".encode("latin-1"))
    err = fail(capsys, *train_args({**files, "csv": latin}, tmp_path / "o"))
    assert "latin.csv" in err and "UTF-8" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "good", "label": "positive"}\n\n{"text": "bad", "label": \n')
    err = fail(capsys, *train_args({**files, "csv": broken}, tmp_path / "o"))
    assert "broken.jsonl" in err and "line 3" in err
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    err = fail(capsys, *train_args({**files, "csv": scalar}, tmp_path / "o"))
    assert "scalar.json" in err and "list of records" in err
    saved_adapter(files, tmp_path / "adapter")
    err = fail(capsys, "predict", tmp_path / "adapter", "--model", files["bert"], "--file", tmp_path / "nope.csv")
    assert "--file" in err and "nope.csv" in err and "does not exist" in err


def test_a_data_set_with_another_class_count_than_the_models_head_says_so(files, tmp_path, capsys):
    two = [r for r in T.sentiment_rows(36) if r["label"] != "neutral"]
    err = fail(capsys, *train_args({**files, "csv": T.write_csv(tmp_path / "two.csv", two)}, tmp_path / "o"))
    assert "2 labels" in err and "3 outputs" in err and "--model" in err


# ---- [26] a broken trainer state ----------------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_resume_from_a_broken_trainer_state_is_a_checkpoint_error(files, tmp_path):
    out = tmp_path / "run"
    train(config(files, out))
    state = out / "checkpoints" / "step-0000002" / "trainer_state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt"):
        train(config(files, out), resume=True)
    state.write_bytes(pickle.dumps({"state": Payload()}))
    with pytest.raises(CheckpointError) as info:
        train(config(files, out), resume=True)
    assert "weights_only=False" not in str(info.value) and "could run code" in str(info.value)
    state.unlink()
    with pytest.raises(CheckpointError, match=r"no trainer_state\.pt"):
        train(config(files, out), resume=True)


# ---- [30] convert writes all or nothing ------------------------------------------------------------------------
def test_convert_writes_nothing_when_a_later_adapter_is_corrupt(files, tmp_path, capsys):
    saved_adapter(files, tmp_path / "adapters", names=("default", "zz"))
    (tmp_path / "adapters" / "zz" / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    err = fail(capsys, "convert", tmp_path / "adapters", tmp_path / "out", "--to", "peft")
    assert "zz" in err and "corrupt" in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]  # no temporary folder left behind


def test_convert_into_an_existing_folder_replaces_only_the_adapters_it_writes(files, tmp_path, capsys):
    saved_adapter(files, tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("kept")
    run(capsys, "convert", tmp_path / "adapter", tmp_path / "out", "--to", "peft")
    assert (tmp_path / "out" / "README.md").read_text() == "kept"
    assert (
        tree(tmp_path / "out")["adapter_model.safetensors"] == tree(tmp_path / "adapter")["adapter_model.safetensors"]
    )


# ---- [31] adapter names and numeric labels -----------------------------------------------------------------------
def test_adapters_named_best_or_checkpoints_are_listed_and_converted(files, tmp_path, capsys):
    saved_adapter(files, tmp_path / "adapters", names=("default", "best", "checkpoints"))
    out = run(capsys, "inspect", tmp_path / "adapters")
    assert all(f"adapter {name!r}" in out for name in ("default", "best", "checkpoints"))
    out = run(capsys, "convert", tmp_path / "adapters", tmp_path / "peft", "--to", "peft")
    assert (tmp_path / "peft" / "best" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "checkpoints" / "adapter_model.safetensors").is_file()
    # in a `peftkit train` output folder, best/ is the run's best-evaluation copy, not another adapter
    run(capsys, *train_args(files, tmp_path / "run"))
    out = run(capsys, "inspect", tmp_path / "run")
    assert "adapter 'default'" in out and "adapter 'best'" not in out


def test_numeric_labels_are_one_class_per_value(tmp_path):
    rows = [{"text": "x", "label": v} for v in ("1", "01", " 2", "2.0", "+1", "10", 3)]
    assert D.label_names(rows, "label") == ["1", "2", "3", "10"]
    cols = D.Columns("classification", text="text", label="label")
    tok = T.tokenizer(tmp_path)
    encoded = D.encode_classification(rows, cols, tok, D.label_names(rows, "label"), 8)
    assert [e["labels"] for e in encoded] == [0, 0, 1, 1, 0, 3, 2]
    words = [{"text": "x", "label": v} for v in ("01", "1", "one")]
    assert D.label_names(words, "label") == ["1", "one"]  # numbers by value, other labels as written


def test_class_names_written_as_numbers_compare_by_value_in_predict(files, tmp_path, capsys):
    rows = [
        {**r, "label": {"positive": "1", "negative": "0", "neutral": "2"}[r["label"]]} for r in T.sentiment_rows(48)
    ]
    T.write_csv(tmp_path / "num.csv", rows)
    run(capsys, *train_args({**files, "csv": tmp_path / "num.csv"}, tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["labels"] == ["0", "1", "2"]
    gold = [{"text": r["text"], "label": "0" + r["label"]} for r in rows[:6]]  # '01' is class '1'
    T.write_csv(tmp_path / "gold.csv", gold)
    out = run(capsys, "predict", tmp_path / "run", "--file", tmp_path / "gold.csv")
    predicted = [line.split("\t")[0] for line in out.splitlines()[:6]]
    right = sum(p == str(int(g["label"])) for p, g in zip(predicted, gold))
    assert right > 0 and f"accuracy {right / 6:.4f} on 6 rows" in out


def test_errors_are_config_errors_from_python_too(files, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--output-dir .* is a file"):
        train(config(files, tmp_path / "f"))
