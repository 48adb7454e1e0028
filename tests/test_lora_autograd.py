"""LoRA's own backward (methods/lora/autograd.py): the same gradients as plain autograd, less kept for backward."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora import autograd
from tests.models import tiny_gpt2, tiny_llama

TOL = dict(atol=1e-6, rtol=1e-6)


def close(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """Equal to 1e-6 relative to the tensor's largest entry (fp32 summation order differs between the paths)."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, atol=1e-6 * scale, rtol=1e-6, msg=lambda m: f"{msg}: {m}")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))


def adapted(base: nn.Module, targets, dropout: float, names=("default",), **config) -> nn.Module:
    kw = dict(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, init_lora_weights=False, **config)
    torch.manual_seed(2)  # the same random A and B each time
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**kw), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, LoraConfig(**{**kw, "r": 3}))
    pm.set_adapter(list(names))
    return pm.train()


def run(model: nn.Module, loss: Callable[[], torch.Tensor], fused: bool, seed: int = 1, **switches) -> dict:
    """Output-loss value and every gradient (inputs included under key 'x') of one seeded forward + backward."""
    with autograd.lora_backward(fused=fused, **switches):
        torch.manual_seed(seed)
        value = loss()
        value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"loss": value.detach(), **grads}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 2
    for key, value in want.items():
        close(got[key], value, key)


def fused_ran(out: torch.Tensor) -> bool:
    """Whether LoraLinearFunction is in ``out``'s graph."""
    todo, seen = [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "LoraLinearFunctionBackward":
            return True
        todo.extend(f for f, _ in node.next_functions)
    return False


def saved_storages(step: Callable[[], torch.Tensor], model: nn.Module) -> int:
    """Bytes of distinct storages autograd keeps during ``step()``, parameters left out."""
    held = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in held:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    out.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_linear_gradients_equal_plain_autograd_with_several_adapters_and_biases(dropout):
    pm = adapted(mlp(), ["0", "2"], dropout, names=("a", "b"), lora_bias=True, bias="all")
    x = torch.randn(5, 7, 16, requires_grad=True)
    out = pm(x)
    assert fused_ran(out)  # the fused path did run

    def loss() -> torch.Tensor:
        return pm(x).square().sum()

    fused, plain = run(pm, loss, True), run(pm, loss, False)
    x.grad, x_grads = None, []
    for switch in (True, False):
        run(pm, loss, switch)
        x_grads.append(x.grad.clone())
        x.grad = None
    assert_same(fused, plain)
    assert fused.keys() >= {"base_model.model.0.lora_A.b.weight", "base_model.model.0.lora_B.a.bias"}
    assert any("base_layer.bias" in k for k in fused)  # bias="all": the base bias trains through the fused path
    close(x_grads[0], x_grads[1])


def test_dropout_draws_the_same_mask_as_the_plain_path_and_varies_between_calls():
    pm = adapted(mlp(), ["0"], 0.5)
    x = torch.randn(6, 16)
    with autograd.lora_backward(fused=True):
        torch.manual_seed(3)
        first, second = pm(x), pm(x)
    with autograd.lora_backward(fused=False):
        torch.manual_seed(3)
        reference = pm(x)
    assert fused_ran(first)
    torch.testing.assert_close(first, reference, atol=0, rtol=0)
    assert not torch.allclose(first, second)  # a fresh mask each call


def test_gpt2_conv1d_gradients_equal_plain_autograd_with_dropout():
    pm = adapted(tiny_gpt2(), ["c_attn", "c_fc"], 0.2)
    ids = torch.randint(0, 100, (2, 9))

    def loss() -> torch.Tensor:
        return pm(input_ids=ids, labels=ids).loss

    assert_same(run(pm, loss, True), run(pm, loss, False))


def test_dropout_no_longer_keeps_a_copy_of_the_input_per_adapted_layer():
    base = tiny_llama()
    ids = torch.randint(0, 100, (2, 16))
    sizes = {}
    for dropout in (0.0, 0.2):
        pm = adapted(base, "all-linear", dropout)
        for fused in (True, False):
            with autograd.lora_backward(fused=fused):
                sizes[dropout, fused] = saved_storages(lambda pm=pm: pm(input_ids=ids, labels=ids).loss, pm)
    assert sizes[0.2, True] <= 1.03 * sizes[0.0, True]  # masks as bits: a few percent at most
    assert sizes[0.2, False] >= 1.2 * sizes[0.0, False]  # plain autograd: a dropped copy + a float mask per layer
    assert sizes[0.0, True] == sizes[0.0, False]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recomputed_inputs_give_the_same_gradients_and_keep_less(dropout):
    pm = adapted(tiny_llama(), "all-linear", dropout)
    ids = torch.randint(0, 100, (2, 16))

    def loss() -> torch.Tensor:
        return pm(input_ids=ids, labels=ids).loss

    assert_same(run(pm, loss, True, recompute_inputs=True), run(pm, loss, False))
    kept = {}
    for recompute in (False, True):
        with autograd.lora_backward(recompute_inputs=recompute):
            torch.manual_seed(1)
            kept[recompute] = saved_storages(loss, pm)
    assert kept[True] < 0.95 * kept[False]
    assert not autograd.lora_backward_settings()["recompute_inputs"]  # the context manager restored the default


def test_input_recipe_reads_products_of_kept_tensors_only():
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    with autograd.lora_backward(recompute_inputs=True):
        recipe = autograd.input_recipe(torch.sigmoid(a) * b)
        assert recipe is not None and torch.equal(autograd._rebuild(autograd._skeleton(recipe), iter(
            autograd._leaves(recipe))), torch.sigmoid(a) * b)  # fmt: skip
        assert autograd.input_recipe(a + b) is None
        assert autograd.input_recipe((a * 2.0).to(torch.float64)) is None  # a cast in between
    assert autograd.input_recipe(torch.sigmoid(a) * b) is None  # off by default


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_dropout_equals_plain_autograd_without_it(reentrant):
    base = tiny_llama()
    ids = torch.randint(0, 100, (2, 12))
    results = []
    for fused, checkpointing in ((False, False), (True, True)):
        pm = adapted(base, ["q_proj", "v_proj", "down_proj"], 0.2)
        if checkpointing:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        pm.train()
        results.append(run(pm, lambda pm=pm: pm(input_ids=ids, labels=ids).loss, fused, recompute_inputs=True))
    assert_same(results[1], results[0])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_torch_compile_gives_the_gradients_of_eager_plain_autograd(dropout):
    pm = adapted(mlp(), ["0", "2"], dropout, names=("a", "b"))
    x = torch.randn(4, 16)
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=False)
    torch._dynamo.reset()
    got = run(pm, lambda: compiled(x).square().sum(), True)
    want = run(pm, lambda: pm(x).square().sum(), False)
    assert_same(got, want)


