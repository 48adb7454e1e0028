"""OFT (issue 20 item 4): the Cayley rotation, COFT's projection and the layer's output written out by hand; merge and
its inverse; peft 0.21's files both ways on the same weights (tiny BERT and Llama)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models import batch, build, output
from peftkit import OFTConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError, TargetNotFoundError
from peftkit.methods.oft import OFTLinear, cayley, cayley_neumann, coft_project, skew

peft = pytest.importorskip("peft")

TOL = 1e-5
TARGETS = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj", "down_proj"]}


def perturb_oft(model: nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def q_by_hand(vec: torch.Tensor, b: int) -> torch.Tensor:
    """One block's skew-symmetric Q from its packed strict upper triangle, row by row."""
    q = torch.zeros(b, b, dtype=vec.dtype)
    k = 0
    for i in range(b):
        for j in range(i + 1, b):
            q[i, j], q[j, i] = vec[k], -vec[k]
            k += 1
    return q


# ---- the maths by hand ----------------------------------------------------------------------------------------
def test_skew_packs_the_upper_triangle_row_by_row():
    vec = torch.arange(1.0, 7.0).reshape(1, 6)  # b = 4: 6 numbers
    torch.testing.assert_close(skew(vec, 4)[0], q_by_hand(vec[0], 4), atol=0, rtol=0)
    assert skew(vec, 4)[0, 0, 1] == 1 and skew(vec, 4)[0, 1, 0] == -1 and skew(vec, 4)[0, 2, 3] == 6


def test_cayley_is_the_paper_formula_and_orthogonal():
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(3, 10, generator=g, dtype=torch.float64)  # 3 blocks of 5
    q = skew(vec, 5)
    eye = torch.eye(5, dtype=torch.float64)
    r = cayley(q)
    for i in range(3):
        torch.testing.assert_close(r[i], (eye + q[i]) @ torch.linalg.inv(eye - q[i]), atol=1e-10, rtol=0)
        torch.testing.assert_close(r[i] @ r[i].T, eye, atol=1e-5, rtol=0)
    assert (r - eye).abs().max() > 0.1  # a real rotation, not the identity


def test_cayley_neumann_is_peft_series_and_close_to_cayley_for_small_q():
    g = torch.Generator().manual_seed(1)
    q = skew(0.01 * torch.randn(2, 6, generator=g, dtype=torch.float64), 4)
    eye = torch.eye(4, dtype=torch.float64)
    q2 = q @ q
    expected = {
        1: eye.expand_as(q),
        2: eye + 2 * q,
        3: eye + 2 * q + 2 * q2 + q2 @ q,
        5: eye + 2 * q + 2 * q2 + 2 * q2 @ q + q2 @ q2,
    }
    for terms, value in expected.items():
        torch.testing.assert_close(cayley_neumann(q, terms), value, atol=1e-12, rtol=0)
    torch.testing.assert_close(cayley_neumann(q, 5), cayley(q), atol=1e-5, rtol=0)


def test_coft_projects_each_block_into_the_eps_ball():
    vec = torch.tensor([[3.0, 0.0, 4.0], [1e-6, 0.0, 0.0]])  # b = 3; block 0: |Q|_F = sqrt(2) * 5
    eps = 1e-3
    radius = eps / 2**0.5  # eps / sqrt(k), k = 2 blocks
    out = coft_project(vec, 3, eps)
    torch.testing.assert_close(out[0], vec[0] * radius / (2**0.5 * 5), atol=1e-9, rtol=0)
    torch.testing.assert_close(out[1], vec[1], atol=0, rtol=0)  # inside the ball: unchanged
    torch.testing.assert_close(skew(out, 3)[0].norm(), torch.tensor(radius), atol=1e-9, rtol=0)


# ---- the layer ------------------------------------------------------------------------------------------------
def tiny_linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))


@pytest.mark.parametrize("neumann", [False, True])
def test_the_output_is_w_r_transpose_x_plus_bias_by_hand(neumann):
    base = tiny_linear_model()
    config = OFTConfig(oft_block_size=4, target_modules=["0"], use_cayley_neumann=neumann)
    pm = get_peft_model(copy.deepcopy(base), config)
    perturb_oft(pm, seed=2, scale=0.1)
    layer = pm.model[0]
    assert isinstance(layer, OFTLinear)
    vec = layer.oft_R["default"].weight.detach()  # (2 blocks, 6)
    eye = torch.eye(4)
    blocks = []
    for i in range(2):
        q = q_by_hand(vec[i], 4)
        if neumann:  # peft 0.21's default: the series of (I + Q)(I - Q)^-1
            blocks.append(eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q)
        else:  # peft 0.21's exact path: (I - Q)(I + Q)^-1
            blocks.append((eye - q) @ torch.linalg.inv(eye + q))
    r = torch.block_diag(*blocks)  # (in, in)
    x = torch.randn(3, 8)
    w, bias = base[0].weight, base[0].bias
    torch.testing.assert_close(layer(x), x @ r @ w.T + bias, atol=TOL, rtol=0)  # h = W Rᵀ x + b
    assert (layer(x) - base[0](x)).abs().max() > 1e-2


