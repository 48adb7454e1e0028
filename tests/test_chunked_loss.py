"""The chunked causal-LM loss (core/loss.py): transformers' loss and gradients without keeping the logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from peftkit import LoraConfig, PromptTuningConfig, get_peft_model
from peftkit.core.loss import causal_lm_loss, chunked_causal_lm_loss
from peftkit.errors import ConfigError
from tests.models import VOCAB, tiny_gpt2, tiny_llama, tiny_t5


def full_loss(hidden, weight, bias, labels, num_items=None) -> torch.Tensor:
    """transformers' causal-LM loss written out: logits, shift, cross-entropy ignoring -100."""
    logits = F.linear(hidden, weight, bias).float()
    targets = F.pad(labels[..., 1:], (0, 1), value=-100)
    reduction = "mean" if num_items is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
    return loss if num_items is None else loss / num_items


def problem(seed: int = 0, vocab: int = 53) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 37, 16, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=g, requires_grad=True)
    bias = torch.randn(vocab, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 37), generator=g)
    labels[0, :9] = -100  # a prompt left out (assistant-only mask)
    labels[1, 20:23] = -100  # a packed boundary
    return hidden, weight, bias, labels


def grads_of(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("recompute", [False, True], ids=["grads-in-forward", "recompute-in-backward"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_loss_and_gradients_equal_the_full_logits_computation(chunk, recompute):
    hidden, weight, bias, labels = problem()
    want = full_loss(hidden, weight, bias, labels) * 3  # a scaled loss: backward's incoming gradient is not 1
    got = chunked_causal_lm_loss(hidden, weight, labels, chunk, bias=bias, recompute=recompute) * 3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads_of(got, hidden, weight, bias), grads_of(want, hidden, weight, bias), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_num_items_in_batch_divides_the_summed_loss_and_ignored_rows_get_no_gradient(recompute):
    hidden, weight, _, labels = problem(1)
    want = full_loss(hidden, weight, None, labels, num_items=50)
    got = chunked_causal_lm_loss(hidden, weight, labels, 8, num_items_in_batch=50, recompute=recompute)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (grad_h,) = grads_of(got, hidden)
    assert grad_h[0, :8].abs().max() == 0  # positions 0..7 predict masked labels 1..8
    assert grad_h[0, 8].abs().max() > 0  # position 8 predicts label 9, the first kept one
    assert grad_h[:, -1].abs().max() == 0  # the last position predicts nothing


def test_unshifted_labels_are_used_as_the_targets():
    hidden, weight, _, labels = problem(2)
    logits = F.linear(hidden, weight).reshape(-1, weight.shape[0])
    want = F.cross_entropy(logits, labels.reshape(-1))
    torch.testing.assert_close(chunked_causal_lm_loss(hidden, weight, labels, 5, shift=False), want)


def test_only_hidden_and_row_statistics_are_kept_for_backward():
    hidden, weight, _, labels = problem(vocab=4000)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    sizes = {}
    for name, fn in (("chunked", lambda: chunked_causal_lm_loss(hidden, weight, labels, 16)),
                     ("recompute", lambda: chunked_causal_lm_loss(hidden, weight, labels, 16, recompute=True)),
                     ("full", lambda: full_loss(hidden, weight, None, labels))):  # fmt: skip
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        sizes[name] = sum(kept.values())
    logits_bytes = 2 * 37 * 4000 * 4
    assert sizes["full"] >= logits_bytes  # log-softmax's output (and the logits too where they are upcast)
    assert sizes["chunked"] <= hidden.numel() * 4 + weight.numel() * 4  # dL/dh and dL/dW (W trains here)
    assert sizes["recompute"] <= hidden.numel() * 4 + 2 * 37 * 16  # hidden + lse + targets


def test_bad_arguments_are_refused_by_name():
    hidden, weight, _, labels = problem()
    with pytest.raises(ConfigError, match="chunk_size=0"):
        chunked_causal_lm_loss(hidden, weight, labels, 0)
    with pytest.raises(ConfigError, match="do not match"):
        chunked_causal_lm_loss(hidden, weight, labels[:, :5])


def lora_grads(pm, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    out = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-tied-head"])
def test_on_a_peft_model_it_equals_the_models_own_loss_and_gradients(build):
    pm = get_peft_model(build(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    pm.train()
    ids = torch.randint(1, VOCAB, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    torch.manual_seed(0)  # GPT-2's own dropout: the same draws in both runs
    want = pm(**batch).loss
    want_grads = lora_grads(pm, want)
    torch.manual_seed(0)
    got = causal_lm_loss(pm, batch, chunk_size=5)
    assert got.grad_fn is not None and type(got.grad_fn).__name__ == "ChunkedCausalLMLossBackward"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got_grads = lora_grads(pm, got)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_prompt_tuning_virtual_tokens_get_no_loss():
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    ids = torch.randint(1, VOCAB, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    torch.testing.assert_close(causal_lm_loss(pm, batch, 4), pm(**batch).loss, atol=1e-5, rtol=1e-5)


def test_falls_back_to_the_models_loss_where_chunking_would_not_be_exact():
    ids = torch.randint(1, VOCAB, (2, 6))
    head_adapted = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    t5 = tiny_t5()
    for model, batch in (
        (head_adapted, {"input_ids": ids, "labels": ids}),
        (t5, {"input_ids": ids, "labels": ids}),
        (copy.deepcopy(head_adapted), {"input_ids": ids}),
    ):
        out = causal_lm_loss(model, batch)
        want = model(**batch).loss
        assert (out is None and want is None) or (type(out.grad_fn).__name__ != "ChunkedCausalLMLossBackward")
        if want is not None:
            torch.testing.assert_close(out, want)


def test_peftkit_train_computes_the_causal_lm_loss_in_chunks():
    from peftkit.train.losses import causal_lm_loss as train_loss

    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ids = torch.randint(1, VOCAB, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    got = train_loss(pm, batch)
    assert type(got.grad_fn).__name__ == "ChunkedCausalLMLossBackward"
    torch.testing.assert_close(got, pm(**batch).loss, atol=1e-5, rtol=1e-5)
