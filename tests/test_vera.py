"""VeRA: the forward against ΔW = Λ_b B Λ_d A written out by hand, the shared projections, and peft 0.21 interop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from models import batch, build, output
from peftkit import PeftModel, VeraConfig, get_peft_model
from peftkit.errors import ConfigError

peft = pytest.importorskip("peft")

TOL = 1e-5
TARGETS = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def perturb_vectors(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name or (p.requires_grad and name.endswith("base_layer.bias")):  # bias="vera_only"
                p.add_(torch.randn(p.shape, generator=g))


def kaiming(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


def test_the_forward_is_w_x_plus_lambda_b_b_lambda_d_a_x_with_slices_of_one_shared_pair():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 4))
    pm = get_peft_model(model, VeraConfig(r=3, target_modules=["0", "2"], projection_prng_key=7))
    perturb_vectors(pm, seed=1)
    g = torch.Generator().manual_seed(7)
    a, b = kaiming((3, 10), g), kaiming((10, 3), g)  # the largest (out, in) = (10, 10)
    state = pm.adapter_state_dict("default")
    torch.testing.assert_close(state["base_model.vera_A"], a, atol=0, rtol=0)
    torch.testing.assert_close(state["base_model.vera_B"], b, atol=0, rtol=0)
    x = torch.randn(5, 6)
    h = x @ model[0].get_base_layer().weight.T + model[0].get_base_layer().bias
    lb, ld = state["0.vera_lambda_b"], state["0.vera_lambda_d"]
    h = h + (torch.diag(lb) @ b[:10, :] @ torch.diag(ld) @ a[:, :6] @ x.T).T
    h = torch.relu(h)
    y = h @ model[2].get_base_layer().weight.T + model[2].get_base_layer().bias
    lb, ld = state["2.vera_lambda_b"], state["2.vera_lambda_d"]
    y = y + (torch.diag(lb) @ b[:4, :] @ torch.diag(ld) @ a[:, :10] @ h.T).T
    torch.testing.assert_close(pm(x), y, atol=TOL, rtol=0)
    pm.merge_adapter()  # W + Λ_b B Λ_d A
    torch.testing.assert_close(pm(x), y, atol=TOL, rtol=0)


def test_identity_at_init_and_bad_values_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    pm = get_peft_model(model, VeraConfig(r=2, target_modules=["0"]))
    assert torch.equal(pm.adapter_state_dict("default")["0.vera_lambda_b"], torch.zeros(4))
    assert torch.equal(pm.adapter_state_dict("default")["0.vera_lambda_d"], torch.full((2,), 0.1))
    with pytest.raises(ConfigError, match=r"r=0 .*\n.*bias='some'"):
        VeraConfig(r=0, bias="some")


def test_without_save_projection_the_pair_is_not_saved_and_is_drawn_again(tmp_path):
    reference = build("bert")
    config = VeraConfig(r=4, target_modules=TARGETS["bert"], save_projection=False)
    ours = get_peft_model(copy.deepcopy(reference), config).eval()
    perturb_vectors(ours, seed=2)
    expected = output(ours, batch("bert"))
    ours.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys and not any("vera_A" in k or "vera_B" in k for k in keys)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    torch.testing.assert_close(output(loaded, batch("bert")), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_saves_peftkit_loads(kind, save_projection, tmp_path):
    reference = build(kind)
    bias = "vera_only" if kind == "gpt2" else "none"
    config = peft.VeraConfig(r=4, target_modules=TARGETS[kind], save_projection=save_projection, bias=bias)
    theirs = peft.get_peft_model(copy.deepcopy(reference), config)
    perturb_vectors(theirs, seed=3)
    theirs.eval()
    inputs = batch(kind)
    expected = output(theirs, inputs)
    assert (expected - output(reference, inputs)).abs().max() > 100 * TOL
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert isinstance(ours.peft_config["default"], VeraConfig)
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_peftkit_saves_peft_loads_without_projection(kind, tmp_path):
    """peft draws the same pair from projection_prng_key: the vectors alone reproduce the outputs."""
    reference = build(kind)
    bias = "vera_only" if kind == "gpt2" else "none"
    config = VeraConfig(r=4, target_modules=TARGETS[kind], save_projection=False, bias=bias)
    ours = get_peft_model(copy.deepcopy(reference), config).eval()
    perturb_vectors(ours, seed=4)
    inputs = batch(kind)
    expected = output(ours, inputs)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), expected, atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    assert sorted(load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) == sorted(
        load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    )


def test_peftkit_saves_peft_loads_with_projection(tmp_path):
    reference = build("bert")
    ours = get_peft_model(copy.deepcopy(reference), VeraConfig(r=4, target_modules=TARGETS["bert"])).eval()
    perturb_vectors(ours, seed=5)
    ours.save_pretrained(tmp_path)
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(load_file(str(tmp_path / "adapter_model.safetensors")))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    torch.testing.assert_close(output(theirs, batch("bert")), output(ours, batch("bert")), atol=TOL, rtol=0)
