"""LoRA (methods/lora/) checked against its formula written out by hand.

h = W x + b + s * B A x, s = alpha / r (rsLoRA: alpha / sqrt(r)); merged W' = W + s * B A (transposed for
GPT-2's Conv1D, whose weight is stored (in, out)). Embedding: A is a table looked up by id; convolutions: A is a
conv with the base kernel / stride / padding, B a 1x1 conv.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.errors import MergeError
from peftkit.methods.lora import LoraConv1d, LoraConv2d, LoraEmbedding, LoraLinear

TOL = dict(atol=1e-5, rtol=1e-5)


class Net(nn.Module):
    """One module of every kind LoRA wraps, plus an unwrapped Linear with a bias (``other``)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.lin = nn.Linear(12, 10)
        self.lin2 = nn.Linear(12, 10)
        self.other = nn.Linear(10, 4)
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.conv1 = nn.Conv1d(3, 5, kernel_size=3, padding=1)
        self.conv = nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(3, 4, kernel_size=1)
        self.gpt = Conv1D(10, 12)  # nf=10 outputs, nx=12 inputs; weight (12, 10)

    def forward(self, x):
        return self.other(self.lin(x))


def wrap(targets, **kwargs):
    base = Net()
    kwargs.setdefault("init_lora_weights", False)  # random A and B so the update is not zero
    pm = get_peft_model(base, LoraConfig(target_modules=targets, **kwargs))
    return pm, Net()  # a fresh copy of the same weights as the reference


def layer(pm, name):
    return pm.get_base_model().get_submodule(name)


def scale(alpha, r, rs=False):
    return alpha / math.sqrt(r) if rs else alpha / r


# ---- the forward formula, per layer type ----------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_formula(rslora):
    pm, ref = wrap(["lin"], r=4, lora_alpha=8, use_rslora=rslora)
    lora = layer(pm, "lin")
    assert isinstance(lora, LoraLinear)
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    assert a.shape == (4, 12) and b.shape == (10, 4)
    x = torch.randn(2, 3, 12)
    s = scale(8, 4, rslora)
    expected = x @ ref.lin.weight.T + ref.lin.bias + s * (x @ a.T @ b.T)
    torch.testing.assert_close(lora(x), expected, **TOL)
    assert lora.scaling["default"] == pytest.approx(s)


def test_gpt2_conv1d_matches_formula():
    pm, ref = wrap(["gpt"], r=3, lora_alpha=6)
    lora = layer(pm, "gpt")
    assert isinstance(lora, LoraLinear) and lora.fan_in_fan_out
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    assert a.shape == (3, 12) and b.shape == (10, 3)
    x = torch.randn(4, 12)
    expected = x @ ref.gpt.weight + ref.gpt.bias + 2.0 * (x @ a.T @ b.T)  # Conv1D: y = x W + b, W (in, out)
    torch.testing.assert_close(lora(x), expected, **TOL)
    pm.merge_adapter()
    torch.testing.assert_close(lora.get_base_layer().weight, ref.gpt.weight + 2.0 * (b @ a).T, **TOL)
    torch.testing.assert_close(lora(x), expected, **TOL)


def test_embedding_matches_formula_with_padding_idx():
    pm, ref = wrap(["emb"], r=2, lora_alpha=4)
    lora = layer(pm, "emb")
    assert isinstance(lora, LoraEmbedding)
    a, b = lora.lora_embedding_A["default"], lora.lora_embedding_B["default"]  # (r, num), (dim, r)
    assert a.shape == (2, 20) and b.shape == (6, 2)
    ids = torch.tensor([[0, 3, 7], [19, 0, 1]])
    expected = ref.emb.weight[ids] + 2.0 * (a.T[ids] @ b.T)
    torch.testing.assert_close(lora(ids), expected, **TOL)
    # padding_idx acts as in nn.Embedding: the padding row gets no gradient, in A as in the base table
    lora(ids).sum().backward()
    assert a.grad[:, 0].abs().sum() == 0
    assert a.grad[:, 3].abs().sum() > 0
    pm.merge_adapter()
    torch.testing.assert_close(lora.get_base_layer().weight, ref.emb.weight + 2.0 * (b @ a).T, **TOL)


