"""DoRA (methods/lora/dora.py) against its formula written out by hand and against peft 0.21 on the same weights.

W' = m * (W + s B A) / ||W + s B A||_c, the row norm (one per output) detached in backward (DoRA section 4.3).
"""

from __future__ import annotations

import json

import peft
import pytest
import test_contract as contract
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from cases import CASES, TARGETS, TASKS, Case
from peftkit import LoraConfig, PeftModel, get_peft_model, hotswap_adapter
from peftkit.errors import ConfigError
from peftkit.methods.lora import LoraLinear

TOL = dict(atol=1e-5, rtol=1e-5)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 10)
        self.gpt = Conv1D(8, 10)  # weight (10, 8): 10 inputs, 8 outputs
        self.emb = nn.Embedding(20, 12)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 12)
        return self.head(self.gpt(self.lin(x)))


def dora_model(train_values: bool = True, **kw) -> PeftModel:
    config = dict(r=4, lora_alpha=8, target_modules=["lin", "gpt"], use_dora=True) | kw
    pm = get_peft_model(Net(), LoraConfig(**config))
    if train_values:  # as after some training: B and m away from their initial values
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
                if "magnitude" in name:
                    p.mul_(1 + 0.2 * torch.randn_like(p))
    return pm


def by_hand(weight: torch.Tensor, bias, a, b, m, s: float, x: torch.Tensor) -> torch.Tensor:
    """m * (W + s B A) x / ||W + s B A||_c + b, the norm per output row of the (out, in) weight, detached."""
    adapted = weight + s * b @ a  # (out, in)
    norm = torch.linalg.norm(adapted, dim=1).detach()
    out = x @ (m[:, None] * adapted / norm[:, None]).T
    return out if bias is None else out + bias


def parts(layer: LoraLinear, name: str = "default"):
    weight = layer.get_base_layer().weight
    weight = weight.T if layer.fan_in_fan_out else weight  # (out, in)
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return weight, layer.get_base_layer().bias, a, b, layer.lora_magnitude_vector[name], layer.scaling[name]


def test_formula_by_hand_linear_and_conv1d():
    pm = dora_model()
    x = torch.randn(2, 5, 12)
    lin, gpt = pm.base_model.model.lin, pm.base_model.model.gpt
    h = by_hand(*parts(lin), x)
    torch.testing.assert_close(lin(x), h, **TOL)
    torch.testing.assert_close(gpt(h), by_hand(*parts(gpt), h), **TOL)


def test_identity_at_init_and_magnitude_is_row_norm():
    base = Net()
    x = torch.randn(2, 5, 12)
    expected = base(x)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lin", "gpt"], use_dora=True))
    torch.testing.assert_close(pm(x), expected, **TOL)
    lin = pm.base_model.model.lin
    torch.testing.assert_close(lin.lora_magnitude_vector["default"], lin.get_base_layer().weight.norm(dim=1))
    gpt = pm.base_model.model.gpt
    torch.testing.assert_close(gpt.lora_magnitude_vector["default"], gpt.get_base_layer().weight.norm(dim=0))


def test_gradients_match_reference_with_detached_norm():
    pm = dora_model()
    lin = pm.base_model.model.lin
    x = torch.randn(3, 4, 12)
    weight, bias, a, b, m, s = parts(lin)
    ref_a, ref_b, ref_m = (t.detach().clone().requires_grad_() for t in (a, b, m))
    by_hand(weight, bias, ref_a, ref_b, ref_m, s, x).square().sum().backward()
    lin(x).square().sum().backward()
    for got, ref in ((a.grad, ref_a.grad), (b.grad, ref_b.grad), (m.grad, ref_m.grad)):
        torch.testing.assert_close(got, ref, **TOL)
    # the norm is not differentiated: a reference through the norm gives a different gradient of B
    ref_b.grad = None
    adapted = weight + s * ref_b @ ref_a
    (x @ (ref_m[:, None] * adapted / adapted.norm(dim=1, keepdim=True)).T + bias).square().sum().backward()
    assert not torch.allclose(ref_b.grad, b.grad, **TOL)