def test_identity_at_init_block_share_and_r():
    base = tiny_linear_model()
    x = torch.randn(3, 8)
    pm = get_peft_model(copy.deepcopy(base), OFTConfig(r=2, oft_block_size=0, target_modules=["0"]))
    assert pm.model[0].oft_R["default"].weight.shape == (2, 6)  # r = 2 blocks of 4: 4*3/2 = 6 each
    torch.testing.assert_close(pm.model(x), base(x), atol=0, rtol=0)
    shared = get_peft_model(copy.deepcopy(base), OFTConfig(oft_block_size=2, block_share=True, target_modules=["0"]))
    rotation = shared.model[0].oft_R["default"]
    assert rotation.weight.shape == (1, 1)
    with torch.no_grad():
        rotation.weight.fill_(0.3)
    blocks = rotation.blocks()
    assert blocks.shape == (4, 2, 2) and torch.equal(blocks[0], blocks[3])


def test_coft_keeps_the_stored_q_in_the_ball_during_training():
    pm = get_peft_model(tiny_linear_model(), OFTConfig(oft_block_size=4, coft=True, eps=1e-2, target_modules=["0"]))
    rotation = pm.model[0].oft_R["default"]
    with torch.no_grad():
        rotation.weight.fill_(1.0)
    pm.eval()
    pm.model(torch.randn(2, 8))
    assert rotation.weight.max() == 1.0  # eval: the stored vector is not changed
    pm.train()
    pm.model(torch.randn(2, 8)).sum().backward()
    assert skew(rotation.weight.detach(), 4).norm(dim=(1, 2)).max() <= 1e-2 / 2**0.5 + 1e-7
    assert rotation.weight.grad is not None and rotation.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("neumann", [False, True])
def test_merge_then_unmerge_restores_w_and_merged_equals_unmerged(neumann):
    base = tiny_linear_model()
    pm = get_peft_model(copy.deepcopy(base), OFTConfig(oft_block_size=2, target_modules=["0", "2"]))
    pm.add_adapter("b", OFTConfig(r=2, oft_block_size=0, target_modules=["0", "2"], use_cayley_neumann=neumann))
    perturb_oft(pm, seed=5, scale=0.3)
    pm.set_adapter(["default", "b"])
    x = torch.randn(4, 8)
    unmerged = pm.model(x)
    pm.merge_adapter()
    torch.testing.assert_close(pm.model(x), unmerged, atol=TOL, rtol=0)
    pm.unmerge_adapter()
    for i in (0, 2):
        torch.testing.assert_close(pm.model[i].base_layer.weight, base[i].weight, atol=1e-6, rtol=0)


def test_larger_conv2d_kernels_and_embedding_are_refused_naming_the_module():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Embedding(10, 4))
    with pytest.raises(ConfigError, match=r"'0' \(Conv2d\).*nn.Linear"):
        get_peft_model(model, OFTConfig(oft_block_size=2, target_modules=["0"]))
    with pytest.raises(TargetNotFoundError):
        get_peft_model(nn.Sequential(nn.Embedding(10, 4)), OFTConfig(oft_block_size=2, target_modules="all-linear"))


def test_bad_values_are_refused_with_one_error():
    with pytest.raises(ConfigError, match="set exactly one") as err:
        OFTConfig(r=4, oft_block_size=8, module_dropout=1.5, bias="some")
    assert "module_dropout=1.5" in str(err.value) and "bias='some'" in str(err.value)
    with pytest.raises(ConfigError, match="set exactly one"):
        OFTConfig(r=0, oft_block_size=0)


def test_a_size_that_does_not_divide_in_features_becomes_the_nearest_divisor():
    with pytest.warns(UserWarning, match="oft_block_size=5 does not divide in_features=8; using 4"):
        pm = get_peft_model(tiny_linear_model(), OFTConfig(oft_block_size=5, target_modules=["0"]))
    assert pm.model[0].oft_R["default"].block_size == 4


