"""Checkpoint reliability (issue 15 and the save side of issue 23): all-or-nothing saves under failures at any file
operation, unique exclusive temporaries, refused base-weight keys, duplicate keys, bad dtypes and values, bad
config files, bad save paths, oversized configs, adapter names, and peft's save_pretrained / load_adapter options."""

from __future__ import annotations

import json
import os
import shutil
import threading
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import batch, output, perturb, tiny_bert, tiny_llama
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core import files as files_module
from peftkit.errors import AdapterNameError, CheckpointError

CONFIG = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
WEIGHTS = "adapter_model.safetensors"


def snapshot(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def two_adapters(seed: int = 0):
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    pm.add_adapter("other", LoraConfig(**CONFIG))
    perturb(pm, "default", seed=seed)
    perturb(pm, "other", seed=seed + 1)
    return pm


def edit_weights(folder, change) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


# ---- [3] all or nothing ------------------------------------------------------------------------------------
OPERATIONS = ("open", "write", "fsync", "close", "replace", "rename", "unlink", "mkdir")


def test_failed_save_at_every_file_operation_leaves_old_or_new(tmp_path, monkeypatch):
    """A save that fails at the k-th file operation, for every k, leaves exactly the old or exactly the new
    checkpoint (byte for byte, loadable) and no temporary or stray folder."""
    old_model, new_model = two_adapters(0), two_adapters(5)
    pristine, expected_new = tmp_path / "old", tmp_path / "new"
    old_model.save_pretrained(pristine, selected_adapters=["default"])
    shutil.copytree(pristine, expected_new)
    new_model.save_pretrained(expected_new)
    old, new = snapshot(pristine), snapshot(expected_new)
    target = tmp_path / "target"
    failures = 0
    for k in range(1, 200):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(pristine, target)
        calls = {"n": 0}
        with monkeypatch.context() as patch:
            for op in OPERATIONS:
                real = getattr(os, op)

                def failing(*args, _real=real, _calls=calls, _k=k, **kwargs):
                    _calls["n"] += 1
                    if _calls["n"] == _k:
                        raise OSError(f"simulated failure at operation {_k}")
                    return _real(*args, **kwargs)

                patch.setattr(os, op, failing)
            try:
                new_model.save_pretrained(target)
                failed = False
            except OSError:
                failed = True
        assert snapshot(target) == (old if failed else new), f"failure at operation {k}"
        failures += failed
        if not failed and calls["n"] < k:  # the save made fewer than k operations: each one has failed once
            break
    assert failures > 5
    loaded = PeftModel.from_pretrained(tiny_bert(), target)
    torch.testing.assert_close(output(loaded, batch("bert")), output(new_model, batch("bert")), atol=1e-6, rtol=0)


def test_temporaries_of_a_killed_process_are_removed(tmp_path):
    pm = two_adapters()
    pm.save_pretrained(tmp_path)
    dead = 2**22 + 12345  # above pid_max on Linux: no such process
    stale = [tmp_path / f".{WEIGHTS}.{dead}.abcd1234.peftkit-tmp", tmp_path / f".adapter_config.json.tmp-{dead}"]
    live = tmp_path / f".{WEIGHTS}.{os.getpid()}.abcd1234.peftkit-tmp"  # another thread of ours may be writing it
    for path in (*stale, live):
        path.write_bytes(b"partial")
    pm.save_pretrained(tmp_path)
    assert not any(p.exists() for p in stale)
    assert live.exists()


# ---- [4] [7] unique, exclusive temporaries -------------------------------------------------------------------
def test_threads_saving_into_one_folder(tmp_path):
    models = [two_adapters(seed) for seed in range(4)]
    errors = []

    def save(pm):
        try:
            for _ in range(3):
                pm.save_pretrained(tmp_path)
        except Exception as err:  # collected: a thread's exception would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=save, args=(pm,)) for pm in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not [name for name in snapshot(tmp_path) if "tmp" in name]
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    outputs = [output(pm, batch("bert")) for pm in models]
    assert any(torch.allclose(output(loaded, batch("bert")), o, atol=1e-6) for o in outputs)


def test_planted_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in (WEIGHTS, "adapter_config.json"):  # the names older versions used (pid only)
        os.symlink(victim, folder / f".{name}.tmp-{os.getpid()}")
    pm = two_adapters()
    pm.save_pretrained(folder)
    assert victim.read_bytes() == b"precious"
    PeftModel.from_pretrained(tiny_bert(), folder)


# ---- [8] base-weight keys -------------------------------------------------------------------------------------
def test_base_layer_key_on_a_non_embedding_layer_is_refused(tmp_path):
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    pm.save_pretrained(tmp_path)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"
    edit_weights(tmp_path, lambda t: t.__setitem__(key, torch.full((32, 32), 7.0)))
    model = tiny_bert()
    before = model.bert.encoder.layer[0].attention.self.query.weight.clone()
    with pytest.raises(CheckpointError, match="not an embedding layer"):
        PeftModel.from_pretrained(model, tmp_path)
    torch.testing.assert_close(model.bert.encoder.layer[0].attention.self.query.weight, before)


def test_embedding_copy_is_restored_on_unload_and_delete(tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    pm = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        pm.model.model.embed_tokens.base_layer.weight.mul_(1.5)  # a trained / resized table
    pm.save_pretrained(tmp_path, save_embedding_layers=True)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(str(tmp_path / WEIGHTS))
    original = tiny_llama().model.embed_tokens.weight.clone()
    for remove in ("unload", "delete"):
        holder = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]), "keep")
        holder.load_adapter(tmp_path, "emb")
        embedding = holder.model.model.embed_tokens
        torch.testing.assert_close(embedding.base_layer.weight, original * 1.5)
        base = holder.unload() if remove == "unload" else (holder.delete_adapter("emb"), holder.model)[1]
        torch.testing.assert_close(base.model.embed_tokens.weight, original)


