"""PiSSA and OLoRA initialisations (methods/lora/inits.py): by hand, and against peft 0.21 on the same weights."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import CheckpointError, ConfigError

WEIGHTS = "adapter_model.safetensors"

TOL = dict(atol=1e-5, rtol=1e-5)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 10)
        self.gpt = Conv1D(8, 10)  # weight (10, 8): 10 inputs, 8 outputs
        self.emb = nn.Embedding(20, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 12)
        return self.gpt(self.lin(x))


def test_pissa_by_hand_and_identity_at_init():
    base = Net()
    w = base.lin.weight.detach().clone()
    x = torch.randn(4, 12)
    expected = base(x)
    pm = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["lin", "gpt"], init_lora_weights="pissa"))
    torch.testing.assert_close(pm(x), expected, **TOL)
    lin = pm.base_model.model.lin
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(sv[:3] / 2.0)  # s = 6 / 3
    torch.testing.assert_close(lin.lora_A["default"].weight, root[:, None] * vh[:3], **TOL)
    torch.testing.assert_close(lin.lora_B["default"].weight, u[:, :3] * root, **TOL)
    residual = lin.get_base_layer().weight
    torch.testing.assert_close(residual, w - 2.0 * lin.lora_B["default"].weight @ lin.lora_A["default"].weight, **TOL)
    top = torch.linalg.svdvals(residual)
    torch.testing.assert_close(top, torch.cat([sv[3:], torch.zeros(3)]), **TOL)  # the principal part moved out


def test_olora_by_hand_and_niter_identity():
    base = Net()
    w = base.lin.weight.detach().clone()
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lin"], init_lora_weights="olora"))
    lin = pm.base_model.model.lin
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close(lin.lora_A["default"].weight, r[:4], **TOL)
    torch.testing.assert_close(lin.lora_B["default"].weight, q[:, :4], **TOL)
    base = Net()
    x = torch.randn(3, 12)
    expected = base(x)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lin", "gpt"], init_lora_weights="pissa_niter_3"))
    torch.testing.assert_close(pm(x), expected, **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_as_peft_both_ways(init, tmp_path):
    targets = ["lin"] if init == "olora" else ["lin", "gpt"]  # peft's OLoRA does not transpose GPT-2's Conv1D
    config = dict(r=3, lora_alpha=6, target_modules=targets, init_lora_weights=init)
    ours = get_peft_model(Net(), LoraConfig(**config))
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(**config))
    ours_state = {k.replace(".default", ""): v for k, v in ours.base_model.model.state_dict().items()}
    for key, value in theirs.base_model.model.state_dict().items():
        torch.testing.assert_close(ours_state[key.replace(".default", "")], value, **TOL)  # same A, B, residual W
    torch.manual_seed(3)
    with torch.no_grad():  # "training"
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ours.save_pretrained(tmp_path / "kit")
    x = torch.randn(3, 12)
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "kit")  # re-initialises from the original base
    torch.testing.assert_close(loaded(x), ours(x), **TOL)
    loaded.save_pretrained(tmp_path / "peft")
    back = PeftModel.from_pretrained(Net(), tmp_path / "peft")
    torch.testing.assert_close(back(x), ours(x), **TOL)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(target_modules=["lin", "emb"], init_lora_weights="pissa"), "cannot initialise 'emb'"),
        (dict(target_modules=["lin"], init_lora_weights="olora", r=11), "r=11"),
    ],
)
def test_refused_before_any_weight_changes(config, match):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        get_peft_model(model, LoraConfig(**config))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bad_niter_refused():
    with pytest.raises(ConfigError, match="pissa_niter_4"):
        LoraConfig(init_lora_weights="pissa_niter_x")


def _trained(pm, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in pm.adapter_state_dict("default").values():
            tensor.add_(torch.randn(tensor.shape, generator=g) * 0.1)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_on_the_untouched_base_equals_the_trained_model(init, rslora, tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=): [A ; A0], [B | -B0], r and alpha doubled: a plain
    LoRA for the original base weights; peft 0.21 reads it to the same outputs and wrote the same tensors."""
    x = torch.randn(4, 12)
    targets = ["lin"] if init == "olora" else ["lin", "gpt"]  # peft's OLoRA does not transpose GPT-2's Conv1D
    config = dict(r=3, lora_alpha=6, target_modules=targets, init_lora_weights=init, use_rslora=rslora)
    pm = get_peft_model(Net(), LoraConfig(**config))
    pm.save_pretrained(tmp_path / "init")
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(**config))
    theirs.load_state_dict(pm.state_dict(), strict=False)  # same residual base weights and factors
    theirs.save_pretrained(tmp_path / "peft-init")
    _trained(pm)
    theirs.load_state_dict(pm.state_dict(), strict=False)
    expected = pm(x)
    torch.testing.assert_close(theirs(x), expected, **TOL)  # the same weights in both libraries
    pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (saved["r"], saved["init_lora_weights"]) == (6, True)
    assert saved["lora_alpha"] == pytest.approx(6 * (2**0.5 if rslora else 2))
    plain = PeftModel.from_pretrained(Net(), tmp_path / "lora")  # the untouched base: no PiSSA residual
    torch.testing.assert_close(plain(x), expected, **TOL)
    in_peft = peft.PeftModel.from_pretrained(Net(), tmp_path / "lora")
    torch.testing.assert_close(in_peft(x), expected, **TOL)
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft-init"))
    ours, peft_file = load_file(str(tmp_path / "lora" / WEIGHTS)), load_file(str(tmp_path / "peft" / WEIGHTS))
    assert ours.keys() == peft_file.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, peft_file[key], **TOL)


def test_conversion_needs_the_initial_adapter_of_a_lora(tmp_path):
    pm = get_peft_model(Net(), LoraConfig(r=3, target_modules=["lin"], init_lora_weights="pissa"))
    with pytest.raises(CheckpointError):
        pm.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "absent"))
    assert not (tmp_path / "out" / WEIGHTS).exists()
