"""LN tuning: the forward against the norm formula written out by hand, merge / unmerge, and peft 0.21 interop."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from models import batch, build, output, tiny_bert
from peftkit import LNTuningConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError

peft = pytest.importorskip("peft")

TOL = 1e-5


def layer_norm(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) * g + b over the last dimension (biased variance)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gain + bias


def set_copies(pm, adapter: str, seed: int) -> dict[str, torch.Tensor]:
    """Give adapter's norm copies random values; return them by file key."""
    g = torch.Generator().manual_seed(seed)
    state = pm.adapter_state_dict(adapter)
    with torch.no_grad():
        for tensor in state.values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5 + 1.0)
    return {k: v.detach().clone() for k, v in state.items()}


def test_one_adapter_runs_the_norm_with_its_copy_and_two_add_their_changes():
    norm = torch.nn.LayerNorm(8)
    model = torch.nn.Sequential(norm)
    pm = get_peft_model(model, LNTuningConfig(target_modules=["0"]))
    a = set_copies(pm, "default", seed=0)
    pm.add_adapter("b", LNTuningConfig(target_modules=["0"]))
    b = set_copies(pm, "b", seed=1)
    x = torch.randn(3, 5, 8)
    w, bias = norm.weight.detach(), norm.bias.detach()
    got = pm(x)
    expected = layer_norm(x, a["0.ln_tuning_layers.weight"], a["0.ln_tuning_layers.bias"], norm.eps)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    pm.set_adapter(["default", "b"])
    gain = w + (a["0.ln_tuning_layers.weight"] - w) + (b["0.ln_tuning_layers.weight"] - w)
    shift = bias + (a["0.ln_tuning_layers.bias"] - bias) + (b["0.ln_tuning_layers.bias"] - bias)
    torch.testing.assert_close(pm(x), layer_norm(x, gain, shift, norm.eps), atol=TOL, rtol=0)
    with pm.disable_adapter():
        torch.testing.assert_close(pm(x), layer_norm(x, w, bias, norm.eps), atol=TOL, rtol=0)


def test_merge_writes_the_copy_and_unmerge_restores_the_norm_bit_for_bit():
    model = tiny_bert()
    pm = get_peft_model(model, LNTuningConfig(target_modules=["LayerNorm"]))
    copies = set_copies(pm, "default", seed=2)
    norm = pm.get_base_model().bert.embeddings.LayerNorm.get_base_layer()
    before = norm.weight.detach().clone()
    pm.merge_adapter()
    assert torch.equal(norm.weight, copies["bert.embeddings.LayerNorm.ln_tuning_layers.weight"])
    pm.unmerge_adapter()
    assert torch.equal(norm.weight, before)


def test_only_the_norm_copies_train_and_a_model_without_default_needs_target_modules():
    pm = get_peft_model(tiny_bert(), LNTuningConfig(task_type="SEQ_CLS"))  # peftkit's BERT default: LayerNorm
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len([n for n in trainable if ".LayerNorm.ln_tuning_layers.default." in n]) == 2 * (1 + 2 * 2)
    assert all(".ln_tuning_layers.default." in n or "classifier" in n for n in trainable)
    with pytest.raises(ConfigError, match="no default target_modules for model type 'Sequential'"):
        get_peft_model(torch.nn.Sequential(torch.nn.LayerNorm(4)), LNTuningConfig())


def file_keys(folder) -> list[str]:
    return sorted(load_file(str(folder / "adapter_model.safetensors")))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_peftkit_saves_peft_loads_and_back(kind, tmp_path):
    reference = build(kind)
    ours = get_peft_model(copy.deepcopy(reference), LNTuningConfig()).eval()
    set_copies(ours, "default", seed=3)
    inputs = batch(kind)
    expected = output(ours, inputs)
    assert (expected - output(reference, inputs)).abs().max() > 100 * TOL
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING" and config["target_modules"]  # the default, saved explicitly
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), expected, atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    assert file_keys(tmp_path / "peft") == file_keys(tmp_path / "ours")


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_saves_peftkit_loads(kind, tmp_path):
    reference = build(kind)
    targets = ["LayerNorm"] if kind == "bert" else None
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.LNTuningConfig(target_modules=targets))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "ln_tuning_layers" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.eval()
    inputs = batch(kind)
    expected = output(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert isinstance(ours.peft_config["default"], peftkit.LNTuningConfig)
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)
    plain = ours.merge_and_unload()
    torch.testing.assert_close(output(plain, inputs), expected, atol=TOL, rtol=0)
