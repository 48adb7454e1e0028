"""EVA (init_lora_weights="eva"): A from the principal directions of each layer's inputs, ranks redistributed by
explained variance (rho), alphas adjusted; against the formula by hand and against peft 0.21's EVA on the same
weights and batches, files both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import EvaConfig, LoraConfig, PeftModel, get_eva_state_dict, get_peft_model, initialize_lora_eva_weights
from peftkit.errors import ConfigError
from peftkit.methods.lora.eva import IncrementalPCA

R = 2


class Two(nn.Module):
    """Two Linear layers on separate inputs, so each has its own activation spectrum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


def spectrum(scales: list[float], seed: int) -> torch.Tensor:
    """(64, 8) rows with principal standard deviations ``scales`` along random orthogonal directions, plus a mean."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    return torch.randn(64, 8, generator=g) * torch.tensor(scales) @ q.T + 3.0


def by_hand(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions of x (largest-magnitude entry positive) and their explained-variance ratios."""
    centred = x.double() - x.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    vh = vh * torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    return vh, s.square() / centred.square().sum()


def test_a_is_the_top_principal_directions_and_ranks_follow_the_largest_explained_variance():
    x = spectrum([9, 6, 4, 3, 0.5, 0.4, 0.3, 0.2], seed=0)  # a: spread over four directions
    y = spectrum([12, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1, 0.1], seed=1)  # b: one dominant direction
    batches = [{"x": x, "y": y}] * 3  # the same batch again: the components converge at the second step
    config = LoraConfig(r=R, lora_alpha=4, target_modules=["a", "b"], init_lora_weights="eva")
    pm = get_peft_model(Two(), config)
    initialize_lora_eva_weights(pm, batches, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
    (va, ra), (vb, rb) = by_hand(x), by_hand(y)
    ratios = torch.cat([ra[: 2 * R], rb[: 2 * R]])  # rho = 2: up to 2 r components per layer, budget 2 r in all
    top = ratios.argsort(descending=True)[: 2 * R]
    rank_a, rank_b = int((top < 2 * R).sum()), int((top >= 2 * R).sum())
    assert (rank_a, rank_b) == (3, 1)  # the spread-out layer takes more of the budget
    layer_a, layer_b = pm.base_model.model.a, pm.base_model.model.b
    assert (layer_a.r["default"], layer_b.r["default"]) == (rank_a, rank_b)
    torch.testing.assert_close(layer_a.lora_A["default"].weight.double(), va[:rank_a], atol=1e-5, rtol=0)
    torch.testing.assert_close(layer_b.lora_A["default"].weight.double(), vb[:rank_b], atol=1e-5, rtol=0)
    assert layer_a.scaling["default"] == pytest.approx(4 * rank_a / R / rank_a)  # alpha *= new r / r
    saved = pm.peft_config["default"]
    assert saved.rank_pattern == {"a": 3, "b": 1} and saved.alpha_pattern == {"a": 6.0, "b": 2.0}
    with torch.no_grad():  # B = 0: still the base model
        torch.testing.assert_close(pm(x, y), pm.base_model.model.a.base_layer(x) + pm.base_model.model.b.base_layer(y))


def test_whiten_and_rho_one_keep_every_rank_and_divide_by_the_root_singular_values():
    x = spectrum([9, 6, 4, 3, 0.5, 0.4, 0.3, 0.2], seed=0)
    y = spectrum([12, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1, 0.1], seed=1)
    eva = EvaConfig(rho=1.0, whiten=True)
    config = LoraConfig(r=R, target_modules=["a", "b"], init_lora_weights="eva", eva_config=eva)
    state = get_eva_state_dict(
        Two(), [{"x": x, "y": y}] * 3, config, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None
    )
    centred = x.double() - x.double().mean(0)
    _, s, _ = torch.linalg.svd(centred, full_matrices=False)
    s = s * 2**0.5  # fitted twice (converged at the second step): the singular values of the data stacked twice
    vh, _ = by_hand(x)
    assert {k: v.shape[0] for k, v in state.items()} == {"a": R, "b": R}
    torch.testing.assert_close(state["a"].double(), vh[:R] / s[:R].sqrt()[:, None], atol=1e-5, rtol=1e-4)


def test_incremental_pca_keeping_every_component_equals_the_svd_of_all_batches_at_once():
    data = spectrum([5, 4, 3, 2, 1, 0.5, 0.2, 0.1], seed=3)
    pca = IncrementalPCA(8)  # with fewer kept components each step drops the rest: an approximation (Ross et al.)
    for chunk in data.split(16):
        pca.partial_fit(chunk)
    vh, ratios = by_hand(data)
    torch.testing.assert_close(pca.components, vh, atol=1e-8, rtol=0)
    torch.testing.assert_close(pca.explained_variance_ratio, ratios, atol=1e-10, rtol=0)
    torch.testing.assert_close(pca.mean, data.double().mean(0))


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=4,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # one dominant input direction in layer 0's attention, a spread-out one in its MLP
        model.model.layers[0].input_layernorm.weight.copy_(torch.tensor([6.0, 1, 1, 1, 1, 1, 1, 1]))
        model.model.layers[0].post_attention_layernorm.weight.copy_(torch.tensor([3.0, 3, 3, 2, 1, 1, 1, 1]))
    return model


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0  # padding: left out of the SVD
        labels = ids.clone()
        labels[:, :3] = -100  # a prompt: left out under use_label_mask
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


EVA_LLAMA = {"r": R, "lora_alpha": 4, "target_modules": "all-linear", "init_lora_weights": "eva"}


def test_equals_peft_eva_on_the_same_weights_and_batches(tmp_path):
    """rho = 2, r = 2: 4 components from 8 inputs, where peft's randomised SVD (q = 8) is exact."""
    base = llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**EVA_LLAMA))
    peft.initialize_lora_eva_weights(theirs, batches(), show_progress_bar=False)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**EVA_LLAMA))
    initialize_lora_eva_weights(ours, batches())
    their_config, our_config = theirs.peft_config["default"], ours.peft_config["default"]
    assert our_config.rank_pattern == their_config.rank_pattern and our_config.rank_pattern  # ranks moved
    assert our_config.alpha_pattern == pytest.approx(their_config.alpha_pattern)
    their_a = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items() if "lora_A" in k}
    our_a = {k.replace(".default", ""): v for k, v in ours.state_dict().items() if "lora_A" in k}
    assert set(our_a) == set(their_a)
    for key, value in their_a.items():
        torch.testing.assert_close(our_a[key], value, atol=1e-5, rtol=0, msg=key)


