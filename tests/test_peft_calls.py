"""peft calls not covered elsewhere: push_to_hub (offline: huggingface_hub's HfApi recorded) and a str adapter_names."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from models import batch, build, output, perturb
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import CheckpointError


class RecordingApi:
    """Stands in for huggingface_hub.HfApi (no network here): keeps what would be uploaded."""

    calls: ClassVar[list[tuple[str, dict]]] = []
    uploaded: ClassVar[dict[str, bytes]] = {}

    def __init__(self, token=None) -> None:
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        RecordingApi.uploaded = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return "commit-info"


def test_push_to_hub_uploads_what_save_pretrained_writes_in_one_commit(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls, RecordingApi.uploaded = [], {}
    pm = get_peft_model(build("bert"), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    perturb(pm, "default")
    assert pm.push_to_hub("me/tiny-lora", private=True, commit_message="first") == "commit-info"
    assert [c for c, _ in RecordingApi.calls] == ["create_repo", "upload_folder"]
    assert RecordingApi.calls[0][1] == {"repo_id": "me/tiny-lora", "private": True, "exist_ok": True}
    assert RecordingApi.calls[1][1]["commit_message"] == "first"
    assert sorted(RecordingApi.uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    pm.save_pretrained(tmp_path)
    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    for name, data in RecordingApi.uploaded.items():
        (uploaded / name).write_bytes(data)
    assert (
        load_file(str(uploaded / "adapter_model.safetensors")).keys()
        == load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    )
    loaded = PeftModel.from_pretrained(build("bert"), uploaded)
    torch.testing.assert_close(output(loaded, batch("bert")), output(pm.eval(), batch("bert")), atol=1e-6, rtol=0)


def test_push_to_hub_refuses_a_name_that_is_not_a_repo_id_and_unknown_options():
    pm = get_peft_model(build("bert"), LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(CheckpointError, match="user/name"):
        pm.push_to_hub("not a repo/../x")
    with pytest.raises(TypeError, match="did you mean 'private'"):
        pm.push_to_hub("me/x", privat=True)


def test_adapter_names_as_one_string_is_refused_not_read_as_letters():
    pm = get_peft_model(build("bert"), LoraConfig(r=4, target_modules=["query"])).eval()
    with pytest.raises(TypeError, match=r"one adapter name per row"):
        pm(**batch("bert"), adapter_names="default")
