"""PiSSA and OLoRA initialisations (methods/lora/inits.py): by hand, and against peft 0.21 on the same weights."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError

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