@pytest.mark.parametrize("which", ["lin", "gpt"])
def test_own_backward_input_and_bias_gradients(which):
    """DoraLinearFunction (training, no dropout): dL/dx and a trained base bias (bias="all") as autograd through the
    formula gives them; GPT-2's Conv1D (weight stored (in, out)) too."""
    pm = dora_model(bias="all")
    layer = getattr(pm.base_model.model, which)
    x = torch.randn(3, 4, layer.in_features if which == "lin" else 10, requires_grad=True)
    weight, bias, a, b, m, s = parts(layer)
    refs = [t.detach().clone().requires_grad_() for t in (x, bias, a, b, m)]
    by_hand(weight, refs[1], refs[2], refs[3], refs[4], s, refs[0]).square().sum().backward()
    layer(x).square().sum().backward()
    for got, ref in zip((x, bias, a, b, m), refs, strict=True):
        torch.testing.assert_close(got.grad, ref.grad, **TOL)


def test_dropout_in_training_follows_peft_form():
    pm = dora_model(lora_dropout=0.5)
    pm.train()
    lin = pm.base_model.model.lin
    weight, bias, a, b, m, s = parts(lin)
    x = torch.randn(2, 3, 12)
    torch.manual_seed(7)
    got = lin(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)
    f = m / torch.linalg.norm(weight + s * b @ a, dim=1).detach()
    expected = x @ weight.T + bias + (f - 1) * (xd @ weight.T) + f * (s * (xd @ a.T) @ b.T)
    torch.testing.assert_close(got, expected, **TOL)


def _peft_pair(tmp_path):
    """A peftkit DoRA model, its base weights, and peft 0.21 loading the folder peftkit saved."""
    pm = dora_model()
    base_state = {
        k.replace(".base_layer", ""): v for k, v in pm.base_model.model.state_dict().items() if "lora" not in k
    }
    pm.save_pretrained(tmp_path / "kit")
    other = Net()
    other.load_state_dict(base_state)
    return pm, peft.PeftModel.from_pretrained(other, tmp_path / "kit"), base_state


def test_peft_loads_peftkit_and_peftkit_loads_peft(tmp_path):
    pm, from_kit, base_state = _peft_pair(tmp_path)
    x = torch.randn(2, 5, 12)
    pm.eval(), from_kit.eval()
    torch.testing.assert_close(from_kit(x), pm(x), **TOL)
    from_kit.save_pretrained(tmp_path / "peft")
    kit_keys = set(load_file(tmp_path / "kit" / "adapter_model.safetensors"))
    assert kit_keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.lin.lora_magnitude_vector" in kit_keys
    assert json.loads((tmp_path / "kit" / "adapter_config.json").read_text())["use_dora"] is True
    fresh = Net()
    fresh.load_state_dict(base_state)
    back = PeftModel.from_pretrained(fresh, tmp_path / "peft")
    torch.testing.assert_close(back(x), from_kit(x), **TOL)


def test_peft_trained_dora_matches(tmp_path):
    """peft's own DoRA (its init, one optimiser step) loads in peftkit with the same outputs."""
    base = Net()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["lin", "gpt"], use_dora=True))
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    ref(torch.randn(4, 3, 12)).square().sum().backward()
    opt.step()
    ref.save_pretrained(tmp_path)
    fresh = Net()
    fresh.load_state_dict(state)
    pm = PeftModel.from_pretrained(fresh, tmp_path)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(pm(x), ref(x), **TOL)


def test_merge_unmerge_exact_and_mixed_with_lora():
    pm = dora_model()
    pm.add_adapter("plain", LoraConfig(r=2, target_modules=["lin", "gpt"], init_lora_weights=False))
    pm.set_adapter(["default", "plain"])
    pm.eval()
    x = torch.randn(2, 5, 12)
    before = {k: v.clone() for k, v in pm.base_model.model.state_dict().items() if "base_layer" in k}
    unmerged = pm(x)
    lin = pm.base_model.model.lin
    weight, bias, a, b, m, s = parts(lin)
    lora_delta = lin.scaling["plain"] * lin.lora_B["plain"].weight @ lin.lora_A["plain"].weight
    f = m / torch.linalg.norm(weight + s * b @ a, dim=1)
    mixed = x @ (weight + lora_delta + (f - 1)[:, None] * weight + f[:, None] * s * b @ a).T + bias
    torch.testing.assert_close(lin(x), mixed, **TOL)  # W x + b + s' B' A' x + (f - 1) W x + f s B A x
    pm.merge_adapter()
    torch.testing.assert_close(pm(x), unmerged, **TOL)
    pm.unmerge_adapter()
    after = pm.base_model.model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)
    single = dora_model()
    single.eval()
    w = single.base_model.model.lin.get_base_layer().weight.detach().clone()
    weight, bias, a, b, m, s = parts(single.base_model.model.lin)
    expected = m[:, None] * (weight + s * b @ a) / torch.linalg.norm(weight + s * b @ a, dim=1, keepdim=True)
    merged = single.merge_and_unload()
    torch.testing.assert_close(merged.lin.weight, expected, **TOL)  # W <- m (W + s B A) / ||W + s B A||_c
    assert not torch.allclose(merged.lin.weight, w)