def test_conv1d_matches_formula():
    pm, ref = wrap(["conv1"], r=2, lora_alpha=2)
    lora = layer(pm, "conv1")
    assert isinstance(lora, LoraConv1d)
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight  # (r, in, k), (out, r, 1)
    x = torch.randn(2, 3, 9)
    h = F.conv1d(x, a, padding=1)  # (B, r, L)
    expected = ref.conv1(x) + torch.einsum("or,brl->bol", b[:, :, 0], h)
    torch.testing.assert_close(lora(x), expected, **TOL)
    merged_w = ref.conv1.weight + torch.einsum("or,rik->oik", b[:, :, 0], a)
    torch.testing.assert_close(F.conv1d(x, merged_w, ref.conv1.bias, padding=1), expected, **TOL)
    pm.merge_adapter()
    torch.testing.assert_close(lora.get_base_layer().weight, merged_w, **TOL)


@pytest.mark.parametrize(("name", "stride", "padding"), [("conv", 2, 1), ("pointwise", 1, 0)], ids=["k3s2p1", "1x1"])
def test_conv2d_matches_formula(name, stride, padding):
    pm, ref = wrap([name], r=3, lora_alpha=6)
    lora = layer(pm, name)
    assert isinstance(lora, LoraConv2d)
    base = getattr(ref, name)
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight  # (r, in, kh, kw), (out, r, 1, 1)
    x = torch.randn(2, 3, 9, 7)
    h = F.conv2d(x, a, stride=stride, padding=padding)  # (B, r, H', W')
    expected = base(x) + 2.0 * torch.einsum("or,brhw->bohw", b[:, :, 0, 0], h)
    out = lora(x)
    assert out.shape == base(x).shape
    torch.testing.assert_close(out, expected, **TOL)
    merged_w = base.weight + 2.0 * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
    pm.merge_adapter()
    torch.testing.assert_close(lora.get_base_layer().weight, merged_w, **TOL)
    torch.testing.assert_close(lora(x), expected, **TOL)
    pm.unmerge_adapter()
    torch.testing.assert_close(lora.get_base_layer().weight, base.weight, **TOL)


@pytest.mark.parametrize("name", ["lin", "gpt", "emb", "conv", "conv1"])
def test_merge_unmerge_and_unload(name):
    pm, ref = wrap([name], r=2, lora_alpha=3)
    lora = layer(pm, name)
    delta = lora.delta_weight("default").detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(lora.get_base_layer().weight, getattr(ref, name).weight + delta, **TOL)
    pm.unmerge_adapter()
    torch.testing.assert_close(lora.get_base_layer().weight, getattr(ref, name).weight, atol=1e-6, rtol=0)
    plain = pm.merge_and_unload()
    assert type(plain.get_submodule(name)) is type(getattr(ref, name))
    torch.testing.assert_close(plain.get_submodule(name).weight, getattr(ref, name).weight + delta, **TOL)


# ---- initialisation ---------------------------------------------------------------------------------------
def test_init_true_is_identity_with_zero_b():
    pm, ref = wrap(["lin", "emb", "conv"], r=4, init_lora_weights=True)
    x, ids, img = torch.randn(3, 12), torch.tensor([1, 2, 0]), torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(layer(pm, "lin")(x), ref.lin(x))
    torch.testing.assert_close(layer(pm, "emb")(ids), ref.emb(ids))
    torch.testing.assert_close(layer(pm, "conv")(img), ref.conv(img))
    lin, emb = layer(pm, "lin"), layer(pm, "emb")
    assert lin.lora_B["default"].weight.abs().sum() == 0 and lin.lora_A["default"].weight.abs().sum() > 0
    # embeddings: A = 0 and B random (peft's choice), still an identity at start
    assert emb.lora_embedding_A["default"].abs().sum() == 0 and emb.lora_embedding_B["default"].abs().sum() > 0