def test_per_row_routing_keeps_its_path_and_input_gradients():
    pm = adapted(mlp(), ["0", "2"], 0.0, names=("a", "b"))
    pm.eval()  # adapter_names= routes rows at inference; gradients still reach the input
    x = torch.randn(3, 16, requires_grad=True)
    grads, outs = [], []
    for fused in (True, False):
        with autograd.lora_backward(fused=fused):
            out = pm(x, adapter_names=["a", "__base__", "b"])
            out.square().sum().backward()
        outs.append(out.detach())
        grads.append(x.grad.clone())
        x.grad = None
    close(outs[0], outs[1])
    close(grads[0], grads[1])
    with torch.no_grad():
        want = pm.base_model.model[0](x[1:2])  # the __base__ row: the layer's base output, no adapter
    torch.testing.assert_close(pm.base_model.model[0](x)[1:2], want, atol=1e-5, rtol=1e-5)


def test_switching_off_takes_plain_autograd_and_no_grad_takes_the_plain_forward():
    pm = adapted(mlp(), ["0"], 0.1)
    x = torch.randn(2, 16)
    autograd.set_lora_backward(fused=False)
    try:
        assert not fused_ran(pm(x))
    finally:
        autograd.set_lora_backward(fused=True)
    assert fused_ran(pm(x))
    with torch.no_grad():
        assert pm(x).grad_fn is None
    pm.eval()
    torch.testing.assert_close(pm(x), pm(x), atol=0, rtol=0)  # eval: no dropout, same output twice


def test_a_base_weight_that_trains_falls_back_to_plain_autograd():
    pm = adapted(mlp(), ["0"], 0.0)
    layer = pm.base_model.model[0]
    layer.base_layer.weight.requires_grad_(True)
    out = pm(torch.randn(2, 16))
    assert not fused_ran(out)
    out.sum().backward()
    assert layer.base_layer.weight.grad is not None


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fp32_factors_on_a_bf16_base_keep_the_bf16_input_not_an_fp32_copy(dropout):
    base = tiny_llama().to(torch.bfloat16)
    pm = adapted(base, "all-linear", dropout)
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ids = torch.randint(0, 100, (2, 16))

    def loss() -> torch.Tensor:
        return pm(input_ids=ids, labels=ids).loss

    assert fused_ran(pm(input_ids=ids).logits)
    assert_same(run(pm, loss, True), run(pm, loss, False))
    sizes = {}
    for fused in (True, False):
        with autograd.lora_backward(fused=fused):
            torch.manual_seed(1)
            sizes[fused] = saved_storages(loss, pm)
    assert sizes[True] < 0.8 * sizes[False]  # plain autograd keeps each layer's fp32 cast of its input


@pytest.mark.parametrize("shape", [(64, 24), (5, 7), (3, 8)])
def test_dropout_masks_round_trip_through_bits(shape):
    mask = torch.empty(shape).bernoulli_(0.7)
    bits = autograd._pack(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    torch.testing.assert_close(autograd._mask(bits, mask), mask, atol=0, rtol=0)
    flat = torch.nn.functional.pad(mask.reshape(-1), (0, -mask.numel() % 8)).reshape(-1, 8).to(torch.uint8)
    assert torch.equal(bits, (flat << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8))


@pytest.mark.parametrize("shape", [(64, 24), (5, 7)])
def test_drawn_bits_are_f_dropouts_draw(shape):
    x = torch.randn(shape)
    torch.manual_seed(3)
    bits = autograd._draw(x, 0.3)
    torch.manual_seed(3)
    reference = torch.nn.functional.dropout(x, 0.3, training=True)
    torch.testing.assert_close(x * autograd._mask(bits, x) / 0.7, reference)