def test_per_row_mix_of_dora_and_lora():
    pm = dora_model()
    pm.add_adapter("plain", LoraConfig(r=2, target_modules=["lin", "gpt"], init_lora_weights=False))
    pm.eval()
    x = torch.randn(3, 5, 12)
    rows = []
    for k, name in enumerate(["default", "plain", "__base__"]):
        if name == "__base__":
            with pm.disable_adapter():
                rows.append(pm(x[k : k + 1]))
        else:
            pm.set_adapter(name)
            rows.append(pm(x[k : k + 1]))
    mixed = pm(x, adapter_names=["default", "plain", "__base__"])
    torch.testing.assert_close(mixed, torch.cat(rows), **TOL)


def test_norm_cached_until_a_weight_changes():
    pm = dora_model()
    lin = pm.base_model.model.lin
    x = torch.randn(2, 3, 12)
    pm(x)
    cached = lin._dora_cache["default"][1]
    pm(x)
    assert lin._dora_cache["default"][1] is cached  # reused: nothing changed
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm(x).square().sum().backward()
    opt.step()
    out = lin(x)
    assert lin._dora_cache["default"][1] is not cached
    torch.testing.assert_close(out, by_hand(*parts(lin), x), **TOL)  # the new norm, not the stale one


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(target_modules=["grouped"]), "use_dora=True is not supported on 'grouped'"),
        (dict(target_modules=["attn"]), "use_dora=True is not supported on 'attn'"),
        (dict(target_modules=["conv"], lora_bias=True), "lora_bias=True"),
    ],
)
def test_unsupported_refused(config, match):
    model = EmbConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        get_peft_model(model, LoraConfig(r=4, use_dora=True, **config))
    assert set(model.state_dict()) == set(before)


def test_combine_and_hotswap_refused(tmp_path):
    pm = dora_model()
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["lin", "gpt"], use_dora=True))
    with pytest.raises(ConfigError, match="cannot combine DoRA"):
        pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
    assert "mix" not in pm.peft_config
    pm.save_pretrained(tmp_path, selected_adapters=["b"])
    with pytest.raises(ConfigError, match="DoRA"):
        hotswap_adapter(pm, str(tmp_path / "b"), adapter_name="default")