# ---- [16] [17] [21] file contents -----------------------------------------------------------------------------
def test_two_keys_for_one_parameter_are_refused(tmp_path):
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    pm.save_pretrained(tmp_path)
    full = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    edit_weights(tmp_path, lambda t: t.__setitem__(full.removeprefix("base_model.model."), t[full] + 1))
    with pytest.raises(CheckpointError, match="two tensors for one parameter") as info:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert full in str(info.value) and repr(full.removeprefix("base_model.model.")) in str(info.value)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.fill_(float("nan")), "NaN or inf"),
        (lambda t: t.fill_(float("inf")), "NaN or inf"),
        (lambda t: t.to(torch.int8), "wrong dtypes"),
        (lambda t: t > 0, "wrong dtypes"),
    ],
    ids=["nan", "inf", "int8", "bool"],
)
def test_bad_values_and_dtypes_are_refused(change, match, tmp_path):
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    pm.save_pretrained(tmp_path)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    edit_weights(tmp_path, lambda t: t.__setitem__(key, change(t[key].clone())))
    with pytest.raises(CheckpointError, match=match):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with pytest.raises(CheckpointError, match=match):
        pm.load_adapter(tmp_path, "again")
    assert list(pm.peft_config) == ["default"]
    if match.startswith("NaN"):
        loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, allow_non_finite=True)
        assert not torch.isfinite(
            loaded.model.bert.encoder.layer[0].attention.self.query.lora_A["default"].weight
        ).all()


@pytest.mark.parametrize("content", [b"null", b"3", b'["r", "peft_type"]', b'"LORA"', '{"r": "é"}'.encode("latin-1")])
def test_config_that_is_not_an_object_or_not_utf8(content, tmp_path):
    get_peft_model(tiny_bert(), LoraConfig(**CONFIG)).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"not UTF-8|not an object") as info:
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert "adapter_config.json" in str(info.value)


def test_huge_rank_is_refused_before_allocating(tmp_path, monkeypatch):
    """r = 2**22 in the config would allocate gigabytes for LoRA A / B before the shapes were compared."""
    get_peft_model(tiny_bert(), LoraConfig(**CONFIG)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "r": 2**22}))
    with pytest.raises(CheckpointError, match="before allocating the adapter"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    with pytest.raises(CheckpointError, match="before allocating the adapter"):
        pm.load_adapter(tmp_path, "big")
    assert list(pm.peft_config) == ["default"]


# ---- [24] save paths ------------------------------------------------------------------------------------------
def test_save_to_a_file_under_a_file_or_read_only(tmp_path, monkeypatch):
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        pm.save_pretrained(a_file)
    with pytest.raises(CheckpointError, match=r"lies under .*which is a file"):
        pm.save_pretrained(a_file / "sub")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):  # root ignores the mode bits: let the permission check answer as for a user
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
        with pytest.raises(CheckpointError, match="read-only"):
            pm.save_pretrained(read_only)
    finally:
        read_only.chmod(0o755)


# ---- [23] names ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["x" * 300, "a.b", "training", "keys", "to", "update", "forward", "parameters", None, ["a"]]
)
def test_bad_adapter_names_are_refused_up_front(name):
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    with pytest.raises(AdapterNameError, match="Invalid adapter name"):
        pm.add_adapter(name, LoraConfig(**CONFIG))
    assert list(pm.peft_config) == ["default"]


def test_nfc_and_nfd_spellings_are_one_adapter(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG))
    pm.add_adapter(nfc, LoraConfig(**CONFIG))
    with pytest.raises(AdapterNameError, match="already exists"):
        pm.add_adapter(nfd, LoraConfig(**CONFIG))


# ---- issue 23: peft's save_pretrained / load_adapter options -------------------------------------------------------
def test_save_options_as_in_peft(tmp_path):
    pm = two_adapters()
    with pytest.raises(CheckpointError, match="never writes pickle"):
        pm.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    pm.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    pm.save_pretrained(tmp_path / "one", selected_adapters="other")  # one name, not the letters o, t, h, e, r
    assert sorted(snapshot(tmp_path / "one")) == ["other/README.md", "other/adapter_config.json", f"other/{WEIGHTS}"]
    with pytest.raises(TypeError, match="did you mean 'selected_adapters'"):
        pm.save_pretrained(tmp_path, selected_adapter=["other"])
    with pytest.raises(TypeError, match="did you mean 'is_trainable'"):
        pm.load_adapter(tmp_path / "one" / "other", "x", is_trainble=True)


def test_model_card_and_load_result(tmp_path):
    pm = get_peft_model(tiny_bert(), LoraConfig(**CONFIG, base_model_name_or_path="org/tiny-bert"))
    pm.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and 'base_model: "org/tiny-bert"' in card and "library_name: peft" in card
    assert "- lora" in card
    (tmp_path / "README.md").write_text("my own notes")
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own notes"  # a card the user wrote is kept
    result = pm.load_adapter(tmp_path, "again")
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_failed_group_removes_the_folders_it_created(tmp_path, monkeypatch):
    pm = two_adapters()
    real = files_module._write_temporary
    calls = {"n": 0}

    def fail_third(path, data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(files_module, "_write_temporary", fail_third)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "other").exists()
    assert snapshot(tmp_path / "fresh") == {}