def test_init_gaussian_draws_a_with_std_one_over_r():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2000, 8))
    pm = get_peft_model(model, LoraConfig(target_modules=["0"], r=4, init_lora_weights="gaussian"))
    lora = pm.get_base_model()[0]
    a = lora.lora_A["default"].weight
    assert a.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert lora.lora_B["default"].weight.abs().sum() == 0


def test_init_false_is_not_identity():
    pm, ref = wrap(["lin"], r=4, init_lora_weights=False)
    x = torch.randn(3, 12)
    assert layer(pm, "lin").lora_B["default"].weight.abs().sum() > 0
    assert not torch.allclose(layer(pm, "lin")(x), ref.lin(x))


# ---- per-module rank / alpha --------------------------------------------------------------------------------
def test_rank_and_alpha_patterns():
    pm, ref = wrap(["lin", "lin2", "gpt"], r=4, lora_alpha=8, rank_pattern={"lin2": 2}, alpha_pattern={"gpt": 3})
    lin, lin2, gpt = layer(pm, "lin"), layer(pm, "lin2"), layer(pm, "gpt")
    assert lin.lora_A["default"].weight.shape == (4, 12) and lin.scaling["default"] == 2.0
    assert lin2.lora_A["default"].weight.shape == (2, 12) and lin2.scaling["default"] == 4.0  # alpha 8 / r 2
    assert gpt.lora_A["default"].weight.shape == (4, 12) and gpt.scaling["default"] == 0.75  # alpha 3 / r 4
    x = torch.randn(5, 12)
    a, b = lin2.lora_A["default"].weight, lin2.lora_B["default"].weight
    torch.testing.assert_close(lin2(x), ref.lin2(x) + 4.0 * (x @ a.T @ b.T), **TOL)
    # a key matches a dotted suffix only: "in2" must not catch "lin2"
    pm2, _ = wrap(["lin2"], r=4, rank_pattern={"in2": 1})
    assert layer(pm2, "lin2").r["default"] == 4