class EmbConvNet(nn.Module):
    """An embedding feeding a Conv2d (and an unused grouped conv and attention, for the refusals)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
        self.grouped = nn.Conv2d(4, 4, kernel_size=1, groups=2)
        self.attn = nn.MultiheadAttention(12, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, T)
        e = self.emb(ids)  # (B, T, 12)
        return self.conv(e.transpose(1, 2).reshape(ids.shape[0], 3, 4, -1)).flatten(1)  # (B, 5 * 4 * T)


def emb_conv_model(**kw) -> PeftModel:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "conv"], use_dora=True, **kw)
    pm = get_peft_model(EmbConvNet(), config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_embedding_A" in name or "lora_B" in name:
                p.normal_(0, 0.3)
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return pm


def test_embedding_and_conv_formula_by_hand():
    pm = emb_conv_model()
    emb, conv = pm.base_model.model.emb, pm.base_model.model.conv
    ids = torch.randint(0, 20, (2, 6))
    table = emb.get_base_layer().weight  # (num, dim): the outputs are the dim columns
    s = emb.scaling["default"]
    adapted = table + s * (emb.lora_embedding_B["default"] @ emb.lora_embedding_A["default"]).T
    m = emb.lora_magnitude_vector["default"]
    torch.testing.assert_close(emb(ids), (m * adapted / adapted.norm(dim=0))[ids], **TOL)
    x = torch.randn(2, 3, 4, 6)
    base = conv.get_base_layer()
    a, b = conv.lora_A["default"].weight, conv.lora_B["default"].weight  # (r, 3, 3, 3), (5, r, 1, 1)
    w = base.weight + conv.scaling["default"] * (b.flatten(1) @ a.flatten(1)).view(base.weight.shape)
    m = conv.lora_magnitude_vector["default"]  # (1, 5, 1, 1), peft's shape
    assert m.shape == (1, 5, 1, 1)
    w_dora = m.view(-1, 1, 1, 1) * w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_dora, base.bias, padding=1), **TOL)


def test_embedding_and_conv_peft_both_ways_merge_and_rows(tmp_path):
    pm = emb_conv_model()
    pm.eval()
    ids = torch.randint(0, 20, (3, 6))
    expected = pm(ids)
    pm.save_pretrained(tmp_path / "kit")
    theirs = peft.PeftModel.from_pretrained(EmbConvNet(), tmp_path / "kit").eval()
    torch.testing.assert_close(theirs(ids), expected, **TOL)
    theirs.save_pretrained(tmp_path / "peft")
    kit_keys = set(load_file(tmp_path / "kit" / "adapter_model.safetensors"))
    assert kit_keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    back = PeftModel.from_pretrained(EmbConvNet(), tmp_path / "peft").eval()
    torch.testing.assert_close(back(ids), expected, **TOL)
    before = {k: v.clone() for k, v in pm.base_model.model.state_dict().items() if "base_layer" in k}
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids), expected, **TOL)
    pm.unmerge_adapter()
    for key, value in before.items():
        torch.testing.assert_close(pm.base_model.model.state_dict()[key], value, atol=1e-6, rtol=0)
    pm.add_adapter("plain", LoraConfig(r=2, target_modules=["emb", "conv"], init_lora_weights=False))
    rows = []
    for k, name in enumerate(["plain", "default", "__base__"]):
        if name == "__base__":
            with pm.disable_adapter():
                rows.append(pm(ids[k : k + 1]))
        else:
            pm.set_adapter(name)
            rows.append(pm(ids[k : k + 1]))
    torch.testing.assert_close(pm(ids, adapter_names=["plain", "default", "__base__"]), torch.cat(rows), **TOL)


# ---- DESIGN.md's shared rules (tests/test_contract.py) with use_dora=True on every architecture ----------------
def _contract_params() -> list[tuple[str, str]]:
    """(check, model kind) as test_contract runs them for LoRA (generate: decoder models only)."""
    checks = [n for n in dir(contract) if n.startswith("test_") and n != "test_every_method_has_a_case"]
    generate = "test_generate_runs_and_disabling_gives_the_base_model"
    decoders = {k for m, k in contract.DECODERS if m == "LORA"}
    return [(c, k) for c in checks for k in CASES["LORA"].models if c != generate or k in decoders]


@pytest.mark.parametrize(("check", "kind"), _contract_params())
def test_contract_rules_hold_for_dora(check, kind, monkeypatch, tmp_path):
    dora_case = Case(
        lambda kind: LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS[kind], task_type=TASKS[kind], use_dora=True, lora_dropout=0.1
        )
    )
    monkeypatch.setitem(CASES, "LORA", dora_case)
    run = getattr(contract, check)
    run("LORA", kind, tmp_path) if "tmp_path" in run.__code__.co_varnames else run("LORA", kind)


def test_conv_dropout_in_training_follows_peft_form():
    pm = emb_conv_model(lora_dropout=0.5)
    pm.train()
    conv = pm.base_model.model.conv
    base = conv.get_base_layer()
    x = torch.randn(2, 3, 4, 6)
    torch.manual_seed(5)
    got = conv(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, training=True)
    a, b, s = conv.lora_A["default"].weight, conv.lora_B["default"].weight, conv.scaling["default"]
    w = base.weight + s * (b.flatten(1) @ a.flatten(1)).view(base.weight.shape)
    f = (conv.lora_magnitude_vector["default"].flatten() / w.flatten(1).norm(dim=1)).view(1, -1, 1, 1)
    wx, wxd = F.conv2d(x, base.weight, padding=1), F.conv2d(xd, base.weight, padding=1)
    low = F.conv2d(F.conv2d(xd, a, padding=1), b) * s
    expected = wx + base.bias.view(1, -1, 1, 1) + (f - 1) * wxd + f * low
    torch.testing.assert_close(got, expected, **TOL)


def test_bf16_base_trains_and_merges():
    model = Net().to(torch.bfloat16)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["lin", "gpt"], use_dora=True, init_lora_weights=False))
    x = torch.randn(2, 3, 12, dtype=torch.bfloat16)
    pm(x).float().square().sum().backward()
    magnitude = pm.base_model.model.lin.lora_magnitude_vector["default"]
    assert magnitude.dtype == torch.float32 and magnitude.grad is not None
    pm.eval()
    with torch.no_grad():
        unmerged = pm(x)
        pm.merge_adapter()
        torch.testing.assert_close(pm(x), unmerged, atol=0.05, rtol=0.02)  # bf16 rounding of the merged weight
