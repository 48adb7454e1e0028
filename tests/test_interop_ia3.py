"""(IA)3 checkpoints move both ways between peftkit and Hugging Face peft 0.21, with peft's exact key names."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from models import batch, build, minilm_folder, needs_minilm, output

peft = pytest.importorskip("peft")

TOL = 1e-5
TASKS = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM"}


def perturb_named(module: torch.nn.Module, seed: int = 0) -> None:
    """Move the (IA)3 vectors (and the head's trainable copy) away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "ia3_l" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def saved_keys(folder: Path) -> list[str]:
    return sorted(load_file(str(folder / "adapter_model.safetensors")))


def real_minilm():
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_folder()).eval()


def hidden(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_peft_checkpoint_loads_in_peftkit_and_back(kind, tmp_path):
    reference = build(kind)
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.IA3Config(task_type=TASKS[kind]))
    perturb_named(theirs)
    theirs.eval()
    inputs = batch(kind)
    expected = output(theirs, inputs)
    assert (expected - output(reference, inputs)).abs().max() > 100 * TOL
    theirs.save_pretrained(tmp_path / "peft")

    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)

    ours.save_pretrained(tmp_path / "ours")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(output(again, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_peftkit_checkpoint_loads_in_peft(kind, tmp_path):
    reference = build(kind)
    ours = peftkit.get_peft_model(copy.deepcopy(reference), peftkit.IA3Config(task_type=TASKS[kind]))
    perturb_named(ours, seed=3)
    ours.eval()
    inputs = batch(kind)
    expected = output(ours, inputs)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]  # defaults saved explicitly

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    complaints = [str(w.message) for w in caught if "nexpected" in str(w.message) or "fan_in_fan_out" in str(w.message)]
    assert not complaints, complaints  # peft finds nothing to correct in the config peftkit wrote
    torch.testing.assert_close(output(theirs, inputs), expected, atol=TOL, rtol=0)
    # the same model built by peft from scratch saves the same tensor names
    fresh = peft.get_peft_model(copy.deepcopy(reference), peft.IA3Config(task_type=TASKS[kind]))
    fresh.save_pretrained(tmp_path / "fresh")
    assert saved_keys(tmp_path) == saved_keys(tmp_path / "fresh")
    # and both merge to the same weights
    merged_theirs = theirs.merge_and_unload().state_dict()
    merged_ours = ours.merge_and_unload().state_dict()
    assert set(merged_ours) == set(merged_theirs)
    for key, value in merged_theirs.items():
        torch.testing.assert_close(merged_ours[key], value, atol=TOL, rtol=0, msg=key)


def test_conv2d_checkpoint_both_ways(tmp_path):
    """Plain nn.Module with convolutions (grouped for the feed-forward one): explicit targets, both directions."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 1, groups=2))
    kwargs = dict(target_modules=["0", "2"], feedforward_modules=["2"])
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.IA3Config(**kwargs))
    perturb_named(theirs)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = theirs(x)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, atol=TOL, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, atol=TOL, rtol=0)


@needs_minilm
def test_real_minilm_both_ways(tmp_path):
    reference = real_minilm()
    inputs = {"input_ids": torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))}
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.IA3Config(task_type="FEATURE_EXTRACTION"))
    perturb_named(theirs)
    theirs.eval()
    expected = hidden(theirs, inputs)
    assert (expected - hidden(reference, inputs)).abs().max() > 100 * TOL
    theirs.save_pretrained(tmp_path / "peft")
    assert len(saved_keys(tmp_path / "peft")) == 6 * 4  # key, value, attention.output.dense, output.dense

    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    torch.testing.assert_close(hidden(ours, inputs), expected, atol=TOL, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(hidden(again, inputs), expected, atol=TOL, rtol=0)
