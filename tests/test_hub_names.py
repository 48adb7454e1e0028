"""Hugging Face Hub names (issue 16 item 4): models and adapters named ``org/name`` resolve through huggingface_hub's
cache as transformers resolves them, offline from the cache; an uncached name is one clear peftkit error; adapters
record the base model as the user named it (built-ins by their Hub ids), and `peftkit convert --to peft` writes a
name peft resolves.

Every test builds a temporary cache in the layout huggingface_hub writes (models--org--name/refs/main,
snapshots/<commit>/<file> -> ../../blobs/<etag>) and runs offline (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import bert_folder, sentiment_rows, write_csv

from models import minilm_folder, needs_minilm, output, perturb
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.cli.main import main
from peftkit.errors import CheckpointError, ConfigError
from peftkit.train import build_method_config
from peftkit.train.models import HUB_IDS, load_model, model_name, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
INPUTS = {"input_ids": torch.randint(5, 40, (3, 6), generator=torch.Generator().manual_seed(0))}  # tiny_runs' vocab
LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


def put_in_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Copy ``folder`` into ``cache`` as huggingface_hub stores a downloaded snapshot of ``repo_id``: blobs named by
    their etag (sha256 for LFS files such as safetensors, the git blob sha1 otherwise), the snapshot's files as
    relative symlinks to them, refs/main holding the commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        lfs = file.suffix in (".safetensors", ".bin")
        etag = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache under tmp_path, offline. huggingface_hub reads its environment once, at import,
    into ``constants``; its functions (and transformers') read ``constants`` at each call, so both are set."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def tiny_bert_repo(tmp_path: Path, hf_cache: Path) -> Path:
    """``org/tiny-bert`` (a 2-layer BERT with its tokenizer) in the cache; its snapshot folder."""
    return put_in_cache(hf_cache, "org/tiny-bert", bert_folder(tmp_path / "tiny-bert"))


def test_a_cached_hub_id_resolves_to_the_folder_transformers_uses(tiny_bert_repo: Path) -> None:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import cached_file

    assert resolve_model("org/tiny-bert") == tiny_bert_repo
    assert Path(cached_file("org/tiny-bert", "config.json")).parent == tiny_bert_repo  # transformers' own look-up
    ours = load_model("org/tiny-bert", "classification")
    theirs = AutoModelForSequenceClassification.from_pretrained("org/tiny-bert")
    assert ours.config._name_or_path == "org/tiny-bert"
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


def test_an_uncached_hub_id_offline_is_one_clear_error(tiny_bert_repo: Path, hf_cache: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_model("org/not-downloaded")
    message = str(err.value)
    for part in ("'org/not-downloaded'", "not in the local cache", str(hf_cache), "HF_HUB_OFFLINE=1"):
        assert part in message
    assert "`hf download org/not-downloaded`" in message and "huggingface-cli download org/not-downloaded" in message
    base = load_model("org/tiny-bert", "classification")
    with pytest.raises(CheckpointError, match=r"adapter 'org/no-adapter'.*not in the local cache.*hf download"):
        PeftModel.from_pretrained(base, "org/no-adapter")
    assert not any(p.requires_grad is False for p in base.parameters())  # the model was left as it was


def test_peftkit_train_with_an_uncached_hub_id_prints_the_error(hf_cache: Path, capsys) -> None:
    with pytest.raises(SystemExit) as code:
        main(["train", "--model", "org/not-downloaded", "--max-steps", "1"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert "'org/not-downloaded'" in err and "hf download org/not-downloaded" in err and "Traceback" not in err


def test_an_adapter_named_by_its_hub_id_loads_from_the_cache(tmp_path: Path, tiny_bert_repo: Path) -> None:
    pm = get_peft_model(load_model("org/tiny-bert", "classification"), LoraConfig(**LORA))
    perturb(pm, "default")
    pm.save_pretrained(tmp_path / "adapter")
    put_in_cache(tiny_bert_repo.parents[2], "org/tiny-lora", tmp_path / "adapter")
    inputs = INPUTS
    expected = output(pm, inputs)
    again = PeftModel.from_pretrained(load_model("org/tiny-bert", "classification"), "org/tiny-lora")
    assert torch.allclose(output(again, inputs), expected, atol=1e-6)
    again.load_adapter("org/tiny-lora", adapter_name="second")
    assert set(again.peft_config) == {"default", "second"}


def test_auto_peft_model_reads_adapter_and_base_by_hub_id(tmp_path: Path, tiny_bert_repo: Path) -> None:
    from peftkit import AutoPeftModelForSequenceClassification

    pm = get_peft_model(load_model("org/tiny-bert", "classification"), LoraConfig(**LORA))
    perturb(pm, "default")
    pm.save_pretrained(tmp_path / "adapter")  # records base_model_name_or_path "org/tiny-bert"
    put_in_cache(tiny_bert_repo.parents[2], "org/tiny-lora", tmp_path / "adapter")
    ours = AutoPeftModelForSequenceClassification.from_pretrained("org/tiny-lora")
    assert torch.allclose(output(ours, INPUTS), output(pm, INPUTS), atol=1e-6)


def test_a_hub_repository_without_an_adapter_is_named_as_such(tiny_bert_repo: Path) -> None:
    pm_base = load_model("org/tiny-bert", "classification")
    with pytest.raises(CheckpointError, match=r"'org/tiny-bert' has no adapter_config.json"):
        PeftModel.from_pretrained(pm_base, "org/tiny-bert")


def test_the_base_model_is_recorded_as_named_and_peft_finds_it(tmp_path: Path, tiny_bert_repo: Path) -> None:
    from peft import AutoPeftModelForSequenceClassification

    pm = get_peft_model(load_model("org/tiny-bert", "classification"), LoraConfig(**LORA))
    assert pm.peft_config["default"].base_model_name_or_path == "org/tiny-bert"
    perturb(pm, "default")
    pm.save_pretrained(tmp_path / "adapter")
    theirs = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")  # base from the cache
    inputs = INPUTS
    assert torch.allclose(output(theirs, inputs), output(pm, inputs), atol=1e-5)


def test_a_relative_folder_is_recorded_as_its_absolute_path(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForSequenceClassification

    bert_folder(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    pm = get_peft_model(AutoModelForSequenceClassification.from_pretrained("./base"), LoraConfig(**LORA))
    assert pm.peft_config["default"].base_model_name_or_path == str((tmp_path / "base").resolve())
    assert model_name("base") == str((tmp_path / "base").resolve())


def test_built_ins_are_recorded_by_their_hub_ids() -> None:
    assert model_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert model_name("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_name("org/name") == "org/name"
    config = build_method_config("lora", {"r": 4}, "SEQ_CLS", "minilm")
    assert config.base_model_name_or_path == HUB_IDS["minilm"]


@needs_minilm
def test_the_built_in_folder_and_hub_id_name_the_same_model(hf_cache: Path) -> None:
    assert model_name(str(minilm_folder())) == HUB_IDS["minilm"]
    assert resolve_model(HUB_IDS["minilm"]) == minilm_folder()  # not in the cache: its offline package


def test_peftkit_train_records_the_hub_id(tmp_path: Path, tiny_bert_repo: Path) -> None:
    data = write_csv(tmp_path / "train.csv", sentiment_rows(24))
    out = tmp_path / "run"
    run("train", "--model", "org/tiny-bert", "--data", data, "--max-steps", 2, "--output-dir", out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-bert"


@pytest.mark.parametrize("recorded", ["minilm", "relative"])
def test_convert_to_peft_writes_a_name_peft_resolves(tmp_path: Path, hf_cache: Path, monkeypatch, recorded) -> None:
    """An old adapter recording the alias "minilm" (or a relative folder) converts to one whose base peft's
    AutoPeftModel loads: here a tiny BERT stands in the cache under all-MiniLM-L6-v2's Hub id."""
    from peft import AutoPeftModelForSequenceClassification

    base_folder = bert_folder(tmp_path / "base")
    put_in_cache(hf_cache, HUB_IDS["minilm"], base_folder)
    monkeypatch.chdir(tmp_path)
    name = "minilm" if recorded == "minilm" else "base"
    pm = get_peft_model(load_model(str(base_folder), "classification"), LoraConfig(**LORA))
    pm.peft_config["default"].base_model_name_or_path = name
    pm.save_pretrained(tmp_path / "old")
    run("convert", tmp_path / "old", tmp_path / "new", "--to", "peft")
    written = json.loads((tmp_path / "new" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written == (HUB_IDS["minilm"] if recorded == "minilm" else str(base_folder.resolve()))
    monkeypatch.chdir("/")
    theirs = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "new")
    inputs = INPUTS
    assert torch.allclose(output(theirs, inputs), output(pm, inputs), atol=1e-5)


def run(*args: object) -> None:
    """`peftkit ARGS`, which must succeed."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 0


SUBPROCESS_CHECK = """
import sys
from pathlib import Path
from peftkit.errors import ConfigError
from peftkit.train.models import resolve_model

folder = resolve_model("org/tiny-bert")
assert folder == Path(sys.argv[1]), (folder, sys.argv[1])
try:
    resolve_model("org/absent")
except ConfigError as err:
    print("ERROR:", err)
"""


def test_the_environment_variables_alone_select_the_cache(tmp_path: Path, tiny_bert_repo: Path, hf_cache) -> None:
    """A fresh process with only HF_HUB_CACHE and HF_HUB_OFFLINE=1 set (huggingface_hub reads them at import; the
    in-process tests patch its constants instead). transformers is not imported there: the first test shows that
    it resolves the same folder."""
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_CHECK, str(tiny_bert_repo)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "ERROR: The model 'org/absent' is not a local folder" in done.stdout
    assert f"not in the local cache ({hf_cache})" in done.stdout
