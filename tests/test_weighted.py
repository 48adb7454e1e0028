"""add_weighted_adapter: the tensor formulas of peftkit.core.combine by hand, LoRA's combinations on a model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from models import batch, output, perturb, tiny_llama
from peftkit import LoraConfig, get_peft_model
from peftkit.core.combine import combine_tensors, magnitude_prune, majority_sign, random_prune, svd_factors
from peftkit.core.io import to_file_keys
from peftkit.errors import AdapterNameError, AdapterNotFoundError, ConfigError

T1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
T2 = torch.tensor([-2.0, 1.0, 1.0, 0.1])


# ---- pure functions, by hand ------------------------------------------------------------------------------------
def test_magnitude_prune_keeps_the_largest_entries():
    assert magnitude_prune(torch.tensor([3.0, -1.0, 2.0, -4.0]), 0.5).tolist() == [3.0, 0.0, 0.0, -4.0]
    assert magnitude_prune(T1, 0.2).tolist() == [0.0, 0.0, 0.0, 0.0]  # int(0.2 * 4) = 0 entries kept


def test_linear_and_magnitude_prune_are_weighted_sums():
    expected = [0.5 * 1 + 2 * -2, 0.5 * -2 + 2 * 1, 0.5 * 3 + 2 * 1, 0.5 * 0.5 + 2 * 0.1]
    torch.testing.assert_close(combine_tensors([T1, T2], [0.5, 2.0], "linear"), torch.tensor(expected))
    # density 0.5 keeps T1's (-2, 3) and T2b's (-2, 1)
    t2b = torch.tensor([-2.0, 1.0, 0.9, 0.1])
    got = combine_tensors([T1, t2b], [1.0, 1.0], "magnitude_prune", density=0.5)
    torch.testing.assert_close(got, torch.tensor([-2.0, -1.0, 3.0, 0.0]))


def test_ties_elects_the_sign_of_the_total_and_averages_the_agreeing_entries():
    # sums per entry: -1, -1, 4, 0.6 -> signs -, -, +, +; entry 0: only T2 (-2) agrees; entry 1: only T1 (-2);
    # entry 2: both (3, 1) -> 2; entry 3: both (0.5, 0.1) -> 0.3
    got = combine_tensors([T1, T2], [1.0, 1.0], "ties", density=1.0)
    torch.testing.assert_close(got, torch.tensor([-2.0, -2.0, 2.0, 0.3]))
    # weights apply after the vote: entry 2 -> (2 * 3 + 0.5 * 1) / 2
    got = combine_tensors([T1, T2], [2.0, 0.5], "ties", density=1.0)
    torch.testing.assert_close(got, torch.tensor([-1.0, -4.0, 3.25, 0.525]))


def test_ties_frequency_counts_signs_not_magnitudes():
    t3 = torch.tensor([-0.1, 0.0, 0.0, 0.0])
    stacked = torch.stack([torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-1.0])])
    assert majority_sign(stacked, "total")[:, 0].tolist() == [True, False, False]  # 5 - 1 - 1 > 0
    assert majority_sign(stacked, "frequency")[:, 0].tolist() == [False, True, True]  # two minus signs
    got = combine_tensors([T1, T2, t3], [1.0, 1.0, 1.0], "ties", density=1.0, majority_sign_method="frequency")
    # entry 0 signs (+, -, -) -> minus wins: mean(-2, -0.1); entry 1 signs (-, +, 0) -> tie goes to +: 1
    torch.testing.assert_close(got[:2], torch.tensor([-1.05, 1.0]))


def test_dare_drops_with_bernoulli_masks_and_rescales():
    density = 0.5
    g = torch.Generator().manual_seed(3)
    masks = [torch.bernoulli(torch.full_like(t, density), generator=g) for t in (T1, T2)]  # drawn in the same order
    got = combine_tensors(
        [T1, T2], [0.3, 0.6], "dare_linear", density=density, generator=torch.Generator().manual_seed(3)
    )
    expected = 0.3 * T1 * masks[0] / density + 0.6 * T2 * masks[1] / density
    torch.testing.assert_close(got, expected)
    dropped = [T1 * masks[0] / density, T2 * masks[1] / density]
    got = combine_tensors(
        [T1, T2], [1.0, 1.0], "dare_ties", density=density, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(got, combine_tensors(dropped, [1.0, 1.0], "ties", density=1.0))
    kept = random_prune(torch.ones(10_000), 0.3, rescale=False, generator=torch.Generator().manual_seed(0))
    assert abs(kept.mean().item() - 0.3) < 0.02


def test_svd_factors_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 5, generator=g)
    s = torch.linalg.svdvals(m)
    b, a = svd_factors(m, 2)
    assert b.shape == (6, 2) and a.shape == (2, 5)
    # Eckart-Young: the Frobenius error of the best rank-k approximation is sqrt(sum of the other s_i^2)
    torch.testing.assert_close(torch.linalg.norm(m - b @ a), s[2:].square().sum().sqrt(), rtol=1e-5, atol=1e-5)
    b, a = svd_factors(m, 8)  # above the matrix's rank: exact, zero-padded
    assert b.shape == (6, 8) and a.shape == (8, 5)
    torch.testing.assert_close(b @ a, m, rtol=1e-5, atol=1e-5)


# ---- LoRA on a model ----------------------------------------------------------------------------------------------
CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
W = [0.7, 0.4]


@pytest.fixture(scope="module")
def two():
    pm = get_peft_model(tiny_llama(), LoraConfig(**CFG), adapter_name="a")
    pm.add_adapter("b", LoraConfig(**{**CFG, "lora_alpha": 4}))  # scales 2 and 1
    perturb(pm, "a", seed=0)
    perturb(pm, "b", seed=1)
    return pm.eval()


def layers(pm):
    return [(p, m) for p, m in pm.model.named_modules() if hasattr(m, "lora_A") and "a" in m.lora_A]


def hand_delta(layer, names=("a", "b"), weights=W):
    """sum_i w_i s_i B_i A_i, written out."""
    return sum(w * layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight for n, w in zip(names, weights))


def new_delta(layer, name):
    return layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight


def test_cat_and_full_rank_svd_equal_the_weighted_sum_of_updates(two):
    two.add_weighted_adapter(["a", "b"], W, "cat", combination_type="cat")
    two.add_weighted_adapter(["a", "b"], W, "svd8", combination_type="svd", svd_rank=8)
    for _, layer in layers(two):
        assert layer.r["cat"] == 8 and layer.scaling["cat"] == 1.0
        torch.testing.assert_close(new_delta(layer, "cat"), hand_delta(layer), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(new_delta(layer, "svd8"), hand_delta(layer), atol=1e-5, rtol=1e-4)
    assert two.active_adapters == ["a"], "the new adapter is not made active"


def test_low_rank_svd_error_is_the_dropped_singular_values(two):
    two.add_weighted_adapter(["a", "b"], W, "svd2", combination_type="svd", svd_rank=2)
    for _, layer in layers(two):
        full = hand_delta(layer)
        tail = torch.linalg.svdvals(full)[2:].square().sum().sqrt()
        torch.testing.assert_close(torch.linalg.norm(full - new_delta(layer, "svd2")), tail, atol=1e-5, rtol=1e-4)


def test_linear_combines_factors_with_square_root_weights(two):
    two.add_weighted_adapter(["a", "b"], W, "lin", combination_type="linear")
    for _, layer in layers(two):
        roots = [math.sqrt(w * layer.scaling[n]) for n, w in zip("ab", W)]
        a = roots[0] * layer.lora_A["a"].weight + roots[1] * layer.lora_A["b"].weight
        b = roots[0] * layer.lora_B["a"].weight + roots[1] * layer.lora_B["b"].weight
        torch.testing.assert_close(new_delta(layer, "lin"), b @ a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("linear", {}),
        ("cat", {}),
        ("svd", {"svd_rank": 2}),
        ("ties", {"density": 0.5}),
        ("ties", {"density": 0.7, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.5}),
    ],
)
def test_outputs_equal_peft(two, kind, options):
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**CFG), adapter_name="a")
    ref.add_adapter("b", peft.LoraConfig(**{**CFG, "lora_alpha": 4}))
    for n in "ab":
        peft.set_peft_model_state_dict(ref, to_file_keys(two.adapter_state_dict(n)), adapter_name=n)
    ours = copy.deepcopy(two)
    ours.add_weighted_adapter(["a", "b"], W, "mix", combination_type=kind, **options)
    ref.add_weighted_adapter(["a", "b"], W, "mix", combination_type=kind, **options)
    ours.set_adapter("mix")
    ref.set_adapter("mix")
    inputs = batch("llama")
    torch.testing.assert_close(output(ours, inputs), output(ref.eval(), inputs), atol=1e-5, rtol=0)


def test_dare_ties_on_a_model_is_reproducible_and_changes_the_output(two):
    inputs = batch("llama")
    outs = []
    for seed in (0, 0):
        pm = copy.deepcopy(two)
        torch.manual_seed(seed)
        pm.add_weighted_adapter(["a", "b"], W, "dare", combination_type="dare_ties", density=0.6)
        pm.set_adapter("dare")
        outs.append(output(pm, inputs))
    torch.testing.assert_close(outs[0], outs[1])
    with two.disable_adapter():
        assert not torch.allclose(outs[0], output(two, inputs), atol=1e-4)


def test_bad_requests_name_the_value(two):
    with pytest.raises(ConfigError, match="'nope'"):
        two.add_weighted_adapter(["a", "b"], W, "x", combination_type="nope")
    with pytest.raises(ConfigError, match="density"):
        two.add_weighted_adapter(["a", "b"], W, "x", combination_type="ties")
    with pytest.raises(ConfigError, match="one weight per"):
        two.add_weighted_adapter(["a", "b"], [1.0], "x", combination_type="cat")
    with pytest.raises(AdapterNotFoundError, match="'zz'"):
        two.add_weighted_adapter(["a", "zz"], W, "x", combination_type="cat")
    with pytest.raises(AdapterNameError, match="'a'"):
        two.add_weighted_adapter(["a", "b"], W, "a", combination_type="cat")
    with pytest.raises(ConfigError, match="sqrt"):
        two.add_weighted_adapter(["a", "b"], [1.0, -1.0], "x", combination_type="linear")
    pm = get_peft_model(tiny_llama(), LoraConfig(**CFG), adapter_name="a")
    pm.add_adapter("b", LoraConfig(**{**CFG, "r": 2}))
    with pytest.raises(ConfigError, match="same rank"):
        pm.add_weighted_adapter(["a", "b"], W, "x", combination_type="linear")
    assert "x" not in pm.peft_config and "x" not in two.peft_config, "a failed call must leave no adapter behind"
    pm.add_weighted_adapter(["a", "b"], W, "x", combination_type="cat")  # different ranks are fine for cat
