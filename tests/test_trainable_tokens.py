"""Trainable tokens: the replaced rows against the formula by hand, tied embeddings, merge, and peft 0.21 interop."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from models import batch, build, output
from peftkit import BASE, PeftModel, TrainableTokensConfig, get_peft_model
from peftkit.errors import ConfigError, MergeError

peft = pytest.importorskip("peft")

TOL = 1e-5
KINDS = ["bert", "llama", "gpt2", "t5"]
ROWS = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31]


def set_rows(pm, adapter: str, seed: int) -> torch.Tensor:
    """Give the adapter's rows random values (one tensor, shared by tied layers); return them."""
    g = torch.Generator().manual_seed(seed)
    (values,) = {id(t): t for t in pm.adapter_state_dict(adapter).values()}.values()
    with torch.no_grad():
        values.copy_(torch.randn(values.shape, generator=g))
    return values.detach().clone()


def embedding_model(vocab: int = 20, dim: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, dim))


def test_the_chosen_rows_are_replaced_and_a_later_adapter_wins():
    model = embedding_model()
    table = model[0].weight.detach().clone()  # (V, D)
    pm = get_peft_model(model, TrainableTokensConfig(target_modules=["0"], token_indices=[2, 5]))
    a = set_rows(pm, "default", seed=0)
    pm.add_adapter("b", TrainableTokensConfig(target_modules=["0"], token_indices=[5, 9]))
    b = set_rows(pm, "b", seed=1)
    ids = torch.tensor([[2, 5, 9, 1], [0, 5, 2, 9]])
    expected = table.clone()
    expected[[2, 5]] = a
    torch.testing.assert_close(pm(ids), expected[ids], atol=0, rtol=0)
    pm.set_adapter(["default", "b"])
    pm.eval()
    expected[[5, 9]] = b  # row 5: the later adapter's
    torch.testing.assert_close(pm(ids), expected[ids], atol=0, rtol=0)
    torch.testing.assert_close(pm(ids, adapter_names=["b", BASE])[1], table[ids[1]], atol=0, rtol=0)


def test_merge_writes_the_rows_and_unmerge_restores_them_and_overlaps_are_refused():
    model = embedding_model()
    table = model[0].weight.detach().clone()
    pm = get_peft_model(model, TrainableTokensConfig(target_modules=["0"], token_indices=[2, 5]))
    a = set_rows(pm, "default", seed=0)
    pm.merge_adapter()
    assert torch.equal(model[0].get_base_layer().weight[[2, 5]], a)
    pm.unmerge_adapter()
    assert torch.equal(model[0].get_base_layer().weight, table)
    pm.add_adapter("b", TrainableTokensConfig(target_modules=["0"], token_indices=[5]))
    with pytest.raises(MergeError, match="both replace token 5"):
        pm.merge_adapter(["default", "b"])
    assert torch.equal(model[0].get_base_layer().weight, table)


def test_no_indices_take_the_special_tokens_of_the_config():
    pm = get_peft_model(build("llama"), TrainableTokensConfig())
    assert pm.peft_config["default"].token_indices == [0, 1, 2]  # pad, bos, eos of the tiny Llama


def test_bad_indices_are_refused_with_the_vocabulary_size():
    with pytest.raises(ConfigError, match="names no special tokens"):
        get_peft_model(embedding_model(), TrainableTokensConfig(target_modules=["0"]))
    with pytest.raises(ConfigError, match=r"more than once"):
        TrainableTokensConfig(token_indices=[1, 1])
    with pytest.raises(ConfigError, match="has 20 rows"):
        get_peft_model(embedding_model(), TrainableTokensConfig(target_modules=["0"], token_indices=[20]))


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_tied_embeddings_share_the_rows_with_the_output_head(kind):
    reference = build(kind)
    pm = get_peft_model(copy.deepcopy(reference), TrainableTokensConfig(token_indices=ROWS)).eval()
    values = set_rows(pm, "default", seed=2)
    model = pm.get_base_model()
    tied = model.lm_head.get_base_layer().weight
    assert tied is model.get_input_embeddings().get_base_layer().weight  # still one tensor
    untied = copy.deepcopy(reference)  # the same model with the rows written into its (tied) weight
    with torch.no_grad():
        untied.get_input_embeddings().weight[ROWS] = values
    inputs = batch(kind)
    torch.testing.assert_close(output(pm, inputs), output(untied, inputs), atol=TOL, rtol=0)
    rows = ["default", BASE, "default", BASE]
    mixed = output(pm, inputs, adapter_names=rows)
    torch.testing.assert_close(mixed[[0, 2]], output(untied, inputs)[[0, 2]], atol=TOL, rtol=0)
    torch.testing.assert_close(mixed[[1, 3]], output(reference, inputs)[[1, 3]], atol=TOL, rtol=0)


def file_keys(folder) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("kind", KINDS)
def test_peftkit_saves_peft_loads_and_back(kind, tmp_path):
    reference = build(kind)
    ours = get_peft_model(copy.deepcopy(reference), TrainableTokensConfig(token_indices=ROWS)).eval()
    set_rows(ours, "default", seed=3)
    inputs = batch(kind)
    expected = output(ours, inputs)
    assert (expected - output(reference, inputs)).abs().max() > 100 * TOL
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == ROWS
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), expected, atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    assert file_keys(tmp_path / "peft") == file_keys(tmp_path / "ours")


@pytest.mark.parametrize("kind", KINDS)
def test_peft_saves_peftkit_loads(kind, tmp_path):
    reference = build(kind)
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.TrainableTokensConfig(token_indices=ROWS))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g))
    theirs.eval()
    inputs = batch(kind)
    expected = output(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert isinstance(ours.peft_config["default"], TrainableTokensConfig)
    torch.testing.assert_close(output(ours, inputs), expected, atol=TOL, rtol=0)
