"""Per-row routing (``adapter_names=``) is local to each call: concurrent calls on one model never mix routings, and
a layer refuses a batch whose size does not match the names (except in generate, where beams repeat rows)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from models import VOCAB, output, perturb, tiny_bert, tiny_llama
from peftkit import BASE, IA3Config, LoraConfig, get_peft_model
from peftkit.errors import RoutingError

THREADS, CALLS = 4, 100


def _mixed_model():
    """Tiny BERT with two LoRA adapters and one (IA)3 adapter, each with non-trivial values."""
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"]), adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["query", "value"]))
    pm.add_adapter("c", IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"]))
    for seed, name in enumerate(("a", "b", "c")):
        perturb(pm, name, seed=seed, scale=0.5)
    return pm.eval()


@pytest.fixture
def one_torch_thread():
    """Each Python thread runs torch on one core (the calls run side by side instead of fighting for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_concurrent_per_row_calls_each_get_their_own_routing(one_torch_thread):
    pm = _mixed_model()
    ids = torch.randint(1, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    routes = [["a", "b", "c", BASE], ["c", "c", "a", "b"], [BASE, "a", "a", "c"], ["b", BASE, "c", "a"]]
    reference = [output(pm, inputs, adapter_names=names) for names in routes]
    assert all(not torch.allclose(reference[0], r) for r in reference[1:])  # the routings differ in their outputs
    barrier, wrong, errors = threading.Barrier(THREADS), [0] * THREADS, []

    def work(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(CALLS):
                got = output(pm, inputs, adapter_names=routes[k])
                wrong[k] += not torch.allclose(got, reference[k], atol=1e-6)
        except Exception as err:  # reported below: a thread's exception would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert wrong == [0] * THREADS
    assert all(layer.routing is None for layer in pm.modules() if hasattr(layer, "adapter_param_names"))


class KeywordModel(nn.Module):
    """A model whose batch comes in a custom keyword (``tokens=``), so PeftModel cannot read its size."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=tokens).logits


def test_per_row_names_that_do_not_match_the_batch_are_refused_without_a_readable_batch():
    pm = get_peft_model(KeywordModel(), LoraConfig(r=4, target_modules=["query"]), adapter_name="a").eval()
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["query"]))
    perturb(pm, "a", seed=1, scale=0.5)
    tokens = torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RoutingError, match="2 entries but a layer saw a batch of 4 rows"):
        pm(tokens=tokens, adapter_names=["a", "b"])
    with torch.no_grad():  # one name per row still routes ("b" is freshly initialised: the base model's output)
        routed = pm(tokens=tokens, adapter_names=["a", "b", "b", "a"])
        pm.set_adapter("a")
        only_a = pm(tokens=tokens)
        with pm.disable_adapter():
            base = pm(tokens=tokens)
    assert not torch.allclose(only_a, base, atol=1e-7)
    assert torch.allclose(routed[[0, 3]], only_a[[0, 3]], atol=1e-7)
    assert torch.allclose(routed[[1, 2]], base[[1, 2]], atol=1e-7)


def test_generate_repeats_each_row_for_beams():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="a").eval()
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(pm, "a", seed=1, scale=1.0)
    perturb(pm, "b", seed=2, scale=1.0)
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    settings = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": 0}
    mixed = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=["a", "b"], **settings)
    for row, name in enumerate(("a", "b")):
        pm.set_adapter(name)
        alone = pm.generate(input_ids=ids[row : row + 1], attention_mask=torch.ones_like(ids[:1]), **settings)
        assert torch.equal(mixed[2 * row : 2 * row + 2], alone)