# ---- bias ---------------------------------------------------------------------------------------------------
def _trainable(pm):
    return {n for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_decide_what_trains_and_is_saved(bias):
    pm, _ = wrap(["lin"], r=2, bias=bias)
    lora_params = {
        "base_model.model.lin.lora_A.default.weight",
        "base_model.model.lin.lora_B.default.weight",
    }
    bias_of_lin = "base_model.model.lin.base_layer.bias"
    all_biases = {
        bias_of_lin,
        "base_model.model.lin2.bias",
        "base_model.model.other.bias",
        "base_model.model.emb.bias",
        "base_model.model.conv1.bias",
        "base_model.model.conv.bias",
        "base_model.model.pointwise.bias",
        "base_model.model.gpt.bias",
    }
    all_biases = {n for n in all_biases if n in dict(pm.named_parameters())}
    expected = {"none": set(), "all": all_biases, "lora_only": {bias_of_lin}}[bias]
    assert _trainable(pm) == lora_params | expected
    saved = set(pm.adapter_state_dict("default"))
    assert saved == {n.removeprefix("base_model.model.").replace(".default", "") for n in lora_params | expected}


def test_bias_all_round_trip(tmp_path):
    from peftkit import PeftModel

    pm, _ = wrap(["lin"], r=2, bias="all")
    with torch.no_grad():
        pm.get_base_model().other.bias.add_(1.0)  # a trained bias outside the LoRA layer
        pm.get_base_model().lin.base_layer.bias.add_(0.5)
    x = torch.randn(2, 12)
    expected = pm(x)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Net(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, **TOL)


# ---- several adapters, dropout ------------------------------------------------------------------------------
def test_active_adapters_add_their_deltas():
    pm, ref = wrap(["lin"], r=2, lora_alpha=2)
    pm.add_adapter("b", LoraConfig(target_modules=["lin"], r=3, lora_alpha=6, init_lora_weights=False))
    pm.set_adapter(["default", "b"])
    lora = layer(pm, "lin")
    x = torch.randn(4, 12)
    delta = {n: lora.scaling[n] * (x @ lora.lora_A[n].weight.T @ lora.lora_B[n].weight.T) for n in ("default", "b")}
    torch.testing.assert_close(lora(x), ref.lin(x) + delta["default"] + delta["b"], **TOL)
    pm.set_adapter("b")
    torch.testing.assert_close(lora(x), ref.lin(x) + delta["b"], **TOL)
    pm.set_adapter(["default", "b"])
    pm.merge_adapter()
    torch.testing.assert_close(
        lora.get_base_layer().weight, ref.lin.weight + lora.delta_weight("default") + lora.delta_weight("b"), **TOL
    )
    torch.testing.assert_close(lora(x), ref.lin(x) + delta["default"] + delta["b"], **TOL)


def test_dropout_only_in_training():
    pm, ref = wrap(["lin"], r=2, lora_alpha=2, lora_dropout=0.5)
    lora = layer(pm, "lin")
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    x = torch.randn(6, 12)
    pm.eval()
    torch.testing.assert_close(lora(x), ref.lin(x) + x @ a.T @ b.T, **TOL)
    pm.train()
    torch.manual_seed(7)
    out = lora(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    # only the LoRA branch sees dropout; the base path is untouched
    torch.testing.assert_close(out, ref.lin(x) + dropped @ a.T @ b.T, **TOL)
    assert not torch.allclose(out, ref.lin(x) + x @ a.T @ b.T)


def test_merge_into_tied_embedding_is_refused():
    """GPT-2 ties wte to lm_head: merging a wte adapter would change lm_head too (merged != unmerged)."""
    from models import batch, tiny_gpt2

    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    pm = get_peft_model(model, LoraConfig(target_modules=["c_attn", "wte"], init_lora_weights=False))
    inputs = batch("gpt2")
    with torch.no_grad():
        before = pm(**inputs).logits
    c_attn = pm.get_base_model().transformer.h[0].attn.c_attn
    weight = c_attn.get_base_layer().weight.clone()
    with pytest.raises(MergeError, match=r"transformer\.wte.*tied"):
        pm.merge_and_unload()
    assert c_attn.merged_adapters == []  # nothing half-merged
    torch.testing.assert_close(c_attn.get_base_layer().weight, weight, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs).logits, before, atol=0, rtol=0)


class Chain(nn.Module):
    """Embedding -> Conv1d -> strided Conv2d -> GPT-2 Conv1D -> Linear, to route rows through every layer type."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.conv1 = nn.Conv1d(6, 5, 3, padding=1)
        self.conv = nn.Conv2d(5, 4, 3, stride=2, padding=1)
        self.gpt = Conv1D(8, 4)
        self.lin = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(ids).transpose(1, 2))  # (B, 5, T)
        h = self.conv(h[:, :, None, :].expand(-1, -1, 4, -1)).mean((2, 3))  # (B, 4)
        return self.lin(self.gpt(h))  # (B, 3)


def test_per_row_adapters_on_every_layer_type():
    from peftkit import BASE

    everything = ["emb", "conv1", "conv", "gpt", "lin"]
    pm = get_peft_model(Chain(), LoraConfig(r=2, target_modules=everything, init_lora_weights=False))
    pm.add_adapter(
        "b", LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=everything[:3], init_lora_weights=False)
    )
    pm.eval()
    ids = torch.tensor([[0, 3, 5, 7, 1, 2, 0, 9], [4, 4, 0, 0, 19, 8, 6, 1], [1, 2, 3, 4, 5, 6, 7, 8]])
    alone = {}
    with torch.no_grad():
        for name in ("default", "b"):
            pm.set_adapter(name)
            alone[name] = pm(ids)
        with pm.disable_adapter():
            alone[BASE] = pm(ids)
        rows = ["b", BASE, "default"]
        routed = pm(ids, adapter_names=rows)
    assert not torch.allclose(alone["b"], alone[BASE]) and not torch.allclose(alone["default"], alone[BASE])
    for i, name in enumerate(rows):
        torch.testing.assert_close(routed[i], alone[name][i], **TOL, msg=f"row {i} ({name})")