def test_eva_files_load_both_ways_with_equal_outputs(tmp_path):
    base = llama()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**EVA_LLAMA))
    initialize_lora_eva_weights(ours, batches())
    with torch.no_grad():  # a trained B, so the adapter does something
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ours.save_pretrained(tmp_path / "ours")
    x = batches()[0]["input_ids"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    expected = ours.eval()(input_ids=x).logits
    assert not torch.allclose(expected, base(input_ids=x).logits, atol=1e-4)
    torch.testing.assert_close(theirs(input_ids=x).logits, expected, atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(back(input_ids=x).logits, expected, atol=1e-5, rtol=0)


def test_misuse_is_refused_by_name():
    pm = get_peft_model(Two(), LoraConfig(r=R, target_modules=["a"]))
    with pytest.raises(ConfigError, match="init_lora_weights='eva'"):
        initialize_lora_eva_weights(pm, [{"x": torch.zeros(4, 8), "y": torch.zeros(4, 8)}])
    with pytest.raises(ConfigError, match=r"rho=0\.5"):
        EvaConfig(rho=0.5)
    with pytest.raises(ConfigError, match="empty dataloader"):
        get_eva_state_dict(Two(), [], LoraConfig(r=R, target_modules=["a"], init_lora_weights="eva"))


def test_an_eva_adapter_routes_per_row_combines_and_reloads_like_any_lora(tmp_path):
    """Item 5 of issue 19: EVA leaves a plain LoRA with per-layer ranks, so per-row routing, add_weighted_adapter
    ('cat' over different ranks) and a save / load round trip work as for any LoRA."""
    base = llama()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**EVA_LLAMA))
    initialize_lora_eva_weights(pm, batches())
    assert len(set(pm.peft_config["default"].rank_pattern.values())) > 1
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    pm.add_adapter("plain", LoraConfig(r=R, target_modules="all-linear", init_lora_weights=False))
    pm.eval()
    x = batches()[0]["input_ids"]
    pm.set_adapter("default")
    eva_out = pm(input_ids=x).logits
    pm.set_adapter("plain")
    plain_out = pm(input_ids=x).logits
    routed = pm(input_ids=x, adapter_names=["default", "plain", "default", "__base__"]).logits
    torch.testing.assert_close(routed[0], eva_out[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], plain_out[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[3], base(input_ids=x).logits[3], atol=1e-5, rtol=0)
    pm.add_weighted_adapter(["default"], [1.0], "copy", combination_type="cat")
    pm.set_adapter("copy")
    torch.testing.assert_close(pm(input_ids=x).logits, eva_out, atol=1e-5, rtol=0)
    pm.save_pretrained(tmp_path, selected_adapters=["default"])
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(input_ids=x).logits, eva_out, atol=1e-5, rtol=0)


def test_batches_too_small_for_the_components_are_refused_instead_of_looping_forever():
    tiny = [{"x": torch.randn(2, 8), "y": torch.randn(2, 8)}] * 2  # 2 tokens, 4 components per layer
    config = LoraConfig(r=R, target_modules=["a", "b"], init_lora_weights="eva")
    with pytest.raises(ConfigError, match="never received more tokens"):
        get_eva_state_dict(Two(), tiny, config, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