def test_checkpoint_without_task_type_next_to_a_head_is_refused_cleanly(tmp_path):
    """Regression: the meta-device size probe read a modules_to_save copy the probe adapter did not have (KeyError)."""
    pm = get_peft_model(build("bert"), OFTConfig(oft_block_size=8, target_modules=["query"], task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "task_type": None}))
    with pytest.raises(Exception, match="does not fit this model") as err:
        pm.load_adapter(tmp_path, adapter_name="x")
    assert not isinstance(err.value, KeyError)


# ---- peft 0.21 both ways ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("options", [{}, {"use_cayley_neumann": False}, {"coft": True, "eps": 0.5}])
def test_peft_saves_peftkit_loads(kind, options, tmp_path):
    reference = build(kind)
    config = peft.OFTConfig(oft_block_size=8, r=0, target_modules=TARGETS[kind], **options)
    theirs = peft.get_peft_model(copy.deepcopy(reference), config)
    perturb_oft(theirs, seed=3, scale=0.3)  # COFT: well outside its ball, so both project
    theirs.eval()
    inputs = batch(kind)
    expected = output(theirs, inputs)
    assert (expected - output(reference, inputs)).abs().max() > 10 * TOL  # tiny BERT logits are ~0.02
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert isinstance(ours.peft_config["default"], OFTConfig)
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("options", [{}, {"use_cayley_neumann": False, "block_share": True}])
def test_peftkit_saves_peft_loads(kind, options, tmp_path):
    reference = build(kind)
    ours = get_peft_model(
        copy.deepcopy(reference), OFTConfig(oft_block_size=8, target_modules=TARGETS[kind], **options)
    )
    perturb_oft(ours, seed=4, scale=0.3)
    ours.eval()
    inputs = batch(kind)
    expected = output(ours, inputs)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), expected, atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_file = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(peft_file) and all(k.endswith(".oft_R.weight") for k in mine)


def tiny_conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1, stride=2, padding=1))


def test_1x1_conv2d_rotates_each_pixel_merges_and_loads_in_peft_both_ways(tmp_path):
    base = tiny_conv_model()
    x = torch.randn(2, 8, 5, 5)
    ours = get_peft_model(copy.deepcopy(base), OFTConfig(oft_block_size=2, target_modules=["0", "2"]))
    perturb_oft(ours, seed=6, scale=0.3)
    ours.eval()
    rotated = ours.model[0].oft_R["default"](x.movedim(1, -1)).movedim(-1, 1)  # each pixel's channels
    torch.testing.assert_close(ours.model[0](x), base[0](rotated), atol=TOL, rtol=0)
    expected = ours.model(x)
    assert (expected - base(x)).abs().max() > 1e-2
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(x), expected, atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(again.model(x), expected, atol=TOL, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(ours.model(x), expected, atol=TOL, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.model[2].base_layer.weight, base[2].weight, atol=1e-6, rtol=0)


def test_module_dropout_sets_that_share_of_blocks_to_the_identity_in_training_only():
    pm = get_peft_model(tiny_linear_model(), OFTConfig(oft_block_size=2, module_dropout=0.5, target_modules=["0"]))
    rotation = pm.model[0].oft_R["default"]  # 4 blocks of 2
    with torch.no_grad():
        rotation.weight.fill_(0.5)
    eye = torch.eye(2)
    rotation.train()
    dropped = rotation.dropped(rotation.blocks())
    assert sum(torch.equal(block, eye) for block in dropped) == 2  # int(0.5 * 4)
    rotation.eval()
    assert not any(torch.equal(block, eye) for block in rotation.dropped(rotation.blocks()))


def test_bias_oft_only_trains_and_saves_the_wrapped_biases_as_peft(tmp_path):
    reference = build("bert")
    config = OFTConfig(oft_block_size=8, target_modules=["query"], bias="oft_only", task_type="SEQ_CLS")
    ours = get_peft_model(copy.deepcopy(reference), config)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert any("query.base_layer.bias" in n for n in trainable)
    assert not any("value" in n or "key" in n for n in trainable)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "query.base_layer.bias" in name:
                p.add_(torch.randn(p.shape, generator=g))
    perturb_oft(ours, seed=9, scale=0.3)
    ours.eval()
    ours.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith("query.base_layer.bias") for k in keys)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    torch.testing.assert_close(output(theirs, batch("bert")), output(ours, batch("bert")), atol=TOL, rtol=0)
